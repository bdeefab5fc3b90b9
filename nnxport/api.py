"""The public API: convert, verify, load, inspect_keys, models. The CLI is a thin layer over this."""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from nnxport import checkpoint as ckpt
from nnxport import interrupt
from nnxport.draft import Draft, draft_mapping
from nnxport.errors import ConfigError, MappingError, NnxportError, SourceError, one_line
from nnxport.manifest import consented_family
from nnxport.mapping import (
    Analysis,
    Assignment,
    Mapping,
    TensorSpec,
    analyze,
    load_mapping_file,
    load_mapping_text,
    select_mapping,
)
from nnxport.models import FAMILIES, Family, get_family, resolve_family  # noqa: F401  (callers use api.get_family)
from nnxport.models.base import annotated_shards
from nnxport.ops import Box, Op, apply_ops, box_slices, pull_part
from nnxport.parity import PARITY_PNG, ParityReport, run_parity
from nnxport.place import (
    build_mesh,
    check_dtype,
    default_sharding,
    init_distributed,
    numpy_dtype,
    parse_mesh,
    partition_spec,
    put,
    put_parts,
    resolve_device,
    target_dtype,
)
from nnxport.progress import NO_PROGRESS, Progress
from nnxport.source import PICKLE_SUFFIXES, Source, open_source

log = logging.getLogger("nnxport")
STATE_FILTER = (nnx.Param, nnx.BatchStat)


def version() -> str:
    try:
        return metadata.version("nnxport")
    except metadata.PackageNotFoundError:
        return "0+unknown"


# ----------------------------------------------------------------------------------------------- mappings

def mappings_dir() -> Path:
    """Built-in mappings: inside the installed wheel, or ``mappings/`` of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "mappings", here.parent / "mappings"):
        if candidate.is_dir():
            return candidate
    raise NnxportError(f"built-in mappings not found (looked in {here / 'mappings'})")


def builtin_mappings() -> list[Mapping]:
    return [load_mapping_file(p) for p in sorted(mappings_dir().glob("*.yaml"))]


def resolve_mapping(spec: str | Mapping | None, config: dict[str, Any] | None) -> Mapping:
    """``None``: pick a built-in by config.json; ``"-"``: stdin; a path; or a built-in name."""
    if isinstance(spec, Mapping):
        return spec
    if spec is None:
        return select_mapping(config, builtin_mappings())
    if spec == "-":
        return load_mapping_text(sys.stdin.read(), name="<stdin>")
    path = Path(spec)
    if path.is_file() or spec.endswith((".yaml", ".yml")) or "/" in spec:
        return load_mapping_file(path)
    builtin = mappings_dir() / f"{spec}.yaml"
    if builtin.is_file():
        return load_mapping_file(builtin)
    names = ", ".join(p.stem for p in sorted(mappings_dir().glob("*.yaml")))
    raise NnxportError(f"--mapping {spec!r}: no such file and no built-in mapping of that name "
                       f"(built-in: {names})")


# ------------------------------------------------------------------------------------------ abstract model

def family_for(mapping: Mapping, model: str | None = None) -> Family:
    """The family the mapping's ``model`` names (a registered family or ``package.module:Class``), or
    ``model`` (``--model``) when given, which overrides it."""
    if model is not None and model != mapping.model:
        log.warning("--model %s overrides the model of mapping %s (%s)", model, mapping.name, mapping.model)
    return resolve_family(model or mapping.model)


MAX_CONFIG_YAML_BYTES = 1_000_000
"""The largest ``--config`` YAML read: a config is a few kB, and PyYAML's pure-Python parser (the one that
can refuse aliases) takes up to ~5 s and 200 MB per MB of short lines; pass a larger config as JSON."""


def _open_source(source: str | Path, revision: str | None, config: str | Path | None,
                 allow_pickle: bool = False) -> Source:
    """:func:`open_source`, with ``config`` a JSON file or, by its suffix, a YAML one."""
    if config is None or Path(config).suffix.lower() not in (".yaml", ".yml"):
        return open_source(source, revision=revision, config=config, allow_pickle=allow_pickle)
    import yaml

    from nnxport.mapping import NoAliasLoader
    from nnxport.source import open_regular

    path = Path(config).expanduser()
    if not os.path.lexists(path):
        raise SourceError(f"{config}: no such config file")
    try:
        with os.fdopen(open_regular(path), "rb") as fh:  # a FIFO or device is refused, not waited on
            raw = fh.read(MAX_CONFIG_YAML_BYTES + 1)
        if len(raw) > MAX_CONFIG_YAML_BYTES:
            raise SourceError(f"{config}: larger than {MAX_CONFIG_YAML_BYTES // 1_000_000} MB, too large for "
                              "a config")
        doc = yaml.load(raw.decode("utf-8"), Loader=NoAliasLoader)  # a SafeLoader refusing aliases
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{config}: cannot read ({e})") from None
    except RecursionError:
        raise SourceError(f"{config}: invalid YAML: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SourceError(f"{config}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(doc, dict):
        raise SourceError(f"{config}: expected a mapping of config fields, found {type(doc).__name__}")
    src = open_source(source, revision=revision, allow_pickle=allow_pickle)
    src.config, src.config_path = doc, path
    return src


def abstract_state(family: Family, config: dict[str, Any],
                   options: dict[str, Any]) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and abstract (ShapeDtypeStruct) state of the family's model for ``config``."""
    family.check_layers(config, None)  # a config asking for absurdly many layers is refused, not built
    model = nnx.eval_shape(lambda: family.build(config, nnx.Rngs(0), options))
    graphdef, state, *_rest = nnx.split(model, STATE_FILTER, ...)
    return graphdef, state


def target_specs(state: nnx.State) -> dict[str, TensorSpec]:
    return {
        ".".join(str(p) for p in path): TensorSpec(tuple(v.get_value().shape), str(v.get_value().dtype))
        for path, v in nnx.to_flat_state(state)
    }


def source_specs(source: Source) -> dict[str, TensorSpec]:
    return {k: TensorSpec(t.shape, t.dtype) for k, t in source.tensors.items()}


def _require_config(source: Source) -> dict[str, Any]:
    if source.config is None:
        raise SourceError(f"{source.spec}: no config.json found; pass --config PATH")
    return source.config


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


def default_out(source: Source) -> Path:
    return Path(f"{source.name}-nnx")


def _protected(src: Source, *more: Path | None) -> list[Path | None]:
    """What an output folder must never be or contain: the source folder, its files, its config (and
    ``more``, e.g. the mapping file)."""
    return [src.root, *(f.path for f in src.files), src.config_path, *more]


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
        src = _open_source(source, revision, config, allow_pickle)
    log.info("source %s: %d tensors in %d file(s)%s", src.spec, len(src.tensors), len(src.files),
             f" at revision {src.revision}" if src.revision else "")
    try:
        # An unsafe target (the source, an ancestor of it, the current folder) is refused before any work.
        ckpt.check_target(Path(out) if out is not None else default_out(src), _protected(src))
        with _timed(timings, "plan", progress):
            cfg = _require_config(src)
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
                shardings = _shardings(the_mapping.name, assignments, the_mesh, abstract)
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
            staging = ckpt.OutputDir(out_path, force=force, process_index=jax.process_index(),
                                     process_count=processes, protect=_protected(src, the_mapping.path))
        writer: ckpt.StateWriter | None = None
        try:
            interrupt.check()
            _sync(processes, "nnxport-staged")
            with _timed(timings, "read_place_write"):
                # Streaming: arrays are written group by group and dropped (StateWriter), so memory stays
                # at about one group whatever the model's size.
                chains = _chains(assignments)
                _start_streaming(prog, src, assignments, chains, dtype)
                writer = ckpt.StateWriter(staging.staging / ckpt.CHECKPOINT, shown_as=out_path,
                                          on_written=lambda n: prog.advance("write", n))
                stored: set[str] = set()
                nbytes = 0
                filled = 0
                for a in assignments:
                    if mesh:
                        placed = [_put_sharded(src, chains[t], dtype, shardings[t], spec,
                                               _what(src, chains[t], t), allow_nonfinite, prog)
                                  for t, spec in zip(a.targets, a.target_specs, strict=True)]
                    else:
                        placed = _materialize(src, a, chains, dtype, single, allow_nonfinite, prog)
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
            manifest = _manifest(src, the_mapping, family, cfg, options, dtype, placement, filled, nbytes)
            report = None
            if parity:
                with _timed(timings, "parity", progress):
                    # The model is restored from the checkpoint just written: parity checks what is on disk.
                    home = default_sharding(resolve_device("auto" if mesh else device), None)
                    restored = ckpt.restore_state(staging.staging / ckpt.CHECKPOINT,
                                                  nnx.to_pure_dict(abstract), home)
                    nnx.replace_by_pure_dict(abstract, restored)
                    nnx_model = nnx.merge(graphdef, abstract)
                    report = run_parity(family, nnx_model, src, cfg, _weakest(stored), options=options,
                                        assignments=assignments)
                _write_reports(staging.staging, report, src.spec)
                manifest["parity"] = {"passed": report.passed}
            manifest["timings_s"] = timings
            if staging.primary:
                manifest["processes"] = processes
                ckpt.write_json(staging.staging / ckpt.MANIFEST, manifest)
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


@dataclass(frozen=True)
class _Chain:
    """How one target is computed: its rule's source keys through ``ops``, taking result ``position``."""

    sources: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str
    ops: tuple[Op, ...]
    position: int


def _chains(assignments: tuple[Assignment, ...]) -> dict[str, _Chain]:
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


def _what(src: Source, chain: _Chain, target: str) -> str:
    """How errors about one target's values name it: its source keys, their files, the target."""
    files = sorted({src.tensors[k].file.name for k in chain.sources})
    keys = ", ".join(repr(k) for k in chain.sources)
    return f"{', '.join(files)}: tensor {keys} (-> {target})"


def _start_streaming(prog: Progress, src: Source, assignments: tuple[Assignment, ...],
                     chains: dict[str, _Chain], dtype: str) -> None:
    """Start the read / place / write phases with their byte totals: the source bytes of every chain read
    (a tie's sources are read again), and the targets' bytes in their stored dtype."""
    read = sum(src.tensors[k].nbytes for a in assignments for k in chains[a.targets[0]].sources)
    # target_dtype refuses a tensor that cannot be stored exactly as asked: here, before any data is read.
    placed = sum(math.prod(spec.shape) * numpy_dtype(target_dtype(chains[t].dtype, dtype, spec.dtype,
                                                                  _what(src, chains[t], t))).itemsize
                 for a in assignments for t, spec in zip(a.targets, a.target_specs, strict=True))
    prog.start("read", read)
    prog.start("place", placed)
    prog.start("write", placed)


def _materialize(src: Source, a: Assignment, chains: dict[str, _Chain], dtype: str,
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
        what = _what(src, chains[target], target)
        placed.append(put(arrays.pop(0), target_dtype(chain.dtype, dtype, spec.dtype, what), sharding,
                          what=what, allow_nonfinite=allow_nonfinite))
    return placed


def _put_sharded(src: Source, chain: _Chain, dtype: str, sharding: jax.sharding.Sharding,
                 spec: TensorSpec, what: str, allow_nonfinite: bool,
                 prog: Progress = NO_PROGRESS) -> jax.Array:
    """One target laid out by ``sharding``, each device part read on its own: the part of the source that
    the chain's ops turn into it (:func:`nnxport.ops.pull_part`). Ops that join several keys (concat,
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


def _shardings(mapping: str, assignments: tuple[Assignment, ...], mesh: jax.sharding.Mesh,
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


def _sync(processes: int, name: str) -> None:
    """A barrier across the processes of a multi-process conversion."""
    if processes > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _weakest(dtypes: set[str]) -> str:
    """The least precise float dtype among stored tensors (what parity tolerances depend on)."""
    for name in ("float16", "bfloat16", "float32", "float64"):
        if name in dtypes:
            return name
    return "float32"


def _manifest(src: Source, mapping: Mapping, family: Family, cfg: dict[str, Any], options: dict[str, Any],
              dtype: str, placement: dict[str, Any], n: int, nbytes: int) -> dict[str, Any]:
    return {
        "nnxport_version": version(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "source": {
            "spec": src.spec,
            "kind": src.kind,
            "repo_id": src.repo_id,
            "revision": src.revision,
            "path": str(src.root.absolute()),
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256()} for f in src.files],
        },
        "mapping": {"name": mapping.name, "path": str(mapping.path) if mapping.path else None,
                    "sha256": mapping.sha256, "text": mapping.text},
        "model": {"family": family.name, "config": cfg, "options": options},
        "dtype": dtype,
        **placement,
        "tensors": n,
        "bytes": nbytes,
    }


def _write_reports(folder: Path, report: ParityReport, title: str) -> None:
    ckpt.write_json(folder / ckpt.PARITY_JSON, report.to_json())
    plot = PARITY_PNG if report.write_plot(folder / PARITY_PNG) else None  # with the optional `plot` extra
    ckpt.write_text(folder / ckpt.PARITY_MD, report.to_markdown(title, plot=plot))


# ------------------------------------------------------------------------------------------- load, verify

def load(folder: str | Path, *, device: str | None = None, model: str | None = None) -> nnx.Module:
    """Rebuild the model recorded in ``folder`` and restore its weights onto ``device`` (default: the
    device recorded at conversion when jax has it, else jax's default device).

    The manifest is data: a recorded family that is not built in (``package.module:Class``) is imported
    only when the caller names it as ``model``; a ``model`` that differs from the recorded one overrides it
    (with a warning)."""
    folder = Path(folder)
    manifest = ckpt.read_manifest(folder)
    return _restore(folder, manifest, _manifest_family(folder, manifest, model), device)


def _restore(folder: Path, manifest: dict[str, Any], family: Family, device: str | None) -> nnx.Module:
    """:func:`load` once the manifest is read and the family chosen. The recorded config is untrusted: a
    config the family cannot build is a SourceError naming the manifest."""
    cfg, options = manifest["model"]["config"], manifest["model"].get("options", {})
    try:
        family.check_config(cfg)
        graphdef, abstract = abstract_state(family, cfg, options)
    except ConfigError as e:  # its message names config.json: here the config is the manifest's
        raise SourceError(f"{folder / ckpt.MANIFEST}: model.config: {str(e).removeprefix('config.json: ')}"
                          ) from None
    except NnxportError:
        raise
    except Exception as e:
        raise SourceError(f"{folder / ckpt.MANIFEST}: model.config does not build model {family.name} "
                          f"({one_line(e, 200)})") from None
    if device is None:
        recorded = str(manifest.get("device", "auto")).split(":")[0]
        device = recorded if recorded in {d.platform for d in jax.devices()} else "auto"
    sharding = default_sharding(resolve_device(device), None)
    restored = ckpt.restore_state(folder / ckpt.CHECKPOINT, nnx.to_pure_dict(abstract), sharding)
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
    manifest = ckpt.read_manifest(folder)
    family = _manifest_family(folder, manifest, model)
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
                            assignments=_recorded_assignments(manifest, src, module))
        prog.end("parity")
    _write_reports(folder, report, str(recorded["spec"]))
    manifest["parity"] = {"passed": report.passed}
    ckpt.write_json(folder / ckpt.MANIFEST, manifest)
    return report


def _manifest_family(folder: Path, manifest: dict[str, Any], model: str | None) -> Family:
    """The family to rebuild ``folder`` with: see :func:`nnxport.manifest.consented_family`."""
    recorded = manifest["model"]["family"]
    name = consented_family(recorded, model, folder / ckpt.MANIFEST)
    if name != recorded:
        log.warning("model %s overrides the family recorded in %s (%s)", name, folder / ckpt.MANIFEST,
                    recorded)
    return resolve_family(name)


def check_unchanged(src: Source, recorded: list[dict[str, Any]]) -> None:
    """SourceError unless ``src`` has exactly the recorded files, each with its recorded sha256."""
    now = {f.name: f for f in src.files}
    for entry in recorded:
        f = now.pop(entry["name"], None)
        if f is None:
            raise SourceError(f"{src.root / entry['name']}: recorded at conversion, now missing")
        digest = f.sha256()
        if digest != entry["sha256"]:
            raise SourceError(f"{f.path}: changed since the conversion (sha256 {digest[:16]}…, recorded "
                              f"{entry['sha256'][:16]}…); convert again, or pass --source with the "
                              "original files")
    if now:
        raise SourceError(f"{src.root}: {', '.join(sorted(now))} not in the source at conversion; convert "
                          "again")


def _recorded_assignments(manifest: dict[str, Any], src: Source, model: nnx.Module) -> tuple[Assignment, ...]:
    """The assignments of the mapping recorded in the manifest, for per-layer parity; none (and a warning)
    when it no longer fits the source."""
    recorded = manifest["mapping"]
    mapping = load_mapping_text(recorded["text"], name=str(recorded["name"]))
    analysis = analyze(mapping, source_specs(src), target_specs(nnx.state(model, STATE_FILTER)),
                       manifest["model"]["config"])
    if analysis.problems:
        log.warning("verify: the recorded mapping %s does not fit the source (%s): no per-layer report",
                    recorded["name"], analysis.problems[0])
        return ()
    return analysis.assignments


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
    src = _open_source(source, revision, config, allow_pickle)
    if mapping is None and (not auto_mapping or src.config is None):
        return Inspection(src, None, None)
    try:
        the_mapping = resolve_mapping(mapping, src.config)
    except NnxportError:
        if mapping is not None:
            raise
        return Inspection(src, None, None)
    family = family_for(the_mapping)
    cfg = _require_config(src)
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
    default: the family of the built-in mapping config.json picks). See :mod:`nnxport.draft`."""
    src = _open_source(source, revision, config)
    try:
        if model is None:
            try:
                model = select_mapping(src.config, builtin_mappings()).model
            except NnxportError as e:
                raise NnxportError(f"{src.spec}: no model family recognises its config.json ({e}); pass "
                                   "--model NAME or --model package.module:Class") from None
        family = resolve_family(model)
        cfg = _require_config(src)
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
