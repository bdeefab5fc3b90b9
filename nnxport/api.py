"""The public API: convert, verify, load, inspect_keys, models. The CLI is a thin layer over this."""

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
from nnxport.errors import ConfigError, MappingError, NnxportError, SourceError, one_line
from nnxport.mapping.analysis import Analysis, analyze
from nnxport.mapping.draft import Draft, draft_mapping
from nnxport.mapping.schema import Mapping, select_mapping
from nnxport.models import FAMILIES, Family, get_family, resolve_family  # noqa: F401  (callers use api.get_family)
from nnxport.parity.report import ParityReport
from nnxport.parity.run import run_parity
from nnxport.pipeline.manifest import build_manifest, manifest_family, read_manifest
from nnxport.pipeline.output import (
    CHECKPOINT,
    MANIFEST,
    OutputDir,
    StateWriter,
    check_target,
    restore_state,
    write_json,
    write_reports,
)
from nnxport.pipeline.plan import (
    STATE_FILTER,
    abstract_state,
    builtin_mappings,
    family_for,
    recorded_assignments,
    resolve_mapping,
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
from nnxport.pipeline.transfer import (
    describe_target,
    make_chains,
    materialize,
    put_sharded,
    start_streaming,
    sync_processes,
    target_shardings,
)
from nnxport.placement import (
    build_mesh,
    check_dtype,
    default_sharding,
    init_distributed,
    parse_mesh,
    resolve_device,
)
from nnxport.progress import NO_PROGRESS, Progress
from nnxport.sources.base import Source
from nnxport.sources.folder import open_source
from nnxport.sources.pickled import PICKLE_SUFFIXES

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

    ``allow_pickle`` admits pickle weights (loaded with ``torch.load(weights_only=True)``) where a source
    has no safetensors. NaN / Inf in a source tensor, and a ``dtype`` cast that overflows, are errors
    naming the tensor; ``allow_nonfinite`` converts NaN / Inf as they are.

    ``progress`` (:class:`nnxport.progress.Progress`) is told each phase and the bytes read, placed and
    written.
    """
    prog = NO_PROGRESS if progress is None else progress
    if mesh is not None:
        parse_mesh(mesh)  # a malformed (or empty) --mesh fails before anything is read
    processes = init_distributed(coordinator, num_processes, process_id)
    timings: dict[str, float] = {}
    with _timed(timings, "resolve", progress):
        src = resolve_source(source, revision, config, allow_pickle)
    log.info("source %s: %d tensors in %d file(s)%s", src.spec, len(src.tensors), len(src.files),
             f" at revision {src.revision}" if src.revision else "")
    try:
        # An unsafe target (the source, an ancestor of it, the current folder) is refused before any work.
        check_target(Path(out) if out is not None else default_out(src), protected_paths(src))
        with _timed(timings, "plan", progress):
            cfg = require_config(src)
            the_mapping = resolve_mapping(mapping, cfg)
            family = family_for(the_mapping, model)
            family.check_config(cfg)
            family.check_layers(cfg, src.tensors.keys())  # before building: fast
            options = family.options(cfg, src.tensors.keys())
            graphdef, abstract = abstract_state(family, cfg, options)
            analysis = analyze(the_mapping, source_specs(src), target_specs(abstract), cfg)
            if analysis.problems:
                raise MappingError(the_mapping.where, analysis.problems)
            tied = {tie.to for tie in the_mapping.ties}
            for rule in analysis.unused_rules:
                # Optional rules and stored copies of tied weights are absent from many checkpoints.
                expected = rule.optional or all(t in tied for t in rule.targets)
                (log.debug if expected else log.warning)("mapping %s: %s matched no source key",
                                                         the_mapping.name, rule.label())
            assignments = analysis.assignments
            for a in assignments:
                if a.tied_from is not None:
                    log.warning("mapping %s: no source key fills %s; filled from %s as its tie declares",
                                the_mapping.name, ", ".join(a.targets), a.tied_from)
            log.info("mapping %s -> family %s: %d tensors to place, %d ignored", the_mapping.name,
                     family.name, len(assignments), sum(k.status == "ignored" for k in analysis.keys))
            check_dtype(dtype)  # before anything is written
            if processes > 1 and not mesh:
                raise NnxportError(f"a multi-process conversion ({processes} processes) needs --mesh over "
                                   f"all {len(jax.devices())} devices")
            if mesh is not None:
                axes = parse_mesh(mesh)
                the_mesh = build_mesh(axes)
                shardings = target_shardings(the_mapping.name, assignments, the_mesh, abstract)
                placement: dict[str, Any] = {"mesh": axes, "partition_specs": {
                    t: [list(d) if isinstance(d, tuple) else d for d in sh.spec]
                    for t, sh in shardings.items() if sh.spec != jax.sharding.PartitionSpec()}}
            else:
                dev = resolve_device(device)
                single = default_sharding(dev, None)
                placement = {"device": f"{dev.platform}:{dev.id}"}
            if parity and not family.parity.has_reference():
                log.warning("model %s declares no reference (a 'reference = \"package.module:TorchClass\"' "
                            "class attribute): parity is skipped", family.name)
                parity = False
            if processes > 1 and parity:
                log.warning("parity is not run in a multi-process conversion; run `nnxport verify` on the "
                            "output folder afterwards")
                parity = False
        out_path = Path(out) if out is not None else default_out(src)
        with interrupt.deferred():  # a signal while it is made would leave it behind: raised just below
            staging = OutputDir(out_path, force=force, process_index=jax.process_index(),
                                     process_count=processes, protect=protected_paths(src, the_mapping.path))
        writer: StateWriter | None = None
        try:
            interrupt.check()
            sync_processes(processes, "nnxport-staged")
            with _timed(timings, "read_place_write"):
                # Streaming: arrays are written group by group and dropped (StateWriter), so memory stays
                # at about one group whatever the model's size.
                chains = make_chains(assignments)
                start_streaming(prog, src, assignments, chains, dtype)
                writer = StateWriter(staging.staging / CHECKPOINT, shown_as=out_path,
                                          on_written=lambda n: prog.advance("write", n))
                stored: set[str] = set()
                nbytes = 0
                filled = 0
                for a in assignments:
                    if mesh:
                        placed = [put_sharded(src, chains[t], dtype, shardings[t], spec,
                                               describe_target(src, chains[t], t), allow_nonfinite, prog)
                                  for t, spec in zip(a.targets, a.target_specs, strict=True)]
                    else:
                        placed = materialize(src, a, chains, dtype, single, allow_nonfinite, prog)
                    for target, arr in zip(a.targets, placed, strict=True):
                        stored.add(str(arr.dtype))
                        nbytes += arr.nbytes
                        filled += 1
                        prog.advance("place", arr.nbytes)
                        writer.add(target, arr)
                    del placed
                    interrupt.check()  # one lost in a library callback ends the run here (nnxport.interrupt)
                prog.end("read")
                prog.end("place")
                writer.finish()
                prog.end("write")
            log.info("checkpoint: %d arrays, %.2f GB in %d group(s)", filled, nbytes / 1e9,
                     writer.groups_written)
            manifest = build_manifest(src, the_mapping, family, cfg, options, dtype, placement, filled,
                                      nbytes)
            report = None
            if parity:
                with _timed(timings, "parity", progress):
                    # The model is restored from the checkpoint just written: parity checks what is on disk.
                    home = default_sharding(resolve_device("auto" if mesh else device), None)
                    restored = restore_state(staging.staging / CHECKPOINT,
                                                  nnx.to_pure_dict(abstract), home)
                    nnx.replace_by_pure_dict(abstract, restored)
                    nnx_model = nnx.merge(graphdef, abstract)
                    report = run_parity(family, nnx_model, src, cfg, _weakest(stored), options=options,
                                        assignments=assignments)
                write_reports(staging.staging, report, src.spec)
                manifest["parity"] = {"passed": report.passed}
            manifest["timings_s"] = timings
            if staging.primary:
                manifest["processes"] = processes
                write_json(staging.staging / MANIFEST, manifest)
            interrupt.check()
            with interrupt.deferred():  # finished: a signal now no longer stops it (nor half-commits it)
                staging.commit()
        except BaseException:
            with interrupt.deferred():
                if writer is not None:
                    writer.close()  # the background write stops writing into the staging folder first
                staging.abort()
            raise
    finally:
        src.close()
    log.info("wrote %s", out_path)
    return ConvertResult(out=out_path, manifest=manifest, parity=report, timings_s=timings)


def _weakest(dtypes: set[str]) -> str:
    """The least precise float dtype among stored tensors (what parity tolerances depend on)."""
    for name in ("float16", "bfloat16", "float32", "float64"):
        if name in dtypes:
            return name
    return "float32"


# ------------------------------------------------------------------------------------------- load, verify

def load(folder: str | Path, *, device: str | None = None, model: str | None = None) -> nnx.Module:
    """Rebuild the model recorded in ``folder`` and restore its weights onto ``device`` (default: the
    device recorded at conversion when jax has it, else jax's default device).

    The manifest is data: a recorded family that is not built in (``package.module:Class``) is imported
    only when the caller names it as ``model``; a ``model`` that differs from the recorded one overrides it
    (with a warning)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    return _restore(folder, manifest, manifest_family(folder, manifest, model), device)


def _restore(folder: Path, manifest: dict[str, Any], family: Family, device: str | None) -> nnx.Module:
    """:func:`load` once the manifest is read and the family chosen. The recorded config is untrusted: a
    config the family cannot build is a SourceError naming the manifest."""
    cfg, options = manifest["model"]["config"], manifest["model"].get("options", {})
    try:
        family.check_config(cfg)
        graphdef, abstract = abstract_state(family, cfg, options)
    except ConfigError as e:  # its message names config.json: here the config is the manifest's
        raise SourceError(f"{folder / MANIFEST}: model.config: {str(e).removeprefix('config.json: ')}"
                          ) from None
    except NnxportError:
        raise
    except Exception as e:
        raise SourceError(f"{folder / MANIFEST}: model.config does not build model {family.name} "
                          f"({one_line(e, 200)})") from None
    if device is None:
        recorded = str(manifest.get("device", "auto")).split(":")[0]
        device = recorded if recorded in {d.platform for d in jax.devices()} else "auto"
    sharding = default_sharding(resolve_device(device), None)
    restored = restore_state(folder / CHECKPOINT, nnx.to_pure_dict(abstract), sharding)
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract)


def verify(folder: str | Path, *, source: str | Path | None = None, model: str | None = None,
           progress: Progress | None = None) -> ParityReport:
    """Reload ``folder``, check that the recorded (or given) source's files are still those converted
    (sha256 of each, as recorded), rebuild the reference from them, re-run parity and rewrite parity.json
    / parity.md. A changed, missing or extra source file is a SourceError naming it. ``model``: as in
    :func:`load` (a custom class is imported only when named here). ``progress`` is told the phases
    resolve (with the re-hashing), load (with the checkpoint's bytes) and parity."""
    prog = NO_PROGRESS if progress is None else progress
    folder = Path(folder)
    manifest = read_manifest(folder)
    family = manifest_family(folder, manifest, model)
    if not family.parity.has_reference():
        raise NnxportError(f"{folder}: model {family.name} declares no reference (a 'reference' class "
                           "attribute): there is nothing to verify against")
    cfg = manifest["model"]["config"]
    recorded = manifest["source"]
    if source is None:
        spec = recorded["spec"] if recorded["kind"] == "hub" else recorded["path"]
        if recorded["kind"] == "file":
            spec = str(Path(recorded["path"]) / recorded["files"][0]["name"])
        revision = recorded.get("revision")
    else:
        spec, revision = str(source), None
    # Pickle weights were allowed at conversion (and are only ever loaded with weights_only=True).
    pickled = any(Path(f["name"]).suffix in PICKLE_SUFFIXES for f in recorded["files"])
    prog.start("resolve")
    with open_source(spec, revision=revision, allow_pickle=pickled) as src:
        check_unchanged(src, recorded["files"])
        prog.end("resolve")
        prog.start("load", manifest.get("bytes"))
        module = _restore(folder, manifest, family, None)
        prog.advance("load", sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(module, STATE_FILTER))))
        prog.end("load")
        prog.start("parity")
        stored = {str(leaf.dtype) for leaf in jax.tree.leaves(nnx.state(module, STATE_FILTER))}
        report = run_parity(family, module, src, cfg, _weakest(stored),
                            options=manifest["model"].get("options", {}),
                            assignments=recorded_assignments(manifest, src, module))
        prog.end("parity")
    write_reports(folder, report, str(recorded["spec"]))
    manifest["parity"] = {"passed": report.passed}
    write_json(folder / MANIFEST, manifest)
    return report


# ------------------------------------------------------------------------------------------ inspect, models

@dataclass
class Inspection:
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
    src = resolve_source(source, revision, config, allow_pickle)
    if mapping is None and (not auto_mapping or src.config is None):
        return Inspection(src, None, None)
    try:
        the_mapping = resolve_mapping(mapping, src.config)
    except NnxportError:
        if mapping is not None:
            raise
        return Inspection(src, None, None)
    family = family_for(the_mapping)
    cfg = require_config(src)
    family.check_config(cfg)
    family.check_layers(cfg, src.tensors.keys())  # before building: fast
    _, abstract = abstract_state(family, cfg, family.options(cfg, src.tensors.keys()))
    return Inspection(src, the_mapping, analyze(the_mapping, source_specs(src), target_specs(abstract), cfg))


def draft(
    source: str | Path,
    model: str | None = None,
    *,
    config: str | Path | None = None,
    revision: str | None = None,
) -> Draft:
    """A mapping suggestion for ``source`` and ``model`` (a family name or ``package.module:Class``;
    default: the family of the built-in mapping config.json picks). See :mod:`nnxport.mapping.draft`."""
    src = resolve_source(source, revision, config)
    try:
        if model is None:
            try:
                model = select_mapping(src.config, builtin_mappings()).model
            except NnxportError as e:
                raise NnxportError(f"{src.spec}: no model family recognises its config.json ({e}); pass "
                                   "--model NAME or --model package.module:Class") from None
        family = resolve_family(model)
        cfg = require_config(src)
        family.check_config(cfg)
        family.check_layers(cfg, src.tensors.keys())  # before building: fast
        _, abstract = abstract_state(family, cfg, family.options(cfg, src.tensors.keys()))
        return draft_mapping(source_specs(src), target_specs(abstract), cfg, model, title=src.spec)
    finally:
        src.close()


def models() -> list[dict[str, Any]]:
    """Built-in families and the mappings that target them."""
    by_family: dict[str, list[Mapping]] = {}
    for m in builtin_mappings():
        by_family.setdefault(m.model, []).append(m)
    return [{"family": name, "description": f.description,
             "mappings": [{"name": m.name, "match": m.match} for m in by_family.get(name, [])]}
            for name, f in sorted(FAMILIES.items())]
