"""Plan: source + mapping + family -> the abstract model and the checked assignments, built once."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from flax import nnx

from nnxport.errors import NnxportError
from nnxport.mapping.analysis import Assignment, TensorSpec, analyze
from nnxport.mapping.schema import Mapping, load_mapping_file, load_mapping_text, select_mapping
from nnxport.models import FAMILIES, Family, get_family, resolve_family  # noqa: F401  (callers use api.get_family)
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
    raise NnxportError(f"--mapping {spec!r}: no such file and no built-in mapping of that name "
                       f"(built-in: {names})")


# ------------------------------------------------------------------------------------------ abstract model

def family_for(mapping: Mapping, model: str | None = None) -> Family:
    """The family the mapping's ``model`` names (a registered family or ``package.module:Class``), or
    ``model`` (``--model``) when given, which overrides it."""
    if model is not None and model != mapping.model:
        log.warning("--model %s overrides the model of mapping %s (%s)", model, mapping.name, mapping.model)
    return resolve_family(model or mapping.model)


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


def recorded_assignments(manifest: dict[str, Any], src: Source, model: nnx.Module) -> tuple[Assignment, ...]:
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
