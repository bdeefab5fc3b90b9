"""nnxport's installed version (importlib.metadata only: cheap enough for ``nnxport --version``)."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    """The installed distribution's version, or ``0+unknown`` when running from an uninstalled checkout."""
    try:
        return metadata.version("nnxport")
    except metadata.PackageNotFoundError:
        return "0+unknown"
