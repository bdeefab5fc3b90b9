"""What travels with the weights: the tokenizer, generation and preprocessor files of a source are copied
unchanged into the output folder, listed (name, size, sha256) in the manifest, fetched from the hub, and
re-checked by ``verify``; hostile ones (a link out of the source, a FIFO, a folder, an oversized file)
hold the fault-matrix contract."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import nnxport
from nnxport.errors import SourceError
from nnxport.pipeline.artifacts import ARTIFACT_NAMES, MAX_ARTIFACT_BYTES
from nnxport.sources.hub import HUB_PATTERNS
from nnxport.testing.hub import write_hub_cache
from tests.helpers import Opens, tree_state

SECRET = "SENTINEL-SECRET-artifacts"
FILES = {
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}),
    "tokenizer_config.json": json.dumps({"model_max_length": 512, "tokenizer_class": "GPT2Tokenizer"}),
    "special_tokens_map.json": json.dumps({"eos_token": "<|endoftext|>"}),
    "vocab.json": json.dumps({"a": 0, "b": 1}),
    "merges.txt": "#version: 0.2\na b\n",
    "spiece.model": "\x00\x01binary-ish\xff",
    "generation_config.json": json.dumps({"max_new_tokens": 20, "do_sample": False}),
    "preprocessor_config.json": json.dumps({"do_resize": True, "size": {"shortest_edge": 224}}),
}


def with_artifacts(tiny: Path, dest: Path) -> Path:
    shutil.copytree(tiny, dest)
    for name, text in FILES.items():
        (dest / name).write_text(text, encoding="utf-8", errors="surrogateescape")
    (dest / "README.md").write_text("not an artifact")
    (dest / "notes.txt").write_text("neither")
    return dest


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_copied(src: Path, out: Path) -> None:
    manifest = json.loads((out / "nnxport.json").read_text())
    names = set(FILES) | ({"generation_config.json"} if (src / "generation_config.json").exists() else set())
    assert {a["name"] for a in manifest["artifacts"]} == names
    for entry in manifest["artifacts"]:
        copied = out / entry["name"]
        assert copied.is_file() and not copied.is_symlink()
        assert copied.read_bytes() == (src / entry["name"]).read_bytes()  # unchanged
        assert entry["size"] == copied.stat().st_size and entry["sha256"] == sha(copied)
    assert not (out / "README.md").exists() and not (out / "notes.txt").exists()


def test_folder_artifacts_are_copied_listed_and_verified(tiny_resnet_dir: Path, tmp_path: Path,
                                                         cli: Any) -> None:
    src = with_artifacts(tiny_resnet_dir, tmp_path / "src")
    out = tmp_path / "out"
    res = cli("convert", src, "--out", out, "-q")
    assert res.exit_code == 0, res.stderr
    check_copied(src, out)
    assert cli("verify", out, "-q").exit_code == 0
    # verify re-checks each copy's sha256, like the source's weights: a change is one error line.
    (out / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {"b": 0}}}')
    res = cli("verify", out, "-q")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "tokenizer.json: changed since the conversion" in res.stderr
    (out / "tokenizer.json").unlink()
    res = cli("verify", out, "-q")
    assert res.exit_code == 1 and "tokenizer.json: listed in" in res.stderr and "missing" in res.stderr
    (out / "tokenizer.json").symlink_to(src / "tokenizer.json")  # same bytes, but not the folder's own
    res = cli("verify", out, "-q")
    assert res.exit_code == 1 and "is a symbolic link" in res.stderr


def test_hub_snapshot_artifacts(tiny_resnet_dir: Path, tmp_path: Path, hub_cache: Path, cli: Any) -> None:
    """A hub download fetches every artifact name (HUB_PATTERNS), and the snapshot's blob symlinks are
    followed inside the cache repo."""
    for name in ARTIFACT_NAMES:
        assert any(fnmatch.fnmatch(name, p) for p in HUB_PATTERNS), name
    src = with_artifacts(tiny_resnet_dir, tmp_path / "src")
    write_hub_cache(hub_cache, "nnxport-test/tiny-with-tokenizer", src, blobs=True)
    out = tmp_path / "out"
    res = cli("convert", "nnxport-test/tiny-with-tokenizer", "--out", out, "--no-parity", "-q")
    assert res.exit_code == 0, res.stderr
    check_copied(src, out)


def test_a_single_file_source_brings_none(tiny_resnet_dir: Path, tmp_path: Path) -> None:
    src = with_artifacts(tiny_resnet_dir, tmp_path / "src")
    result = nnxport.convert(src / "model.safetensors", tmp_path / "out", config=src / "config.json",
                             mapping="resnet", parity=False)
    assert result.manifest["artifacts"] == []
    assert not (tmp_path / "out" / "tokenizer.json").exists()


@pytest.mark.parametrize(("edit", "says"), [
    (lambda a: a.append({"name": "../../etc/passwd", "size": 1, "sha256": "0" * 64}), "artifacts[1].name"),
    (lambda a: a.append(dict(a[0])), "artifacts[1].name"),
    (lambda a: a[0].update(sha256="xyz"), "artifacts[0].sha256"),
    (lambda a: a[0].update(size=-1), "artifacts[0].size"),
])
def test_the_artifacts_field_is_validated(tiny_resnet_dir: Path, tmp_path: Path,
                                          edit: Callable[[list[Any]], None], says: str) -> None:
    src = shutil.copytree(tiny_resnet_dir, tmp_path / "src")
    (src / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    nnxport.convert(src, out, parity=False)
    manifest = json.loads((out / "nnxport.json").read_text())
    edit(manifest["artifacts"])
    (out / "nnxport.json").write_text(json.dumps(manifest))
    with pytest.raises(SourceError, match=f"nnxport.json: {says.replace('[', '.').replace(']', '.')}"):
        nnxport.load(out)


# ------------------------------------------------------------------------------------------ the fault matrix

def _link_outside(src: Path, outside: Path) -> None:
    (src / "tokenizer.json").symlink_to(outside / "secret.json")


def _link_to_outside_fifo(src: Path, outside: Path) -> None:
    os.mkfifo(outside / "pipe")
    (src / "tokenizer_config.json").symlink_to(outside / "pipe")


def _fifo(src: Path, outside: Path) -> None:
    os.mkfifo(src / "tokenizer.json")


def _folder(src: Path, outside: Path) -> None:
    (src / "vocab.txt").mkdir()


def _oversized(src: Path, outside: Path) -> None:
    with (src / "tokenizer.json").open("wb") as fh:
        fh.truncate(MAX_ARTIFACT_BYTES + 1)  # sparse: nothing to write or read


HOSTILE: dict[str, tuple[Callable[[Path, Path], None], int, list[str]]] = {
    "symlink-outside": (_link_outside, 1, ["tokenizer.json points outside", "nnxport reads only files"]),
    "symlink-to-outside-fifo": (_link_to_outside_fifo, 1, ["tokenizer_config.json points outside"]),
    "fifo": (_fifo, 1, ["tokenizer.json: is a FIFO (named pipe), not a regular file"]),
    "folder": (_folder, 1, ["vocab.txt: is a folder, not a file"]),
    "oversized": (_oversized, 0, ["tokenizer.json", "more than the 64 MiB an artifact may have: not copied"]),
}


@pytest.mark.parametrize("row", list(HOSTILE))
def test_hostile_artifacts(row: str, tiny_resnet_dir: Path, tmp_path: Path, opens: Opens, alarm: None,
                           cli: Any) -> None:
    """A link out of the source, a FIFO or a folder under an artifact's name: exit 1, one ``error:`` line
    naming it, nothing outside the source opened, no output or staging folder. An oversized one: the
    conversion goes on without it, with one warning line."""
    make, code, says = HOSTILE[row]
    src = shutil.copytree(tiny_resnet_dir, tmp_path / "src")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text(json.dumps({"note": SECRET}))
    make(src, outside)
    out = tmp_path / "out"
    before = tree_state(tmp_path)
    opens.paths.clear()  # what the test itself wrote
    res = cli("convert", src, "--out", out, "--no-parity", "--format", "json", *(["-q"] if code else []))
    assert res.exit_code == code, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and SECRET not in res.stderr + res.stdout
    assert opens.inside(outside) == [], "opened outside the source"
    for fragment in says:
        assert fragment in res.stderr, (fragment, res.stderr)
    if code == 1:
        assert res.stdout == ""
        assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not out.exists()
        assert tree_state(tmp_path) == before  # no staging folder, nothing changed
    else:
        warnings = [ln for ln in res.stderr.splitlines() if "not copied" in ln]
        assert len(warnings) == 1, res.stderr
        manifest = json.loads((out / "nnxport.json").read_text())
        assert "tokenizer.json" not in {a["name"] for a in manifest["artifacts"]}
        assert not (out / "tokenizer.json").exists()
