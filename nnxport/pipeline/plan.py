"""Plan: source + mapping + family -> the abstract model and the checked assignments, built once."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from nnxport.errors import MappingError, NnxportError, option
from nnxport.mapping.analysis import Analysis, Assignment, TensorSpec, analyze
from nnxport.mapping.schema import Mapping, load_mapping_file, load_mapping_text, select_mapping
from nnxport.models import Family, resolve_family
from nnxport.models.base import annotated_shards
from nnxport.models.layers import strip_dropout_rngs
from nnxport.parity.streamed import parity_mode
from nnxport.pipeline.artifacts import copy_artifacts, find_artifacts
from nnxport.pipeline.lazy import cache_bytes
from nnxport.pipeline.resolve import require_config
from nnxport.placement import (
    build_mesh,
    check_dtype,
    default_sharding,
    parse_mesh,
    partition_spec,
    resolve_device,
)
from nnxport.quant.view import check_dtype as check_quantized_dtype
from nnxport.sources.base import Source

log = logging.getLogger("nnxport")
STATE_FILTER = (nnx.Param, nnx.BatchStat)


# ----------------------------------------------------------------------------------------------- mappings

def mappings_dir() -> Path:
    """Built-in mappings: inside the installed wheel, or ``mappings/`` of a source checkout."""
    here = Path(__file__).resolve().parent.parent  # the nnxport package
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
    raise NnxportError(f"{option('mapping')} {spec!r}: no such file and no built-in mapping of that name "
                       f"(built-in: {names})")


# ------------------------------------------------------------------------------------------ abstract model

def family_for(mapping: Mapping, model: str | None = None) -> Family:
    """The family the mapping's ``model`` names (a registered family or ``package.module:Class``), or
    ``model`` (``--model``) when given, which overrides it."""
    if model is not None and model != mapping.model:
        log.warning("%s %s overrides the model of mapping %s (%s)", option("model"), model, mapping.name,
                    mapping.model)
    return resolve_family(model or mapping.model)


def abstract_state(family: Family, config: dict[str, Any],
                   options: dict[str, Any]) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and abstract (ShapeDtypeStruct) state of the family's model for ``config``."""
    family.check_layers(config, None)  # a config asking for absurdly many layers is refused, not built
    model = nnx.eval_shape(lambda: family.build(config, nnx.Rngs(0), options))
    strip_dropout_rngs(model)  # the state is Params and BatchStats only; load gives dropout fresh streams
    graphdef, state, *_rest = nnx.split(model, STATE_FILTER, ...)
    return graphdef, state


def target_specs(state: nnx.State) -> dict[str, TensorSpec]:
    return {
        ".".join(str(p) for p in path): TensorSpec(tuple(v.get_value().shape), str(v.get_value().dtype))
        for path, v in nnx.to_flat_state(state)
    }


def source_specs(source: Source) -> dict[str, TensorSpec]:
    return {k: TensorSpec(t.shape, t.dtype) for k, t in source.tensors.items()}


def analyse(mapping: Mapping, src: Source, state: nnx.State, config: dict[str, Any]) -> Analysis:
    """The mapping checked against the source's tensors and the model's leaves (shapes only, no data):
    every problem together (:func:`nnxport.mapping.analysis.analyze`)."""
    return analyze(mapping, source_specs(src), target_specs(state), config)


def recorded_assignments(manifest: dict[str, Any], src: Source, model: nnx.Module) -> tuple[Assignment, ...]:
    """The assignments of the mapping recorded in the manifest, for per-layer parity; none (and a warning)
    when it no longer fits the source."""
    recorded = manifest["mapping"]
    try:
        mapping = load_mapping_text(recorded["text"], name=str(recorded["name"]))
        return analyse(mapping, src, nnx.state(model, STATE_FILTER), manifest["model"]["config"]
                       ).checked(mapping.where)
    except MappingError as e:  # the manifest's copy is untrusted: unreadable, or no longer fitting
        log.warning("verify: the recorded mapping %s does not fit the source (%s): no per-layer report",
                    recorded["name"], e.problems[0])
        return ()


# ------------------------------------------------------------------------------------------------ the plan

@dataclass
class ModelPlan:
    """The target model for a source: config.json, the mapping and family it picks, the options the
    source's keys give, and the model built abstractly (shapes and dtypes only)."""

    config: dict[str, Any]
    mapping: Mapping
    family: Family
    options: dict[str, Any]
    graphdef: nnx.GraphDef
    abstract: nnx.State


def plan_model(src: Source, mapping: str | Mapping | None, model: str | None = None) -> ModelPlan:
    """Pick the mapping (``None``: by config.json) and the family (``model`` overrides the mapping's),
    check config.json against both (before anything is built), and build the model abstractly."""
    config = require_config(src)
    the_mapping = resolve_mapping(mapping, config)
    family = family_for(the_mapping, model)
    return ModelPlan(config, the_mapping, family, *build_abstract(src, family, config))


def build_abstract(src: Source, family: Family, config: dict[str, Any]
                   ) -> tuple[dict[str, Any], nnx.GraphDef, nnx.State]:
    """``family``'s model for ``config`` and the source's keys, built abstractly after config.json was
    checked (every field, and its layer counts against the keys: before building, which takes time in
    proportion to the layers): (options, graphdef, abstract state)."""
    family.check_config(config)
    family.check_layers(config, src.tensors.keys())
    options = family.options(config, src.tensors.keys())
    return (options, *abstract_state(family, config, options))


@dataclass(frozen=True)
class Placement:
    """Where the arrays go: one device (``sharding``), or a mesh (a sharding per target). ``record`` is
    what the manifest says of it."""

    record: dict[str, Any]
    sharding: jax.sharding.Sharding | None = None
    shardings: dict[str, jax.sharding.NamedSharding] | None = None


#: How the checkpoint's arrays may be stored (``convert --compression``); why "none" is the default:
#: docs/benchmarks.md.
COMPRESSIONS = ("none", "zstd")


@dataclass
class Plan(ModelPlan):
    """Everything a conversion does, decided before any tensor is read: the model, the checked
    assignments, the dtype, the placement, and whether parity runs."""

    source: Source
    analysis: Analysis
    dtype: str
    placement: Placement
    parity: bool
    processes: int
    artifacts: tuple[Path, ...] = ()
    compression: str = "none"  # of the checkpoint's arrays: "none" or "zstd" (COMPRESSIONS)

    @property
    def assignments(self) -> tuple[Assignment, ...]:
        return self.analysis.assignments

    def copy_artifacts(self, folder: Path) -> list[dict[str, Any]]:
        """Copy the source's tokenizer / generation / preprocessing files into ``folder``: the manifest's
        ``artifacts`` (:mod:`nnxport.pipeline.artifacts`)."""
        return copy_artifacts(self.artifacts, self.source, folder)


def make_plan(src: Source, *, mapping: str | Mapping | None = None, model: str | None = None,
              dtype: str = "keep", device: str = "auto", mesh: str | None = None, compression: str = "none",
              parity: bool = True, processes: int = 1) -> Plan:
    """The one place a conversion's plan is built. Every mapping problem is raised together (a
    MappingError) before any tensor is read, and so are a bad dtype, compression, device or mesh."""
    if compression not in COMPRESSIONS:
        raise NnxportError(f"unknown compression {compression!r} (choose {' or '.join(COMPRESSIONS)})")
    base = plan_model(src, mapping, model)
    analysis = analyse(base.mapping, src, base.abstract, base.config)
    analysis.checked(base.mapping.where)
    _log_analysis(base, analysis)
    check_dtype(dtype)  # before anything is written
    if parity:  # the streamed-parity settings too (nnxport.parity.streamed)
        parity_mode(), cache_bytes()
    check_quantized_dtype(src, dtype)
    if processes > 1 and not mesh:
        raise NnxportError(f"a multi-process conversion ({processes} processes) needs {option('mesh')} over "
                           f"all {len(jax.devices())} devices")
    placement = _placement(base, analysis, device, mesh)
    if parity and not base.family.parity.has_reference():
        log.warning("model %s declares no reference (a 'reference = \"package.module:TorchClass\"' "
                    "class attribute): parity is skipped", base.family.name)
        parity = False
    if processes > 1 and parity:
        log.warning("parity is not run in a multi-process conversion; run `nnxport verify` on the "
                    "output folder afterwards")
        parity = False
    return Plan(**vars(base), source=src, analysis=analysis, dtype=dtype, placement=placement,
                parity=parity, processes=processes, artifacts=find_artifacts(src), compression=compression)


def _log_analysis(base: ModelPlan, analysis: Analysis) -> None:
    """What the analysis found that is worth saying but is no error: rules that matched nothing, targets
    filled by a tie, and the counts."""
    name = base.mapping.name
    tied = {tie.to for tie in base.mapping.ties}
    for rule in analysis.unused_rules:
        # Optional rules and stored copies of tied weights are absent from many checkpoints.
        expected = rule.optional or all(t in tied for t in rule.targets)
        (log.debug if expected else log.warning)("mapping %s: %s matched no source key", name, rule.label())
    for a in analysis.assignments:
        if a.tied_from is not None:
            log.warning("mapping %s: no source key fills %s; filled from %s as its tie declares", name,
                        ", ".join(a.targets), a.tied_from)
    log.info("mapping %s -> family %s: %d tensors to place, %d ignored", name, base.family.name,
             len(analysis.assignments), sum(k.status == "ignored" for k in analysis.keys))


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


def _placement(base: ModelPlan, analysis: Analysis, device: str, mesh: str | None) -> Placement:
    if mesh is None:
        dev = resolve_device(device)
        return Placement({"device": f"{dev.platform}:{dev.id}"}, sharding=default_sharding(dev, None))
    axes = parse_mesh(mesh)
    shardings = target_shardings(base.mapping.name, analysis.assignments, build_mesh(axes), base.abstract)
    specs = {t: [list(d) if isinstance(d, tuple) else d for d in sh.spec]
             for t, sh in shardings.items() if sh.spec != jax.sharding.PartitionSpec()}
    return Placement({"mesh": axes, "partition_specs": specs}, shardings=shardings)
