"""The user's surface: progress on stderr, --format json against docs/cli.md, inspect-keys tsv,
--mapping - from stdin, --version, --help examples, shell completion."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import shlex
import shutil
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import orbax.checkpoint.experimental.v1 as ocp_v1
import pytest
import typer
from rich.console import Console
from rich.filesize import decimal
from safetensors import safe_open

import nnxport
from nnxport.cli import app
from nnxport.cli import progress as cli_progress
from nnxport.testing.replicas import build_replica, published_config
from tests.helpers import RESNET_YAML, ROOT

DOCS = (ROOT / "docs" / "cli.md").read_text()
TINY_GPT2 = published_config("openai-community/gpt2", n_embd=64, n_head=4, n_layer=2, vocab_size=512,
                             n_positions=64)
PROGRESS_LINE = re.compile(r"^nnxport: progress: (\w+) (.*)$")


# ------------------------------------------------------------------------------------------------ progress

class Recorder:
    """A Progress that keeps every call (only ints: it would notice an array being handed over)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int | None]] = []
        self.lock = threading.Lock()

    def start(self, phase: str, total: int | None = None) -> None:
        assert total is None or type(total) is int
        with self.lock:
            self.calls.append(("start", phase, total))

    def advance(self, phase: str, nbytes: int) -> None:
        assert type(nbytes) is int and nbytes >= 0
        with self.lock:
            self.calls.append(("advance", phase, nbytes))

    def end(self, phase: str) -> None:
        with self.lock:
            self.calls.append(("end", phase, None))

    def total(self, phase: str) -> int | None:
        (total,) = [t for kind, p, t in self.calls if kind == "start" and p == phase]
        return total

    def done(self, phase: str) -> int:
        return sum(n or 0 for kind, p, n in self.calls if kind == "advance" and p == phase)

    def order(self) -> list[tuple[str, str]]:
        return [(kind, p) for kind, p, _ in self.calls if kind != "advance"]


def _checkpoint_bytes(folder: Path) -> int:
    """Bytes of the arrays in the Orbax checkpoint, from its own metadata."""
    import jax
    import numpy as np

    meta = ocp_v1.metadata((folder / "checkpoint").absolute()).metadata
    return sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in jax.tree.leaves(meta))


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_replica(TINY_GPT2, tmp_path_factory.mktemp("gpt2") / "tiny-gpt2", seed=4)


@pytest.mark.parametrize("dtype", ["keep", "bfloat16"])
def test_progress_bytes_equal_the_checkpoint(dtype: str, tiny_resnet_dir: Path, tmp_path: Path) -> None:
    rec = Recorder()
    result = nnxport.convert(tiny_resnet_dir, tmp_path / "o", parity=False, dtype=dtype, progress=rec)
    assert rec.order() == [("start", "resolve"), ("end", "resolve"), ("start", "plan"), ("end", "plan"),
                           ("start", "read"), ("start", "place"), ("start", "write"),
                           ("end", "read"), ("end", "place"), ("end", "write")]
    on_disk = _checkpoint_bytes(result.out)
    assert rec.total("place") == rec.done("place") == result.manifest["bytes"] == on_disk
    assert rec.total("write") == rec.done("write") == on_disk
    # read counts the source bytes of every key read (all but the ignored num_batches_tracked), as stored
    with safe_open(tiny_resnet_dir / "model.safetensors", framework="numpy") as f:
        keys = [k for k in f.keys() if not k.endswith("num_batches_tracked")]  # noqa: SIM118 (no __iter__)
        source = sum(f.get_tensor(k).nbytes for k in keys)
    assert rec.total("read") == rec.done("read") == source
    assert on_disk == (source if dtype == "keep" else source // 2)
    assert rec.total("resolve") is None and rec.total("plan") is None


@pytest.mark.parametrize("mesh", [None, "data=2,model=4"])
def test_progress_with_ties_splits_and_mesh(mesh: str | None, tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    # GPT-2: the fused c_attn is split in three, the head is filled from the embedding (a second read);
    # on a mesh every device part is read on its own, each distinct part once.
    rec = Recorder()
    result = nnxport.convert(tiny_gpt2_dir, tmp_path / "o", parity=False, mesh=mesh, progress=rec)
    on_disk = _checkpoint_bytes(result.out)
    assert rec.total("place") == rec.done("place") == rec.total("write") == rec.done("write") == on_disk
    assert rec.total("read") == rec.done("read") == on_disk  # float32 throughout: read once per target


def test_plain_progress_lines_when_stderr_is_not_a_terminal(tiny_resnet_dir: Path, tmp_path: Path,
                                                            cli) -> None:
    res = cli("convert", tiny_resnet_dir, "--out", tmp_path / "o", "--no-parity")
    assert res.exit_code == 0, res.stderr
    lines = [m.groups() for m in map(PROGRESS_LINE.match, res.stderr.splitlines()) if m]
    # one line for a phase without bytes, two for one with (start and end), not one per tensor
    assert [p for p, _ in lines] == ["resolve", "plan", "read", "place", "write", "read", "place", "write"]
    manifest = json.loads((tmp_path / "o" / "nnxport.json").read_text())
    total = decimal(manifest["bytes"])  # e.g. 64.5 kB
    said = dict(lines[2:5])
    assert said["place"] == said["write"] == f"started ({total})"
    ends = dict(lines[5:])
    for phase in ("read", "place", "write"):
        done = rf"done: {re.escape(total)} in \d+\.\d\d s, \d+\.\d MB/s"
        assert re.fullmatch(done, ends[phase]), ends[phase]
    assert re.fullmatch(r"done in \d+\.\d\d s", dict(lines[:2])["plan"])
    assert "\x1b[" not in res.stderr  # no terminal codes in a log file


@pytest.mark.parametrize("flags", [["-q"], ["--format", "json"]])
def test_no_progress_with_quiet_or_json(flags: list[str], tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    res = cli("convert", tiny_resnet_dir, "--out", tmp_path / "o", "--no-parity", *flags)
    assert res.exit_code == 0, res.stderr
    assert "nnxport: progress" not in res.stderr
    if flags == ["-q"]:
        assert res.stderr == "" and res.stdout == ""
    else:
        assert json.loads(res.stdout)["tensors"] > 0


def test_plain_progress_is_throttled() -> None:
    now = [100.0]
    stream = io.StringIO()
    p = cli_progress.PlainProgress(stream, interval=10.0, clock=lambda: now[0])
    p.start("read", 4_000_000)
    for _ in range(40):  # 40 tensors over 20 s: a line at most every 10 s
        now[0] += 0.5
        p.advance("read", 100_000)
    p.end("read")
    p.start("parity")
    now[0] += 2.0
    p.end("parity")
    p.advance("parity", 5)  # after its end: ignored
    assert stream.getvalue().splitlines() == [
        "nnxport: progress: read started (4.0 MB)",
        "nnxport: progress: read 2.0 MB of 4.0 MB (50%), 0.2 MB/s",
        "nnxport: progress: read 4.0 MB of 4.0 MB (100%), 0.2 MB/s",
        "nnxport: progress: read done: 4.0 MB in 20.00 s, 0.2 MB/s",
        "nnxport: progress: parity done in 2.00 s",
    ]


def test_rich_progress_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    with cli_progress.reporter(False, False, console) as p:
        assert isinstance(p, cli_progress.RichProgress)
        p.start("resolve")
        p.end("resolve")
        p.start("read", 2_000_000)
        p.advance("read", 1_500_000)
        p.advance("read", 500_000)
        p.end("read")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    final = text.split("\r")[-1]
    assert re.search(r"resolve .*\n.*read .* 2\.0 MB/2\.0 MB +\d+\.\d MB/s", final), final
    with cli_progress.reporter(True, False, console) as none_quiet, \
            cli_progress.reporter(False, True, console) as none_json:
        assert none_quiet is None and none_json is None


def test_verify_progress_counts_the_checkpoint(converted: tuple[Path, dict[str, Any]], cli) -> None:
    folder, _ = converted
    res = cli("verify", folder)
    assert res.exit_code == 0, res.stderr
    lines = [m.groups() for m in map(PROGRESS_LINE.match, res.stderr.splitlines()) if m]
    assert [p for p, _ in lines] == ["resolve", "load", "load", "parity"]  # resolve re-hashes the source
    manifest = json.loads((folder / "nnxport.json").read_text())
    assert re.fullmatch(rf"done: {re.escape(decimal(manifest['bytes']))} in .* MB/s", lines[2][1])


# ------------------------------------------------------------------------------------ JSON vs docs/cli.md

TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                      "boolean": (bool,), "object": (dict,), "array": (list,),
                                      "null": (type(None),)}


def documented(name: str) -> dict[str, tuple[type, ...]]:
    """The field table after ``<!-- json-schema: NAME -->`` in docs/cli.md: path -> accepted types."""
    start = DOCS.index(f"<!-- json-schema: {name} -->")
    fields: dict[str, tuple[type, ...]] = {}
    for line in DOCS[start:].splitlines()[3:]:
        if not line.startswith("| `"):
            break
        path, kind = (c.strip() for c in re.split(r"(?<!\\)\|", line)[1:3])
        types: tuple[type, ...] = ()
        for word in kind.split(" or "):
            types += TYPES[word]
        fields[path.strip("`")] = types
    assert fields, f"no field table for {name} in docs/cli.md"
    return fields


def values_at(doc: Any, path: str) -> list[Any]:
    """Every value at ``path`` (``a.b``, ``a[].b``, ``[].a``); a missing key fails the test."""
    nodes = [doc]
    for part in re.findall(r"\[\]|[^.\[\]]+", path):
        if part == "[]":
            assert all(isinstance(n, list) for n in nodes), path
            nodes = [x for n in nodes for x in n]
        else:
            for n in nodes:
                assert isinstance(n, dict) and part in n, f"{path}: no {part!r} in {n!r:.200}"
            nodes = [n[part] for n in nodes]
    return nodes


def check_schema(doc: Any, name: str, *, closed: bool = True) -> None:
    fields = documented(name)
    for path, types in fields.items():
        values = values_at(doc, path)
        assert values, f"{path}: no values to check (empty array in the test data)"
        for v in values:
            assert isinstance(v, types) and not (isinstance(v, bool) and bool not in types), (path, v)
    if closed:  # every top-level field (of every element, for an array) is documented
        top = {p.removeprefix("[].").split(".")[0].split("[")[0] for p in fields}
        keys = {k for item in doc for k in item} if isinstance(doc, list) else set(doc)
        assert keys <= top, f"undocumented in docs/cli.md ({name}): {sorted(keys - top)}"


@pytest.fixture(scope="module")
def converted(tiny_resnet_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A tiny ResNet converted with parity, and what ``convert --format json`` printed (with the
    parity.json written then, under ``"written"``: verify rewrites it)."""
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("conv") / "tiny-nnx"
    res = CliRunner().invoke(app, ["convert", str(tiny_resnet_dir), "--out", str(out), "--format", "json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    return out, {**json.loads(res.stdout), "written": json.loads((out / "parity.json").read_text())}


def test_convert_json_matches_docs(converted: tuple[Path, dict[str, Any]]) -> None:
    folder, printed = converted
    doc = {k: v for k, v in printed.items() if k != "written"}
    check_schema(doc, "convert")
    check_schema(doc["parity"], "parity", closed=False)
    assert doc["out"] == str(folder) and doc["parity"] == printed["written"]
    assert set(doc["timings_s"]) == {"resolve", "plan", "read_place_write", "parity"}


def test_convert_json_without_parity_and_verify_json(converted: tuple[Path, dict[str, Any]],
                                                     tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    res = cli("convert", tiny_resnet_dir, "--out", tmp_path / "o", "--no-parity", "--format", "json")
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    check_schema(doc, "convert")
    assert doc["parity"] is None and "parity" not in doc["timings_s"]

    folder, _ = converted
    res = cli("verify", folder, "--format", "json")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    check_schema(report, "parity", closed=False)
    assert report == json.loads((folder / "parity.json").read_text()) and report["passed"] is True


def test_inspect_keys_and_models_json_match_docs(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    res = cli("inspect-keys", tiny_resnet_dir, "--format", "json")
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    check_schema(doc, "inspect-keys")
    # the nullable and list fields get values to check from a broken mapping
    (tmp_path / "bad.yaml").write_text(RESNET_YAML.replace("to: 'stem.bn.var'", "to: 'stem.bn.nope'"))
    res = cli("inspect-keys", tiny_resnet_dir, "--mapping", tmp_path / "bad.yaml", "--format", "json")
    bad = json.loads(res.stdout)
    check_schema(bad, "inspect-keys")
    assert bad["unfilled_targets"] == ["stem.bn.var"] and bad["problems"]

    res = cli("models", "--format", "json")
    assert res.exit_code == 0
    check_schema(json.loads(res.stdout), "models")


def test_docs_json_examples_follow_their_schema() -> None:
    blocks = re.findall(r"```json\n(.*?)```", DOCS, flags=re.S)
    docs = [json.loads(b) for b in blocks]
    assert len(docs) == 5
    convert, parity, generate, inspect, models = docs
    check_schema({**convert, "parity": None}, "convert")
    check_schema(parity, "parity", closed=False)
    check_schema(generate, "generate")
    check_schema(inspect, "inspect-keys")
    check_schema(models, "models")


# ----------------------------------------------------------------------------------- tsv and --mapping -

def test_tsv_is_cut_and_awk_friendly(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    res = cli("inspect-keys", tiny_resnet_dir, "--format", "tsv")
    assert res.exit_code == 0
    header, *rows = res.stdout.splitlines()
    assert header.split("\t") == ["key", "shape", "dtype", "status", "target", "ops", "target_shape"]
    table = [r.split("\t") for r in rows]
    assert all(len(r) == 7 for r in table) and len(table) == len(json.loads(
        cli("inspect-keys", tiny_resnet_dir, "--format", "json").stdout)["keys"])
    assert not re.search(r"\x1b|\[/?[a-z ]+\]", res.stdout)  # no colour codes, no rich markup
    assert {r[3] for r in table} == {"mapped", "ignored"} and res.stderr == ""
    # `cut -f1,5` and `awk -F'\t' '$4 == "ignored"'` see the same columns
    assert shutil.which("cut")
    cut = subprocess.run(["cut", "-f1,5"], input=res.stdout, capture_output=True, text=True, check=True)
    assert cut.stdout.splitlines()[0] == "key\ttarget"
    assert "resnet.embedder.embedder.convolution.weight\tstem.conv.kernel" in cut.stdout.splitlines()

    (tmp_path / "bad.yaml").write_text(RESNET_YAML.replace("to: 'stem.bn.var'", "to: 'stem.bn.nope'"))
    res = cli("inspect-keys", tiny_resnet_dir, "--mapping", tmp_path / "bad.yaml", "--format", "tsv")
    assert res.exit_code == 0
    assert "unfilled target: stem.bn.var" in res.stderr and "stem.bn.var" not in res.stdout


def test_mapping_from_stdin(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    res = cli("convert", tiny_resnet_dir, "--mapping", "-", "--out", tmp_path / "o", "--no-parity", "-q",
              input=RESNET_YAML)
    assert res.exit_code == 0, res.stderr
    manifest = json.loads((tmp_path / "o" / "nnxport.json").read_text())
    assert manifest["mapping"]["name"] == "<stdin>" and manifest["mapping"]["text"] == RESNET_YAML

    broken = RESNET_YAML.replace("to: 'stem.bn.var'", "to: 'stem.bn.variance'")
    res = cli("convert", tiny_resnet_dir, "--mapping", "-", "--out", tmp_path / "o2", "-q", input=broken)
    assert res.exit_code == 1 and res.stderr.startswith("error: <stdin>: ")
    assert "stem.bn.variance" in res.stderr and not (tmp_path / "o2").exists()

    res = cli("inspect-keys", tiny_resnet_dir, "--mapping", "-", "--format", "json", input=broken)
    doc = json.loads(res.stdout)
    assert doc["mapping"] == "<stdin>" and doc["unfilled_targets"] == ["stem.bn.var"]

    res = cli("inspect-keys", tiny_resnet_dir, "--mapping", "-", input="")
    assert res.exit_code == 1 and "<stdin>" in res.stderr and "Traceback" not in res.stderr


def test_mapping_from_a_terminal_stdin_is_a_usage_error(tiny_resnet_dir: Path) -> None:
    # A pty as stdin: `--mapping -` would wait for typing; it is refused at once instead.
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "nnxport", "inspect-keys", str(tiny_resnet_dir),
                               "--mapping", "-"], stdin=terminal, capture_output=True, text=True, timeout=60)
    finally:
        os.close(terminal)
        os.close(controller)
    assert proc.returncode == 2
    said = " ".join(re.sub(r"[│╭╮╰╯─]", " ", proc.stderr).split())  # unwrap rich's error box
    assert "'-' reads the mapping from stdin, which is a terminal" in said and "Traceback" not in said

    closed = f"{shlex.quote(sys.executable)} -m nnxport inspect-keys {shlex.quote(str(tiny_resnet_dir))} " \
             "--mapping - <&-"
    proc = subprocess.run(["bash", "-c", closed], capture_output=True, text=True, timeout=60)
    said = " ".join(re.sub(r"[│╭╮╰╯─]", " ", proc.stderr).split())
    assert proc.returncode == 2 and "from stdin, which is closed" in said, proc.stderr


# ------------------------------------------------------------------------ version, help, completion

def test_version(cli) -> None:
    res = cli("--version")
    assert res.exit_code == 0
    assert res.stdout == f"nnxport {metadata.version('nnxport')}\n" and res.stderr == ""


def _commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = []
    for name, cmd in group.commands.items():
        found.append(((*path, name), cmd))
        if hasattr(cmd, "commands"):
            found += _commands(cmd, (*path, name))
    return found


def test_every_help_has_an_example_that_parses(cli) -> None:
    root = typer.main.get_command(app)
    commands = _commands(root)
    assert {p[0] for p, _ in commands} >= {"convert", "verify", "inspect-keys", "models"}
    res = cli("--help")
    assert res.exit_code == 0 and "Example" in res.stdout
    for path, cmd in commands:
        res = cli(*path, "--help")
        assert res.exit_code == 0, path
        assert "Example" in res.stdout, f"nnxport {' '.join(path)} --help shows no example"
        if hasattr(cmd, "commands"):
            continue
        example = re.search(r"Example: (nnxport [^|>\n]+)", cmd.help or "")  # up to a pipe or redirection
        assert example, f"no 'Example: nnxport ...' in the docstring of {path}"
        words = shlex.split(example.group(1))[1 + len(path):]
        assert shlex.split(example.group(1))[1:1 + len(path)] == list(path)
        cmd.make_context(" ".join(path), words)  # raises a UsageError if the example is not valid


def test_bash_completion_end_to_end(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "nnxport"
    assert exe.is_file(), "the nnxport script is installed next to the interpreter"
    script = ('source <(nnxport --show-completion) && '
              'COMP_WORDS=(nnxport inspect-k) COMP_CWORD=1 && _nnxport_completion nnxport && '
              'echo "${COMPREPLY[*]}" && '
              'COMP_WORDS=(nnxport inspect-keys x --format "") COMP_CWORD=4 && '
              '_nnxport_completion nnxport && echo "${COMPREPLY[*]}"')
    env = {"PATH": f"{exe.parent}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["inspect-keys", "table json tsv"]
