"""docs/training.md's fine-tuning example runs as written (on a tiny converted ResNet) and prints what
the page shows."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
from flax import nnx

import nnxport

ROOT = Path(__file__).resolve().parents[2]
MARK = "<!-- training-test -->"
BLOCKS = re.compile(r"```python\n(.*?)^```\n```\n(.*?)^```\n", re.S | re.M)


def test_fine_tuning_example_runs(tiny_resnet_dir: Path, tmp_path: Path) -> None:
    text = (ROOT / "docs" / "training.md").read_text()
    assert text.count(MARK) == 1
    found = BLOCKS.match(text, text.index(MARK) + len(MARK) + 1)
    assert found, f"docs/training.md: no python block and output block after {MARK}"
    code, expected = found.group(1), found.group(2)
    out = tmp_path / "resnet-50-nnx"
    nnxport.convert(tiny_resnet_dir, out, parity=False)
    before = nnx.state(nnxport.load(out), nnx.BatchStat)
    namespace: dict[str, object] = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace('"resnet-50-nnx"', repr(str(out))), "docs/training.md", "exec"), namespace)
    assert printed.getvalue() == expected
    model = namespace["model"]
    assert isinstance(model, nnx.Module) and model.stem.bn.use_running_average  # type: ignore[attr-defined]
    after = nnx.state(model, nnx.BatchStat)
    moved = [float(np.abs(np.asarray(a.get_value()) - np.asarray(b.get_value())).max())
             for (_, a), (_, b) in zip(nnx.to_flat_state(after), nnx.to_flat_state(before), strict=True)]
    assert min(moved) > 1e-4  # two train steps moved every running statistic
