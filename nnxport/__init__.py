"""nnxport: port PyTorch / Hugging Face checkpoints to Flax NNX.

Public API (imported lazily, so ``import nnxport`` and ``nnxport --help`` stay fast)::

    nnxport.convert(source, out, ...)   -> ConvertResult
    nnxport.verify(dir)                 -> ParityReport
    nnxport.load(dir)                   -> nnx.Module, ready to call
    nnxport.inspect_keys(source, mapping=None) -> Inspection
    nnxport.draft(source, model=None)   -> Draft (a proposed mapping)
    nnxport.models()                    -> list of families and their mappings
    nnxport.generate(model, input_ids, max_new_tokens=N, ...) -> numpy ids (prompt + new tokens)

Every failure a user can cause is an :class:`NnxportError` (the subclasses below) whose ``str()`` is the
one-line message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nnxport.errors import (
    ConfigError,
    DeviceError,
    MappingError,
    NnxportError,
    OutputError,
    SourceError,
    ValueCheckError,
)

if TYPE_CHECKING:
    from nnxport.api import convert, draft, inspect_keys, load, models, verify
    from nnxport.generation import generate

_API = ("convert", "verify", "load", "inspect_keys", "draft", "models", "generate")


def __getattr__(name: str) -> Any:
    if name == "generate":
        from nnxport.generation import generate

        return generate
    if name in _API:
        from nnxport import api

        return getattr(api, name)
    raise AttributeError(f"module 'nnxport' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "DeviceError",
    "MappingError",
    "NnxportError",
    "OutputError",
    "SourceError",
    "ValueCheckError",
    "convert",
    "draft",
    "generate",
    "inspect_keys",
    "load",
    "models",
    "verify",
]
