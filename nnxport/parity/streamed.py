"""Streamed parity: the reference and the NNX model run block by block, never held whole.

Whole-model parity holds the float32 transformers model and the restored NNX model at once (about 5x the
checkpoint's bytes for a bf16 checkpoint). Here each side holds only the blocks it is running (plus a small
cache), so a checkpoint larger than RAM is verified on the machine that converted it:

- **Reference** (:class:`StreamedReference`): the transformers class is built with its parameters on the
  ``meta`` device (its buffers, such as RoPE frequencies, computed for real as usual). Its *blocks* are the
  modules that hold weights directly, or the members of a ``ModuleList`` (a decoder layer), found from the
  top down (:func:`torch_blocks`). A forward pre-hook on each block reads that block's tensors from the
  source's safetensors (in float32, as the whole-model reference) just before it runs, and a forward hook
  drops them after it (kept while the cache has room). Tied weights are read from the source key of the
  tensor they are tied to. Greedy generation runs the same hooked model without a KV cache, one pass per
  new token, with position ids from the attention mask as ``generate`` computes them.
- **NNX model** (:func:`lazy_model`): the model's graph with every Variable holding a :class:`Pending`
  placeholder and an ``on_get_value`` hook (flax's Variable metadata). The first read of a leaf loads that
  leaf's block from the Orbax checkpoint just written (a partial load of the block's leaves); blocks are
  ``layers.N``-style list members or top-level attributes (:func:`block_of`). The harness's ordinary
  ``run_nnx`` and ``nnxport.generate`` run it under ``jax.disable_jit()``, so reads happen in Python order
  and every block is loaded when it is reached.

The comparisons (outputs, per-layer divergence, greedy generation) are those of the whole-model path, from
the same forward passes. What it cannot cover: a reference whose checkpoint keys transformers converts while
loading (fused per-expert tensors and other ``WeightConverter`` layouts), one whose forward reads a block's
weights without calling that block, and custom references; for those the whole-model path is used, and the
choice is logged (:func:`plan_reference`). Each greedy token costs one pass over every weight on both sides.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from nnxport.errors import ConfigError, NnxportError, option
from nnxport.models.base import Family, ParityHarness
from nnxport.parity.generation import Reference
from nnxport.pipeline.lazy import COLLECT_BYTES, cache_bytes, return_freed_memory
from nnxport.quant.view import QuantizedSource
from nnxport.sources.base import Source

log = logging.getLogger("nnxport")

#: Bytes read from the source at a time while a reference block is loaded.
READ_CHUNK = 64 * 2**20


class Unstreamable(Exception):
    """The reference cannot be run block by block (the reason is the message)."""


# ------------------------------------------------------------------------------------------- reference

@contextlib.contextmanager
def _meta_parameters() -> Iterator[None]:
    """Every parameter registered meanwhile is moved to the ``meta`` device as it is registered (before a
    layer's initialiser touches it); buffers stay real."""
    import torch

    register = torch.nn.Module.register_parameter

    def register_on_meta(module: Any, name: str, param: Any) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def torch_blocks(model: Any) -> list[tuple[str, Any]]:
    """``(name, module)`` of the reference's blocks, top down: a module is a block when it holds parameters
    or persistent buffers itself, or is a member of a ``ModuleList``; other modules are looked into."""
    import torch

    out: list[tuple[str, Any]] = []

    def visit(prefix: str, module: Any, in_list: bool) -> None:
        own = any(True for _ in module.parameters(recurse=False)) or any(
            n not in module._non_persistent_buffers_set for n in module._buffers)
        if in_list or own:
            out.append((prefix, module))
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child, isinstance(module, torch.nn.ModuleList))

    for name, child in model.named_children():
        visit(name, child, False)
    return out


@dataclass
class _Block:
    name: str
    module: Any
    #: (owner module, attribute, source key, is_parameter) of every tensor the block reads.
    tensors: list[tuple[Any, str, str, bool]]
    meta: dict[tuple[int, str], Any]
    loaded: bool = False
    nbytes: int = 0


class StreamedReference:
    """The transformers reference of ``family`` with meta parameters, and the hooks that read each block's
    tensors from ``source`` while it runs (module docstring). Use as a context manager; ``model`` is the
    hooked torch model."""

    def __init__(self, family: Family, source: Source, config: Mapping[str, Any], options: Mapping[str, Any],
                 cache: int | None = None) -> None:
        import torch
        import transformers

        from nnxport.parity.layerwise import reference_names

        harness = family.parity
        cls_name = harness.reference_class(config, options)
        cls = getattr(transformers, cls_name)
        transformers.utils.logging.set_verbosity_error()
        cfg = cls.config_class.from_dict(dict(config))
        with _meta_parameters():
            model = cls._from_config(cfg, dtype=torch.float32, **harness.reference_kwargs(config, options))
        self.model, self.name = model.eval(), f"transformers.{cls_name}"
        self.source, self.cache = source, cache_bytes() if cache is None else cache
        self.cached = self.largest = 0
        key_of = {ref: key for key, ref in reference_names(model, source.tensors).items()}
        aliases: dict[int, list[str]] = {}  # parameter -> every name it is shared under (ties)
        for n, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(n)
        self.blocks = [self._block(prefix, module, key_of, aliases) for prefix, module in torch_blocks(model)]
        covered = {n for b in self.blocks for n in _local_names(b.name, b.module)}
        loose = [n for n, _ in model.named_parameters(remove_duplicate=False) if n not in covered]
        if loose:
            raise Unstreamable(f"parameter {loose[0]} is outside every block")
        self._handles: list[Any] = []
        self._kept: set[str] = set()
        return_freed_memory()

    def _block(self, prefix: str, module: Any, key_of: Mapping[str, str], aliases: Mapping[int, list[str]]
               ) -> _Block:
        """The tensors of block ``prefix``: each parameter's source key (``key_of``: reference name ->
        source key; a tied parameter: the key of any name it is shared under), each persistent buffer's
        when the source has one."""
        tensors: list[tuple[Any, str, str, bool]] = []
        meta: dict[tuple[int, str], Any] = {}
        for local, owner, attr, is_param in _members(module):
            full = f"{prefix}.{local}"
            if is_param:
                shared = aliases.get(id(owner._parameters[attr]), [full])
                key = next((key_of[n] for n in [full, *shared] if n in key_of), None)
                if key is None:
                    raise NnxportError(f"parity: the reference {self.name} did not find its weight {full} in "
                                       f"the source; use {option('parity', False)} to skip parity")
            elif full in key_of:
                key = key_of[full]
            else:
                continue  # a buffer the checkpoint does not carry keeps its constructed value
            tensors.append((owner, attr, key, is_param))
            meta[(id(owner), attr)] = (owner._parameters if is_param else owner._buffers)[attr]
        return _Block(prefix, module, tensors, meta)

    def __enter__(self) -> StreamedReference:
        for block in self.blocks:
            self._handles.append(block.module.register_forward_pre_hook(
                lambda m, args, b=block: self._load(b)))
            self._handles.append(block.module.register_forward_hook(
                lambda m, args, out, b=block: self._done(b)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for block in self.blocks:
            self._release(block)
        self._kept.clear()
        self.cached = 0
        if self.largest >= COLLECT_BYTES:
            gc.collect()  # blocks held by reference cycles go now, before the NNX side runs

    def _load(self, block: _Block) -> None:
        import torch

        if block.loaded:
            return
        for owner, attr, key, is_param in block.tensors:
            old = block.meta[(id(owner), attr)]
            shape = tuple(self.source.tensors[key].shape)
            if shape != tuple(old.shape):
                raise NnxportError(f"parity: {key} has shape {shape} in the source, the reference's "
                                   f"{block.name} expects {tuple(old.shape)}")
            tensor = self._read(key, torch.float32 if old.is_floating_point() else old.dtype)
            if is_param:
                owner._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
            else:
                owner._buffers[attr] = tensor.to(old.dtype)
            block.nbytes += tensor.nbytes
        block.loaded = True
        self.largest = max(self.largest, block.nbytes)

    def _read(self, key: str, dtype: Any) -> Any:
        """Source tensor ``key`` as a new torch tensor of ``dtype``, read and converted in runs of rows of
        about :data:`READ_CHUNK` bytes (never a whole second copy in the stored dtype)."""
        import torch

        info = self.source.tensors[key]
        if not info.shape or info.nbytes <= READ_CHUNK:
            return _as_torch(self.source.read(key)).to(dtype).reshape(info.shape)
        out = torch.empty(info.shape, dtype=dtype)
        rows = info.shape[0]
        step = max(1, READ_CHUNK // max(1, info.nbytes // rows))
        rest = [(0, d) for d in info.shape[1:]]
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            out[start:stop] = _as_torch(self.source.read_box(key, [(start, stop), *rest]))
        return out

    def _done(self, block: _Block) -> None:
        """After a block ran: keep it while the cache has room, else drop its tensors."""
        if block.nbytes and self.cached + block.nbytes <= self.cache and block.name not in self._kept:
            self._kept.add(block.name)
            self.cached += block.nbytes
        elif block.name not in self._kept:
            self._release(block)

    def _release(self, block: _Block) -> None:
        for owner, attr, _key, is_param in block.tensors:
            (owner._parameters if is_param else owner._buffers)[attr] = block.meta[(id(owner), attr)]
        block.loaded, block.nbytes = False, 0

    def generate(self, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> Reference:
        """Greedy ``new_tokens`` without a KV cache (one hooked pass each), positions from the mask as
        transformers' ``generate`` computes them for left padding."""
        import torch

        tokens, scores = [], []
        ids_t = torch.from_numpy(ids.astype(np.int64))
        mask_t = torch.from_numpy(mask.astype(np.int64))
        with torch.no_grad():
            for _ in range(new_tokens):
                positions = (mask_t.cumsum(-1) - 1).masked_fill(mask_t == 0, 1)
                logits = self.model(input_ids=ids_t, attention_mask=mask_t, position_ids=positions,
                                    use_cache=False).logits[:, -1].float()
                choice = logits.argmax(-1)
                tokens.append(choice.numpy().astype(np.int32))
                scores.append(logits.numpy())
                ids_t = torch.cat([ids_t, choice[:, None]], dim=1)
                mask_t = torch.cat([mask_t, torch.ones_like(choice)[:, None]], dim=1)
        return Reference(np.stack(tokens, axis=1), np.stack(scores, axis=1))


def _as_torch(array: np.ndarray) -> Any:
    """A numpy array (bf16 from ml_dtypes included) as a torch tensor sharing its memory."""
    import ml_dtypes
    import torch

    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def _members(module: Any) -> Iterator[tuple[str, Any, str, bool]]:
    """(name within ``module``, owning submodule, attribute, is_parameter) of every parameter and
    persistent buffer, shared ones once per owner."""
    for sub_name, sub in module.named_modules(remove_duplicate=False):
        for attr in sub._parameters:
            if sub._parameters[attr] is not None:
                yield (f"{sub_name}.{attr}" if sub_name else attr), sub, attr, True
        for attr in sub._buffers:
            if sub._buffers[attr] is not None and attr not in sub._non_persistent_buffers_set:
                yield (f"{sub_name}.{attr}" if sub_name else attr), sub, attr, False


def _local_names(prefix: str, module: Any) -> Iterator[str]:
    for local, _owner, _attr, is_param in _members(module):
        if is_param:
            yield f"{prefix}.{local}"


#: Above this estimate of what whole-model parity holds (the float32 reference plus the NNX model in the
#: stored dtype), parity is streamed (NNXPORT_PARITY_MODE=auto, the default).
WHOLE_LIMIT_BYTES = 2**30
MODES = ("auto", "streamed", "whole")


def parity_mode() -> str:
    """NNXPORT_PARITY_MODE: ``auto`` (streamed above :data:`WHOLE_LIMIT_BYTES`), ``streamed`` or
    ``whole``."""
    mode = os.environ.get("NNXPORT_PARITY_MODE", "") or "auto"
    if mode not in MODES:
        raise ConfigError(f"NNXPORT_PARITY_MODE must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def whole_bytes(source: Source) -> int:
    """What whole-model parity holds: every tensor in float32 (the reference) plus as stored (the NNX
    model)."""
    return sum(4 * math.prod(t.shape) + t.nbytes for t in source.tensors.values())


def plan_reference(family: Family, source: Source, config: Mapping[str, Any], options: Mapping[str, Any]
                   ) -> StreamedReference | None:
    """The streamed reference, or None where the whole-model path is used (NNXPORT_PARITY_MODE, the size of
    the model, or a reference that cannot be streamed: logged with the reason)."""
    mode, size = parity_mode(), whole_bytes(source)
    if mode == "whole" or (mode == "auto" and size <= WHOLE_LIMIT_BYTES):
        log.info("parity: whole-model (%s, about %.2f GB held)", "NNXPORT_PARITY_MODE=whole"
                 if mode == "whole" else "it fits", size / 1e9)
        return None
    why = _unstreamable(family, source)
    reference = None
    if why is None:
        try:
            reference = StreamedReference(family, source, config, options)
        except Unstreamable as e:
            why = str(e)
    if why is not None:
        log.warning("parity: whole-model, about %.2f GB held (cannot stream: %s)", size / 1e9, why)
    else:
        log.info("parity: streamed, block by block (%d reference blocks)",
                 len(reference.blocks) if reference else 0)
    return reference


def _unstreamable(family: Family, source: Source) -> str | None:
    if type(family.parity).load_reference is not ParityHarness.load_reference:
        return "the family loads its own reference"
    if any(not f.name.endswith(".safetensors") for f in source.files):
        return "the source is not safetensors"
    if isinstance(source, QuantizedSource):  # its reference checks nnxport's dequantization
        return "a quantized source's reference is dequantized by transformers' own functions"
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: F401
    except ImportError:
        return "transformers lacks its conversion mapping"
    return None
