"""Registry of model families. One module per family; each exports ``FAMILY``."""

from __future__ import annotations

from nnxport.errors import NnxportError
from nnxport.models import resnet
from nnxport.models.base import Family, ParityInput, Tolerance

FAMILIES: dict[str, Family] = {f.name: f for f in (resnet.FAMILY,)}


def get_family(name: str) -> Family:
    """The registered family called ``name``; NnxportError listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise NnxportError(
            f"unknown model family {name!r} (known: {', '.join(sorted(FAMILIES))})"
        ) from None


__all__ = ["FAMILIES", "Family", "ParityInput", "Tolerance", "get_family"]
