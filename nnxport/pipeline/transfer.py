"""Transfer: the streaming loop, source tensors read -> ops -> cast -> placed on a device or a mesh."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import jax
import numpy as np
from flax import nnx

from nnxport.mapping.analysis import Assignment, TensorSpec
from nnxport.mapping.ops import Box, Op, apply_ops, box_slices, pull_part
from nnxport.models import FAMILIES, Family, get_family, resolve_family  # noqa: F401  (callers use api.get_family)
from nnxport.models.base import annotated_shards
from nnxport.placement import (
    numpy_dtype,
    partition_spec,
    put,
    put_parts,
    target_dtype,
)
from nnxport.progress import NO_PROGRESS, Progress
from nnxport.sources.base import Source

log = logging.getLogger("nnxport")


@dataclass(frozen=True)
class _Chain:
    """How one target is computed: its rule's source keys through ``ops``, taking result ``position``."""

    sources: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str
    ops: tuple[Op, ...]
    position: int


def make_chains(assignments: tuple[Assignment, ...]) -> dict[str, _Chain]:
    """Every target's chain. A tie fill is the chain of its ``tied_from`` followed by the tie's ops: it is
    computed from the source keys again rather than kept in memory (analysis puts tie fills after the
    assignment they copy)."""
    chains: dict[str, _Chain] = {}
    for a in assignments:
        for position, target in enumerate(a.targets):
            if a.tied_from is None:
                chains[target] = _Chain(a.sources, tuple(s.shape for s in a.source_specs),
                                        a.source_specs[0].dtype, a.ops, position)
            else:
                base = chains[a.tied_from]
                chains[target] = replace(base, ops=base.ops + a.ops)
    return chains


def describe_target(src: Source, chain: _Chain, target: str) -> str:
    """How errors about one target's values name it: its source keys, their files, the target."""
    files = sorted({src.tensors[k].file.name for k in chain.sources})
    keys = ", ".join(repr(k) for k in chain.sources)
    return f"{', '.join(files)}: tensor {keys} (-> {target})"


def start_streaming(prog: Progress, src: Source, assignments: tuple[Assignment, ...],
                     chains: dict[str, _Chain], dtype: str) -> None:
    """Start the read / place / write phases with their byte totals: the source bytes of every chain read
    (a tie's sources are read again), and the targets' bytes in their stored dtype."""
    read = sum(src.tensors[k].nbytes for a in assignments for k in chains[a.targets[0]].sources)
    # target_dtype refuses a tensor that cannot be stored exactly as asked: here, before any data is read.
    placed = sum(math.prod(spec.shape)
                 * numpy_dtype(target_dtype(chains[t].dtype, dtype, spec.dtype,
                                            describe_target(src, chains[t], t))).itemsize
                 for a in assignments for t, spec in zip(a.targets, a.target_specs, strict=True))
    prog.start("read", read)
    prog.start("place", placed)
    prog.start("write", placed)


def materialize(src: Source, a: Assignment, chains: dict[str, _Chain], dtype: str,
                 sharding: jax.sharding.Sharding, allow_nonfinite: bool = False,
                 prog: Progress = NO_PROGRESS) -> list[jax.Array]:
    """The placed arrays of ``a.targets`` on one device: the source keys read whole, through the ops."""
    chain = chains[a.targets[0]]
    read = [src.read(key) for key in chain.sources]
    prog.advance("read", sum(r.nbytes for r in read))
    arrays = apply_ops(chain.ops, read)
    del read
    if a.tied_from is not None:
        arrays = [arrays[chain.position]]
    placed: list[jax.Array] = []
    for target, spec in zip(a.targets, a.target_specs, strict=True):  # drop each host array once placed
        what = describe_target(src, chains[target], target)
        placed.append(put(arrays.pop(0), target_dtype(chain.dtype, dtype, spec.dtype, what), sharding,
                          what=what, allow_nonfinite=allow_nonfinite))
    return placed


def put_sharded(src: Source, chain: _Chain, dtype: str, sharding: jax.sharding.Sharding,
                 spec: TensorSpec, what: str, allow_nonfinite: bool,
                 prog: Progress = NO_PROGRESS) -> jax.Array:
    """One target laid out by ``sharding``, each device part read on its own: the part of the source that
    the chain's ops turn into it (:func:`nnxport.mapping.ops.pull_part`). Ops that join several keys (concat,
    stack) have no such part: their result is computed whole, once per process, and cut."""
    whole: list[np.ndarray] = []

    def read(box: Box) -> np.ndarray:
        pulled = pull_part(chain.ops, chain.shapes[0], chain.position, box)
        if pulled is None:
            if not whole:
                read = [src.read(k) for k in chain.sources]
                prog.advance("read", sum(r.nbytes for r in read))
                whole.append(apply_ops(chain.ops, read)[chain.position])
                del read
            return whole[0][box_slices(box)]
        part, steps = pulled
        arr = src.read_box(chain.sources[0], part)
        prog.advance("read", arr.nbytes)
        for step in steps:
            arr = step(arr)
        return arr

    placed = put_parts(spec.shape, target_dtype(chain.dtype, dtype, spec.dtype, what), sharding, read,
                       what=what, allow_nonfinite=allow_nonfinite)
    src.unmap()  # or the pages read through safetensors' maps stay in RSS: memory would grow with the model
    return placed


def target_shardings(mapping: str, assignments: tuple[Assignment, ...], mesh: jax.sharding.Mesh,
               abstract: nnx.State) -> dict[str, jax.sharding.NamedSharding]:
    """Every target's sharding on ``mesh``: its rule's ``shard`` where it has one (an override), else the
    model's annotation of the leaf (``out_sharding`` metadata, read from the ``abstract`` state), else
    replicated; each reason a named axis could not be used is logged once per rule."""
    annotated = annotated_shards(abstract)
    out: dict[str, jax.sharding.NamedSharding] = {}
    dropped: dict[tuple[str, str], int] = {}
    for a in assignments:
        label = a.rule.label() if a.rule is not None else f"tie to {a.targets[0]!r}"
        for target, spec in zip(a.targets, a.target_specs, strict=True):
            shard = a.shard if a.shard is not None else annotated.get(target)
            pspec, why = partition_spec(shard, spec.shape, mesh)
            out[target] = jax.sharding.NamedSharding(mesh, pspec)
            for reason in why:
                dropped[(label, reason)] = dropped.get((label, reason), 0) + 1
    for (label, reason), n in dropped.items():
        level = log.info if "not in the mesh" in reason else log.warning
        level("mapping %s: %s: %s (%d target%s): replicated along it", mapping, label, reason, n,
              "" if n == 1 else "s")
    return out


def sync_processes(processes: int, name: str) -> None:
    """A barrier across the processes of a multi-process conversion."""
    if processes > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
