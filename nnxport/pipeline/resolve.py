"""Resolve: what the user names (hub id, folder, file, --config) -> an open Source with its config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nnxport.errors import SourceError, option
from nnxport.quant.view import dequantizing
from nnxport.sources.base import Source
from nnxport.sources.folder import open_source

MAX_CONFIG_YAML_BYTES = 1_000_000
"""The largest ``--config`` YAML read: a config is a few kB, and PyYAML's pure-Python parser (the one that
can refuse aliases) takes up to ~5 s and 200 MB per MB of short lines; pass a larger config as JSON."""


def resolve_source(source: str | Path, revision: str | None, config: str | Path | None,
                 allow_pickle: bool = False) -> Source:
    """:func:`open_source`, with ``config`` a JSON file or, by its suffix, a YAML one; a quantized
    checkpoint (config.json ``quantization_config``) seen dequantized (:mod:`nnxport.quant.view`)."""
    if config is None or Path(config).suffix.lower() not in (".yaml", ".yml"):
        return _dequantizing(open_source(source, revision=revision, config=config, allow_pickle=allow_pickle))
    import yaml

    from nnxport.mapping.loader import NoAliasLoader
    from nnxport.sources.files import open_regular

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
    return _dequantizing(src)


def _dequantizing(src: Source) -> Source:
    try:
        return dequantizing(src)
    except BaseException:
        src.close()
        raise


def require_config(source: Source) -> dict[str, Any]:
    if source.config is None:
        raise SourceError(f"{source.spec}: no config.json found; pass {option('config')} PATH")
    return source.config


def default_out(source: Source) -> Path:
    return Path(f"{source.name}-nnx")


def protected_paths(src: Source, *more: Path | None) -> list[Path | None]:
    """What an output folder must never be or contain: the source folder, its files, its config (and
    ``more``, e.g. the mapping file)."""
    return [src.root, *(f.path for f in src.files), src.config_path, *more]


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
                              f"{entry['sha256'][:16]}…); convert again, or pass {option('source')} with the "
                              "original files")
    if now:
        raise SourceError(f"{src.root}: {', '.join(sorted(now))} not in the source at conversion; convert "
                          "again")
