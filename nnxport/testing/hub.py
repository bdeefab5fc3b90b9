"""A hub-style cache laid out locally, which huggingface_hub resolves offline (tests, demo, benchmarks)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from nnxport.sources.hub import is_hub_id

# ----------------------------------------------------------------------------------------- test/demo helper


def write_hub_cache(
    cache_dir: Path, repo_id: str, folder: Path, revision: str = "0123456789abcdef0123456789abcdef01234567",
    *, blobs: bool = False,
) -> Path:
    """Copy the files of ``folder`` into a hub-style cache (``models--org--name/snapshots/<revision>/``
    with ``refs/main`` = ``revision``), which ``snapshot_download`` resolves offline. Plain files, or with
    ``blobs`` the layout huggingface_hub writes: each file stored once as ``blobs/<sha256>`` and the
    snapshot's files relative symlinks ``../../blobs/<sha256>``. An existing snapshot of that revision is
    replaced. Returns the snapshot folder."""
    if not is_hub_id(repo_id):
        raise ValueError(f"not a hub id: {repo_id!r}")
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    if snapshot.exists():
        shutil.rmtree(snapshot)
    if blobs:
        store = repo_dir / "blobs"
        store.mkdir(parents=True, exist_ok=True)
        for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            rel = file.relative_to(folder)
            with file.open("rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            if not (store / digest).exists():
                shutil.copyfile(file, store / digest)
            link = snapshot / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(store / digest, link.parent))
    else:
        shutil.copytree(folder, snapshot)
    refs = repo_dir / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(revision)  # no newline: huggingface_hub reads the ref without stripping it
    return snapshot
