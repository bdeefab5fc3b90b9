"""GPT-2 family: convert random-weight replicas of openai-community/gpt2 (tiny configs) and check parity
against transformers' GPT2LMHeadModel, the hub's checkpoint layout, broken mappings and config drift."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nnxport
from nnxport.models.gpt2 import GPT2
from nnxport.testing.replicas import build_replica, edit_safetensors, published_config
from tests.helpers import MAPPINGS, convert_json, read_tensors

REPO = "openai-community/gpt2"
GPT2_YAML = (MAPPINGS / "gpt2.yaml").read_text()
# initializer_range 0.1 (published: 0.02) gives logits of a few units and non-uniform attention, so that
# a mapping mistake (e.g. q and k swapped) moves the logits far outside the tolerance.
TINY: dict[str, Any] = published_config(REPO, n_embd=64, n_head=4, n_layer=2, vocab_size=512, n_positions=64,
                                        n_ctx=64, initializer_range=0.1)
N_VALID = 2 * 16 - 5  # base.token_inputs: two rows of 16 tokens, the last one right-padded by 5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT2LMHeadModel as save_pretrained writes it: `transformer.` prefix, no lm_head stored."""
    return build_replica(TINY, tmp_path_factory.mktemp("gpt2") / "tiny-gpt2", seed=1, hub_config=True)


@pytest.fixture(scope="module")
def tiny_hub(tiny_dir: Path, hub_cache: Path) -> str:
    from nnxport.testing.hub import write_hub_cache

    write_hub_cache(hub_cache, "nnxport-test/tiny-gpt2", tiny_dir)
    return "nnxport-test/tiny-gpt2"


def _logits(report: dict[str, Any]) -> dict[str, Any]:
    (logits,) = report["outputs"]
    assert logits["name"] == "logits" and logits["shape"] == [N_VALID, TINY["vocab_size"]]
    return logits


def test_from_offline_hub_cache_with_automatic_mapping(tiny_hub: str, tiny_dir: Path, tmp_path: Path,
                                                       cli) -> None:
    out = tmp_path / "out"
    result = convert_json(cli, tiny_hub, out)
    assert result["mapping"] == "gpt2" and result["family"] == "gpt2"
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is True and report["reference"] == "transformers.GPT2LMHeadModel"
    assert [i["name"] for i in report["inputs"]] == ["input_ids", "attention_mask"]
    logits = _logits(report)
    assert logits["violations"] == 0 and logits["top1_agreement"] == 1.0
    assert logits["top5_agreement"] == 1.0 and 0.0 <= logits["kl_divergence"] < 1e-8
    print("gpt2 tiny fp32:", {k: logits[k] for k in ("max_abs_diff", "max_rel_diff", "kl_divergence")})
    manifest = json.loads((out / "nnxport.json").read_text())
    assert manifest["model"]["family"] == "gpt2" and manifest["mapping"]["text"] == GPT2_YAML
    assert manifest["source"]["repo_id"] == tiny_hub

    # The fused c_attn was split column-wise into q | k | v; Conv1D weights kept their [in, out] layout.
    model = nnxport.load(out)
    assert isinstance(model, GPT2)
    src = read_tensors(tiny_dir)
    d = TINY["n_embd"]
    c_attn, c_bias = src["transformer.h.1.attn.c_attn.weight"], src["transformer.h.1.attn.c_attn.bias"]
    attn = model.layers[1].attn
    for j, proj in enumerate((attn.q, attn.k, attn.v)):
        np.testing.assert_array_equal(np.asarray(proj.kernel[...]), c_attn[:, j * d:(j + 1) * d])
        assert proj.bias is not None
        np.testing.assert_array_equal(np.asarray(proj.bias[...]), c_bias[j * d:(j + 1) * d])
    np.testing.assert_array_equal(np.asarray(attn.o.kernel[...]), src["transformer.h.1.attn.c_proj.weight"])
    np.testing.assert_array_equal(np.asarray(model.layers[0].mlp.c_fc.kernel[...]),
                                  src["transformer.h.0.mlp.c_fc.weight"])
    assert model.lm_head is None  # tied: logits come from wte


def test_hub_layout_without_prefix_with_buffers_and_stored_head(tiny_dir: Path, tmp_path: Path,
                                                                cli) -> None:
    """openai-community/gpt2's own model.safetensors: no `transformer.` prefix, the old causal-mask
    buffers in every block, and (in older saves) the tied lm_head.weight stored."""
    folder = tmp_path / "hub-layout"
    shutil.copytree(tiny_dir, folder)
    wte = read_tensors(tiny_dir)["transformer.wte.weight"]
    n = TINY["n_positions"]
    buffers: dict[str, np.ndarray] = {}
    for i in range(TINY["n_layer"]):
        buffers[f"h.{i}.attn.bias"] = np.tril(np.ones((n, n), np.float32))[None, None]
        buffers[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    edit_safetensors(folder, rename=lambda k: k.removeprefix("transformer."),
                     add={**buffers, "lm_head.weight": wte.copy()})
    keys = read_tensors(folder)
    assert "wte.weight" in keys and not any(k.startswith("transformer.") for k in keys)

    res = cli("inspect-keys", folder, "--format", "json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["mapping"] == "gpt2" and doc["problems"] == [] and doc["unfilled_targets"] == []
    status = {k["key"]: k["status"] for k in doc["keys"]}
    assert {k for k, s in status.items() if s == "ignored"} == set(buffers)
    assert {k for k, s in status.items() if s == "tied"} == {"lm_head.weight"}
    assert status["h.0.attn.c_attn.weight"] == "mapped" and status["wte.weight"] == "mapped"

    report = convert_json(cli, folder, tmp_path / "out")["parity"]
    assert report["passed"] is True
    assert _logits(report)["top1_agreement"] == 1.0


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # q and k swapped in the split targets: same shapes, attention scores become k·q.
        ("to: ['layers.\\1.attn.q.kernel', 'layers.\\1.attn.k.kernel',",
         "to: ['layers.\\1.attn.k.kernel', 'layers.\\1.attn.q.kernel',"),
        # The square attention output projection transposed, as if Conv1D were an nn.Linear.
        ("to: 'layers.\\1.attn.o.kernel'\n",
         "to: 'layers.\\1.attn.o.kernel'\n    ops: [{transpose: [1, 0]}]\n"),
    ],
    ids=["q-k-swapped", "c_proj-transposed"],
)
def test_shape_preserving_wrong_mapping_fails_parity(tiny_dir: Path, tmp_path: Path, cli, old: str,
                                                     new: str) -> None:
    assert GPT2_YAML.count(old) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(GPT2_YAML.replace(old, new))
    out = tmp_path / "out"
    res = cli("convert", tiny_dir, "--mapping", bad, "--out", out, "--format", "json")
    assert res.exit_code == 3, res.stderr
    assert "parity FAILED" in res.stderr
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is False
    logits = _logits(report)
    assert logits["violations"] > 0 and logits["max_rel_diff"] > 0.05
    assert (out / "checkpoint").is_dir()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("activation_function", "relu6"),  # a transformers activation nnxport does not implement
        ("add_cross_attention", True),
        ("architectures", ["GPT2ForSequenceClassification"]),
        ("n_inner", "wide"),
    ],
)
def test_config_drift_is_refused_naming_the_field(tiny_dir: Path, tmp_path: Path, cli, field: str,
                                                  value: Any) -> None:
    folder = tmp_path / "drift"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    res = cli("convert", folder, "--out", out, "-q")
    assert res.exit_code == 1
    (line,) = res.stderr.strip().splitlines()  # -q: the error line only
    assert line.startswith("error: config.json: field ") and f"'{field}'" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "overrides",
    [
        # transformers' other softmax-scale rules, a non-default MLP width and exact GELU
        {"scale_attn_weights": False, "scale_attn_by_inverse_layer_idx": True,
         "reorder_and_upcast_attn": True, "n_inner": 96, "activation_function": "gelu",
         "layer_norm_epsilon": 1e-3},
        # an untied head: lm_head.weight is stored and read
        {"tie_word_embeddings": False},
    ],
    ids=["scales-inner-gelu", "untied-head"],
)
def test_config_variants_convert_and_pass(tmp_path: Path, cli, overrides: dict[str, Any]) -> None:
    src = build_replica({**TINY, **overrides}, tmp_path / "src", seed=2, hub_config=True)
    out = tmp_path / "out"
    report = convert_json(cli, src, out)["parity"]
    assert report["passed"] is True and _logits(report)["top1_agreement"] == 1.0
    model = nnxport.load(out)
    assert isinstance(model, GPT2)
    if overrides.get("tie_word_embeddings") is False:
        head = read_tensors(src)["lm_head.weight"]
        assert not np.array_equal(head, read_tensors(src)["transformer.wte.weight"])
        assert model.lm_head is not None
        np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]), head.T)
    else:
        assert model.layers[0].mlp.c_fc.kernel.shape == (TINY["n_embd"], 96)


def test_bfloat16_within_bf16_tolerance(tiny_dir: Path, tmp_path: Path, cli) -> None:
    # A checkpoint stored in bfloat16: the reference reads the same bf16 weights.
    src = build_replica(TINY, tmp_path / "bf16-src", seed=3, dtype="bfloat16", hub_config=True)
    report = convert_json(cli, src, tmp_path / "bf16")["parity"]
    assert report["passed"] is True and report["dtype"] == "bfloat16"
    assert report["tolerance"]["atol_relative_to"] == "max_abs_reference"
    assert report["tolerance"]["atol"] > 1e-3  # the bf16 tolerance, not the fp32 one
    print("gpt2 tiny bf16 checkpoint:", _logits(report)["max_rel_diff"])
    # A float32 checkpoint cast to bfloat16 on conversion: the reference keeps float32 weights.
    report = convert_json(cli, tiny_dir, tmp_path / "cast", "--dtype", "bfloat16")["parity"]
    logits = _logits(report)
    assert report["passed"] is True and report["dtype"] == "bfloat16"
    assert 1e-4 < logits["max_rel_diff"] < report["tolerance"]["atol"]  # the cast did happen
    print("gpt2 tiny fp32 -> bf16:", {k: logits[k] for k in ("max_abs_diff", "max_rel_diff", "kl_divergence",
                                                             "top5_agreement")})


@pytest.mark.slow
def test_published_gpt2_full_size(tmp_path: Path, cli) -> None:
    """openai-community/gpt2 at full size (124M parameters, random weights)."""
    src = build_replica(published_config(REPO), tmp_path / "gpt2", hub_config=True)
    report = convert_json(cli, src, tmp_path / "out")["parity"]
    (logits,) = report["outputs"]
    print("gpt2 full size fp32:", {k: logits[k] for k in ("shape", "max_abs_diff", "max_rel_diff", "cosine",
                                                          "top1_agreement", "top5_agreement",
                                                          "kl_divergence")})
    assert report["passed"] is True
    assert logits["shape"] == [N_VALID, 50257] and logits["top1_agreement"] == 1.0
