"""Bring your own model: ``--model package.module:Class`` with a YAML or JSON config, end to end on the
tutorial's conv + fc pair (examples/convfc.py): the correct mapping converts with parity passing, the
naive one (the draft: flatten order ignored) fails parity with exit 3; load and verify rebuild the model
from nnxport.json; import errors and a missing reference are one clear line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from flax import nnx

import nnxport
from examples.convfc import ConvFc
from examples.convfc_torch import CONFIG, TorchConvFc, save_checkpoint
from tests.helpers import ROOT

EXAMPLE_MAPPING = ROOT / "examples" / "convfc.yaml"
MODEL = "examples.convfc:ConvFc"


class NoReference(ConvFc):
    """ConvFc without a parity reference."""

    reference: ClassVar[str | None] = None  # type: ignore[misc]


class BrokenReference(ConvFc):
    """ConvFc whose reference cannot be imported."""

    reference: ClassVar[str] = "examples.nosuch_torch:TorchConvFc"


class PickyCheck(ConvFc):
    """ConvFc whose check_config raises a plain exception."""

    @classmethod
    def check_config(cls, config: dict[str, Any]) -> None:
        raise KeyError("depth")


class NotAModule:
    pass


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The torch model's random weights as model.safetensors, its config as config.yaml next to it."""
    return save_checkpoint(tmp_path_factory.mktemp("convfc"), seed=1)


def _convert(cli: Any, checkpoint: Path, out: Path, *args: str | Path, config: Path | None = None) -> Any:
    return cli("convert", checkpoint, "--config", config or checkpoint.parent / "config.yaml", "--out", out,
               "--format", "json", *args)


def test_correct_mapping_passes_and_load_verify_rebuild(checkpoint: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "good"
    res = _convert(cli, checkpoint, out, "--mapping", EXAMPLE_MAPPING)
    assert res.exit_code == 0, res.stderr
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is True and report["reference"] == "examples.convfc_torch:TorchConvFc"
    assert report["inputs"] == [{"name": "images", "shape": [2, 6, 6, 3], "dtype": "float32", "seed": 0}]
    assert report["outputs"][0]["max_abs_diff"] < 1e-5
    manifest = json.loads((out / "nnxport.json").read_text())
    assert manifest["model"]["family"] == MODEL and manifest["model"]["config"] == CONFIG

    # nnxport.load rebuilds the class from the manifest: same outputs as the torch model on new inputs
    model = nnxport.load(out, model=MODEL)  # a recorded import path is imported only when the caller names it
    assert isinstance(model, ConvFc)
    import torch
    from safetensors.torch import load_file

    torch_model = TorchConvFc(CONFIG)
    torch_model.load_state_dict(load_file(checkpoint))
    x = np.random.default_rng(7).standard_normal((3, 6, 6, 3)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(np.asarray(model(x)), expected, atol=1e-5)

    res = cli("verify", out, "--model", MODEL, "--format", "json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["passed"] is True


def test_naive_draft_ignores_flatten_order_and_fails_parity(checkpoint: Path, tmp_path: Path, cli) -> None:
    res = cli("mapping", "draft", checkpoint, "--model", MODEL, "--config", checkpoint.parent / "config.yaml")
    assert res.exit_code == 0, res.stderr
    assert f"model: '{MODEL}'" in res.stdout
    assert "  - from: '^fc\\.weight$'\n    to: 'fc.kernel'\n    ops: [{transpose: [1, 0]}]" in res.stdout
    draft = tmp_path / "draft.yaml"
    draft.write_text(res.stdout)
    out = tmp_path / "naive"
    res = _convert(cli, checkpoint, out, "--mapping", draft)
    assert res.exit_code == 3, res.stderr
    assert "parity FAILED: output max |Δ|" in res.stderr
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is False and report["outputs"][0]["violations"] > 0


def test_model_option_overrides_mapping_and_json_config(checkpoint: Path, tmp_path: Path, cli) -> None:
    """--model with a mapping that names another model, and the config as JSON."""
    text = EXAMPLE_MAPPING.read_text().replace(f"model: {MODEL}", "model: resnet")
    mapping = tmp_path / "m.yaml"
    mapping.write_text(text)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    res = cli("convert", checkpoint, "--config", config, "--mapping", mapping, "--model", MODEL, "--out",
              tmp_path / "o", "--format", "json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["family"] == MODEL and json.loads(res.stdout)["parity"]["passed"] is True
    assert "overrides the model of mapping m (resnet)" in res.stderr


def test_no_reference_skips_parity_with_a_warning(checkpoint: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "noref"
    res = _convert(cli, checkpoint, out, "--mapping", EXAMPLE_MAPPING, "--model",
                   "tests.e2e.test_custom_model:NoReference")
    assert res.exit_code == 0, res.stderr
    assert "declares no reference" in res.stderr and "parity is skipped" in res.stderr
    assert not (out / "parity.json").exists() and json.loads(res.stdout)["parity"] is None
    assert isinstance(nnxport.load(out, model="tests.e2e.test_custom_model:NoReference"), NoReference)
    res = cli("verify", out, "--model", "tests.e2e.test_custom_model:NoReference")
    assert res.exit_code == 1 and "nothing to verify against" in res.stderr


@pytest.mark.parametrize(("model", "message"), [
    ("nosuch_pkg.mod:Model", "cannot import module 'nosuch_pkg.mod'"),
    ("examples.convfc:Missing", "module 'examples.convfc' has no attribute 'Missing'"),
    ("examples.convfc:", "expected an import path package.module:Class"),
    ("tests.e2e.test_custom_model:NotAModule", "is not an nnx.Module subclass"),
])
def test_bad_model_import_path_is_one_line_exit_1(model: str, message: str, checkpoint: Path, tmp_path: Path,
                                                  cli) -> None:
    for res in (_convert(cli, checkpoint, tmp_path / "x", "--mapping", EXAMPLE_MAPPING, "--model", model,
                         "-q"),
                cli("mapping", "draft", checkpoint, "--model", model, "--config",
                    checkpoint.parent / "config.yaml", "-q")):
        assert res.exit_code == 1
        assert message in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "x").exists()


def test_broken_reference_fails_before_anything_is_written(checkpoint: Path, tmp_path: Path, cli) -> None:
    res = _convert(cli, checkpoint, tmp_path / "x", "--mapping", EXAMPLE_MAPPING, "--model",
                   "tests.e2e.test_custom_model:BrokenReference", "-q")
    assert res.exit_code == 1 and "Traceback" not in res.stderr
    assert "reference of model tests.e2e.test_custom_model:BrokenReference" in res.stderr
    assert "cannot import module 'examples.nosuch_torch'" in res.stderr
    assert not (tmp_path / "x").exists()
    # --no-parity does not need the reference
    res = _convert(cli, checkpoint, tmp_path / "y", "--mapping", EXAMPLE_MAPPING, "--model",
                   "tests.e2e.test_custom_model:BrokenReference", "--no-parity")
    assert res.exit_code == 0, res.stderr


def test_config_errors(checkpoint: Path, tmp_path: Path, cli) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("in_channels: [3\n")
    res = _convert(cli, checkpoint, tmp_path / "x", "--mapping", EXAMPLE_MAPPING, config=bad)
    assert res.exit_code == 1 and "bad.yaml: invalid YAML at line" in res.stderr
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("in_channels: 3\nchannels: 4\nkernel_size: 2\nimage_size: 6\nnum_classes: two\n")
    res = _convert(cli, checkpoint, tmp_path / "x", "--mapping", EXAMPLE_MAPPING, config=wrong)
    assert res.exit_code == 1 and "field 'num_classes' must be a positive integer" in res.stderr


def test_check_config_exceptions_are_config_errors(checkpoint: Path, tmp_path: Path, cli) -> None:
    res = _convert(cli, checkpoint, tmp_path / "x", "--mapping", EXAMPLE_MAPPING, "--model",
                   "tests.e2e.test_custom_model:PickyCheck", "-q")
    assert res.exit_code == 1 and "Traceback" not in res.stderr
    assert "check_config refused the config: KeyError: 'depth'" in res.stderr


def test_protocol_builds_abstractly() -> None:
    """The class is built under nnx.eval_shape from the config dict alone (no weights drawn)."""
    model = nnx.eval_shape(lambda: ConvFc(dict(CONFIG), rngs=nnx.Rngs(0)))
    assert model.fc.kernel.get_value().shape == (100, 2)
    assert ConvFc.parity_inputs(dict(CONFIG)) == {"images": (2, 6, 6, 3)}
