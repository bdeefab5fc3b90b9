"""nnxport: port PyTorch / Hugging Face checkpoints to Flax NNX.

Public API (imported lazily, so ``import nnxport`` and ``nnxport --help`` stay fast)::

    nnxport.convert(source, out, ...)   -> ConvertResult
    nnxport.verify(dir)                 -> ParityReport
    nnxport.load(dir)                   -> nnx.Module, ready to call
    nnxport.inspect_keys(source, mapping=None) -> Inspection
    nnxport.models()                    -> list of families and their mappings
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nnxport.errors import ConfigError, MappingError, NnxportError, OutputError, SourceError

if TYPE_CHECKING:
    from nnxport.api import convert, inspect_keys, load, models, verify

_API = ("convert", "verify", "load", "inspect_keys", "models")


def __getattr__(name: str) -> Any:
    if name in _API:
        from nnxport import api

        return getattr(api, name)
    raise AttributeError(f"module 'nnxport' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "MappingError",
    "NnxportError",
    "OutputError",
    "SourceError",
    "convert",
    "inspect_keys",
    "load",
    "models",
    "verify",
]
