"""Lazy restore: a model whose leaves are read from its Orbax checkpoint block by block, when first used.

Streamed parity (:mod:`nnxport.parity.streamed`) runs the NNX model this way so that only the blocks being
run are in memory. Every Variable holds a :class:`Pending` placeholder and an ``on_get_value`` hook (flax
Variable metadata); the first read of a leaf loads that leaf's *block* (:func:`block_of`: a ``layers.N``-style
list member, or a top-level attribute) with one partial Orbax load of the block's leaves. Blocks are kept
while the cache (NNXPORT_PARITY_CACHE_MB, none by default) has room; beyond it only the most recent one is
held. Run the model under ``jax.disable_jit()`` (:func:`eagerly`): traced code cannot read lazily.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp_v1
from flax import nnx

from nnxport.errors import ConfigError

T = TypeVar("T")
DEFAULT_CACHE_BYTES = 0
#: Blocks at least this large are followed by a cyclic garbage collection when let go of.
COLLECT_BYTES = 32 * 2**20


def cache_bytes() -> int:
    """The block cache of each side of streamed parity in bytes, from NNXPORT_PARITY_CACHE_MB (default 0:
    every block is read again on each use; a cache of the first blocks saved little time and cost its
    size in peak memory)."""
    text = os.environ.get("NNXPORT_PARITY_CACHE_MB", "")
    if not text:
        return DEFAULT_CACHE_BYTES
    if not text.isdigit() or len(text) > 7:
        raise ConfigError(f"NNXPORT_PARITY_CACHE_MB must be a whole number of megabytes, got {text!r}")
    return int(text) * 2**20


def return_freed_memory() -> None:
    """Make glibc hand large freed blocks back to the system at once (a fixed 4 MiB mmap threshold).

    By default glibc raises its mmap threshold each time a large mapped block is freed, so later blocks
    of that size come from the heap, whose freed memory stays in the process: streamed parity frees a
    block's arrays, reads the next and computes on it thousands of times, and RSS crept up by about half a
    block per pass (measured: 0.54 -> 1.30 GB over three passes of a 1B model, flat with the fixed
    threshold). A no-op where the C library is not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 * 2**20)  # M_MMAP_THRESHOLD


def eagerly(fn: Callable[[], T]) -> T:
    """``fn()`` with jit disabled, so that lazy leaves are read in Python order."""
    with jax.disable_jit():
        return fn()



@dataclass(frozen=True)
class Pending:
    """A not-yet-loaded leaf: its dotted path, shape and dtype (an index taken of it is remembered)."""

    path: str
    shape: tuple[int, ...]
    dtype: Any
    index: Any = None

    def __getitem__(self, index: Any) -> Pending:
        return Pending(self.path, self.shape, self.dtype, index)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


def block_of(path: str) -> str:
    """The block a leaf belongs to: the path up to its last integer part (``layers.3`` of
    ``layers.3.attn.q.kernel``), else its first part (``embed``)."""
    parts = path.split(".")
    ints = [i for i, p in enumerate(parts[:-1]) if p.isdigit()]
    return ".".join(parts[: ints[-1] + 1]) if ints else parts[0]


class CheckpointBlocks:
    """Loads blocks of leaves from the Orbax checkpoint at ``path`` on first read, keeping them while
    ``cache`` bytes allow and otherwise only the most recent one."""

    def __init__(self, path: Path, abstract: Mapping[str, jax.ShapeDtypeStruct], sharding: Any,
                 cache: int | None = None) -> None:
        self.path, self.sharding = path.absolute(), sharding
        self.cache = cache_bytes() if cache is None else cache
        self.abstract = dict(abstract)  # dotted path -> ShapeDtypeStruct (the checkpoint's dtype)
        self.members: dict[str, list[str]] = {}
        for p in self.abstract:
            self.members.setdefault(block_of(p), []).append(p)
        self.kept: OrderedDict[str, dict[str, jax.Array]] = OrderedDict()
        self.kept_bytes = 0
        self.current: tuple[str, dict[str, jax.Array]] | None = None
        return_freed_memory()
        self.context = ocp_v1.Context()
        self.context.pytree.loading.partial_load = True  # only the block's leaves

    def leaf(self, path: str) -> jax.Array:
        block = block_of(path)
        if block in self.kept:
            return self.kept[block][path]
        if self.current is not None and self.current[0] == block:
            return self.current[1][path]
        if self.current is not None:
            # Arrays of the block let go of are often held by reference cycles (eager dispatch, nnx
            # graph objects) until the cyclic collector runs: run it now, before the next block is read
            # (for large blocks only: a full collection costs up to a second in a process with many
            # objects, such as a test session, and small blocks are not worth it).
            size = sum(a.nbytes for a in self.current[1].values())
            self.current = None
            if size >= COLLECT_BYTES:
                gc.collect()
        arrays = self._read(block)
        size = sum(a.nbytes for a in arrays.values())
        if self.kept_bytes + size <= self.cache:
            self.kept[block] = arrays
            self.kept_bytes += size
        else:
            self.current = (block, arrays)
        return arrays[path]

    def _read(self, block: str) -> dict[str, jax.Array]:
        tree: dict[Any, Any] = {}
        for p in self.members[block]:
            node = tree
            keys = p.split(".")
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            sds = self.abstract[p]
            node[keys[-1]] = jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=self.sharding)
        with self.context:
            loaded = ocp_v1.load(self.path, tree)
        return flatten(loaded)


def lazy_model(graphdef: Any, abstract: nnx.State, blocks: CheckpointBlocks) -> nnx.Module:
    """The model of ``graphdef`` whose every leaf is read from ``blocks`` when first used (module
    docstring); run it under ``jax.disable_jit()``."""

    def hook(var: Any, value: Any) -> Any:
        if isinstance(value, Pending):
            array = blocks.leaf(value.path)
            return array if value.index is None or value.index is Ellipsis else array[value.index]
        return value

    state = jax.tree.map(lambda x: x, abstract)  # a copy: the plan's abstract state stays as it is
    for path, var in nnx.to_flat_state(state):
        dotted = ".".join(str(p) for p in path)
        if dotted in blocks.abstract:
            sds = blocks.abstract[dotted]
            var.set_value(Pending(dotted, tuple(sds.shape), sds.dtype))
            var.set_metadata("on_get_value", hook)
    return nnx.merge(graphdef, state)


def flatten(tree: Mapping[Any, Any]) -> dict[str, Any]:
    """A nested dict as dotted path -> leaf."""
    out: dict[str, Any] = {}

    def collect(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                collect(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    collect("", tree)
    return out
