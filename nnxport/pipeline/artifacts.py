"""What travels with the weights: the tokenizer, generation and preprocessing files of a source, copied
unchanged into the output folder and listed (name, size, sha256) in the manifest's ``artifacts``.

Only the names in :data:`ARTIFACT_NAMES`, found at the top of a folder or hub snapshot source (a single
``.safetensors`` file brings none). Each must be a regular file that resolves inside the source (a hub
snapshot's blobs included): a symbolic link pointing elsewhere, a FIFO, a device or a folder under one of
these names is refused (SourceError, before any tensor is read), as a weight file would be. A file larger
than :data:`MAX_ARTIFACT_BYTES` is left out with a warning: the weights convert without it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from nnxport.errors import OutputError, SourceError
from nnxport.sources.base import Source
from nnxport.sources.files import check_inside, check_regular, open_regular, source_homes

log = logging.getLogger("nnxport")

ARTIFACT_NAMES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json", "generation_config.json", "preprocessor_config.json",
    "image_processor_config.json", "processor_config.json",
)
"""The files copied when a source has them (the names transformers' tokenizers, GenerationConfig and
image processors save and load)."""

MAX_ARTIFACT_BYTES = 64 * 2**20
"""The largest artifact copied (64 MiB; the largest published tokenizer.json files are ~35 MB)."""

_CHUNK = 1 << 20


def find_artifacts(src: Source) -> tuple[Path, ...]:
    """The source's artifacts to copy, checked (regular files inside the source, not too large)."""
    if src.kind == "file":
        return ()
    homes = source_homes(src.root, snapshot=src.kind == "hub")
    found: list[Path] = []
    for name in ARTIFACT_NAMES:
        path = src.root / name
        if not os.path.lexists(path):
            continue
        check_inside(path, homes)
        size = check_regular(path).st_size
        if size > MAX_ARTIFACT_BYTES:
            log.warning("%s: %d bytes, more than the %d MiB an artifact may have: not copied", path, size,
                        MAX_ARTIFACT_BYTES // 2**20)
            continue
        found.append(path)
    return tuple(found)


def copy_artifacts(found: tuple[Path, ...], src: Source, folder: Path) -> list[dict[str, Any]]:
    """Copy each of ``found`` into ``folder`` unchanged (re-checked once open: a file swapped for a link
    elsewhere or a FIFO since :func:`find_artifacts` is refused); the manifest's ``artifacts`` entries."""
    homes = source_homes(src.root, snapshot=src.kind == "hub")
    entries = []
    for path in found:
        fd = open_regular(path)
        with os.fdopen(fd, "rb") as fh:
            if os.path.isdir("/proc/self/fd"):
                check_inside(Path(f"/proc/self/fd/{fd}"), homes, str(path))
            entries.append(_copy(fh, path, folder / path.name))
    return entries


def _copy(fh: Any, path: Path, dest: Path) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    try:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise OutputError(f"{dest}: cannot write ({e.strerror or e})") from None
    with os.fdopen(out, "wb") as w:
        while chunk := fh.read(_CHUNK):
            size += len(chunk)
            if size > MAX_ARTIFACT_BYTES:
                raise SourceError(f"{path}: grew past {MAX_ARTIFACT_BYTES // 2**20} MiB while being copied")
            digest.update(chunk)
            try:
                w.write(chunk)
            except OSError as e:
                raise OutputError(f"{dest}: cannot write ({e.strerror or e})") from None
    return {"name": path.name, "size": size, "sha256": digest.hexdigest()}


def check_artifacts(folder: Path, manifest: dict[str, Any]) -> None:
    """SourceError naming the first artifact the manifest lists that is missing from ``folder``, not a
    regular file there, or no longer has the recorded size and sha256 (``nnxport verify``)."""
    for entry in manifest.get("artifacts") or []:
        path = folder / entry["name"]
        if not os.path.lexists(path):
            raise SourceError(f"{path}: listed in {folder / 'nnxport.json'} (artifacts) but missing")
        if path.is_symlink():
            raise SourceError(f"{path}: is a symbolic link; the converted folder holds its own copy")
        with os.fdopen(open_regular(path), "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        if digest != entry["sha256"]:
            raise SourceError(f"{path}: changed since the conversion (sha256 {digest[:12]}..., "
                              f"recorded {entry['sha256'][:12]}...)")
