"""The README's examples run as written: every fenced block right after ``<!-- pipeline-test -->``.

A shell block holds ``$ command`` lines, each followed by the stdout it must print; every command runs
under bash, in order, in one scratch folder (holding ``mappings/``), with the venv's ``nnxport`` and
``python`` first on PATH and the random-weight replica of microsoft/resnet-50 in the offline hub cache. It
must exit 0 and print exactly the lines shown (trailing whitespace aside: cut leaves a tab on a line
whose field is empty). A ``python`` block runs in the same folder after the shell blocks before it (so it
can use the folder they wrote), and must print the fenced block that follows it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import ROOT

README = (ROOT / "README.md").read_text()
MARK = "<!-- pipeline-test -->"
FENCE = re.compile(r"\s*```(\w*)\n(.*?)^```\n", re.S | re.M)


@dataclass
class Example:
    kind: str  # "shell" or "python"
    code: str
    expected: list[str]
    line: int  # where the block starts in README.md, for failure messages


def examples(text: str) -> list[Example]:
    """Each marked block as one example per ``$`` command (shell) or one per block (python)."""
    found: list[Example] = []
    for mark in re.finditer(re.escape(MARK), text):
        block = FENCE.match(text, mark.end())
        assert block, f"README.md:{text.count(chr(10), 0, mark.start()) + 1}: no fenced block after {MARK}"
        line = text.count("\n", 0, block.start(2)) + 1
        lang, body = block.group(1), block.group(2)
        if lang == "python":
            output = FENCE.match(text, block.end())
            assert output and output.group(1) == "", f"README.md:{line}: a python example needs its output"
            found.append(Example("python", body, output.group(2).splitlines(), line))
            continue
        assert lang in ("", "sh", "console"), f"README.md:{line}: {lang!r} block"
        current: Example | None = None
        for i, row in enumerate(body.splitlines()):
            if row.startswith("$ "):
                current = Example("shell", row[2:], [], line + i)
                found.append(current)
            else:
                assert current is not None, f"README.md:{line + i}: output before any $ command"
                current.expected.append(row)
    return found


EXAMPLES = examples(README)


def test_the_readme_has_marked_examples() -> None:
    kinds = [e.kind for e in EXAMPLES]
    assert kinds.count("shell") >= 4 and kinds.count("python") >= 1
    commands = " ".join(e.code for e in EXAMPLES)
    for needed in ("--format tsv | awk", "--format json | python", "--mapping - ", "| cut"):
        assert needed in commands, f"no README pipeline uses {needed!r}"
    assert any("nnxport.load(" in e.code for e in EXAMPLES if e.kind == "python")


def test_examples_parse_as_expected() -> None:
    text = f"x\n{MARK}\n```\n$ echo a\na\n$ true\n```\n\n{MARK}\n```python\nprint(1)\n```\n```\n1\n```\n"
    got = examples(text)
    assert [(e.kind, e.code, e.expected) for e in got] == [
        ("shell", "echo a", ["a"]), ("shell", "true", []), ("python", "print(1)\n", ["1"])]


def test_readme_examples_run_as_written(resnet50_hub: str, hub_cache: Path, tmp_path: Path) -> None:
    assert resnet50_hub == "microsoft/resnet-50"
    (tmp_path / "mappings").symlink_to(ROOT / "mappings")
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(hub_cache), "NNXPORT_DEBUG": ""}
    for ex in EXAMPLES:
        argv = ["bash", "-c", ex.code] if ex.kind == "shell" else [sys.executable, "-c", ex.code]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        where = f"README.md:{ex.line}: {ex.code.strip()[:80]!r}"
        assert proc.returncode == 0, f"{where} exited {proc.returncode}\n{proc.stderr[-2000:]}"
        got = [line.rstrip() for line in proc.stdout.splitlines()]
        assert got == [line.rstrip() for line in ex.expected], f"{where}\nstderr: {proc.stderr[-2000:]}"

