"""Hostile output folders and manifests (issue 12, classes 1, 3, 8 and stale staging of 4).

A converted folder's nnxport.json is untrusted data: verify / load validate every field, never import a
class it names unless the caller does, never read outside the recorded source. ``--out`` is never the
source, an ancestor of it, the current, home or root folder; what is replaced at the end is exactly what
was checked at the start; a second conversion into the same folder fails at once; everything is fsynced
before it is published, with the umask's permissions; staging folders of killed runs are cleaned up.

Every case asserts the whole contract: exit code, one ``error:`` line on stderr naming the culprit, no
traceback, no "internal error", nothing on stdout, no output or staging left, nothing else changed, and a
bounded time.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnxport
from nnxport import api
from nnxport.errors import NnxportError
from nnxport.pipeline.output import StateWriter
from nnxport.sources.base import Source
from nnxport.testing.hub import write_hub_cache
from tests.helpers import ROOT, convert_until_staging, tree_state

SECONDS = 60  # every in-process case ends well within this
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # subprocesses run from elsewhere import this checkout


# ----------------------------------------------------------------------------------------------- helpers

def _one_line(res: Any, *says: str, code: int = 1) -> None:
    """The error contract of one CLI result."""
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    assert res.stdout == ""
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    assert res.stderr.startswith("error: "), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    for fragment in says:
        assert fragment in res.stderr, f"{fragment!r} not in {res.stderr!r}"


@pytest.fixture(scope="module")
def converted(tiny_resnet_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source folder, output folder) of one converted tiny ResNet, converted once for the module."""
    base = tmp_path_factory.mktemp("conv")
    src = base / "src"
    shutil.copytree(tiny_resnet_dir, src)
    result = api.convert(src, base / "out")
    assert result.passed
    return src, base / "out"


@pytest.fixture
def folder(converted: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the converted folder, to break."""
    dst = tmp_path / "conv"
    shutil.copytree(converted[1], dst)
    return dst


def _edit(folder: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    path = folder / "nnxport.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return path


def _verify_fails(cli: Any, folder: Path, *says: str, roots: tuple[Path, ...] = ()) -> None:
    """``nnxport verify`` fails with one line, in bounded time, changing nothing; ``load`` raises the same."""
    before = tree_state(folder, *roots, include_roots=True)
    t = time.monotonic()
    res = cli("verify", folder, "-q")
    _one_line(res, *says)
    with pytest.raises(NnxportError) as err:
        nnxport.load(folder)
    if "nnxport.json" in res.stderr:
        assert str(err.value) == res.stderr.strip()[len("error: "):]
    assert time.monotonic() - t < SECONDS
    assert tree_state(folder, *roots, include_roots=True) == before


# ------------------------------------------------------------------------------ class 1: manifest as data

def test_manifest_family_import_path_is_never_imported(folder: Path, tmp_path: Path, cli,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The current folder holds evil_payload.py; the manifest names it. Before: verify imported it."""
    marker = tmp_path / "pwned"
    (tmp_path / "evil_payload.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\nclass Model: pass\n")
    monkeypatch.chdir(tmp_path)
    _edit(folder, lambda d: d["model"].update(family="evil_payload:Model"))
    _verify_fails(cli, folder, f"{folder / 'nnxport.json'}: model.family 'evil_payload:Model'",
                  "model='evil_payload:Model'", "--model evil_payload:Model")
    assert not marker.exists() and "evil_payload" not in sys.modules


def test_unknown_family_name_names_the_field(folder: Path, cli) -> None:
    _edit(folder, lambda d: d["model"].update(family="nosuch"))
    _verify_fails(cli, folder, "model.family 'nosuch' is not a built-in family (known: ")


def test_explicit_model_overrides_and_is_the_only_way_to_import(folder: Path, cli) -> None:
    """``verify --model NAME`` is the caller's choice: a built-in name works on any manifest family."""
    _edit(folder, lambda d: d["model"].update(family="evil_payload:Model"))
    res = cli("verify", folder, "--model", "resnet", "--format", "json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["passed"] is True
    assert "overrides the family recorded in" in res.stderr
    assert isinstance(nnxport.load(folder, model="resnet"), nnx.Module)


SCHEMA_CASES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "model-config-missing": (lambda d: d["model"].pop("config"), "model.config is missing"),
    "model-config-a-list": (lambda d: d["model"].update(config=[]), "model.config must be an object"),
    "model-not-an-object": (lambda d: d.update(model="resnet"), "model must be an object"),
    "source-missing": (lambda d: d.pop("source"), "source is missing"),
    "source-kind-unknown": (lambda d: d["source"].update(kind="ftp"), "source.kind must be one of hub"),
    "source-path-relative": (lambda d: d["source"].update(path="src"),
                             "source.path must be an absolute path"),
    "file-name-dotdot": (lambda d: d["source"]["files"][0].update(name="../../etc/passwd"),
                         "source.files[0].name must be a relative file name inside the source"),
    "file-name-absolute": (lambda d: d["source"]["files"][0].update(name="/etc/passwd"),
                           "source.files[0].name must be a relative file name"),
    "file-sha256-not-hex": (lambda d: d["source"]["files"][0].update(sha256=123),
                            "source.files[0].sha256 must be 64 lowercase hex digits"),
    "file-size-negative": (lambda d: d["source"]["files"][0].update(size=-1),
                           "source.files[0].size must be a non-negative integer"),
    "files-empty": (lambda d: d["source"].update(files=[]), "source.files must be a non-empty list"),
    "mapping-text-missing": (lambda d: d["mapping"].pop("text"), "mapping.text is missing"),
    "dtype-unknown": (lambda d: d.update(dtype="float128"), "dtype must be one of keep"),
    "tensors-a-bool": (lambda d: d.update(tensors=True), "tensors must be a non-negative integer"),
    "device-with-newline": (lambda d: d.update(device="cpu:0\nerror: forged"), "device must be PLATFORM:ID"),
    "mesh-axis-zero": (lambda d: d.update(mesh={"data": 0}), "mesh.data must be a positive integer"),
    "version-missing": (lambda d: d.pop("nnxport_version"), "nnxport_version is missing"),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_manifest_schema_violation_is_one_line_naming_the_field(case: str, folder: Path, cli) -> None:
    edit, says = SCHEMA_CASES[case]
    path = _edit(folder, edit)
    _verify_fails(cli, folder, f"{path}: {says}")


def test_file_source_name_cannot_leave_the_recorded_folder(folder: Path, tmp_path: Path, cli,
                                                          converted: tuple[Path, Path]) -> None:
    """A "file" source with name ../secret/model.safetensors: before, verify opened the file outside."""
    secret = tmp_path / "secret"
    shutil.copytree(converted[0], secret)
    _edit(folder, lambda d: d["source"].update(kind="file", path=str(converted[0]), files=[
        {**d["source"]["files"][0], "name": "../secret/model.safetensors"}]))
    _verify_fails(cli, folder, "source.files[0].name must be a relative file name", roots=(secret,))


def test_model_config_that_cannot_build_is_one_line(folder: Path, cli) -> None:
    _edit(folder, lambda d: d["model"]["config"].update(hidden_sizes="wide", depths={"a": 1}))
    _verify_fails(cli, folder, f"{folder / 'nnxport.json'}: model.config: field 'depths' must be list")


@pytest.mark.parametrize(("name", "write", "says"), [
    ("duplicate-key", lambda p: p.write_text(p.read_text()[:-2] + ', "dtype": "keep"}'),
     "names 'dtype' twice"),
    ("not-json", lambda p: p.write_text("{nope"), "invalid JSON at line 1"),
    ("a-list", lambda p: p.write_text("[1, 2]"), "expected a JSON object, found list"),
    ("deep-nesting-recursion", lambda p: p.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"),
     "nested more than 64 levels deep"),
    ("deep-nesting", lambda p: p.write_text('{"a": ' + "[" * 70 + "]" * 70 + "}"), "nested more than 64"),
    ("oversized", lambda p: os.truncate(p, 17 * 2**20),
     "17825792 bytes, more than a manifest can be (16 MB)"),
    ("not-utf8", lambda p: p.write_bytes(b'{"a": "\xff"}'), "not UTF-8 text"),
])
def test_unreadable_manifest_is_one_line(name: str, write: Callable[[Path], None], says: str, folder: Path,
                                         cli) -> None:
    write(folder / "nnxport.json")
    _verify_fails(cli, folder, f"{folder / 'nnxport.json'}: {says}")


def test_manifest_symlink_is_refused(folder: Path, tmp_path: Path, cli) -> None:
    (tmp_path / "elsewhere.json").write_text((folder / "nnxport.json").read_text())
    (folder / "nnxport.json").unlink()
    (folder / "nnxport.json").symlink_to(tmp_path / "elsewhere.json")
    _verify_fails(cli, folder, f"{folder / 'nnxport.json'}: is a symbolic link")


def test_manifest_fifo_does_not_hang(folder: Path, cli) -> None:
    (folder / "nnxport.json").unlink()
    os.mkfifo(folder / "nnxport.json")
    _verify_fails(cli, folder, f"{folder / 'nnxport.json'}: not a regular file")


# Hypothesis: random mutations of a real manifest. load / verify either work or raise a one-line
# NnxportError; nothing is ever imported on the manifest's word, no file outside is read.

HOSTILE_STR = st.sampled_from(["", "os:system", "evil_payload:Model", "../secret/model.safetensors",
                               "/etc/passwd", "..", "a/../../b", "resnet", "bert", "cpu:0", "keep", "folder",
                               "file", "hub", "x\x00y", "\n", "0" * 64, "{}", "nnxport.json", "A" * 5000])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                    | HOSTILE_STR | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                                                                              max_size=3), max_leaves=8)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in ``doc`` (dict keys and list indices), skipping the bulk of config and mapping text."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield (*prefix, k)
            if not (prefix == ("model",) and k == "config" and len(v) > 12):
                yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated(draw: Any, doc: dict[str, Any]) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        places = list(_paths(doc))
        if not places:
            break
        where = draw(st.sampled_from(places))
        parent: Any = doc
        for k in where[:-1]:
            parent = parent[k]
        key = where[-1]
        how = draw(st.sampled_from(["delete", "replace", "hostile", "wrap"]))
        if how == "delete":
            del parent[key]
        elif how == "replace":
            parent[key] = draw(JSON)
        elif how == "hostile":
            parent[key] = draw(HOSTILE_STR)
        else:
            parent[key] = [parent[key]]
    return doc


@pytest.fixture(scope="module")
def fuzz_folder(converted: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of the converted folder and, next to the source, a ``secret`` folder nothing may read."""
    base = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(converted[1], base / "conv")
    shutil.copytree(converted[0], base / "secret")
    return base / "conv", base / "secret"


_OPENED: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


class _ReachedParity(Exception):
    """verify got past every check of the manifest (parity itself is tested elsewhere)."""


def test_random_manifests_never_import_or_read_outside(fuzz_folder: tuple[Path, Path],
                                                       converted: tuple[Path, Path]) -> None:
    folder, secret = fuzz_folder
    original = json.loads((folder / "nnxport.json").read_text())
    nnxport.load(folder)  # warm up every import the real path needs
    imports: list[str] = []
    import importlib

    from nnxport.models import custom

    real_import = importlib.import_module

    def watched_import(name: str, package: str | None = None) -> Any:
        if name not in sys.modules:
            imports.append(name)
        return real_import(name, package)

    def no_import(spec: str, what: str) -> Any:
        imports.append(spec)
        raise AssertionError(f"imported {spec} on the manifest's word")

    def reached(*a: object, **k: object) -> Any:
        raise _ReachedParity

    outcomes: dict[str, int] = {}

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(doc=mutated(original))
    def run(doc: dict[str, Any]) -> None:
        global _OPENED
        (folder / "nnxport.json").write_text(json.dumps(doc))
        for call in (lambda: nnxport.load(folder), lambda: nnxport.verify(folder)):
            _OPENED = []
            try:
                call()
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except _ReachedParity:
                outcomes["parity"] = outcomes.get("parity", 0) + 1
            except NnxportError as e:
                assert len(str(e).splitlines()) == 1 and "KeyError" not in str(e), str(e)
                outcomes["refused"] = outcomes.get("refused", 0) + 1
            finally:
                opened, _OPENED = _OPENED, None
            outside = [p for p in opened if Path(os.path.abspath(p)).is_relative_to(secret)]
            assert not outside, outside
            assert not imports, imports

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib, "import_module", watched_import)
        mp.setattr(custom, "import_object", no_import)
        mp.setattr(api, "run_parity", reached)
        try:
            run()
        finally:
            (folder / "nnxport.json").write_text(json.dumps(original))
    assert outcomes.get("refused", 0) > 50 and outcomes.get("ok", 0) + outcomes.get("parity", 0) > 0, outcomes


# ------------------------------------------------------------------------------------ class 3: --out safety

def _convert_fails(cli: Any, src: Path | str, out: Path | str, *args: str, says: tuple[str, ...],
                   roots: tuple[Path, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """convert refuses before reading any tensor, in one line, and changes nothing under ``roots``."""
    def no_reads(*a: object, **k: object) -> None:
        raise AssertionError("tensor data was read before the output was checked")

    monkeypatch.setattr(Source, "read", no_reads)
    before = tree_state(*roots, include_roots=True)
    t = time.monotonic()
    res = cli("convert", src, "--out", out, *args, "-q")
    _one_line(res, *says)
    assert time.monotonic() - t < SECONDS
    assert tree_state(*roots, include_roots=True) == before


@pytest.fixture
def src(tiny_resnet_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "work" / "src"
    shutil.copytree(tiny_resnet_dir, dst)
    return dst


def test_out_is_the_source_folder(src: Path, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: --force deleted the source after a "successful" run."""
    _convert_fails(cli, src, src, "--force", says=(f"error: {src}: is the source ({src})", "never replaced"),
                   roots=(tmp_path,), monkeypatch=monkeypatch)


def test_out_is_an_ancestor_of_the_source(src: Path, tmp_path: Path, cli,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _convert_fails(cli, src, src.parent, "--force", says=(f"{src.parent}: contains the source ({src})",),
                   roots=(tmp_path,), monkeypatch=monkeypatch)


def test_out_is_the_current_folder(src: Path, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: `--out .` failed with an internal error after the whole conversion."""
    empty = tmp_path / "here"
    empty.mkdir()
    monkeypatch.chdir(empty)
    _convert_fails(cli, src, ".", "--force", says=(f"{empty}: is the current folder",), roots=(tmp_path,),
                   monkeypatch=monkeypatch)


def test_out_is_the_root_folder(src: Path, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    _convert_fails(cli, src, "/", "--force", says=("error: /: is the root folder",), roots=(tmp_path,),
                   monkeypatch=monkeypatch)


def test_out_is_the_home_folder(src: Path, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    _convert_fails(cli, src, home, "--force", says=(f"{home}: is your home folder",), roots=(tmp_path,),
                   monkeypatch=monkeypatch)


def test_out_contains_the_config_file(src: Path, tmp_path: Path, cli,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    shutil.copy(src / "config.json", cfg_dir / "config.json")
    _convert_fails(cli, src, cfg_dir, "--config", str(cfg_dir / "config.json"), "--force",
                   says=(f"{cfg_dir}: contains the source ({cfg_dir / 'config.json'})",), roots=(tmp_path,),
                   monkeypatch=monkeypatch)


def test_out_contains_the_hub_snapshot(tiny_resnet_dir: Path, hub_cache: Path, tmp_path: Path, cli,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """--out the hub cache itself, with --force: it would have deleted every cached model."""
    snapshot = write_hub_cache(hub_cache, "issue12/tiny-out", tiny_resnet_dir)
    repo = snapshot.parents[1]
    _convert_fails(cli, "issue12/tiny-out", repo, "--force", says=(f"{repo}: contains the source",),
                   roots=(repo,), monkeypatch=monkeypatch)


def test_out_is_a_symlink_to_the_source(src: Path, tmp_path: Path, cli,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    link = tmp_path / "link"
    link.symlink_to(src)
    _convert_fails(cli, src, link, "--force", says=(f"{link}: is the source ({src})",), roots=(tmp_path,),
                   monkeypatch=monkeypatch)


def test_out_is_a_symlink_elsewhere(src: Path, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    _convert_fails(cli, src, tmp_path / "link", says=(f"{tmp_path / 'link'}: is a symbolic link",),
                   roots=(tmp_path,), monkeypatch=monkeypatch)


def _during_write(monkeypatch: pytest.MonkeyPatch, act: Callable[[], None]) -> None:
    """Run ``act`` while the checkpoint is being written (after the start checks, before the commit)."""
    real = StateWriter.finish

    def finish(self: StateWriter) -> None:
        act()
        real(self)

    monkeypatch.setattr(StateWriter, "finish", finish)


def _no_staging(parent: Path) -> None:
    left = [p.name for p in parent.iterdir() if ".nnxport-" in p.name]
    assert not left, left


def test_folder_created_during_the_run_is_kept(src: Path, tmp_path: Path, cli,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a folder with a user's file, created at --out during the run, was deleted at commit."""
    out = tmp_path / "out"

    def create() -> None:
        out.mkdir()
        (out / "mine.txt").write_text("mine")

    _during_write(monkeypatch, create)
    res = cli("convert", src, "--out", out, "--no-parity", "-q")
    _one_line(res, f"{out}: created by someone else during the conversion", "discarded")
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "mine"
    _no_staging(tmp_path)


def test_file_created_during_the_run_is_kept(src: Path, tmp_path: Path, cli,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    _during_write(monkeypatch, lambda: out.write_text("mine"))
    res = cli("convert", src, "--out", out, "--no-parity", "-q")
    _one_line(res, f"{out}: created by someone else during the conversion")
    assert out.read_text() == "mine"
    _no_staging(tmp_path)


def test_empty_folder_filled_during_the_run_is_kept(src: Path, tmp_path: Path, cli,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty --out is fine at the start; a file put in it meanwhile is never deleted without --force."""
    out = tmp_path / "out"
    out.mkdir()
    _during_write(monkeypatch, lambda: (out / "mine.txt").write_text("mine"))
    res = cli("convert", src, "--out", out, "--no-parity", "-q")
    _one_line(res, f"{out}: changed during the conversion")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    _no_staging(tmp_path)


def test_forced_folder_swapped_during_the_run_is_kept(src: Path, tmp_path: Path, cli,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """--force saw one folder; another one put in its place during the run is not the one it may replace."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def swap() -> None:
        shutil.rmtree(out)
        out.mkdir()
        (out / "old.txt").write_text("new, precious")

    _during_write(monkeypatch, swap)
    res = cli("convert", src, "--out", out, "--no-parity", "--force", "-q")
    _one_line(res, f"{out}: changed during the conversion")
    assert (out / "old.txt").read_text() == "new, precious"
    _no_staging(tmp_path)


def test_second_conversion_into_the_same_folder_fails_at_once(src: Path, tmp_path: Path, cli,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holds the lock (as a running conversion does): this one fails at once naming it."""
    out = tmp_path / "out"
    lock = tmp_path / ".out.nnxport-lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, f'{os.getpid()}\\n'.encode())\n"
        "print('locked', flush=True)\ntime.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        _convert_fails(cli, src, out, says=(f"{out}: another nnxport process (pid {holder.pid}) is writing",),
                       roots=(src,), monkeypatch=monkeypatch)
        assert not out.exists() and lock.read_text().strip() == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()
    lock.unlink()
    _no_staging(tmp_path)


def test_two_real_conversions_into_one_folder(src: Path, tmp_path: Path) -> None:
    """Before: both exited 0 and one silently replaced the other. Now exactly one writes the folder."""
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "nnxport", "convert", str(src), "--out", str(out), "-q"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()) for p in procs]
    codes = sorted(code for code, _ in results)
    errors = [err for code, (_, err) in results if code]
    if codes == [0, 0]:  # the second started only after the first had finished: refused as non-empty
        pytest.fail("both conversions succeeded into the same folder")
    assert codes == [0, 1], results
    assert len(errors[0].strip().splitlines()) == 1 and errors[0].startswith("error: ")
    assert "another nnxport process" in errors[0] or "folder exists and is not empty" in errors[0]
    assert (out / "nnxport.json").is_file()
    _no_staging(tmp_path)


# ------------------------------------------------------------------------------------- class 8: durability

@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_output_folder_gets_the_umask_permissions(mask: int, src: Path, tmp_path: Path, cli) -> None:
    """Before: the output folder was 0700 whatever the umask (tempfile.mkdtemp)."""
    old = os.umask(mask)
    try:
        res = cli("convert", src, "--out", tmp_path / "out", "--no-parity", "-q")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.stderr
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "out" / "nnxport.json").stat().st_mode) == 0o666 & ~mask


def test_everything_is_fsynced_before_the_rename(src: Path, tmp_path: Path, cli,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    res = cli("convert", src, "--out", out, "-q")
    assert res.exit_code == 0, res.stderr
    staged = {p for p in synced if ".out.nnxport-partial-" in p}
    prefix = os.path.commonpath(list(staged)) if staged else ""
    staged_rel = {os.path.relpath(p, prefix) for p in staged}
    final_rel = {os.path.relpath(p, out) for p in [out, *out.rglob("*")] if not p.is_symlink()}
    assert final_rel <= staged_rel, final_rel - staged_rel  # every file and folder, before it was published
    assert str(tmp_path) in synced  # the parent, after the rename


def test_fsync_failure_is_one_line_and_leaves_nothing(src: Path, tmp_path: Path, cli,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    res = cli("convert", src, "--out", tmp_path / "out", "--no-parity", "-q")
    _one_line(res, "cannot write (Input/output error)")
    assert not (tmp_path / "out").exists()
    _no_staging(tmp_path)


# ------------------------------------------------------------------------ stale staging (class 4, kill -9)

def test_staging_of_a_killed_run_is_removed_by_the_next(resnet50_hub: str, tmp_path: Path) -> None:
    proc = convert_until_staging(resnet50_hub, tmp_path, ENV)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.nnxport-partial-")]
    assert len(stale) == 1 and stale[0].name.startswith(f".out.nnxport-partial-{proc.pid}-")
    # a staging folder of a live process (this test's) is left alone
    alive = tmp_path / f".out.nnxport-partial-{os.getpid()}-keep"
    alive.mkdir()
    res = subprocess.run([sys.executable, "-m", "nnxport", "convert", resnet50_hub, "--out", "out",
                          "--no-parity"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stderr
    assert f"{stale[0]}: removed, left by a run that was killed (pid {proc.pid})" in res.stderr
    assert not stale[0].exists() and alive.is_dir()
    assert (tmp_path / "out" / "nnxport.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", alive.name])


def test_old_folder_of_a_run_killed_while_replacing_is_put_back(src: Path, tmp_path: Path, cli) -> None:
    """A run killed between moving the previous output aside and putting the new one in place."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / f".out.nnxport-old-{dead.pid}"
    old.mkdir()
    (old / "nnxport.json").write_text("{}")
    res = cli("convert", src, "--out", tmp_path / "out", "--no-parity", "-q")
    _one_line(res, "folder exists and is not empty")  # the previous output is back, and not replaced
    assert (tmp_path / "out" / "nnxport.json").read_text() == "{}" and not old.exists()
