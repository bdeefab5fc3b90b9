"""nnxport: port PyTorch / Hugging Face checkpoints to Flax NNX.

Public API (imported lazily, so ``import nnxport`` and ``nnxport --help`` stay fast)::

    nnxport.convert(source, out, ...)   -> ConvertResult
    nnxport.verify(dir)                 -> ParityReport
    nnxport.load(dir)                   -> nnx.Module, ready to call
    nnxport.inspect_keys(source, mapping=None) -> Inspection
    nnxport.draft(source, model=None)   -> Draft (a proposed mapping)
    nnxport.models()                    -> list of families and their mappings
    nnxport.seed_dropout(model, seed)   -> model, its dropout layers given fresh random streams
    nnxport.check_inputs(model, input_ids) -> raise ValueError for ids or lengths the model cannot take
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
    from nnxport.models.inputs import check_inputs
    from nnxport.models.layers import seed_dropout

_API = ("convert", "verify", "load", "inspect_keys", "draft", "models", "generate")


def __getattr__(name: str) -> Any:
    if name == "generate":
        from nnxport.generation import generate

        return generate
    if name in _API:
        from nnxport import api

        return getattr(api, name)
    if name == "seed_dropout":
        from nnxport.models.layers import seed_dropout

        return seed_dropout
    if name == "check_inputs":
        from nnxport.models.inputs import check_inputs

        return check_inputs
    raise AttributeError(f"module 'nnxport' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "DeviceError",
    "MappingError",
    "NnxportError",
    "OutputError",
    "SourceError",
    "ValueCheckError",
    "check_inputs",
    "convert",
    "draft",
    "generate",
    "inspect_keys",
    "load",
    "models",
    "seed_dropout",
    "verify",
]
