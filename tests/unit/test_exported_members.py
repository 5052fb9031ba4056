"""The public names of each package are exactly its sorted ``__all__``, and all import."""

from __future__ import annotations

import importlib
import types

import pytest

PACKAGES = ["router", "router.pkcs11", "router.placement"]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_sorted_and_unique(name: str) -> None:
    exported = importlib.import_module(name).__all__
    assert exported == sorted(exported)
    assert len(exported) == len(set(exported))


@pytest.mark.parametrize("name", PACKAGES)
def test_every_exported_name_is_importable(name: str) -> None:
    module = importlib.import_module(name)
    for member in module.__all__:
        assert getattr(module, member, None) is not None, f"{name}.{member} is in __all__ but missing"
    namespace: dict[str, object] = {}
    exec(f"from {name} import *", namespace)  # what `import *` users get
    assert set(namespace) - {"__builtins__"} == set(module.__all__)


@pytest.mark.parametrize("name", PACKAGES)
def test_every_public_name_is_exported(name: str) -> None:
    module = importlib.import_module(name)
    public = {
        member
        for member, value in vars(module).items()
        if not member.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(module.__all__)
