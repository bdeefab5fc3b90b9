"""The measurements behind the ResNet tolerances (docs/parity.md), on the full-size replica: low-precision
casts must pass with their margin, and a wrong mapping must still fail at the looser bf16 tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import RESNET_YAML, run_subprocess

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_resnet50_low_precision_casts_pass(resnet50_hub: str, tmp_path: Path, dtype: str) -> None:
    proc = run_subprocess("convert", resnet50_hub, "--out", tmp_path / "o", "--dtype", dtype,
                          "--format", "json")
    assert proc.returncode == 0, proc.stderr
    (logits,) = json.loads(proc.stdout)["parity"]["outputs"]
    assert logits["top1_agreement"] == 1.0
    assert logits["max_rel_diff"] < 2e-2 / 2  # at least 2x inside the tolerance, as documented


def test_bf16_tolerance_still_catches_a_wrong_mapping(resnet50_hub: str, tmp_path: Path) -> None:
    text = RESNET_YAML.replace("to: 'stem.bn.mean'", "to: 'stem.bn.TMP'").replace(
        "to: 'stem.bn.var'", "to: 'stem.bn.mean'").replace("to: 'stem.bn.TMP'", "to: 'stem.bn.var'")
    (tmp_path / "m.yaml").write_text(text)
    proc = run_subprocess("convert", resnet50_hub, "--out", tmp_path / "o", "--dtype", "bfloat16",
                          "--mapping", tmp_path / "m.yaml", "-q")
    assert proc.returncode == 3, proc.stderr
    assert "parity FAILED: logits" in proc.stderr
