"""Every mapping-coverage error exits 1 with one message naming the key or rule, before any data is read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nnxport.sources.base import Source
from tests.helpers import CLS_BIAS_RULE, CLS_WEIGHT_OPS, RESNET_YAML, STEM_VAR_RULE

CASES = {
    "unmatched-key": (
        lambda t: t.replace(CLS_BIAS_RULE, ""),
        ["unmatched source key 'classifier.1.bias'", "'classifier.bias' is not filled"],
    ),
    "key-matched-twice": (
        lambda t: t + "  - from: 'classifier\\.1\\.bias'\n    to: 'classifier.bias'\n",
        ["classifier.1.bias", "rule 17", "rule 18"],
    ),
    "target-filled-twice": (
        lambda t: t.replace("to: 'stem.bn.bias'", "to: 'stem.bn.scale'"),
        ["stem.bn.scale", "resnet.embedder.embedder.normalization.weight",
         "resnet.embedder.embedder.normalization.bias", "'stem.bn.bias' is not filled"],
    ),
    "target-not-filled": (
        lambda t: t.replace(STEM_VAR_RULE, "").replace("  - '\\.num_batches_tracked$'\n",
                                                       "  - '\\.num_batches_tracked$'\n  - 'running_var$'\n"),
        ["'stem.bn.var' is not filled"],
    ),
    "target-does-not-exist": (
        lambda t: t.replace("to: 'stem.bn.var'", "to: 'stem.bn.variance'"),
        ["stem.bn.variance", "does not exist", "stem.bn.var"],
    ),
    "shape-mismatch-after-ops": (
        lambda t: t.replace(CLS_WEIGHT_OPS, "    to: 'classifier.kernel'\n"),
        ["classifier.1.weight", "(10, 64)", "(64, 10)"],
    ),
    "unknown-op": (
        lambda t: t.replace(CLS_WEIGHT_OPS, "    to: 'classifier.kernel'\n    ops: [{flip: [0]}]\n"),
        ["flip", "line"],
    ),
    "invalid-regex": (
        lambda t: t.replace("from: '^classifier\\.1\\.bias$'", "from: '^classifier\\.1\\.(bias$'"),
        ["classifier\\.1\\.(bias$", "rule 17"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mapping_error_exits_1_naming_the_culprit(case: str, tiny_resnet_dir: Path, tmp_path: Path, cli,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    edit, expected = CASES[case]
    text = edit(RESNET_YAML)
    assert text != RESNET_YAML
    mapping = tmp_path / "m.yaml"
    mapping.write_text(text)


    def no_reads(*args: object, **kwargs: object) -> None:
        raise AssertionError("tensor data was read before the mapping was validated")

    monkeypatch.setattr(Source, "read", no_reads)
    out = tmp_path / "out"
    res = cli("convert", tiny_resnet_dir, "--mapping", mapping, "--out", out, "-q")
    assert res.exit_code == 1, res.stderr
    assert res.stdout == ""
    assert "Traceback" not in res.stderr and "AssertionError" not in res.stderr
    assert res.stderr.startswith("error: ")
    for fragment in expected:
        assert fragment in res.stderr, f"{fragment!r} not in {res.stderr!r}"
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["m.yaml"]


def test_all_problems_reported_together(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    text = CASES["unknown-op"][0](CASES["invalid-regex"][0](RESNET_YAML))
    (tmp_path / "m.yaml").write_text(text)
    res = cli("convert", tiny_resnet_dir, "--mapping", tmp_path / "m.yaml", "--out", tmp_path / "o")
    assert res.exit_code == 1
    assert "flip" in res.stderr and "classifier\\.1\\.(bias$" in res.stderr


def test_usage_error_exits_2(cli) -> None:
    res = cli("convert", "x", "--no-such-flag")
    assert res.exit_code == 2


def test_bad_source_exits_1_one_line(tmp_path: Path, cli) -> None:
    res = cli("convert", tmp_path / "missing-folder")
    assert res.exit_code == 1
    assert "missing-folder" in res.stderr and "Traceback" not in res.stderr


def test_hub_id_missing_from_offline_cache(tmp_path: Path, cli) -> None:
    res = cli("convert", "nobody/not-cached", "--out", tmp_path / "o")
    assert res.exit_code == 1
    assert "nobody/not-cached" in res.stderr
    assert len([line for line in res.stderr.splitlines() if line.strip()]) == 1


def test_unknown_device_is_refused(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    res = cli("convert", tiny_resnet_dir, "--device", "tpu", "--out", tmp_path / "o", "--no-parity")
    assert res.exit_code == 1
    assert re.search(r"--device tpu: no tpu device", res.stderr)


def test_core_messages_name_parameters_each_front_end_spells() -> None:
    """Core errors name a parameter with ``nnxport.errors.option``: ``str(err)`` spells it as the API does,
    the CLI as its flag; every parameter the core names has a flag of the command line."""
    import typer.main

    import nnxport
    from nnxport.cli import app
    from nnxport.cli._options import FLAGS, NEGATED, flag
    from nnxport.errors import NnxportError, option

    package = Path(nnxport.__file__).parent
    used = {m for p in package.rglob("*.py") for m in re.findall(r"option\([\"'](\w+)[\"']", p.read_text())}
    assert used and used <= FLAGS.keys() | NEGATED.keys()
    command = typer.main.get_command(app)
    declared: set[str] = set()
    stack = [command]
    while stack:
        c = stack.pop()
        declared.update(o for p in c.params for o in p.opts)
        stack.extend(getattr(c, "commands", {}).values())
    assert set(FLAGS.values()) | set(NEGATED.values()) <= declared
    e = NnxportError(f"pass {option('allow_pickle', True)}, {option('parity', False)}, "
                     f"{option('dtype', 'float32')} or {option('mesh')} 'x'")
    assert str(e) == "pass allow_pickle=True, parity=False, dtype='float32' or mesh 'x'"
    assert e.message(flag) == "pass --allow-pickle, --no-parity, --dtype float32 or --mesh 'x'"
