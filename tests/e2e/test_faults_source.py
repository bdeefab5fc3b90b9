"""Untrusted sources and bounded work (issue 12, classes 2, 5 and 9), through the CLI.

Every file a source names must resolve inside its folder (a hub snapshot: inside the snapshot or its
repo's ``blobs/``), and is opened only if it is a regular file; YAML aliases are refused; a config asking
for more layers than the checkpoint holds fails before the model is built; pathological regexes are
refused when the mapping loads; an error lists at most 20 problems. Each case asserts the whole contract:
the exit code, one ``error:`` line naming the culprit, no traceback, nothing on stdout, no output or
staging folder, nothing outside the output folder changed, no file outside the source opened, and a
bounded time.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnxport.errors import DeviceError, MappingError, NnxportError, SourceError
from nnxport.models import get_family
from nnxport.sources import safetensors as safetensors_mod
from nnxport.sources.folder import open_source
from nnxport.testing.hub import write_hub_cache
from tests.helpers import RESNET_YAML, Opens, copy_source, shard, tree_state

SECRET = "SENTINEL-SECRET-7f3a"
BOMB = ("version: 1\nmodel: resnet\nrules:\n"
        "  - &a {from: x, to: y}\n"
        + "".join(f"  - &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9))
        + "  - *j\n")
"""A 400-byte billion laughs: 9**9 rules once expanded."""


@dataclass
class Case:
    """``args`` to ``nnxport convert`` after the source (``@X`` first: X is the source spec) and what
    the one error line must say; ``code`` 2 is a usage error (click's box, not an ``error:`` line)."""

    args: list[Any]
    says: list[str]
    code: int = 1
    command: str = "convert"
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture
def outside(tmp_path: Path, tiny_resnet_dir: Path) -> Path:
    """A folder next to the source with files nothing may open: a valid checkpoint and a JSON file that
    both hold the sentinel."""
    folder = tmp_path / "outside"
    folder.mkdir()
    shutil.copy(tiny_resnet_dir / "model.safetensors", folder / "secret.safetensors")
    (folder / "secret.json").write_text(json.dumps({"model_type": "resnet", "note": SECRET}))
    (folder / "secret.txt").write_text(SECRET)
    (folder / "sub").mkdir()
    shutil.copy(tiny_resnet_dir / "model.safetensors", folder / "sub" / "model.safetensors")
    return folder


def _index(src: Path, edit: Callable[[dict[str, str]], None]) -> Path:
    """Shard the source and rewrite its index's weight_map with ``edit``."""
    shard(src)
    index = src / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    edit(doc["weight_map"])
    index.write_text(json.dumps(doc))
    return index


def _first(weight_map: dict[str, str]) -> str:
    return min(weight_map)


# ------------------------------------------------------------------------------------ class 2: outside paths

def _entry(name: str | Callable[[Path], str], *says: str) -> Callable[[Path, Path], Case]:
    def make(src: Path, tmp: Path) -> Case:
        value = name(tmp) if callable(name) else name
        key: list[str] = []

        def edit(wm: dict[str, str]) -> None:
            key.append(_first(wm))
            wm[key[0]] = value

        index = _index(src, edit)
        return Case([], [str(index), f"weight_map entry {key[0]!r}", *says])

    return make


def _shard_links_outside(src: Path, tmp: Path) -> Case:
    index = _index(src, lambda wm: None)
    shard = src / "model-00001-of-00002.safetensors"
    shard.unlink()
    shard.symlink_to(tmp / "outside" / "secret.safetensors")
    return Case([], [str(index), "model-00001-of-00002.safetensors", "points outside",
                     str(tmp / "outside" / "secret.safetensors")])


def _subfolder_links_outside(src: Path, tmp: Path) -> Case:
    (src / "sub").symlink_to(tmp / "outside" / "sub")
    index = _index(src, lambda wm: wm.update({k: "sub/model.safetensors" for k in wm}))
    return Case([], [str(index), "'sub/model.safetensors'", "points outside",
                     str(tmp / "outside" / "sub" / "model.safetensors")])


def _weights_link_outside(src: Path, tmp: Path) -> Case:
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").symlink_to(tmp / "outside" / "secret.safetensors")
    return Case([], [f"{src / 'model.safetensors'} points outside {src}", "secret.safetensors"])


def _config_links_outside(src: Path, tmp: Path) -> Case:
    (src / "config.json").unlink()
    (src / "config.json").symlink_to(tmp / "outside" / "secret.json")
    return Case([], [f"{src / 'config.json'} points outside", "secret.json"])


def _index_links_outside(src: Path, tmp: Path) -> Case:
    index = _index(src, lambda wm: None)
    shutil.move(index, tmp / "outside" / "index.json")
    index.symlink_to(tmp / "outside" / "index.json")
    return Case([], [f"{index} points outside", "index.json"])


def _pickle_index_escapes(src: Path, tmp: Path) -> Case:
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "../outside/secret.bin"}}))
    return Case(["--allow-pickle"], ["pytorch_model.bin.index.json", "'a.weight'", "'..'"])


def _many_files(src: Path, tmp: Path) -> Case:
    index = _index(src, lambda wm: wm.update({f"k{i}": f"f{i}.safetensors" for i in range(20000)}))
    return Case([], [str(index), "names 20002 files", "(at most 10000 here)"])


def _hub_blob_of_another_repo(src: Path, tmp: Path) -> Case:
    cache = Path(os.environ["HF_HUB_CACHE"])
    other = write_hub_cache(cache, "faults/other-blobs", src, blobs=True)
    snapshot = write_hub_cache(cache, "faults/stolen-blob", src, blobs=True)
    link = snapshot / "model.safetensors"
    target = os.path.realpath(other / "model.safetensors")
    link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))
    return Case(["@faults/stolen-blob"], [f"{link} points outside {snapshot}", "models--faults--other-blobs"])


def _hub_index_names_a_blob(src: Path, tmp: Path) -> Case:
    shard(src)
    snapshot = write_hub_cache(Path(os.environ["HF_HUB_CACHE"]), "faults/blob-by-name", src, blobs=True)
    index = snapshot / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    blob = os.path.relpath(os.path.realpath(snapshot / "model-00001-of-00002.safetensors"), snapshot)
    key = _first(doc["weight_map"])
    doc["weight_map"][key] = blob
    index.unlink()
    index.write_text(json.dumps(doc))
    return Case(["@faults/blob-by-name"], [f"weight_map entry {key!r}", "'..'"])


# ------------------------------------------------------------------------------- class 5 / 9: bounded work

def _fifo(name: str) -> Callable[[Path, Path], Case]:
    def make(src: Path, tmp: Path) -> Case:
        if name == "model.safetensors.index.json":
            shard(src)
        path = src / name
        if path.exists():
            path.unlink()
        os.mkfifo(path)
        return Case([], [str(path), "is a FIFO (named pipe), not a regular file"])

    return make


def _config_yaml_fifo(src: Path, tmp: Path) -> Case:
    os.mkfifo(tmp / "c.yaml")
    return Case(["--config", tmp / "c.yaml"], [str(tmp / "c.yaml"), "is a FIFO"])


def _mapping_fifo(src: Path, tmp: Path) -> Case:
    os.mkfifo(tmp / "m.yaml")
    return Case(["--mapping", tmp / "m.yaml"], [str(tmp / "m.yaml"), "cannot read mapping file",
                                                  "not a regular file"])


def _device_as_source(src: Path, tmp: Path) -> Case:
    return Case(["@/dev/zero"], ["/dev/zero: is a character device, not a regular file"])


def _mapping_text(text: str, *says: str) -> Callable[[Path, Path], Case]:
    def make(src: Path, tmp: Path) -> Case:
        (tmp / "m.yaml").write_text(text)
        return Case(["--mapping", tmp / "m.yaml"], [f"{tmp / 'm.yaml'}: ", *says])

    return make


def _config_yaml(text: str, *says: str) -> Callable[[Path, Path], Case]:
    def make(src: Path, tmp: Path) -> Case:
        (tmp / "c.yaml").write_text(text)
        return Case(["--config", tmp / "c.yaml"], [f"{tmp / 'c.yaml'}: ", *says])

    return make


def _config_edit(edit: Callable[[dict[str, Any]], None], *says: str) -> Callable[[Path, Path], Case]:
    def make(src: Path, tmp: Path) -> Case:
        cfg = json.loads((src / "config.json").read_text())
        edit(cfg)
        (src / "config.json").write_text(json.dumps(cfg))
        return Case([], list(says))

    return make


def _config_duplicate_key(src: Path, tmp: Path) -> Case:
    text = (src / "config.json").read_text()
    (src / "config.json").write_text(text.replace("{", '{"depths": [1, 200], ', 1))
    return Case([], [str(src / "config.json"), "names 'depths' twice ([1, 200] and [1, 2])"])


def _bad_rules(src: Path, tmp: Path) -> Case:
    rules = "".join(f"  - from: '^x{i}('\n    to: 'y{i}'\n" for i in range(500))
    (tmp / "m.yaml").write_text(f"version: 1\nmodel: resnet\nrules:\n{rules}")
    return Case(["--mapping", tmp / "m.yaml"], [f"{tmp / 'm.yaml'}: 500 problems", "... and 480 more"],
                extra={"lines": 22})


def _source_loop(src: Path, tmp: Path) -> Case:
    (tmp / "loop-a").symlink_to(tmp / "loop-b")
    (tmp / "loop-b").symlink_to(tmp / "loop-a")
    return Case([f"@{tmp / 'loop-a'}"], [f"{tmp / 'loop-a'}: symlink loop"])


def _weights_loop(src: Path, tmp: Path) -> Case:
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").symlink_to("model.safetensors")
    return Case([], [f"{src / 'model.safetensors'}: symlink loop"])


def _config_broken_link(src: Path, tmp: Path) -> Case:
    (src / "config.json").unlink()
    (src / "config.json").symlink_to("gone.json")
    return Case([], [f"{src / 'config.json'}: broken symlink", "'gone.json'"])


def _usage(*args: Any, says: str) -> Callable[[Path, Path], Case]:
    return lambda src, tmp: Case(list(args), [says], code=2)


ALIAS = "alias *a refused"
CASES: dict[str, Callable[[Path, Path], Case]] = {
    # class 2: every file a source names resolves inside it
    "index-entry-dotdot": _entry("../secret.safetensors", "goes up a folder with '..'"),
    "index-entry-etc-passwd": _entry("/etc/passwd", "is an absolute path"),
    "index-entry-absolute-into-outside": _entry(lambda t: str(t / "outside" / "secret.safetensors"),
                                                "is an absolute path"),
    "index-entry-sub-dotdot-dotdot": _entry("sub/../../x", "goes up a folder with '..'"),
    "index-entry-nul": _entry("model\x00.safetensors", "'model\\x00.safetensors'", "NUL"),
    "index-entry-newline": _entry("a\nb.safetensors", "'a\\nb.safetensors'", "line-break"),
    "index-entry-empty": _entry("", "the file name is empty"),
    "index-entry-windows-drive": _entry("C:\\secret.safetensors", "is an absolute path"),
    "index-names-20000-files": _many_files,
    "index-shard-symlink-outside": _shard_links_outside,
    "index-subfolder-symlink-outside": _subfolder_links_outside,
    "index-json-symlink-outside": _index_links_outside,
    "weights-symlink-outside": _weights_link_outside,
    "config-json-symlink-outside": _config_links_outside,
    "pickle-index-entry-dotdot": _pickle_index_escapes,
    "hub-snapshot-links-another-repos-blob": _hub_blob_of_another_repo,
    "hub-index-names-blob-by-dotdot": _hub_index_names_a_blob,
    # class 5: bounded work
    "mapping-alias-bomb": _mapping_text(BOMB, "line 5", "alias *a refused"),
    "mapping-merge-key": _mapping_text(RESNET_YAML.replace("rules:\n", "x: &a {}\nrules:\n  - {<<: *a}\n",
                                                           1), ALIAS),
    "mapping-over-1-mb": _mapping_text("# " + "x" * 1_000_001 + "\n", "larger than 1 MB"),
    "mapping-nested-quantifier": _mapping_text(
        RESNET_YAML + "  - from: '^(a+)+$'\n    to: 'x'\n", "'^(a+)+$'", "a repeat inside a repeat"),
    "mapping-overlapping-alternation": _mapping_text(
        RESNET_YAML + "  - from: '^(a|aa)*$'\n    to: 'x'\n", "an alternation whose branches"),
    "mapping-ignore-nested-quantifier": _mapping_text(
        RESNET_YAML.replace("ignore:\n", "ignore:\n  - '(x*)*y'\n", 1), "'(x*)*y'", "exponential time"),
    "mapping-500-problems-capped": _bad_rules,
    "config-yaml-alias-bomb": _config_yaml(BOMB.replace("version: 1\nmodel: resnet\nrules:\n", "x:\n"),
                                           "invalid YAML at line 3", ALIAS),
    "config-yaml-over-1-mb": _config_yaml("a: " + "x" * 1_000_001 + "\n", "larger than 1 MB"),
    "config-yaml-nested-too-deeply": _config_yaml("x: " + "[" * 5000 + "\n", "nested too deeply"),
    "config-2000-layers-in-a-stage": _config_edit(
        lambda c: c.update(depths=[1, 2000]), "field 'depths' is [1, 2000]", "hold [1, 2] layers per stage"),
    "config-more-stages-than-keys": _config_edit(
        lambda c: c.update(depths=[1, 2, 3], hidden_sizes=[32, 64, 128]), "field 'depths' is [1, 2, 3]"),
    "config-over-4096-layers": _config_edit(lambda c: c.update(depths=[1, 5000]),
                                            "field 'depths' asks for 5001 layers", "(4096)"),
    "fifo-model-safetensors": _fifo("model.safetensors"),
    "fifo-index-json": _fifo("model.safetensors.index.json"),
    "fifo-config-json": _fifo("config.json"),
    "fifo-config-yaml": _config_yaml_fifo,
    "fifo-mapping": _mapping_fifo,
    "character-device-as-source": _device_as_source,
    # class 9
    "symlink-loop-as-source": _source_loop,
    "symlink-loop-weights": _weights_loop,
    "config-json-broken-symlink": _config_broken_link,
    "config-json-duplicate-key": _config_duplicate_key,
    "mesh-empty": _usage("--mesh", "", says="'--mesh': empty"),
    "mesh-blank": _usage("--mesh", "  ", says="'--mesh': empty"),
    "num-processes-negative": _usage("--num-processes", "-1", says="'--num-processes'"),
    "process-id-negative": _usage("--process-id", "-1", says="'--process-id'"),
    "process-id-not-below-count": _usage("--num-processes", "2", "--process-id", "2",
                                         says="--process-id 2 is not in 0..1"),
    "process-id-before-count": _usage("--process-id", "3", "--num-processes", "2",
                                      says="--process-id 3 is not in 0..1"),
}
def _fifo_shard(src: Path, tmp: Path) -> Case:
    shard(src)
    path = src / "model-00001-of-00002.safetensors"
    path.unlink()
    os.mkfifo(path)
    return Case([], [str(path), "is a FIFO (named pipe)"])


CASES["fifo-shard"] = _fifo_shard


@pytest.mark.parametrize("row", list(CASES))
def test_hostile_source(row: str, tiny_resnet_dir: Path, tmp_path: Path, outside: Path, opens: Opens,
                        alarm: None, cli: Any) -> None:
    src = copy_source(tiny_resnet_dir, tmp_path)
    case = CASES[row](src, tmp_path)
    args = [str(a) for a in case.args]
    spec = args.pop(0)[1:] if args and args[0].startswith("@") else str(src)
    out = tmp_path / "out"
    before = tree_state(tmp_path)
    started = time.monotonic()
    res = cli(case.command, spec, *args, "--out", out, "-q")
    took = time.monotonic() - started
    assert res.exit_code == case.code, (res.stdout, res.stderr)
    assert res.stdout == ""
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
    assert SECRET not in res.stderr
    if case.code == 1:
        lines = res.stderr.strip().splitlines()
        assert res.stderr.startswith("error: "), res.stderr
        assert len(lines) == case.extra.get("lines", 1), res.stderr
    text = " ".join(res.stderr.replace("│", " ").split()) if case.code == 2 else res.stderr
    for fragment in case.says:
        assert fragment in text, f"{fragment!r} not in {res.stderr!r}"
    assert not out.exists()
    assert tree_state(tmp_path) == before  # nothing created, changed or deleted: no staging folder either
    assert opens.inside(outside) == [], "a file outside the source was opened"
    assert took < 30, f"took {took:.1f} s"


def test_matrix_size() -> None:
    assert len(CASES) >= 45


# --------------------------------------------------------------------------------------- what still works

def test_hub_cache_with_blob_symlinks_converts(tiny_resnet_dir: Path, tmp_path: Path, cli: Any) -> None:
    """The hub's own layout (snapshot files as symlinks into ../../blobs) is followed."""
    snapshot = write_hub_cache(Path(os.environ["HF_HUB_CACHE"]), "faults/blobs", tiny_resnet_dir, blobs=True)
    assert (snapshot / "model.safetensors").is_symlink()
    assert os.readlink(snapshot / "model.safetensors").startswith("../../blobs/")
    res = cli("convert", "faults/blobs", "--out", tmp_path / "out", "--no-parity", "--format", "json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["source"] == "faults/blobs"


def test_sharded_hub_cache_with_blobs_opens(tiny_resnet_dir: Path, tmp_path: Path) -> None:
    src = shard(copy_source(tiny_resnet_dir, tmp_path))
    write_hub_cache(Path(os.environ["HF_HUB_CACHE"]), "faults/blobs-sharded", src, blobs=True)
    with open_source("faults/blobs-sharded") as s:
        assert len(s.files) == 2 and s.config is not None
        assert s.read("classifier.1.bias").shape == (10,)


def test_files_inside_the_folder_are_followed(tiny_resnet_dir: Path, tmp_path: Path) -> None:
    """A subfolder entry and a symlink that stays inside are fine; so is a source folder that is itself
    a symlink, and a --config the user names anywhere."""
    src = copy_source(tiny_resnet_dir, tmp_path)
    (src / "sub").mkdir()
    shutil.move(src / "model.safetensors", src / "sub" / "weights.safetensors")
    (src / "model.safetensors").symlink_to("sub/weights.safetensors")
    (tmp_path / "alias").symlink_to(src)
    with open_source(tmp_path / "alias") as s:
        assert s.config is not None and len(s.tensors) > 10
    idx = _index(src, lambda wm: None)
    doc = json.loads(idx.read_text())
    shutil.move(src / "model-00001-of-00002.safetensors", src / "sub" / "part1.safetensors")
    doc["weight_map"] = {k: ("sub/part1.safetensors" if v.startswith("model-00001") else v)
                         for k, v in doc["weight_map"].items()}
    idx.write_text(json.dumps(doc))
    shutil.move(src / "config.json", tmp_path / "elsewhere.json")
    with open_source(src, config=tmp_path / "elsewhere.json") as s:
        assert {f.name for f in s.files} == {"sub/part1.safetensors", "model-00002-of-00002.safetensors"}


def test_built_in_mappings_pass_the_backtracking_check() -> None:
    from nnxport.mapping.loader import compile_regex
    from nnxport.pipeline.plan import builtin_mappings

    for m in builtin_mappings():
        for r in m.rules:
            assert not isinstance(compile_regex(r.source), str), r.source
    for ok in [r"^(?:bert\.)?x$", r"(weight|bias)+", r"(a++)+", r"(?>a+)+", r"^h\.(\d+)\.ln_(1|2)$"]:
        assert not isinstance(compile_regex(ok), str), ok


def test_json_output_keeps_every_problem(tmp_path: Path, tiny_resnet_dir: Path, cli: Any) -> None:
    """The stderr error is capped at 20 problems; inspect-keys' JSON is data and lists them all."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    src = copy_source(tiny_resnet_dir, tmp_path)
    tensors = load_file(src / "model.safetensors")
    extra = {f"resnet.extra{i}.weight": np.ones(1, np.float32) for i in range(60)}
    save_file({**tensors, **extra}, str(src / "model.safetensors"))
    res = cli("convert", src, "--out", tmp_path / "o", "-q")
    assert res.exit_code == 1 and res.stderr.startswith("error: ")
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 22 and lines[0].endswith(": 60 problems") and lines[-1] == "  ... and 40 more"
    res = cli("inspect-keys", src, "--format", "json")
    problems = json.loads(res.stdout)["problems"]
    assert len(problems) == 60, problems
    err = MappingError("m.yaml", [f"p{i}" for i in range(200_000)])
    assert len(str(err).splitlines()) == 22 and len(err.problems) == 200_000
    assert str(err).endswith("... and 199980 more")


# ------------------------------------------------------------------------------------------ API and layers

def test_api_refuses_bad_mesh_and_process_numbers(tiny_resnet_dir: Path, tmp_path: Path) -> None:
    from nnxport import api
    from nnxport.placement import init_distributed, parse_mesh

    for spec in ["", " ", ","]:
        with pytest.raises(DeviceError, match=r"^mesh "):
            parse_mesh(spec)
    with pytest.raises(DeviceError, match="num_processes=-1"):
        init_distributed(None, -1, None)
    with pytest.raises(DeviceError, match="process_id=-1"):
        init_distributed(None, None, -1)
    with pytest.raises(DeviceError, match=r"process_id=2: must be in 0\.\.1"):
        init_distributed(None, 2, 2)
    with pytest.raises(DeviceError, match="empty"):
        api.convert(tiny_resnet_dir, tmp_path / "o", mesh="")
    assert not (tmp_path / "o").exists()


KEYS = {
    "decoder": ("num_hidden_layers", [f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)]),
    "gpt2": ("n_layer", [f"h.{i}.attn.c_attn.weight" for i in range(2)]),
    "bert": ("num_hidden_layers", [f"bert.encoder.layer.{i}.output.dense.weight" for i in range(2)]),
    "vit": ("num_hidden_layers", [f"vit.encoder.layer.{i}.output.dense.weight" for i in range(2)]),
}


@pytest.mark.parametrize("name", list(KEYS))
def test_layer_count_checked_against_keys(name: str) -> None:
    family = get_family(name)
    field_name, keys = KEYS[name]
    family.check_layers({field_name: 2}, keys)
    family.check_layers({field_name: 1}, keys)  # fewer: the mapping reports the keys left over
    family.check_layers({field_name: 2000}, ["other.naming.0.weight"])  # nothing to compare with
    with pytest.raises(NnxportError, match=rf"field '{field_name}' is 2000, but the checkpoint's keys hold "
                                           r"only 2 layers \(0\.\.1\)"):
        family.check_layers({field_name: 2000}, keys)
    with pytest.raises(NnxportError, match=rf"field '{field_name}' asks for 5000 layers"):
        family.check_layers({field_name: 5000}, None)


def test_resnet_stage_counts_against_keys() -> None:
    family = get_family("resnet")
    keys = [f"resnet.encoder.stages.{s}.layers.{i}.shortcut.convolution.weight"
            for s, n in enumerate([3, 4]) for i in range(n)]
    family.check_layers({"depths": [3, 4]}, keys)
    with pytest.raises(NnxportError, match=r"'depths' is \[3, 40\], but the checkpoint's keys hold \[3, 4\]"):
        family.check_layers({"depths": [3, 40]}, keys)


def _gpt2_2000_layers(tmp: Path) -> Path:
    from nnxport.testing.replicas import build_replica, published_config

    cfg = published_config("openai-community/gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                           n_positions=32)
    folder = build_replica(cfg, tmp / "gpt2")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_layer": 2000}))
    return folder


def test_2000_layer_config_fails_fast_and_small(tmp_path: Path) -> None:
    """In a fresh interpreter (as a user runs it): time and peak RSS of the worst bounded cases."""
    folder = _gpt2_2000_layers(tmp_path)
    (tmp_path / "bomb.yaml").write_text(BOMB)
    for args, says in [([folder], "field 'n_layer' is 2000, but the checkpoint's keys hold only 2 layers"),
                       ([folder, "--mapping", tmp_path / "bomb.yaml"], ALIAS)]:
        probe = ("import resource, subprocess, sys, time; t = time.monotonic(); "
                 "p = subprocess.run([sys.executable, '-m', 'nnxport', 'convert', *sys.argv[1:]], "
                 "capture_output=True, text=True, timeout=120); "
                 "print(p.returncode, round(time.monotonic() - t, 2), "
                 "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024); "
                 "print(p.stderr, file=sys.stderr)")
        argv = [sys.executable, "-c", probe, *map(str, args), "--out", str(tmp_path / "o"), "-q"]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=180)
        code, took, rss_mb = res.stdout.split()
        print(f"{says[:30]}: exit {code}, {took} s, peak RSS {rss_mb} MB")
        assert code == "1" and says in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
        assert float(took) < 30 and int(rss_mb) < 1500
        assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- hypothesis: no escape

_PARTS = st.sampled_from(["..", ".", "", "/", "sub", "link", "model.safetensors", "secret.safetensors",
                          "outside", "/etc/passwd", "\x00", "é", "モデル", "a" * 300, "\\", "C:", "~",
                          "model-00001-of-00002.safetensors", "blobs", "\u2028", "\n"])
_NAMES = st.lists(_PARTS, min_size=0, max_size=6).map("/".join)
_VALUES = st.one_of(_NAMES, _NAMES, _NAMES, st.none(), st.integers(), st.lists(_NAMES, max_size=2),
                    st.dictionaries(st.text(max_size=3), _NAMES, max_size=2))
_KEYS = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=20)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(weight_map=st.dictionaries(_KEYS, _VALUES, max_size=6), as_list=st.booleans())
def test_random_index_never_escapes(weight_map: dict[str, Any], as_list: bool, tiny_resnet_dir: Path,
                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "src"
    root.mkdir()
    outside = base / "outside"
    outside.mkdir()
    shutil.copy(tiny_resnet_dir / "model.safetensors", outside / "secret.safetensors")
    (outside / "model.safetensors").write_text(SECRET)
    shutil.copy(tiny_resnet_dir / "model.safetensors", root / "model.safetensors")
    (root / "link").symlink_to(outside)
    (root / "secret.safetensors").symlink_to(outside / "secret.safetensors")
    doc: Any = {"metadata": {}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps([doc] if as_list else doc))
    seen = Opens()
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

    def track(fn: Callable[..., Any]) -> Callable[..., Any]:
        def opened(path: Any, *a: Any, **k: Any) -> Any:
            if isinstance(path, str | os.PathLike):
                seen.paths.append(os.path.realpath(os.fsdecode(path).replace("\x00", "")))
            return fn(path, *a, **k)

        return opened

    builtins.open, io.open, os.open = track(real_open), track(real_io_open), track(real_os_open)
    safe_open = safetensors_mod.safe_open
    safetensors_mod.safe_open = track(safe_open)
    try:
        try:
            with open_source(root) as src:
                for key in list(src.tensors)[:3]:
                    src.read(key)
        except SourceError as e:
            assert "\n" not in str(e) and len(str(e).splitlines()) == 1, str(e)
            assert SECRET not in str(e)
    finally:
        builtins.open, io.open, os.open = real_open, real_io_open, real_os_open
        safetensors_mod.safe_open = safe_open
    assert seen.inside(outside) == [], seen.inside(outside)
    shutil.rmtree(base)
