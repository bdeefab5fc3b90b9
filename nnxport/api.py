"""The public API: convert, verify, load, inspect_keys, draft, models (the CLI is a thin layer over it).

Each function composes the pipeline's steps (:mod:`nnxport.pipeline`): resolve, plan, transfer into the
staged output, parity, commit. The steps are importable and tested on their own; this only orders them."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from nnxport import interrupt
from nnxport.errors import NnxportError, option
from nnxport.mapping.analysis import Analysis
from nnxport.mapping.draft import Draft, draft_mapping
from nnxport.mapping.schema import Mapping, select_mapping
from nnxport.models import FAMILIES, resolve_family
from nnxport.parity.report import ParityReport
from nnxport.parity.run import run_parity, weakest_dtype
from nnxport.parity.streamed import plan_reference
from nnxport.pipeline.manifest import build_manifest, manifest_family, read_manifest, recorded_source
from nnxport.pipeline.output import (
    CHECKPOINT,
    MANIFEST,
    OutputDir,
    check_target,
    restore_lazily,
    restore_model,
    restore_state,
    write_json,
    write_reports,
)
from nnxport.pipeline.plan import (
    STATE_FILTER,
    Plan,
    analyse,
    build_abstract,
    builtin_mappings,
    make_plan,
    plan_model,
    recorded_assignments,
    source_specs,
    target_specs,
)
from nnxport.pipeline.resolve import (
    check_unchanged,
    default_out,
    protected_paths,
    require_config,
    resolve_source,
)
from nnxport.pipeline.transfer import Transferred, sync_processes, transfer
from nnxport.placement import default_sharding, init_distributed, parse_mesh, resolve_device
from nnxport.progress import LOAD, NO_PROGRESS, PARITY, PLAN, RESOLVE, WRITE, Progress
from nnxport.sources.base import Source
from nnxport.version import version

__all__ = ["ConvertResult", "Inspection", "convert", "draft", "inspect_keys", "load", "models", "verify",
           "version"]

log = logging.getLogger("nnxport")


# ------------------------------------------------------------------------------------------------ convert

@dataclass
class ConvertResult:
    out: Path
    manifest: dict[str, Any]
    parity: ParityReport | None
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        return None if self.parity is None else self.parity.passed

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "source": self.manifest["source"]["spec"],
            "mapping": self.manifest["mapping"]["name"],
            "family": self.manifest["model"]["family"],
            "dtype": self.manifest["dtype"],
            "tensors": self.manifest["tensors"],
            "bytes": self.manifest["bytes"],
            "parity": None if self.parity is None else self.parity.to_json(),
            "timings_s": self.timings_s,
        }


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str, progress: Progress | None = None) -> Iterator[None]:
    """Time the block into ``timings[name]``; report it to ``progress`` as a phase, or log the time when
    there is no reporter (which would say it again)."""
    if progress is not None:
        progress.start(name)
    t = time.perf_counter()
    interrupt.check()
    yield
    interrupt.check()  # a signal lost in a library's callback during the phase ends the run here
    timings[name] = round(time.perf_counter() - t, 3)
    if progress is not None:
        progress.end(name)
    else:
        log.info("%-16s %6.2f s", name, timings[name])


def convert(
    source: str | Path,
    out: str | Path | None = None,
    *,
    mapping: str | Mapping | None = None,
    config: str | Path | None = None,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "keep",
    mesh: str | None = None,
    compression: str = "none",
    parity: bool = True,
    force: bool = False,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    model: str | None = None,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert ``source`` (hub id, folder or .safetensors file) into an output folder ``out``.

    Every mapping problem is reported before any tensor data is read. The returned result's
    ``passed`` is False when parity failed (the folder is still written, with the report).

    ``mesh`` shards each target as its mapping rule's ``shard`` says (replicated where it says nothing),
    and every device's part is read from the file on its own. ``coordinator`` (or JAX_COORDINATOR_ADDRESS)
    makes this one of ``num_processes`` processes of a multi-host conversion (``jax.distributed``): each
    process reads only what its devices hold, all of them write one checkpoint, process 0 the rest of the
    folder; parity is left to ``nnxport verify``.

    ``compression``: the checkpoint's arrays as they are (``none``) or ``zstd``-compressed. ``allow_pickle``
    admits pickle weights (loaded with ``torch.load(weights_only=True)``) where a source has no
    safetensors. NaN / Inf in a source tensor, and a ``dtype`` cast that overflows, are errors naming the
    tensor; ``allow_nonfinite`` converts NaN / Inf as they are. ``progress``
    (:class:`nnxport.progress.Progress`) is told each phase and the bytes read, placed and written.
    """
    prog = NO_PROGRESS if progress is None else progress
    if mesh is not None:
        parse_mesh(mesh)  # a malformed (or empty) mesh fails before anything is read
    processes = init_distributed(coordinator, num_processes, process_id)
    timings: dict[str, float] = {}
    with _timed(timings, RESOLVE, progress):
        src = resolve_source(source, revision, config, allow_pickle)
    log.info("source %s: %d tensors in %d file(s)%s", src.spec, len(src.tensors), len(src.files),
             f" at revision {src.revision}" if src.revision else "")
    with src:
        out_path = Path(out) if out is not None else default_out(src)
        # An unsafe target (the source, an ancestor of it, the current folder) is refused before any work.
        check_target(out_path, protected_paths(src))
        with _timed(timings, PLAN, progress):
            plan = make_plan(src, mapping=mapping, model=model, dtype=dtype, device=device, mesh=mesh,
                             compression=compression, parity=parity, processes=processes)
        with interrupt.deferred():  # a signal while it is made would leave it behind: raised just below
            staging = OutputDir(out_path, force=force, process_index=jax.process_index(),
                                process_count=processes, protect=protected_paths(src, plan.mapping.path))
        with staging:
            interrupt.check()
            sync_processes(processes, "nnxport-staged")
            with _timed(timings, "read_place_write"):
                writer = staging.state_writer(lambda n: prog.advance(WRITE, n), plan.compression)
                done = transfer(plan, writer, allow_nonfinite=allow_nonfinite, progress=prog)
            log.info("checkpoint: %d arrays, %.2f GB in %d group(s)", done.arrays, done.nbytes / 1e9,
                     writer.groups_written)
            manifest = build_manifest(plan, done)
            report = None
            if plan.parity:
                with _timed(timings, PARITY, progress):
                    report = _parity_of_written(plan, staging.staging / CHECKPOINT, done, device)
                write_reports(staging.staging, report, src.spec)
                manifest["parity"] = {"passed": report.passed}
            manifest["timings_s"] = timings
            if staging.primary:
                manifest.update(processes=processes, artifacts=plan.copy_artifacts(staging.staging))
                write_json(staging.staging / MANIFEST, manifest)
            interrupt.check()
            with interrupt.deferred():  # finished: a signal now no longer stops it (nor half-commits it)
                staging.commit()
    log.info("wrote %s", out_path)
    return ConvertResult(out=out_path, manifest=manifest, parity=report, timings_s=timings)


def _parity_of_written(plan: Plan, checkpoint: Path, done: Transferred, device: str) -> ParityReport:
    """Parity on the model restored from the checkpoint just written: it checks what is on disk."""
    home = default_sharding(resolve_device("auto" if plan.placement.shardings is not None else device), None)
    streamed = plan_reference(plan.family, plan.source, plan.config, plan.options)
    if streamed is not None:  # neither side held whole (nnxport.parity.streamed)
        model = restore_lazily(checkpoint, plan.graphdef, plan.abstract, home)
    else:
        restored = restore_state(checkpoint, nnx.to_pure_dict(plan.abstract), home)
        nnx.replace_by_pure_dict(plan.abstract, restored)
        model = nnx.merge(plan.graphdef, plan.abstract)
    return run_parity(plan.family, model, plan.source, plan.config, weakest_dtype(done.dtypes),
                      options=plan.options, assignments=plan.assignments, streamed=streamed)


# ------------------------------------------------------------------------------------------- load, verify

def load(folder: str | Path, *, device: str | None = None, mesh: jax.sharding.Mesh | str | None = None,
         model: str | None = None) -> nnx.Module:
    """Rebuild the model recorded in ``folder`` and restore its weights onto ``device`` (default: the
    device recorded at conversion when jax has it, else jax's default device), or shard them over ``mesh``
    (a Mesh, ``"AXIS=N,..."`` or ``"recorded"``: :mod:`nnxport.pipeline.loading`). The manifest is data:
    a family that is not built in (``package.module:Class``) is imported only when the caller names it as
    ``model``, which overrides the recorded one (with a warning)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    return restore_model(folder, manifest, manifest_family(folder, manifest, model), device, mesh)


def verify(folder: str | Path, *, source: str | Path | None = None, model: str | None = None,
           progress: Progress | None = None) -> ParityReport:
    """Reload ``folder``, check that the recorded (or given) source's files are still those converted
    (sha256 of each, as recorded), rebuild the reference from them, re-run parity and rewrite parity.json
    / parity.md. A changed, missing or extra source file is a SourceError naming it. ``model``: as in
    :func:`load` (a custom class is imported only when named here). ``progress`` is told the phases
    resolve (with the re-hashing), load (with the checkpoint's bytes) and parity."""
    prog = NO_PROGRESS if progress is None else progress
    folder = Path(folder)
    manifest = read_manifest(folder, artifacts=True)  # the copied tokenizer files etc. re-hashed too
    family = manifest_family(folder, manifest, model)
    if not family.parity.has_reference():
        raise NnxportError(f"{folder}: model {family.name} declares no reference (a 'reference' class "
                           "attribute): there is nothing to verify against")
    spec, revision, pickled = recorded_source(manifest, source)
    prog.start(RESOLVE)
    with resolve_source(spec, revision, None, pickled) as src:
        check_unchanged(src, manifest["source"]["files"])
        prog.end(RESOLVE)
        config, options = manifest["model"]["config"], manifest["model"].get("options", {})
        streamed = plan_reference(family, src, config, options)
        prog.start(LOAD, manifest.get("bytes"))
        module = restore_model(folder, manifest, family, lazy=streamed is not None)
        leaves = jax.tree.leaves(nnx.state(module, STATE_FILTER))
        prog.advance(LOAD, sum(leaf.nbytes for leaf in leaves))
        prog.end(LOAD)
        prog.start(PARITY)
        report = run_parity(family, module, src, config, weakest_dtype({str(leaf.dtype) for leaf in leaves}),
                            options=options, assignments=recorded_assignments(manifest, src, module),
                            streamed=streamed)
        prog.end(PARITY)
    write_reports(folder, report, str(manifest["source"]["spec"]))
    manifest["parity"] = {"passed": report.passed}
    write_json(folder / MANIFEST, manifest)
    return report


# ------------------------------------------------------------------------------------------ inspect, models

@dataclass
class Inspection:
    """What :func:`inspect_keys` found. ``source`` is closed (its tensors' metadata stays readable)."""

    source: Source
    mapping: Mapping | None
    analysis: Analysis | None

    def rows(self) -> list[dict[str, Any]]:
        """One dict per source key: key, shape, dtype, status, target (the targets joined by ", "),
        targets, ops, target_shape (when exactly one target), target_shapes, problem, note."""
        if self.analysis is None:
            return [{"key": k, "shape": list(t.shape), "dtype": t.dtype, "status": None, "target": None,
                     "targets": [], "ops": [], "target_shape": None, "target_shapes": [], "problem": None,
                     "note": None}
                    for k, t in self.source.tensors.items()]
        return [{"key": r.key, "shape": list(r.spec.shape), "dtype": r.spec.dtype, "status": r.status,
                 "target": r.target, "targets": list(r.targets), "ops": list(r.ops),
                 "target_shape": None if r.target_shape is None else list(r.target_shape),
                 "target_shapes": [list(s) for s in r.target_shapes], "problem": r.problem, "note": r.note}
                for r in self.analysis.keys]

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source.spec,
            "mapping": None if self.mapping is None else self.mapping.name,
            "keys": self.rows(),
            "unfilled_targets": [] if self.analysis is None else list(self.analysis.unfilled),
            "problems": [] if self.analysis is None else list(self.analysis.problems),
        }


def inspect_keys(
    source: str | Path,
    mapping: str | Mapping | None = None,
    *,
    config: str | Path | None = None,
    revision: str | None = None,
    auto_mapping: bool = True,
    allow_pickle: bool = False,
) -> Inspection:
    """Every source key with shape and dtype and, with a mapping (given, or picked from config.json when
    ``auto_mapping``), where it goes. Mapping problems are reported in the result, not raised."""
    with resolve_source(source, revision, config, allow_pickle) as src:  # closed: the result owns no file
        if mapping is None and (not auto_mapping or src.config is None):
            return Inspection(src, None, None)
        try:
            plan = plan_model(src, mapping)
        except NnxportError:
            if mapping is not None:
                raise
            return Inspection(src, None, None)  # no built-in mapping recognises the source: keys only
        return Inspection(src, plan.mapping, analyse(plan.mapping, src, plan.abstract, plan.config))


def draft(
    source: str | Path,
    model: str | None = None,
    *,
    config: str | Path | None = None,
    revision: str | None = None,
) -> Draft:
    """A mapping suggestion for ``source`` and ``model`` (a family name or ``package.module:Class``;
    default: the family of the built-in mapping config.json picks). See :mod:`nnxport.mapping.draft`."""
    with resolve_source(source, revision, config) as src:
        if model is None:
            try:
                model = select_mapping(src.config, builtin_mappings()).model
            except NnxportError as e:
                raise NnxportError(f"{src.spec}: no model family recognises its config.json ({e.text}); "
                                   f"pass {option('model')} NAME or {option('model')} package.module:Class") \
                    from None
        cfg = require_config(src)
        _, _, abstract = build_abstract(src, resolve_family(model), cfg)
        return draft_mapping(source_specs(src), target_specs(abstract), cfg, model, title=src.spec)


def models() -> list[dict[str, Any]]:
    """Built-in families and the mappings that target them."""
    by_family: dict[str, list[Mapping]] = {}
    for m in builtin_mappings():
        by_family.setdefault(m.model, []).append(m)
    return [{"family": name, "description": f.description,
             "mappings": [{"name": m.name, "match": m.match} for m in by_family.get(name, [])]}
            for name, f in sorted(FAMILIES.items())]
