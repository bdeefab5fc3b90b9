"""End to end: nnxport convert / verify / load on ResNet replicas, parity against transformers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp_v1
import pytest
from flax import nnx
from safetensors import safe_open

import nnxport
from nnxport.models import get_family
from nnxport.pipeline import output as output_mod
from tests.helpers import RESNET_YAML, run_subprocess


def _abstract_pure(config: dict) -> dict:
    model = nnx.eval_shape(lambda: get_family("resnet").build(config, nnx.Rngs(0), {}))
    _, state, _ = nnx.split(model, (nnx.Param, nnx.BatchStat), ...)
    return nnx.to_pure_dict(state)


def test_resnet50_from_offline_hub_cache(resnet50_hub: str, tmp_path: Path) -> None:
    out = tmp_path / "r50"
    proc = run_subprocess("convert", resnet50_hub, "--out", out, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # stdout is exactly one JSON document
    assert result["parity"]["passed"] is True
    assert result["tensors"] == 320 - 53  # num_batches_tracked buffers are ignored

    report = json.loads((out / "parity.json").read_text())
    assert report["schema_version"] == 1 and report["passed"] is True
    assert report["reference"] == "transformers.ResNetForImageClassification"
    assert report["inputs"] == [{"name": "pixel_values", "shape": [2, 224, 224, 3], "dtype": "float32",
                                 "seed": 0}]
    (logits,) = report["outputs"]
    assert logits["name"] == "logits" and logits["shape"] == [2, 1000]
    assert logits["max_abs_diff"] < 1e-3 and logits["cosine"] > 0.999999 and logits["top1_agreement"] == 1.0
    assert "PASSED" in (out / "parity.md").read_text()

    manifest = json.loads((out / "nnxport.json").read_text())
    src = manifest["source"]
    assert src["kind"] == "hub" and src["repo_id"] == "microsoft/resnet-50"
    assert len(src["revision"]) == 40
    (f,) = src["files"]
    data = (Path(src["path"]) / f["name"]).read_bytes()
    assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["mapping"]["name"] == "resnet" and manifest["mapping"]["text"] == RESNET_YAML
    assert manifest["mapping"]["sha256"] == hashlib.sha256(RESNET_YAML.encode()).hexdigest()
    assert manifest["model"]["family"] == "resnet" and manifest["model"]["config"]["depths"] == [3, 4, 6, 3]

    # Plain Orbax restores it, given the abstract state of the model; values are the source's, transposed.
    config = manifest["model"]["config"]
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu),
                            _abstract_pure(config))
    restored = ocp_v1.load((out / "checkpoint").absolute(), abstract)
    with safe_open(Path(src["path"]) / f["name"], framework="numpy") as st:
        conv = st.get_tensor("resnet.embedder.embedder.convolution.weight")
        kernel = np.asarray(restored["stem"]["conv"]["kernel"])
        np.testing.assert_array_equal(kernel, conv.transpose(2, 3, 1, 0))
        mean = st.get_tensor("resnet.encoder.stages.2.layers.5.layer.1.normalization.running_mean")
        np.testing.assert_array_equal(np.asarray(restored["stages"][2]["blocks"][5]["bn1"]["mean"]), mean)

    # nnxport.load gives a callable model with the same logits as the reference run during conversion.
    model = nnxport.load(out)
    family = get_family("resnet")
    inputs = family.parity.parity_inputs(config, seed=0)
    got = family.parity.run_nnx(model, inputs)["logits"]
    ref = _reference_logits(Path(src["path"]), inputs)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)

    # verify re-runs parity from the recorded source and rewrites the report.
    (out / "parity.json").unlink()
    proc = run_subprocess("verify", out, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["passed"] is True
    assert json.loads((out / "parity.json").read_text())["passed"] is True


def _reference_logits(folder: Path, inputs: list) -> np.ndarray:
    import transformers

    ref = transformers.ResNetForImageClassification.from_pretrained(folder).eval()
    return get_family("resnet").parity.run_reference(ref, inputs)["logits"]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # BatchNorm running mean and var swapped: same shapes, wrong model.
        ("to: 'stages.\\1.blocks.\\2.bn\\3.mean'", "to: 'stages.\\1.blocks.\\2.bn\\3.TMP'"),
        # Conv kernels with height and width swapped (OIHW -> WHIO): same shapes for square kernels.
        ("to: 'stem.conv.kernel'\n    ops: [{transpose: [2, 3, 1, 0]}]",
         "to: 'stem.conv.kernel'\n    ops: [{transpose: [3, 2, 1, 0]}]"),
    ],
    ids=["bn-mean-var-swapped", "kernel-hw-swapped"],
)
def test_shape_preserving_wrong_mapping_fails_parity(resnet50_hub: str, tmp_path: Path, old: str,
                                                     new: str) -> None:
    text = RESNET_YAML.replace(old, new)
    if "TMP" in text:
        text = text.replace("bn\\3.var'", "bn\\3.mean'").replace("bn\\3.TMP'", "bn\\3.var'")
    assert text != RESNET_YAML
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    out = tmp_path / "out"
    proc = run_subprocess("convert", resnet50_hub, "--mapping", bad, "--out", out)
    assert proc.returncode == 3, proc.stderr
    assert "parity FAILED" in proc.stderr and "Traceback" not in proc.stderr
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is False
    assert report["outputs"][0]["violations"] > 0
    assert (out / "checkpoint").is_dir()  # the checkpoint is still written, with the report
    # the failure line names the first layer whose error jumps: the first one the broken rule feeds
    jump = report["first_jump"]["target"]
    assert jump == ("stem.conv" if "kernel" in new else "stages.0.blocks.0.bn0")
    assert f"error first jumps at layer {jump} (" in proc.stderr.strip().splitlines()[-1]


def test_resnet18_basic_blocks_from_folder(resnet18_dir: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "r18"
    res = cli("convert", resnet18_dir, "--out", out, "--format", "json")
    assert res.exit_code == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["parity"]["passed"] is True
    assert result["tensors"] == 122 - 20  # 20 num_batches_tracked
    assert json.loads((out / "nnxport.json").read_text())["source"]["kind"] == "folder"


def test_bfloat16_cast_is_stored_and_within_bf16_tolerance(tiny_resnet_dir: Path, tmp_path: Path,
                                                           cli) -> None:
    out = tmp_path / "bf16"
    res = cli("convert", tiny_resnet_dir, "--out", out, "--dtype", "bfloat16", "--format", "json")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)["parity"]
    assert report["passed"] is True and report["dtype"] == "bfloat16"
    assert report["tolerance"]["atol"] > 1e-3  # bf16 tolerance, not the fp32 one
    model = nnxport.load(out)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {np.dtype(jax.numpy.bfloat16)}


def test_single_file_with_config(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "single"
    res = cli("convert", tiny_resnet_dir / "model.safetensors", "--config", tiny_resnet_dir / "config.json",
              "--out", out, "--format", "json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["parity"]["passed"] is True
    assert json.loads((out / "nnxport.json").read_text())["source"]["kind"] == "file"
    res = cli("verify", out, "--format", "json")
    assert res.exit_code == 0, res.stderr


def test_sharded_base_model_checkpoint(tmp_path: Path, cli) -> None:
    """ResNetModel (no `resnet.` prefix, no classifier) saved in several shards with an index."""
    from nnxport.testing.replicas import build_replica
    from tests.helpers import TINY_RESNET

    src = build_replica(TINY_RESNET, tmp_path / "base", base_model=True, max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").is_file()
    assert len(list(src.glob("*.safetensors"))) >= 2
    res = cli("convert", src, "--out", tmp_path / "out", "--format", "json", "--force")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)["parity"]
    assert report["passed"] is True and report["reference"] == "transformers.ResNetModel"
    assert report["outputs"][0]["name"] == "pooler_output"


def test_no_parity_writes_no_report(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "np"
    res = cli("convert", tiny_resnet_dir, "--out", out, "--no-parity", "-q")
    assert res.exit_code == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "nnxport.json"]


def test_existing_folder_refused_without_force(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli("convert", tiny_resnet_dir, "--out", out, "--no-parity")
    assert res.exit_code == 1
    assert "--force" in res.stderr and str(out) in res.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    res = cli("convert", tiny_resnet_dir, "--out", out, "--no-parity", "--force")
    assert res.exit_code == 0, res.stderr
    assert not (out / "keep.txt").exists() and (out / "nnxport.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or old folder left


def test_failure_mid_write_leaves_nothing(tiny_resnet_dir: Path, tmp_path: Path, cli,
                                          monkeypatch: pytest.MonkeyPatch) -> None:

    def boom(path: Path, state: dict) -> None:
        (path.parent / "partial").mkdir(parents=True)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output_mod.ocp_v1.partial, "save_async", boom)
    out = tmp_path / "never"
    res = cli("convert", tiny_resnet_dir, "--out", out, "--no-parity")
    assert res.exit_code == 1
    assert "cannot write the checkpoint (No space left on device)" in res.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the staging folder is gone too


def test_default_output_folder_is_repo_name(resnet50_hub: str, tmp_path: Path) -> None:
    proc = run_subprocess("convert", resnet50_hub, "--no-parity", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "resnet-50-nnx" / "nnxport.json").is_file()


def test_verify_errors(tmp_path: Path, cli) -> None:
    res = cli("verify", tmp_path / "nope")
    assert res.exit_code == 1 and "no such folder" in res.stderr
    res = cli("verify", tmp_path)
    assert res.exit_code == 1 and "not an nnxport output folder" in res.stderr


def test_models_lists_resnet(cli) -> None:
    res = cli("models", "--format", "json")
    assert res.exit_code == 0
    (resnet,) = [m for m in json.loads(res.stdout) if m["family"] == "resnet"]
    assert resnet["mappings"] == [{"name": "resnet", "match": {"model_type": "resnet"}}]


# ------------------------------------------------------------------- streaming writes, memory discipline

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
    from tests.helpers import TINY_RESNET

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
