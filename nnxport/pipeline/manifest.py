"""Reading an output folder's ``nnxport.json``: untrusted data, checked field by field.

A converted folder may come from anyone, so its manifest is validated against the schema below before
``load`` or ``verify`` use any of it. Every problem is one line naming the field path
(``DIR/nnxport.json: model.config must be an object``). Nothing a manifest says is imported: a model
family that is not built in is refused unless the caller names it (:func:`consented_family`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import orbax.checkpoint as ocp

from nnxport.errors import SourceError
from nnxport.models import FAMILIES, Family, resolve_family
from nnxport.models.base import annotated_shards
from nnxport.pipeline.output import CHECKPOINT, MANIFEST
from nnxport.pipeline.plan import COMPRESSIONS
from nnxport.sources.pickled import PICKLE_SUFFIXES

if TYPE_CHECKING:
    from nnxport.pipeline.plan import Plan
    from nnxport.pipeline.transfer import Transferred
from nnxport.version import version

log = logging.getLogger("nnxport")


LAYOUT = {"images": "NHWC", "linear_kernels": "[in, out]", "conv_kernels": "HWIO",
          "embeddings": "[vocab, hidden]"}
"""How the checkpoint's arrays are laid out (Flax's conventions, not torch's): the manifest's ``layout``."""


def build_manifest(plan: Plan, done: Transferred) -> dict[str, Any]:
    """nnxport.json for a conversion of ``plan`` that wrote ``done``: what was converted (each source file
    with its sha256), with which mapping (its full text), into which model (family, config, options, so
    that :func:`nnxport.load` can rebuild it), how (dtype, device or mesh), and every leaf stored."""
    src, mapping = plan.source, plan.mapping
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
        "model": {"family": plan.family.name, "config": plan.config, "options": plan.options},
        "dtype": plan.dtype,
        "compression": plan.compression,
        **plan.placement.record,
        "tensors": done.arrays,
        "bytes": done.nbytes,
        "layout": LAYOUT,
        "leaves": leaf_records(plan, done.stored),
    }


def leaf_records(plan: Plan, stored: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Every leaf by dotted path: shape, stored dtype, kind (Param / BatchStat) and, where the mapping's
    ``shard:`` or the model's annotation declares one, its layout over mesh axes (``shard``: per
    dimension null or a list of axes; what ``nnxport.load(DIR, mesh=...)`` uses for a single-device
    conversion)."""
    from flax import nnx

    annotated = annotated_shards(plan.abstract)
    declared = {t: a.shard for a in plan.assignments for t in a.targets if a.shard is not None}
    out: dict[str, dict[str, Any]] = {}
    for path, var in nnx.to_flat_state(plan.abstract):
        dotted = ".".join(map(str, path))
        leaf = var.get_value()
        entry: dict[str, Any] = {"shape": list(leaf.shape), "dtype": stored.get(dotted, str(leaf.dtype)),
                                 "kind": "BatchStat" if isinstance(var, nnx.BatchStat) else "Param"}
        shard = declared.get(dotted, annotated.get(dotted))
        if shard is not None and any(d for d in shard):
            entry["shard"] = [None if d is None else list(d) for d in shard]
        out[dotted] = entry
    return out


def manifest_family(folder: Path, manifest: dict[str, Any], model: str | None) -> Family:
    """The family to rebuild ``folder`` with: see :func:`consented_family`."""
    recorded = manifest["model"]["family"]
    name = consented_family(recorded, model, folder / MANIFEST)
    if name != recorded:
        log.warning("model %s overrides the family recorded in %s (%s)", name, folder / MANIFEST,
                    recorded)
    return resolve_family(name)



MAX_BYTES = 16 * 2**20
"""A manifest larger than this is refused before it is read (a real one is a few hundred KB at most; the
largest part, a mesh run's partition_specs, stays under 1 MB for thousands of tensors)."""
MAX_DEPTH = 64
"""Deepest nesting of objects / lists accepted anywhere in a manifest."""

_SHA256 = re.compile(r"[0-9a-f]{64}")
_KINDS = ("hub", "folder", "file")


class _Bad(Exception):
    """A schema violation at ``field``: ``must`` says what the field must be."""

    def __init__(self, field: str, must: str) -> None:
        super().__init__(field)
        self.field, self.must = field, must


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``: a regular file of at most :data:`MAX_BYTES`, names unique in every
    object, nesting at most :data:`MAX_DEPTH` deep. SourceError in one line otherwise."""
    from nnxport.sources.files import DuplicateKey, unique_pairs

    if path.is_symlink():  # it could name any file: the manifest is the folder's own
        raise SourceError(f"{path}: is a symbolic link; a manifest is a regular file in its folder")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)  # a FIFO must not block the open
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"{path}: not a regular file")
        if st.st_size > MAX_BYTES:
            raise SourceError(f"{path}: {st.st_size} bytes, more than a manifest can be "
                              f"({MAX_BYTES // 2**20} MB)")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(MAX_BYTES + 1)
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=unique_pairs)
    except DuplicateKey as e:
        raise SourceError(f"{path}: names {e.key!r} twice in one object") from None
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise SourceError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise SourceError(f"{path}: nested more than {MAX_DEPTH} levels deep") from None
    if not isinstance(doc, dict):
        raise SourceError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    if _depth(doc) > MAX_DEPTH:
        raise SourceError(f"{path}: nested more than {MAX_DEPTH} levels deep")
    return doc


def _depth(doc: Any) -> int:
    """How deeply objects and lists nest in ``doc`` (iteratively: no recursion limit to hit)."""
    deepest, todo = 0, [(doc, 1)]
    while todo:
        node, level = todo.pop()
        deepest = max(deepest, level)
        children = node.values() if isinstance(node, dict) else node
        todo.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


def validate(doc: dict[str, Any], where: Path) -> dict[str, Any]:
    """``doc`` itself once every field that load and verify use is checked; SourceError naming the first
    bad field (``where: model.config must be an object``) otherwise."""
    try:
        _check(doc)
    except _Bad as e:
        raise SourceError(f"{where}: {e.field} {e.must}") from None
    return doc


def _get(obj: dict[str, Any], field: str, key: str, test: Callable[[Any], bool], must: str, *,
         optional: bool = False) -> Any:
    name = f"{field}.{key}" if field else key
    if key not in obj:
        if optional:
            return None
        raise _Bad(name, "is missing")
    value = obj[key]
    if not test(value):
        raise _Bad(name, must)
    return value


def _is_str(v: Any) -> bool:
    return isinstance(v, str) and "\x00" not in v


def _is_count(v: Any) -> bool:
    return type(v) is int and v >= 0


def _is_opt_str(v: Any) -> bool:
    return v is None or _is_str(v)


def _is_obj(v: Any) -> bool:
    return isinstance(v, dict)


def plain_name(name: Any) -> bool:
    """A relative path that stays inside the folder it is relative to: no ``..``, not absolute, no empty
    or ``.`` parts, no backslashes or control characters."""
    if not _is_str(name) or not name or "\\" in name or any(ord(c) < 32 for c in name):
        return False
    parts = name.split("/")
    return not PurePosixPath(name).is_absolute() and all(p not in ("", ".", "..") for p in parts)


def _check(doc: dict[str, Any]) -> None:
    from nnxport.placement import DTYPES

    _get(doc, "", "nnxport_version", _is_str, "must be a string")
    src = _get(doc, "", "source", _is_obj, "must be an object")
    _get(src, "source", "spec", _is_str, "must be a string")
    kind = _get(src, "source", "kind", lambda v: v in _KINDS, f"must be one of {', '.join(_KINDS)}")
    _get(src, "source", "repo_id", _is_opt_str, "must be a string or null")
    _get(src, "source", "revision", _is_opt_str, "must be a string or null")
    _get(src, "source", "path", lambda v: _is_str(v) and os.path.isabs(v), "must be an absolute path")
    files = _get(src, "source", "files", lambda v: isinstance(v, list) and len(v) > 0,
                 "must be a non-empty list")
    if kind == "file" and len(files) != 1:
        raise _Bad("source.files", "must list exactly one file for a source of kind file")
    names: set[str] = set()
    for i, entry in enumerate(files):
        at = f"source.files[{i}]"
        if not _is_obj(entry):
            raise _Bad(at, "must be an object")
        name = _get(entry, at, "name", plain_name, "must be a relative file name inside the source "
                    "(no '..', not absolute)")
        if name in names:
            raise _Bad(f"{at}.name", f"names {name!r} a second time")
        names.add(name)
        _get(entry, at, "size", _is_count, "must be a non-negative integer")
        _get(entry, at, "sha256", lambda v: isinstance(v, str) and _SHA256.fullmatch(v) is not None,
             "must be 64 lowercase hex digits")
    mapping = _get(doc, "", "mapping", _is_obj, "must be an object")
    _get(mapping, "mapping", "name", _is_str, "must be a string")
    _get(mapping, "mapping", "path", _is_opt_str, "must be a string or null", optional=True)
    _get(mapping, "mapping", "sha256", _is_str, "must be a string")
    _get(mapping, "mapping", "text", _is_str, "must be a string")
    model = _get(doc, "", "model", _is_obj, "must be an object")
    _get(model, "model", "family", lambda v: _is_str(v) and v.strip() != "", "must be a non-empty string")
    _get(model, "model", "config", _is_obj, "must be an object")
    _get(model, "model", "options", _is_obj, "must be an object", optional=True)
    _get(doc, "", "dtype", lambda v: v in DTYPES, f"must be one of {', '.join(DTYPES)}")
    _get(doc, "", "compression", lambda v: v in COMPRESSIONS, f"must be one of {', '.join(COMPRESSIONS)}",
         optional=True)
    _check_placement(doc)
    _get(doc, "", "tensors", _is_count, "must be a non-negative integer")
    _get(doc, "", "bytes", _is_count, "must be a non-negative integer")
    parity = _get(doc, "", "parity", _is_obj, "must be an object", optional=True)
    if parity is not None:
        _get(parity, "parity", "passed", lambda v: isinstance(v, bool), "must be true or false")
    _check_leaves(doc)
    _check_artifacts(doc)


_AXIS = re.compile(r"[A-Za-z_]\w*")
_DOTTED = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def _is_axes(v: Any, axes: Any) -> bool:
    """A per-dimension layout: a list of null, an axis or a list of distinct axes, each axis used once
    and (``axes`` not None) one of ``axes``."""
    if not isinstance(v, list):
        return False
    used: list[Any] = []
    for d in v:
        if d is None:
            continue
        names = d if isinstance(d, list) else [d]
        if not names or not all(isinstance(a, str) and _AXIS.fullmatch(a) for a in names):
            return False
        used += names
    return len(used) == len(set(used)) and (axes is None or all(a in axes for a in used))


def _check_leaves(doc: dict[str, Any]) -> None:
    """``layout`` ({convention: string}) and ``leaves`` ({dotted path: {shape, dtype, kind, shard?}}),
    both optional (manifests before nnxport 0.x lack them)."""
    layout = _get(doc, "", "layout", _is_obj, "must be an object", optional=True)
    for key, value in (layout or {}).items():
        if not _is_str(value):
            raise _Bad(f"layout.{key}", "must be a string")
    leaves = _get(doc, "", "leaves", _is_obj, "must be an object", optional=True)
    for path, entry in (leaves or {}).items():
        at = f"leaves.{path}"
        if not _DOTTED.fullmatch(path):
            raise _Bad(at, "must be named by a dotted path (a.b.0.c)")
        if not _is_obj(entry):
            raise _Bad(at, "must be an object")
        shape = _get(entry, at, "shape", lambda v: isinstance(v, list) and all(_is_count(n) for n in v),
                     "must be a list of non-negative integers")
        _get(entry, at, "dtype", _is_str, "must be a string")
        _get(entry, at, "kind", lambda v: v in ("Param", "BatchStat"), "must be Param or BatchStat")
        shard = _get(entry, at, "shard", lambda v: _is_axes(v, None), "must list, per dimension, null or "
                     "mesh axes (each axis once)", optional=True)
        if shard is not None and len(shard) != len(shape):
            raise _Bad(f"{at}.shard", f"must have one entry per dimension ({len(shape)})")


def _check_artifacts(doc: dict[str, Any]) -> None:
    """``artifacts``: [{name, size, sha256}], each name one of ARTIFACT_NAMES, given once."""
    from nnxport.pipeline.artifacts import ARTIFACT_NAMES

    artifacts = _get(doc, "", "artifacts", lambda v: isinstance(v, list), "must be a list", optional=True)
    seen: set[str] = set()
    for i, entry in enumerate(artifacts or []):
        at = f"artifacts[{i}]"
        if not _is_obj(entry):
            raise _Bad(at, "must be an object")
        name = _get(entry, at, "name", lambda v: v in ARTIFACT_NAMES and v not in seen,
                    "must be a tokenizer / generation / preprocessor file name, given once")
        seen.add(name)
        _get(entry, at, "size", _is_count, "must be a non-negative integer")
        _get(entry, at, "sha256", lambda v: isinstance(v, str) and _SHA256.fullmatch(v) is not None,
             "must be 64 lowercase hex digits")


def _check_placement(doc: dict[str, Any]) -> None:
    """``device`` (``platform:id``) or ``mesh`` ({axis: size}) with ``partition_specs``."""
    if "device" not in doc and "mesh" not in doc:
        raise _Bad("device", "is missing (a manifest records a device or a mesh)")
    _get(doc, "", "device", lambda v: _is_str(v) and re.fullmatch(r"[A-Za-z0-9_]+(:\d+)?", v) is not None,
         "must be PLATFORM:ID, e.g. cpu:0", optional=True)
    mesh = _get(doc, "", "mesh", lambda v: _is_obj(v) and len(v) > 0, "must be a non-empty object",
                optional=True)
    if mesh is not None:
        for axis, size in mesh.items():
            if not _AXIS.fullmatch(axis):
                raise _Bad(f"mesh.{axis}", "must be named by an identifier")
            if type(size) is not int or not 1 <= size <= 2**20:
                raise _Bad(f"mesh.{axis}", "must be a positive integer")
        specs = _get(doc, "", "partition_specs", _is_obj, "must be an object", optional=True) or {}
        for target, spec in specs.items():
            if not _DOTTED.fullmatch(target) or not _is_axes(spec, mesh):
                raise _Bad(f"partition_specs.{target}", "must be a list of mesh axes (or null, or lists "
                                                        "of axes), each axis once")


def consented_family(recorded: str, model: str | None, where: Path) -> str:
    """The family name to build: ``model`` when the caller names one (it overrides the manifest), the
    recorded family when it is built in. A recorded ``package.module:Class`` is never imported on the
    manifest's word: SourceError saying how to consent."""
    from nnxport.models.custom import is_import_path

    if model is not None:
        return model
    if recorded in FAMILIES:
        return recorded
    if is_import_path(recorded):
        raise SourceError(f"{where}: model.family {recorded!r} is not a built-in family and is imported only "
                          f"when you name it: pass model={recorded!r} (nnxport verify --model {recorded})")
    raise SourceError(f"{where}: model.family {recorded!r} is not a built-in family (known: "
                      f"{', '.join(sorted(FAMILIES))})")




def read_manifest(folder: Path, *, artifacts: bool = False) -> dict[str, Any]:
    """The manifest of a finished output folder, validated (:func:`validate`); SourceError if the
    folder is not one or the manifest is malformed; ``artifacts``: also if a copied tokenizer /
    generation file it lists is missing or changed (:func:`~nnxport.pipeline.artifacts.check_artifacts`)."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise SourceError(f"{folder}: no such folder")
    if not os.path.lexists(path):
        raise SourceError(f"{folder}: not an nnxport output folder (no {MANIFEST})")
    manifest = validate(read_json(path), path)  # untrusted data: every field load / verify use is checked
    ckpt = folder / CHECKPOINT
    if not ckpt.is_dir() or not ocp.utils.is_checkpoint_finalized(ckpt.absolute()):
        raise SourceError(f"{ckpt}: missing or unfinished Orbax checkpoint")
    if artifacts:
        from nnxport.pipeline.artifacts import check_artifacts

        check_artifacts(folder, manifest)
    return manifest


def recorded_source(manifest: dict[str, Any], source: str | Path | None = None
                    ) -> tuple[str, str | None, bool]:
    """What to re-open to verify a conversion: (source spec, revision, whether pickle weights are allowed)
    — the recorded source, or ``source`` instead. Pickle weights were allowed at conversion when the
    recorded files are pickles (and are only ever loaded with ``weights_only=True``)."""
    recorded = manifest["source"]
    pickled = any(Path(f["name"]).suffix in PICKLE_SUFFIXES for f in recorded["files"])
    if source is not None:
        return str(source), None, pickled
    if recorded["kind"] == "hub":
        return recorded["spec"], recorded.get("revision"), pickled
    if recorded["kind"] == "file":
        return str(Path(recorded["path"]) / recorded["files"][0]["name"]), None, pickled
    return recorded["path"], None, pickled
