"""Put the same trusted wrapping key on every token of a fleet (its own process).

Replication and the EXTERNAL tier wrap keys under one AES key that every cluster
holds, marked CKA_TRUSTED by the security officer; keys are created with
CKA_WRAP_WITH_TRUSTED so that only such a key can wrap them, and its
CKA_UNWRAP_TEMPLATE makes every key unwrapped with it private, sensitive and
again wrappable only so (``router.pkcs11._guard``). For the local fleet
the key value is drawn here, imported into each token by its SO, and dropped;
it is never written anywhere. (With real HSMs this is a key ceremony.)

Runs as ``python -m gateway._provision`` so the PKCS #11 module is initialised
with this fleet's SOFTHSM2_CONF and not the caller's. Input on stdin (JSON):
``{"module": PATH, "env": {...}, "so_pins": {label: pin}}`` — PINs never go on
a command line. Output on stdout (JSON): ``{"created": [labels]}``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from router.pkcs11._guard import CKA_UNWRAP_TEMPLATE, GUARD
from router.pkcs11.pool import WRAPPING_KEY_LABEL


def _has_wrapping_key(module: Any, label: str) -> bool:
    from pkcs11 import Attribute

    session = module.token(label).open()
    try:
        return any(True for _ in session.get_objects({Attribute.LABEL: WRAPPING_KEY_LABEL}))
    finally:
        session.close()


def provision(request: dict[str, Any]) -> list[str]:
    from pkcs11 import Attribute, KeyType, ObjectClass

    os.environ.update(request.get("env", {}))
    from router.pkcs11 import load_module

    module = load_module(request["module"])
    so_pins: dict[str, str] = request["so_pins"]
    have = {label: _has_wrapping_key(module, label) for label in so_pins}
    if all(have.values()):
        return []
    if any(have.values()):
        missing = ", ".join(sorted(label for label, ok in have.items() if not ok))
        raise SystemExit(
            f"tokens {missing} lack the replication wrapping key the others hold; rebuild the fleet with --force"
        )
    if module.unwrap_guard is None:
        raise SystemExit(f"{request['module']}: its function list cannot write an unwrap template")
    value = os.urandom(32)
    for label, so_pin in so_pins.items():
        session = module.token(label).open(rw=True, so_pin=so_pin)
        try:
            module.unwrap_guard.create(
                session,
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.VALUE: value,
                    Attribute.TOKEN: True,
                    # Created by the SO, so a public object; sensitive, never extractable.
                    Attribute.PRIVATE: False,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.TRUSTED: True,
                    Attribute.WRAP: True,
                    Attribute.UNWRAP: True,
                    Attribute.ENCRYPT: False,
                    Attribute.DECRYPT: False,
                    Attribute.SIGN: False,
                    Attribute.VERIFY: False,
                    Attribute.DERIVE: False,
                    Attribute.MODIFIABLE: False,
                    Attribute.LABEL: WRAPPING_KEY_LABEL,
                    Attribute.ID: WRAPPING_KEY_LABEL.encode(),
                    # Every key unwrapped with it is private, sensitive and wrappable only with a trusted
                    # key: a PIN holder cannot unwrap one in the clear, and a session with no login (this
                    # key is public) cannot unwrap one at all (router.pkcs11._guard).
                    CKA_UNWRAP_TEMPLATE: GUARD,
                },
            )
        finally:
            session.close()
    del value
    return sorted(so_pins)


def main() -> None:
    request = json.load(sys.stdin)
    created = provision(request)
    json.dump({"created": created}, sys.stdout)


if __name__ == "__main__":
    main()
