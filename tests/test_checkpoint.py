"""Streaming checkpoint writes: group by group into one Orbax checkpoint that plain Orbax restores."""

from __future__ import annotations

from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp_v1
import pytest

from nnxport.errors import OutputError
from nnxport.pipeline import output as output_mod
from nnxport.pipeline.output import StateWriter, restore_state, set_path


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "embed.embedding": rng.standard_normal((64, 16)).astype(ml_dtypes.bfloat16),
        "layers.0.attn.q.kernel": rng.standard_normal((16, 16)).astype(np.float32),
        "layers.1.attn.q.kernel": rng.standard_normal((16, 16)).astype(np.float32),
        "layers.10.norm.scale": rng.standard_normal((16,)).astype(np.float16),
        "steps": np.arange(3, dtype=np.int32),
    }


def test_groups_are_written_into_one_checkpoint_that_orbax_restores(tmp_path: Path) -> None:
    arrays = _arrays()
    path = tmp_path / "ckpt"
    writer = StateWriter(path, group_bytes=1500)  # a few arrays per group
    for name, value in arrays.items():
        writer.add(name, jax.device_put(value))
    writer.finish()
    assert writer.groups_written >= 3
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target: dict = {}
    for name, value in arrays.items():
        set_path(target, name, jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=cpu),
                            create=True)
    restored = ocp_v1.load(path, target)
    for name, value in arrays.items():
        node = restored
        for k in name.split("."):
            node = node[int(k) if k.isdigit() else k]
        got = np.asarray(node)
        assert got.dtype == value.dtype and np.array_equal(got, value), name
    # nnxport's own restore reads dtypes from the checkpoint's metadata.
    again = restore_state(path, target, cpu)
    assert np.array_equal(np.asarray(again["layers"][10]["norm"]["scale"]), arrays["layers.10.norm.scale"])


@pytest.mark.parametrize("when", ["scheduling", "writing"])
def test_a_failed_write_is_an_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           when: str) -> None:
    class Failed:
        def result(self) -> None:
            raise OSError(28, "No space left on device")

    def full(path: Path, tree: dict) -> Failed:
        if when == "scheduling":
            raise OSError(28, "No space left on device")
        return Failed()  # the background write fails; seen when the writer waits for it

    monkeypatch.setattr(output_mod.ocp_v1.partial, "save_async", full)
    writer = StateWriter(tmp_path / "ckpt", group_bytes=1)
    with pytest.raises(OutputError, match="No space left on device"):
        writer.add("w", jax.device_put(np.ones(4, np.float32)))
        writer.finish()


def test_convert_streams_in_groups_and_restores_exactly(tiny_resnet_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    import re

    from safetensors import safe_open

    import nnxport

    monkeypatch.setattr(output_mod, "GROUP_BYTES", 4096)  # many groups for a small model
    with caplog.at_level("INFO", logger="nnxport"):
        result = nnxport.convert(tiny_resnet_dir, tmp_path / "out")
    (groups,) = re.findall(r"in (\d+) group\(s\)", caplog.text)
    assert int(groups) > 5
    assert result.passed  # parity runs on the model restored from the streamed checkpoint
    model = nnxport.load(tmp_path / "out")
    with safe_open(tiny_resnet_dir / "model.safetensors", framework="numpy") as st:
        fc = st.get_tensor("classifier.1.weight")
    np.testing.assert_array_equal(np.asarray(model.classifier.kernel[...]), fc.T)


def test_conversion_path_uses_no_torch_and_keeps_bf16(tmp_path: Path) -> None:
    """Memory discipline: without parity, no torch is imported, and bf16 weights are stored as bf16 with
    exactly the source's bytes (no float32 upcast on the way)."""
    import json
    import subprocess
    import sys

    from nnxport.testing.replicas import build_replica
    from tests.conftest import TINY_RESNET

    src = build_replica(TINY_RESNET, tmp_path / "bf16", dtype="bfloat16", seed=2)
    out = tmp_path / "out"
    code = ("import sys, nnxport; nnxport.convert(sys.argv[1], sys.argv[2], parity=False); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
    manifest = json.loads((out / "nnxport.json").read_text())
    from safetensors import safe_open

    with safe_open(src / "model.safetensors", framework="numpy") as st:
        keys = [k for k in st.keys() if "num_batches_tracked" not in k]  # noqa: SIM118 (not a dict)
        source_bytes = sum(st.get_tensor(k).nbytes for k in keys)
    assert manifest["bytes"] == source_bytes
    meta = ocp_v1.metadata((out / "checkpoint").absolute()).metadata
    assert str(meta["stem"]["conv"]["kernel"].dtype) == "bfloat16"
