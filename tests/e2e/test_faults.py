"""The fault matrix: every failure a user can cause, one row each, through the CLI.

Each row breaks one thing (a source file, the mapping, a value, the output) and asserts the same contract:
the exit code (1, or the signal's in test_signals.py), one short line on stderr that names the culprit,
no traceback, nothing on stdout, and no output folder (or staging leftover) that could pass for a
finished one. docs/errors.md catalogues the messages.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from safetensors.numpy import load_file, save_file

from nnxport.sources.base import Source
from nnxport.testing.hub import write_hub_cache
from tests.helpers import (
    CLS_WEIGHT_OPS,
    RESNET_YAML,
    STEM_VAR_RULE,
    copy_source,
    hub_response,
    run_subprocess,
    shard,
)

STEM_KEY = "resnet.embedder.embedder.convolution.weight"


@dataclass
class Case:
    """A broken copy of the tiny ResNet (``args`` to ``nnxport convert`` after the source) and what the
    error must say. ``{src}`` / ``{tmp}`` in fragments are the source path / the test's folder."""

    args: list[Any]
    says: list[str]
    #: Mapping errors list every problem together: "FILE: N problems" then one line each.
    problems: int = 1


def _rewrite(path: Path, edit: Callable[[dict[str, Any], bytes], tuple[bytes, bytes]]) -> None:
    """Rewrite a safetensors file's header (and data) with ``edit(header, data) -> (header, data)``."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header, data = edit(json.loads(blob[8:8 + n]), blob[8 + n:])
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def _first_two(header: dict[str, Any]) -> tuple[str, str]:
    keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return keys[0], keys[1]


def _set_value(src: Path, key: str, value: float, index: int = 0) -> None:
    tensors = load_file(src / "model.safetensors")
    flat = tensors[key].reshape(-1)
    flat[index] = value
    save_file(tensors, str(src / "model.safetensors"))


def _truncated(src: Path, tmp: Path) -> Case:
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return Case([], [str(f), "which has only", "(truncated?)"])


def _header_too_long(src: Path, tmp: Path) -> Case:
    f = src / "model.safetensors"
    blob = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(blob)) + blob[8:])
    return Case([], [str(f), f"header length {len(blob)} runs past the end of the file"])


def _header_not_json(src: Path, tmp: Path) -> Case:
    f = src / "model.safetensors"
    _rewrite(f, lambda h, d: (b"{" + json.dumps(h).encode()[2:], d))
    return Case([], [str(f), "header is not valid JSON at column"])


def _header_not_object(src: Path, tmp: Path) -> Case:
    f = src / "model.safetensors"
    _rewrite(f, lambda h, d: (json.dumps([h]).encode(), d))
    return Case([], [str(f), "header is not a JSON object"])


def _unknown_dtype(src: Path, tmp: Path) -> Case:
    f = src / "model.safetensors"

    def edit(h: dict[str, Any], d: bytes) -> tuple[bytes, bytes]:
        h[STEM_KEY]["dtype"] = "F31"
        return json.dumps(h).encode(), d

    _rewrite(f, edit)
    return Case([], [str(f), repr(STEM_KEY), "dtype F31, which nnxport does not know"])


def _offsets_overlap(src: Path, tmp: Path) -> Case:
    f = src / "model.safetensors"
    names: list[str] = []

    def edit(h: dict[str, Any], d: bytes) -> tuple[bytes, bytes]:
        a, b = _first_two(h)
        names.extend([a, b])
        h[b]["data_offsets"] = [o - 4 for o in h[b]["data_offsets"]]
        return json.dumps(h).encode(), d

    _rewrite(f, edit)
    return Case([], [str(f), f"tensor {names[1]!r}'s data", f"overlaps {names[0]!r}'s"])


def _offsets_out_of_range(src: Path, tmp: Path) -> Case:
    f = src / "model.safetensors"

    def edit(h: dict[str, Any], d: bytes) -> tuple[bytes, bytes]:
        last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        h[last]["shape"] = [*h[last]["shape"][:-1], h[last]["shape"][-1] * 2]
        begin, end = h[last]["data_offsets"]
        h[last]["data_offsets"] = [begin, begin + 2 * (end - begin)]
        return json.dumps(h).encode(), d

    _rewrite(f, edit)
    return Case([], [str(f), "data ends at byte", "(truncated?)"])


def _missing_shard(src: Path, tmp: Path) -> Case:
    (shard(src) / "model-00002-of-00002.safetensors").unlink()
    return Case([], ["model.safetensors.index.json", "model-00002-of-00002.safetensors",
                     "the checkpoint is incomplete"])


def _index_names_twice(src: Path, tmp: Path) -> Case:
    shard(src)
    index = src / "model.safetensors.index.json"
    text = index.read_text()
    key = json.dumps(STEM_KEY)
    dup = f'"weight_map": {{{key}: "model-00002-of-00002.safetensors", '
    index.write_text(text.replace('"weight_map": {', dup))
    return Case([], [str(index), f"names {STEM_KEY!r} twice", "model-00002-of-00002.safetensors"])


def _incomplete_snapshot(src: Path, tmp: Path) -> Case:
    snapshot = write_hub_cache(Path(os.environ["HF_HUB_CACHE"]), "faults/partial", shard(src))
    (snapshot / "model-00001-of-00002.safetensors").unlink()
    return Case(["@faults/partial"], ["model-00001-of-00002.safetensors", "the snapshot is incomplete"])


def _not_in_offline_cache(src: Path, tmp: Path) -> Case:
    return Case(["@faults/never-downloaded"],
                ["faults/never-downloaded is not in the local Hugging Face cache",
                                               "HF_HUB_OFFLINE=1"])


def _hub_raises(error: Exception) -> Callable[..., str]:
    def fail(repo_id: str, *, revision: str | None, **kwargs: Any) -> str:
        raise error

    return fail


def _repo_not_found(src: Path, tmp: Path) -> Case:
    return Case(["@faults/absent", "!hub", RepositoryNotFoundError("404", response=hub_response(404, "o/m"))],
                ["faults/absent: no such repository on the hub"])


def _gated_repo(src: Path, tmp: Path) -> Case:
    return Case(["@faults/gated", "!hub", GatedRepoError("403", response=hub_response(403, "o/m"))],
                ["faults/gated is a gated repository", "HF_TOKEN"])


def _pickle_only(src: Path, tmp: Path) -> Case:
    _to_pickle(src)
    return Case([], ["only pickle weights (pytorch_model.bin)", "--allow-pickle"])


def _config_missing(src: Path, tmp: Path) -> Case:
    (src / "config.json").unlink()
    return Case([], ["no config.json found; pass --config PATH"])


def _config_invalid(src: Path, tmp: Path) -> Case:
    (src / "config.json").write_text('{"model_type": "resnet",\n  "depths": [1, 2\n}')
    return Case([], [str(src / "config.json"), "invalid JSON at line 3"])


def _config_wrong_values(src: Path, tmp: Path) -> Case:
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "layer_type": "pyramid"}))
    return Case([], ["layer_type"])


def _no_such_path(src: Path, tmp: Path) -> Case:
    return Case([f"@{tmp / 'nowhere'}"], [f"{tmp / 'nowhere'}: no such file or folder"])


def _mapping(edit: Callable[[str], str], *says: str, problems: int = 1) -> Callable[[Path, Path], Case]:
    def make(src: Path, tmp: Path) -> Case:
        text = edit(RESNET_YAML)
        assert text != RESNET_YAML
        (tmp / "m.yaml").write_text(text)
        return Case(["--mapping", str(tmp / "m.yaml"), "!no-reads"], [f"error: {tmp / 'm.yaml'}: ", *says],
                    problems)

    return make


def _yaml_file(text: str, *says: str) -> Callable[[Path, Path], Case]:
    def make(src: Path, tmp: Path) -> Case:
        (tmp / "m.yaml").write_text(text)
        return Case(["--mapping", str(tmp / "m.yaml"), "!no-reads"], list(says))

    return make


def _unmatched_key(src: Path, tmp: Path) -> Case:
    tensors = load_file(src / "model.safetensors")
    save_file({**tensors, "resnet.extra.weight": np.ones(2, np.float32)}, str(src / "model.safetensors"))
    return Case(["!no-reads"], ["unmatched source key 'resnet.extra.weight'"])


def _nan(src: Path, tmp: Path) -> Case:
    _set_value(src, STEM_KEY, np.nan, 3)
    return Case([], ["model.safetensors: tensor", repr(STEM_KEY), "-> stem.conv.kernel", "1 NaN and 0 Inf",
                     "--allow-nonfinite"])


def _inf(src: Path, tmp: Path) -> Case:
    _set_value(src, "classifier.1.bias", -np.inf)
    return Case([], ["'classifier.1.bias' (-> classifier.bias)", "0 NaN and 1 Inf"])


def _fp16_overflow(src: Path, tmp: Path) -> Case:
    _set_value(src, "classifier.1.weight", 1e6, 5)
    return Case(["--dtype", "float16"], ["'classifier.1.weight'", "values up to 1e+06 overflow float16",
                                         "65504"])


def _out_exists(src: Path, tmp: Path) -> Case:
    (tmp / "out").mkdir()
    (tmp / "out" / "precious.txt").write_text("mine")
    return Case(["!out-kept"], [str(tmp / "out"), "folder exists and is not empty (use --force"])


def _force_keeps_old_on_failure(src: Path, tmp: Path) -> Case:
    (tmp / "out").mkdir()
    (tmp / "out" / "precious.txt").write_text("mine")
    _set_value(src, STEM_KEY, np.nan)
    return Case(["--force", "!out-kept"], ["NaN"])


def _out_under_a_file(src: Path, tmp: Path) -> Case:
    (tmp / "file").write_text("x")
    return Case([f"--out={tmp / 'file' / 'out'}", "!no-out-check"],
                [str(tmp / "file" / "out"), f"cannot create the output folder ({tmp / 'file'} is a file)"])


SOURCES = {
    "truncated-safetensors": _truncated,
    "header-length-beyond-file": _header_too_long,
    "header-not-json": _header_not_json,
    "header-not-an-object": _header_not_object,
    "unknown-dtype": _unknown_dtype,
    "data-offsets-overlap": _offsets_overlap,
    "data-offsets-out-of-range": _offsets_out_of_range,
    "index-shard-missing": _missing_shard,
    "index-names-a-tensor-twice": _index_names_twice,
    "incomplete-offline-snapshot": _incomplete_snapshot,
    "hub-id-not-in-offline-cache": _not_in_offline_cache,
    "repo-not-found": _repo_not_found,
    "gated-repo": _gated_repo,
    "pickle-only-without-allow-pickle": _pickle_only,
    "config-json-missing": _config_missing,
    "config-json-invalid": _config_invalid,
    "config-json-unsupported-value": _config_wrong_values,
    "path-does-not-exist": _no_such_path,
}
MAPPINGS = {
    "yaml-syntax-error": _yaml_file("version: 1\nmodel: resnet\nrules:\n  - from: 'a'\n    to: [b\n",
                                    "m.yaml: invalid YAML at line 6"),
    "document-of-the-wrong-shape": _yaml_file("- version: 1\n- model: resnet\n",
                                              "m.yaml: a mapping file is a YAML mapping with keys"),
    "unknown-op": _mapping(lambda t: t.replace(CLS_WEIGHT_OPS, "    to: 'classifier.kernel'\n"
                                                               "    ops: [{flip: [0]}]\n"), "flip", "line"),
    "bad-op-arguments": _mapping(lambda t: t.replace("ops: [{transpose: [1, 0]}]", "ops: [{transpose: x}]"),
                                 "transpose", "line"),
    "invalid-regex": _mapping(lambda t: t.replace("from: '^classifier\\.1\\.bias$'",
                                                  "from: '^classifier\\.1\\.(bias$'"),
                              "classifier\\.1\\.(bias$", "rule 17"),
    "ambiguous-key": _mapping(lambda t: t + "  - from: 'classifier\\.1\\.bias'\n    to: 'classifier.bias'\n",
                              "classifier.1.bias", "rule 17", "rule 18"),
    "unmatched-key": _unmatched_key,
    "target-does-not-exist": _mapping(lambda t: t.replace("to: 'stem.bn.var'", "to: 'stem.bn.variance'"),
                                      "stem.bn.variance", "does not exist", "closest: 'stem.bn.var'",
                                      "'stem.bn.var' is not filled", problems=2),
    "target-filled-twice": _mapping(lambda t: t.replace("to: 'stem.bn.bias'", "to: 'stem.bn.scale'"),
                                    "target 'stem.bn.scale' is filled by 2 keys",
                                    "resnet.embedder.embedder.normalization.bias", "rule 2 (line 16",
                                    "rule 3 (line 18",
                                    "'stem.bn.bias' is not filled", problems=2),
    "target-not-filled": _mapping(
        lambda t: t.replace(STEM_VAR_RULE, "").replace("  - '\\.num_batches_tracked$'\n",
                                                       "  - '\\.num_batches_tracked$'\n  - 'running_var$'\n"),
        "'stem.bn.var' is not filled"),
    "shape-mismatch-after-ops": _mapping(lambda t: t.replace(CLS_WEIGHT_OPS, "    to: 'classifier.kernel'\n"),
                                         "classifier.1.weight", "(10, 64)", "(64, 10)"),
}
VALUES = {
    "nan-in-source": _nan,
    "inf-in-source": _inf,
    "fp16-cast-overflows": _fp16_overflow,
}
OUTPUTS = {
    "existing-folder-without-force": _out_exists,
    "force-keeps-the-old-folder-until-done": _force_keeps_old_on_failure,
    "output-parent-is-a-file": _out_under_a_file,
}
MATRIX = {**SOURCES, **MAPPINGS, **VALUES, **OUTPUTS}


@pytest.mark.parametrize("row", list(MATRIX))
def test_fault(row: str, tiny_resnet_dir: Path, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    src = copy_source(tiny_resnet_dir, tmp_path)
    case = MATRIX[row](src, tmp_path)
    args: list[Any] = list(case.args)
    spec: str = str(src)
    checks = {a for a in args if isinstance(a, str) and a.startswith("!")}
    if args and isinstance(args[0], str) and args[0].startswith("@"):
        spec = args.pop(0)[1:]
    if "!hub" in checks:
        error = args[args.index("!hub") + 1]
        args.remove(error)
        import huggingface_hub  # the hub client itself: nnxport's own resolving code runs as usual

        monkeypatch.setattr(huggingface_hub, "snapshot_download", _hub_raises(error))
    if "!no-reads" in checks:  # mapping problems are all found before any tensor data is read
        def no_reads(*a: object, **k: object) -> None:
            raise AssertionError("tensor data was read before the mapping was validated")

        monkeypatch.setattr(Source, "read", no_reads)
    args = [a for a in args if a not in checks]
    out = tmp_path / "out"
    if not any(str(a).startswith("--out") for a in args):
        args += ["--out", str(out)]
    before = sorted(p.name for p in tmp_path.iterdir())
    res = cli("convert", spec, *args, "-q")
    assert res.exit_code == 1, (res.stdout, res.stderr)
    assert res.stdout == ""
    assert "Traceback" not in res.stderr and "AssertionError" not in res.stderr
    assert res.stderr.startswith("error: ") and "internal error" not in res.stderr
    lines = res.stderr.strip().splitlines()
    if case.problems == 1:
        assert len(lines) == 1, res.stderr
    else:
        assert lines[0].endswith(f": {case.problems} problems") and len(lines) == 1 + case.problems
    for fragment in case.says:
        assert fragment in res.stderr, f"{fragment!r} not in {res.stderr!r}"
    if "!out-kept" in checks:
        assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
        assert (out / "precious.txt").read_text() == "mine"
    elif "!no-out-check" not in checks:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no staging folder or temporary left


def test_matrix_covers_every_row_of_issue_5() -> None:
    assert len(SOURCES) >= 17 and len(MAPPINGS) >= 11 and len(VALUES) == 3 and len(OUTPUTS) >= 3


def test_rule_matching_nothing_is_a_warning(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    extra = "  - from: '^no\\.such\\.key$'\n    to: 'classifier.bias'\n"
    (tmp_path / "m.yaml").write_text(RESNET_YAML + extra)
    res = cli("convert", tiny_resnet_dir, "--mapping", tmp_path / "m.yaml", "--out", tmp_path / "o",
              "--no-parity")
    assert res.exit_code == 0, res.stderr
    assert "WARNING" in res.stderr and "rule 18" in res.stderr and "matched no source key" in res.stderr
    assert (tmp_path / "o" / "nnxport.json").is_file()


# ------------------------------------------------------------------------------------------ values passed


def test_allow_nonfinite_converts_nan_as_it_is(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    src = copy_source(tiny_resnet_dir, tmp_path)
    _set_value(src, STEM_KEY, np.nan, 3)
    res = cli("convert", src, "--out", tmp_path / "o", "--allow-nonfinite", "--no-parity", "-q")
    assert res.exit_code == 0, res.stderr
    import nnxport

    model = nnxport.load(tmp_path / "o")
    kernel = np.asarray(model.stem.conv.kernel[...])
    assert np.isnan(kernel).sum() == 1
    # the NaN sits where the transposed source put it: OIHW index 3 -> HWIO (h=0, w=0, i=0... per shape)
    torch_shape = load_file(src / "model.safetensors")[STEM_KEY].shape
    o, i, h, w = np.unravel_index(3, torch_shape)
    assert np.isnan(kernel[h, w, i, o])


def test_fp16_in_range_still_converts(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    res = cli("convert", tiny_resnet_dir, "--out", tmp_path / "o", "--dtype", "float16", "--no-parity", "-q")
    assert res.exit_code == 0, res.stderr


def test_nonfinite_check_in_sharded_placement(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    src = copy_source(tiny_resnet_dir, tmp_path)
    _set_value(src, STEM_KEY, np.inf, 7)
    res = cli("convert", src, "--out", tmp_path / "o", "--mesh", "data=2", "--no-parity", "-q")
    assert res.exit_code == 1 and "0 NaN and 1 Inf" in res.stderr and repr(STEM_KEY) in res.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- disk faults


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=64k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True)


def test_disk_full_is_one_line_and_leaves_nothing(tiny_resnet_dir: Path, small_disk: Path, cli) -> None:
    res = cli("convert", tiny_resnet_dir, "--out", small_disk / "out", "--no-parity", "-q")
    assert res.exit_code == 1, res.stderr
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "No space left on device" in res.stderr and str(small_disk / "out") in res.stderr
    assert list(small_disk.iterdir()) == []


def test_read_only_folder_is_one_line(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    disk = tmp_path / "ro"
    if not _mount_tmpfs(disk, "size=64k,ro"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        res = cli("convert", tiny_resnet_dir, "--out", disk / "out", "--no-parity", "-q")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True)
    assert res.exit_code == 1
    expected = f"error: {disk / 'out'}: cannot create the output folder (Read-only file system)"
    assert res.stderr.strip() == expected


# ----------------------------------------------------------------------------------------------- pickles


def _to_pickle(src: Path) -> dict[str, np.ndarray]:
    import torch

    tensors = load_file(src / "model.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    return tensors


@pytest.mark.parametrize("where", ["folder", "hub"])
def test_allow_pickle_converts_with_weights_only(tiny_resnet_dir: Path, tmp_path: Path, cli, where: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    src = copy_source(tiny_resnet_dir, tmp_path)
    tensors = _to_pickle(src)
    spec: Path | str = src
    if where == "hub":
        write_hub_cache(Path(os.environ["HF_HUB_CACHE"]), "faults/pickled", src)
        spec = "faults/pickled"
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    res = cli("convert", spec, "--out", tmp_path / "o", "--allow-pickle", "--format", "json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["parity"]["passed"] is True
    ours = [c for c in calls if c.get("mmap") is not None]
    assert ours and all(c["weights_only"] is True for c in calls)
    manifest = json.loads((tmp_path / "o" / "nnxport.json").read_text())
    assert [f["name"] for f in manifest["source"]["files"]] == ["pytorch_model.bin"]
    import nnxport

    model = nnxport.load(tmp_path / "o")
    np.testing.assert_array_equal(np.asarray(model.classifier.bias[...]), tensors["classifier.1.bias"])
    # verify re-opens the (hashed) pickle on its own
    assert cli("verify", tmp_path / "o", "-q").exit_code == 0


def test_pickle_is_never_loaded_without_the_flag(tiny_resnet_dir: Path, tmp_path: Path, cli,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    src = copy_source(tiny_resnet_dir, tmp_path)
    _to_pickle(src)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.load called without --allow-pickle")

    monkeypatch.setattr(torch, "load", forbidden)
    for command in (["convert", src, "--out", tmp_path / "o"], ["inspect-keys", src],
                    ["convert", src / "pytorch_model.bin", "--out", tmp_path / "o"]):
        res = cli(*command)
        assert res.exit_code == 1 and "--allow-pickle" in res.stderr and "AssertionError" not in res.stderr


class _Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {os.environ['NNXPORT_PWNED']}",))


def test_malicious_pickle_is_refused_even_when_allowed(tiny_resnet_dir: Path, tmp_path: Path, cli,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    src = copy_source(tiny_resnet_dir, tmp_path)
    _to_pickle(src)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("NNXPORT_PWNED", str(marker))
    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"resnet.x": _Payload()}))
    res = cli("convert", src, "--out", tmp_path / "o", "--allow-pickle", "-q")
    assert res.exit_code == 1, res.stderr
    assert "pytorch_model.bin: refused to unpickle" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ security


def test_yaml_is_loaded_safely(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "m.yaml").write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    res = cli("convert", tiny_resnet_dir, "--mapping", tmp_path / "m.yaml", "--out", tmp_path / "o")
    assert res.exit_code == 1 and "m.yaml" in res.stderr
    assert not marker.exists()


def test_hf_token_never_written_or_logged(tiny_resnet_dir: Path, tmp_path: Path) -> None:
    secret = "hf_" + "Zq8" * 12
    cache = tmp_path / "hub"
    write_hub_cache(cache, "faults/tokened", tiny_resnet_dir)
    env = {"HF_TOKEN": secret, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = run_subprocess("convert", "faults/tokened", "--out", tmp_path / "o", env=env)
    assert proc.returncode == 0, proc.stderr
    proc2 = run_subprocess("verify", tmp_path / "o", "--format", "json", env=env)
    assert proc2.returncode == 0, proc2.stderr
    bad = run_subprocess("convert", "faults/other", "--out", tmp_path / "x", env=env)
    assert bad.returncode == 1
    for text in (proc.stdout, proc.stderr, proc2.stdout, proc2.stderr, bad.stderr):
        assert secret not in text and secret[3:15] not in text
    for f in (tmp_path / "o").rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


def test_output_paths_never_come_from_tensor_names(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    src = copy_source(tiny_resnet_dir, tmp_path)
    tensors = load_file(src / "model.safetensors")
    tensors["../../../escaped/evil"] = np.ones(3, np.float32)
    tensors["/abs/evil"] = np.ones(2, ml_dtypes.bfloat16)
    save_file(tensors, str(src / "model.safetensors"))
    text = RESNET_YAML.replace("ignore:\n", "ignore:\n  - 'evil$'\n")
    assert text != RESNET_YAML
    (tmp_path / "m.yaml").write_text(text)
    before = {p for p in tmp_path.parent.rglob("*")}
    res = cli("convert", src, "--mapping", tmp_path / "m.yaml", "--out", tmp_path / "o", "-q")
    assert res.exit_code == 0, res.stderr
    created = {p for p in tmp_path.parent.rglob("*")} - before
    assert created and all(p.is_relative_to(tmp_path / "o") for p in created)
    assert not any("evil" in p.name or "escaped" in p.name for p in created)
    assert not Path("/abs").exists()


def test_verify_names_a_source_file_changed_since_conversion(tiny_resnet_dir: Path, tmp_path: Path,
                                                             cli) -> None:
    src = copy_source(tiny_resnet_dir, tmp_path)
    assert cli("convert", src, "--out", tmp_path / "o", "-q").exit_code == 0
    assert cli("verify", tmp_path / "o", "-q").exit_code == 0
    _set_value(src, "classifier.1.bias", 0.5)  # same keys, shapes and size: only the hash tells
    res = cli("verify", tmp_path / "o", "-q")
    assert res.exit_code == 1
    assert res.stderr.startswith(f"error: {src / 'model.safetensors'}: changed since the conversion")
    assert len(res.stderr.strip().splitlines()) == 1
    (src / "model.safetensors").unlink()
    res = cli("verify", tmp_path / "o", "-q")
    assert res.exit_code == 1 and str(src) in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64,
                                   ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, np.int8, np.bool_])
def test_count_nonfinite_equals_numpy_on_views(dtype: Any) -> None:
    from nnxport.placement import count_nonfinite

    rng = np.random.default_rng(1)
    base = rng.standard_normal((37, 29, 5)).astype(np.float32) * 4
    flat = base.reshape(-1)
    flat[rng.choice(flat.size, 40, replace=False)] = np.nan
    flat[rng.choice(flat.size, 25, replace=False)] = np.inf
    flat[rng.choice(flat.size, 25, replace=False)] = -np.inf
    with np.errstate(invalid="ignore"):
        arr = base.astype(dtype)
    for view in (arr, arr.transpose(2, 0, 1), arr[::3, 1::2], arr[5], arr[0, 0, 0], arr[:0]):
        expected = int(np.count_nonzero(~np.isfinite(np.asarray(view, np.float32))))
        assert count_nonfinite(view) == expected


def test_pickle_tensors_keep_their_dtype_and_values(tmp_path: Path) -> None:
    import torch

    from nnxport.sources.folder import open_source

    state = {"a": torch.randn(3, 4, dtype=torch.bfloat16), "b": torch.randn(5, dtype=torch.float16),
             "c": torch.arange(6, dtype=torch.int64).reshape(2, 3).t(), "d": torch.tensor([True, False])}
    torch.save(state, tmp_path / "weights.pt")
    with open_source(tmp_path / "weights.pt", allow_pickle=True) as src:
        assert {k: t.dtype for k, t in src.tensors.items()} == {"a": "bfloat16", "b": "float16",
                                                                 "c": "int64", "d": "bool"}
        for key, t in state.items():
            got = src.read(key)
            want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
            np.testing.assert_array_equal(got.astype(want.dtype), want)
        np.testing.assert_array_equal(src.read_box("c", [(1, 3), (0, 1)]), state["c"].numpy()[1:3, 0:1])
