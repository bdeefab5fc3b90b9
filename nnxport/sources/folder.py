"""Checkpoint sources: a hub id, a folder or a single ``.safetensors`` file -> files, config, lazy tensors.

:func:`open_source` resolves what the user passed, checks that the safetensors files are complete and
consistent (``model.safetensors.index.json`` included) and lists every tensor's shape and dtype from the
file headers alone. Tensor data is only read by :meth:`Source.read` / :meth:`Source.read_slice`, in its
stored dtype (bfloat16 as ``ml_dtypes.bfloat16``), never through torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from nnxport.errors import SourceError, option
from nnxport.mapping.ops import show_value
from nnxport.sources.base import Source, SourceFile, TensorInfo
from nnxport.sources.files import check_inside, check_regular, few, read_json_object, source_homes
from nnxport.sources.hub import is_hub_id, resolve_hub
from nnxport.sources.pickled import PICKLE_INDEX_NAME, PICKLE_SUFFIXES, PickleSource, pickle_entries
from nnxport.sources.safetensors import parse_header

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
_OTHER_WEIGHT_SUFFIXES = (".h5", ".msgpack", ".gguf", ".onnx", ".npz", ".pdparams")


def open_source(
    spec: str | Path, *, revision: str | None = None, config: str | Path | None = None,
    allow_pickle: bool = False,
) -> Source:
    """Resolve ``spec`` (hub id, folder or ``.safetensors`` file; a :class:`~pathlib.Path` is always taken
    as a local path) and read its config and tensor headers.

    Pickle weights (``pytorch_model.bin``, sharded or not, or a ``.bin``/``.pt``/``.pth`` file) are
    refused unless ``allow_pickle``, and then only loaded with ``torch.load(weights_only=True)``, which
    unpickles tensors and plain containers but never runs code from the file."""
    text = str(spec)
    path = Path(text).expanduser()
    if os.path.lexists(path) or isinstance(spec, Path) or not is_hub_id(text):
        if not os.path.lexists(path):
            raise SourceError(f"{text}: no such file or folder (and not a hub id)")
        if not path.is_dir():
            check_regular(path)
        if revision is not None:
            raise SourceError(f"{text}: {option('revision')} only applies to hub ids")
        path = Path(os.path.abspath(path))
        if path.is_dir():
            kind: Literal["hub", "folder", "file"] = "folder"
            root = path
            files, tensors = _scan_folder(root, what=text, allow_pickle=allow_pickle)
        elif path.suffix == ".safetensors" or (path.suffix in PICKLE_SUFFIXES and allow_pickle):
            kind, root = "file", path.parent
            files = [SourceFile(path, path.name, check_regular(path).st_size)]
            tensors = _scan_files(files)
        elif path.suffix in PICKLE_SUFFIXES:
            raise SourceError(f"{text}: pickle weights, which can run code when loaded; convert them to "
                              f"safetensors, or pass {option('allow_pickle', True)} to load them with "
                              "torch.load(weights_only=True)")
        else:
            raise SourceError(f"{text}: not a folder or a .safetensors file")
        repo_id = resolved = None
    else:
        kind, repo_id = "hub", text
        root = resolve_hub(text, revision, allow_pickle)
        resolved = root.name
        at = f"{text}@{resolved[:12]}"
        files, tensors = _scan_folder(root, what=at, snapshot=True, allow_pickle=allow_pickle)
    cfg_path = Path(config).expanduser() if config is not None else root / CONFIG_NAME
    if config is not None and not os.path.lexists(cfg_path):
        raise SourceError(f"{config}: no such config file")
    if config is None and os.path.lexists(cfg_path):
        check_inside(cfg_path, source_homes(root, snapshot=kind == "hub"))
    cfg = read_json_object(cfg_path, unique=True) if os.path.lexists(cfg_path) else None
    cls = PickleSource if files[0].name.endswith(PICKLE_SUFFIXES) else Source
    return cls(
        spec=text,
        kind=kind,
        repo_id=repo_id,
        revision=resolved,
        root=root,
        files=files,
        config=cfg,
        config_path=cfg_path if cfg is not None else None,
        tensors=tensors,
    )


def _scan_folder(
    root: Path, *, what: str, snapshot: bool = False, allow_pickle: bool = False
) -> tuple[list[SourceFile], dict[str, TensorInfo]]:
    """Files and tensors of a folder (or hub snapshot), through its index when it has one. Pickle weights
    are used only when there are no safetensors and ``allow_pickle``. Every file used must resolve inside
    the folder (:func:`check_inside`) and be a regular file."""
    homes = source_homes(root, snapshot=snapshot)
    index_path = root / INDEX_NAME
    if os.path.lexists(index_path):
        return _scan_index(root, check_inside(index_path, homes), snapshot=snapshot)
    paths = sorted(root.glob("*.safetensors"))
    if not paths and allow_pickle:
        if os.path.lexists(root / PICKLE_INDEX_NAME):
            return _scan_index(root, check_inside(root / PICKLE_INDEX_NAME, homes), snapshot=snapshot)
        paths = sorted(p for p in root.iterdir() if p.name.endswith(PICKLE_SUFFIXES) and p.is_file())
    if not paths:
        raise SourceError(_no_safetensors_message(root, what))
    files = [SourceFile(p, p.name, check_regular(check_inside(p, homes)).st_size) for p in paths]
    return files, _scan_files(files)


def _index_name_problem(name: str) -> str | None:
    """Why ``name`` (a weight_map value) cannot be a file of the source folder, or None."""
    if not name:
        return "is empty"
    if not name.isprintable():
        return "contains a NUL, control or line-break character"
    if os.path.isabs(name) or name.startswith("\\") or re.match(r"[A-Za-z]:", name):
        return "is an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "goes up a folder with '..'"
    return None


def _no_safetensors_message(root: Path, what: str) -> str:
    found = sorted(p.name for p in root.iterdir() if p.is_file())
    pickles = [n for n in found if n.endswith(PICKLE_SUFFIXES)]
    others = [n for n in found if n.endswith(_OTHER_WEIGHT_SUFFIXES)]
    if pickles:
        return (f"{what}: only pickle weights ({', '.join(pickles)}), which can run code when loaded; "
                f"convert them to safetensors, or pass {option('allow_pickle', True)} to load them with "
                "torch.load(weights_only=True)")
    if others:
        return f"{what}: only other weight formats ({', '.join(others)}); nnxport reads safetensors"
    return f"{what}: no .safetensors files found in {root}"


MAX_INDEX_FILES = 10_000
"""The most shard files an index may name (the largest published checkpoints have a few hundred)."""


def _scan_index(
    root: Path, index_path: Path, *, snapshot: bool
) -> tuple[list[SourceFile], dict[str, TensorInfo]]:
    """Files and tensors named by ``model.safetensors.index.json``, checked against the shards."""
    doc = read_json_object(index_path, unique=True)
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise SourceError(f"{index_path}: 'weight_map' must be an object mapping tensor names to file names")
    if not weight_map:
        raise SourceError(f"{index_path}: 'weight_map' is empty: the index names no tensor")
    homes = source_homes(root, snapshot=snapshot)
    first_key: dict[str, str] = {}
    for key, name in weight_map.items():
        first_key.setdefault(name, key)
    if len(first_key) > MAX_INDEX_FILES:
        raise SourceError(f"{index_path}: names {len(first_key)} files, more than a checkpoint has "
                          f"(at most {MAX_INDEX_FILES} here)")
    for name, key in sorted(first_key.items()):
        entry = f"{index_path}: weight_map entry {show_value(key)} -> {show_value(name)}"
        if (why := _index_name_problem(name)) is not None:
            raise SourceError(f"{entry}: the file name {why}; an index names files inside its own folder")
        check_inside(root / name, homes, entry)
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not os.path.lexists(root / n)]
    if missing:
        state = "the snapshot is incomplete" if snapshot else "the checkpoint is incomplete"
        raise SourceError(f"{index_path}: {few(missing)} named by the index not found in {root}; {state}")
    files = [SourceFile(root / n, n, check_regular(root / n).st_size) for n in names]
    tensors = _scan_files(files)
    misplaced: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        if key not in tensors or tensors[key].file != root / name:
            misplaced.setdefault(name, []).append(key)
    if misplaced:
        name, keys = min(misplaced.items())
        raise SourceError(
            f"{index_path}: the index puts {few(sorted(keys))} in {name}, which does not hold it"
        )
    extra = sorted(set(tensors) - set(weight_map))
    if extra:
        where = sorted({tensors[k].file.name for k in extra})
        raise SourceError(f"{index_path}: {few(extra)} (in {', '.join(where)}) missing from the index")
    return files, tensors


def _scan_files(files: list[SourceFile]) -> dict[str, TensorInfo]:
    """Every tensor's shape and dtype, from the validated headers (:func:`parse_header`: no data is
    read). A key stored in two files is refused."""
    found: dict[str, TensorInfo] = {}
    for f in files:
        entries = pickle_entries(f.path) if f.name.endswith(PICKLE_SUFFIXES) else parse_header(f.path)[1]
        for key, (dtype, shape, begin, end) in entries.items():
            if key in found:
                raise SourceError(
                    f"{f.path.parent}: tensor {key!r} is stored in both {found[key].file.name} and {f.name}"
                )
            found[key] = TensorInfo(key, shape, dtype, f.path, end - begin)
    return dict(sorted(found.items()))
