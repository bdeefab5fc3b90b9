"""Transfer: the streaming loop, source tensors read -> ops -> cast -> placed on a device or a mesh."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import jax
import numpy as np

from nnxport import interrupt
from nnxport.mapping.analysis import Assignment, TensorSpec
from nnxport.mapping.ops import Box, Op, Reshape, Stack, Transpose, apply_ops, box_slices, pull_part
from nnxport.placement import (
    cast_checked,
    numpy_dtype,
    put,
    put_parts,
    target_dtype,
)
from nnxport.progress import NO_PROGRESS, PLACE, READ, WRITE, Progress
from nnxport.sources.base import Source

if TYPE_CHECKING:
    from nnxport.pipeline.output import StateWriter
    from nnxport.pipeline.plan import Plan

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
    prog.start(READ, read)
    prog.start(PLACE, placed)
    prog.start(WRITE, placed)


def stacking(chain: _Chain) -> tuple[tuple[Op, ...], Stack, tuple[Op, ...]] | None:
    """A chain that stacks its keys (experts, layers) with only one-tensor ops around the stack: (the ops
    before it, the stack, the ops after it); None for any other chain."""
    cut = next((j for j, op in enumerate(chain.ops) if op.kind == "gather"), None)
    if cut is None or not isinstance(chain.ops[cut], Stack) or len(chain.sources) < 2:
        return None
    before, after = chain.ops[:cut], chain.ops[cut + 1:]
    if any(op.kind != "map" for op in (*before, *after)):
        return None
    return before, chain.ops[cut], after  # type: ignore[return-value]


def _lifted(ops: tuple[Op, ...], count: int) -> list[Op] | None:
    """``ops`` (transposes and reshapes of one piece) as the same ops on ``count`` pieces stacked along a
    new leading axis; None when an op is of another kind."""
    out: list[Op] = []
    for op in ops:
        if isinstance(op, Transpose):
            out.append(Transpose((0, *(p + 1 for p in op.perm))))
        elif isinstance(op, Reshape) and all(isinstance(d, int) for d in op.dims):
            out.append(Reshape((count, *op.dims)))
        else:
            return None
    return out


def stack_in_place(src: Source, chain: _Chain, want: np.dtype, what: str, allow_nonfinite: bool,
                   prog: Progress = NO_PROGRESS) -> np.ndarray | None:
    """The result of a stacking chain (:func:`stacking`) built piece by piece: each key read once, checked
    and cast (:func:`~nnxport.placement.cast_checked`) into its slot of one preallocated array as stored
    (contiguous copies), and dropped; the ops before the stack then run once on the whole, as views (a
    transpose of each piece is a transpose of the stack). Memory holds the target and one piece, not
    every source plus the stacked copy. None for other chains, or ops that cannot be lifted."""
    parts = stacking(chain)
    lifted = None if parts is None else _lifted(parts[0], len(chain.sources))
    if parts is None or lifted is None:
        return None
    _, stack, after = parts
    out = np.empty((len(chain.sources), *chain.shapes[0]), want)
    for slot, key in zip(out, chain.sources, strict=True):
        arr = src.read(key)
        prog.advance(READ, arr.nbytes)
        slot[...] = cast_checked(arr, want, what, allow_nonfinite)
        del arr
    (result,) = apply_ops(lifted, [out])
    result = np.moveaxis(result, 0, stack.axis % result.ndim)
    (result,) = apply_ops(after, [result])
    return result


def _stack_part(src: Source, chain: _Chain, box: Box, prog: Progress) -> np.ndarray | None:
    """``box`` of a stacking chain's result read from only the keys (and the part of each) that fall in
    it: a device holding experts 2..3 reads those two experts. None for other chains, or ops after the
    stack."""
    parts = stacking(chain)
    if parts is None or parts[2]:
        return None
    before, stack, _ = parts
    axis = stack.axis % len(box)
    inner = box[:axis] + box[axis + 1:]
    pieces = []
    for key, shape in list(zip(chain.sources, chain.shapes, strict=True))[box[axis][0]:box[axis][1]]:
        pulled = pull_part(before, shape, 0, inner)
        assert pulled is not None  # one-tensor ops only
        part, steps = pulled
        arr = src.read_box(key, part)
        prog.advance(READ, arr.nbytes)
        for step in steps:
            arr = step(arr)
        pieces.append(arr)
    return np.stack(pieces, axis=axis)


def materialize(src: Source, a: Assignment, chains: dict[str, _Chain], dtype: str,
                 sharding: jax.sharding.Sharding, allow_nonfinite: bool = False,
                 prog: Progress = NO_PROGRESS) -> list[jax.Array]:
    """The placed arrays of ``a.targets`` on one device: the source keys read whole, through the ops (a
    stack of many keys built in place, :func:`stack_in_place`)."""
    chain = chains[a.targets[0]]
    if len(a.targets) == 1:
        what = describe_target(src, chain, a.targets[0])
        want = target_dtype(chain.dtype, dtype, a.target_specs[0].dtype, what)
        stacked = stack_in_place(src, chain, numpy_dtype(want), what, allow_nonfinite, prog)
        if stacked is not None:  # its values were checked piece by piece
            return [put(stacked, want, sharding, what=what, allow_nonfinite=True)]
    read = [src.read(key) for key in chain.sources]
    prog.advance(READ, sum(r.nbytes for r in read))
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
    the chain's ops turn into it (:func:`nnxport.mapping.ops.pull_part`); for a stack, the part of each
    key in the device's range of the stacked axis. Other ops that join several keys (concat) have no such
    part: their result is computed whole, once per process, and cut."""
    whole: list[np.ndarray] = []

    def read(box: Box) -> np.ndarray:
        stacked = _stack_part(src, chain, box, prog)
        if stacked is not None:
            return stacked
        pulled = pull_part(chain.ops, chain.shapes[0], chain.position, box)
        if pulled is None:
            if not whole:
                read = [src.read(k) for k in chain.sources]
                prog.advance(READ, sum(r.nbytes for r in read))
                whole.append(apply_ops(chain.ops, read)[chain.position])
                del read
            return whole[0][box_slices(box)]
        part, steps = pulled
        arr = src.read_box(chain.sources[0], part)
        prog.advance(READ, arr.nbytes)
        for step in steps:
            arr = step(arr)
        return arr

    placed = put_parts(spec.shape, target_dtype(chain.dtype, dtype, spec.dtype, what), sharding, read,
                       what=what, allow_nonfinite=allow_nonfinite)
    src.unmap()  # or the pages read through safetensors' maps stay in RSS: memory would grow with the model
    return placed


def sync_processes(processes: int, name: str) -> None:
    """A barrier across the processes of a multi-process conversion."""
    if processes > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@dataclass
class Transferred:
    """What :func:`transfer` wrote: arrays, bytes, and the dtypes stored (parity's tolerance needs the
    least precise; ``stored``: each target's, for the manifest's ``leaves``)."""

    arrays: int = 0
    nbytes: int = 0
    dtypes: set[str] = field(default_factory=set)
    stored: dict[str, str] = field(default_factory=dict)


def transfer(plan: Plan, writer: StateWriter, *, allow_nonfinite: bool = False,
             progress: Progress = NO_PROGRESS) -> Transferred:
    """Stream every assignment of ``plan`` into ``writer``: the source keys read (each device's part alone
    on a mesh), run through the rule's ops, cast, placed, and queued; the writer writes group by group and
    drops them, so memory stays at about one group whatever the model's size. A signal that a library
    callback swallowed ends the run after the tensor it arrived in (:func:`nnxport.interrupt.check`)."""
    src, dtype, placement = plan.source, plan.dtype, plan.placement
    chains = make_chains(plan.assignments)
    start_streaming(progress, src, plan.assignments, chains, dtype)
    done = Transferred()
    for a in plan.assignments:
        if placement.shardings is not None:
            placed = [put_sharded(src, chains[t], dtype, placement.shardings[t], spec,
                                  describe_target(src, chains[t], t), allow_nonfinite, progress)
                      for t, spec in zip(a.targets, a.target_specs, strict=True)]
        else:
            assert placement.sharding is not None
            placed = materialize(src, a, chains, dtype, placement.sharding, allow_nonfinite, progress)
        for target, arr in zip(a.targets, placed, strict=True):
            done.dtypes.add(str(arr.dtype))
            done.stored[target] = str(arr.dtype)
            done.nbytes += arr.nbytes
            done.arrays += 1
            progress.advance(PLACE, arr.nbytes)
            writer.add(target, arr)
        del placed
        interrupt.check()
    progress.end(READ)
    progress.end(PLACE)
    writer.finish()
    progress.end(WRITE)
    return done
