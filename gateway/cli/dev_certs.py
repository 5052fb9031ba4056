"""``hsmgw dev certs``: a local CA, a server certificate and client certificates for mTLS.

Example:
  hsmgw dev certs --out .hsmgw/tls --client payments-app --client operator

Files (keys mode 0600): ca.pem, ca-key.pem, server.pem, server-key.pem,
client-<name>.pem, client-<name>-key.pem. Existing files are kept, so running it
again with another --client adds that client under the same CA. Each client's
identity is its SAN URI spiffe://hsmgw/<name> (its CN is <name>).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from gateway.cli._common import fail


def _certs(args: argparse.Namespace) -> None:
    from gateway.tls import DEV_SERVER_HOSTS, spiffe_id, write_dev_certs

    try:
        certs = write_dev_certs(
            Path(args.out), args.client, hosts=tuple(args.host) or DEV_SERVER_HOSTS, days=args.days
        )
    except (ValueError, OSError) as exc:
        fail(str(exc))
    # Absolute: a config file reads relative paths from its own directory, not from where this ran.
    def at(path: Path) -> str:
        return str(path.resolve())

    if args.output == "json":
        data = {
            "ca": at(certs.ca),
            "server": {"cert_file": at(certs.server), "key_file": at(certs.server_key)},
            "clients": {
                name: {"identity": spiffe_id(name), "cert_file": at(cert), "key_file": at(key)}
                for name, (cert, key) in certs.clients.items()
            },
            "created": list(certs.created),
        }
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    for item in certs.created:
        print(f"created {item}")
    if not certs.created:
        print(f"certificates in {certs.out} already exist; nothing changed")
    # Quoted for where they go: a TOML string (JSON's escapes are TOML's) and a shell word.
    print(
        "\n[server.tls]\n"
        f"cert_file = {json.dumps(at(certs.server))}\n"
        f"key_file = {json.dumps(at(certs.server_key))}\n"
        f"client_ca_file = {json.dumps(at(certs.ca))}"
    )
    for name, (cert, key) in certs.clients.items():
        print(f"\n# {spiffe_id(name)}\nhsmctl --ca {shlex.quote(at(certs.ca))} --cert {shlex.quote(at(cert))} "
              f"--key {shlex.quote(at(key))} ...")


def add_parser(sub: Any) -> None:
    certs = sub.add_parser(
        "certs", help="make a local CA, server and client certificates (idempotent)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    certs.add_argument("--out", required=True, help="directory for the PEM files")
    certs.add_argument("--client", action="append", default=[], metavar="NAME", help="a client certificate (repeat)")
    certs.add_argument(
        "--host", action="append", default=[], metavar="HOST",
        help="server certificate name or IP (repeat; default 127.0.0.1, ::1, localhost)",
    )
    certs.add_argument("--days", type=int, default=365, help="validity of new certificates (default 365)")
    certs.add_argument("--output", choices=("text", "json"), default="text")
    certs.set_defaults(func=_certs)
