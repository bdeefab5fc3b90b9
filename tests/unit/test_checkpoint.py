"""Streaming checkpoint writes (nnxport.pipeline.output.StateWriter): group by group into one Orbax checkpoint
that plain Orbax restores, and a failed write is an OutputError. Whole conversions streamed in groups are
in tests/e2e/test_convert.py."""

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
