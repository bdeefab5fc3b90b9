"""Registry of model families: every module in this package that defines ``FAMILY`` (one file per family:
its spec, modules, Family and parity harness; see :mod:`nnxport.models.base`)."""

from __future__ import annotations

import importlib
import pkgutil

from nnxport.errors import NnxportError
from nnxport.models.base import Family, ParityHarness, ParityInput, Tolerance


def _discover() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if isinstance(family, Family):
            found[family.name] = family
    return found


FAMILIES: dict[str, Family] = _discover()


def get_family(name: str) -> Family:
    """The registered family called ``name``; NnxportError listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise NnxportError(
            f"unknown model family {name!r} (known: {', '.join(sorted(FAMILIES))})"
        ) from None


def resolve_family(name: str) -> Family:
    """A registered family, or for an import path ``package.module:Class`` the user's NNX class as a family
    (:mod:`nnxport.models.custom`)."""
    from nnxport.models.custom import CustomFamily, is_import_path

    return CustomFamily(name) if is_import_path(name) else get_family(name)


__all__ = ["FAMILIES", "Family", "ParityHarness", "ParityInput", "Tolerance", "get_family", "resolve_family"]
