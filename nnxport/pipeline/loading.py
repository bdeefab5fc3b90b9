"""Where a loaded model's leaves go: one device, or a mesh with a partition spec per leaf.

``nnxport.load(DIR, mesh=...)`` takes a :class:`jax.sharding.Mesh`, an ``"AXIS=N,..."`` string or
``"recorded"`` (the conversion's ``--mesh``, from the manifest). Each leaf's layout is, in order: the
partition spec the manifest records for a ``--mesh`` conversion (``partition_specs``), the layout a
single-device conversion recorded for it (``leaves.<path>.shard``: its mapping rule's ``shard:`` override,
else the model's annotation), else the model's own annotation (``out_sharding`` metadata of the abstract
state, for a manifest that predates ``leaves``); a leaf without one is replicated. Axes the mesh lacks,
and dimensions an axis does not divide, are left whole (as at conversion: :func:`partition_spec`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nnxport.errors import DeviceError, NnxportError, SourceError
from nnxport.models.base import annotated_shards
from nnxport.placement import build_mesh, parse_mesh, partition_spec

log = logging.getLogger("nnxport")
RECORDED = "recorded"

Shard = tuple[tuple[str, ...] | None, ...]


def load_mesh(mesh: Mesh | str, manifest: dict[str, Any], where: Path) -> Mesh:
    """The mesh ``nnxport.load`` restores onto: ``mesh`` itself, built from an ``AXIS=N,...`` string, or
    the manifest's recorded one (``"recorded"``); a DeviceError in one line when this machine has too few
    devices for it."""
    if isinstance(mesh, Mesh):
        return mesh
    if not isinstance(mesh, str):
        raise NnxportError(f"mesh={mesh!r}: expected a jax.sharding.Mesh, 'AXIS=N,...' or 'recorded'")
    if mesh.strip() != RECORDED:
        return build_mesh(parse_mesh(mesh))
    axes = manifest.get("mesh")
    if axes is None:
        raise NnxportError(f"{where}: mesh='recorded', but this folder was converted on one device "
                           f"({manifest.get('device', '?')}) and records no mesh; pass mesh='AXIS=N,...' or "
                           "a jax.sharding.Mesh")
    shown = ",".join(f"{k}={v}" for k, v in axes.items())
    try:
        return build_mesh(axes)
    except DeviceError:
        raise DeviceError(f"{where}: the recorded mesh {shown} needs {math.prod(axes.values())} devices, "
                          f"jax sees {len(jax.devices())}; pass a smaller mesh='AXIS=N,...'") from None


def _as_shard(spec: list[Any], ndim: int, field: str) -> Shard:
    """A manifest's per-dimension layout (null, an axis, or a list of axes), padded to ``ndim``."""
    if len(spec) > ndim:
        raise SourceError(f"{field}: {len(spec)} entries for a leaf of {ndim} dimensions")
    dims = [None if d is None else (d,) if isinstance(d, str) else tuple(d) for d in spec]
    return tuple(dims + [None] * (ndim - len(dims)))


def leaf_shardings(manifest: dict[str, Any], abstract: nnx.State, mesh: Mesh, where: Path
                   ) -> dict[str, NamedSharding]:
    """Every leaf's NamedSharding on ``mesh``, by dotted path (see the module's docstring)."""
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(abstract)}
    recorded = manifest.get("partition_specs") if "mesh" in manifest else None
    leaves = manifest.get("leaves") or {}
    annotated = annotated_shards(abstract)
    out: dict[str, NamedSharding] = {}
    dropped: dict[str, int] = {}
    for dotted, leaf in flat.items():
        ndim = len(leaf.shape)
        shard: Shard | None
        if recorded is not None:
            spec = recorded.get(dotted)
            shard = None if spec is None else _as_shard(spec, ndim, f"{where}: partition_specs.{dotted}")
        elif leaves:
            spec = (leaves.get(dotted) or {}).get("shard")
            shard = None if spec is None else _as_shard(spec, ndim, f"{where}: leaves.{dotted}.shard")
        else:
            shard = annotated.get(dotted)
        pspec, why = partition_spec(shard, tuple(leaf.shape), mesh)
        out[dotted] = NamedSharding(mesh, pspec)
        for reason in why:
            dropped[reason] = dropped.get(reason, 0) + 1
    for reason, n in dropped.items():
        (log.info if "not in the mesh" in reason else log.warning)(
            "load: %s (%d leaf%s): replicated along it", reason, n, "" if n == 1 else "s")
    return out


def tag_shardings(state: nnx.State, shardings: dict[str, NamedSharding]) -> None:
    """Record each leaf's partition spec as its ``out_sharding`` metadata, so that
    ``nnx.get_partition_spec(nnx.state(model))`` says where the restored arrays are."""
    for path, var in nnx.to_flat_state(state):
        sharding = shardings.get(".".join(map(str, path)))
        if sharding is not None:
            spec: PartitionSpec = sharding.spec
            var.set_metadata(out_sharding=tuple(spec))
