"""ViT family: convert random-weight replicas of google/vit-base-patch16-224 (tiny configs) and check parity
against transformers' ViTForImageClassification / ViTModel, the checkpoint layouts (with and without the
`vit.` prefix and the pooler), a broken q/k/v concat order, config drift and bf16 weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nnxport
from nnxport.models.vit import ViT
from nnxport.testing.replicas import build_replica, edit_safetensors, published_config
from tests.helpers import MAPPINGS, convert_json, copy_source, read_tensors

REPO = "google/vit-base-patch16-224"
VIT_YAML = (MAPPINGS / "vit.yaml").read_text()
# initializer_range 0.1 (published: 0.02) gives non-uniform attention, so that a mapping mistake (e.g. q
# and k exchanged) moves the outputs far outside the tolerance (at 0.02 it moves them by ~0.2%).
TINY: dict[str, Any] = published_config(REPO, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, image_size=32, patch_size=8, num_labels=10,
                                        initializer_range=0.1)
TOKENS = (32 // 8) ** 2 + 1  # patches + [CLS]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViTForImageClassification as save_pretrained writes it (`vit.` prefix, no pooler)."""
    return build_replica(TINY, tmp_path_factory.mktemp("vit") / "tiny-vit", seed=1, hub_config=True)


@pytest.fixture(scope="module")
def tiny_hub(tiny_dir: Path, hub_cache: Path) -> str:
    from nnxport.testing.hub import write_hub_cache

    write_hub_cache(hub_cache, "nnxport-test/tiny-vit", tiny_dir)
    return "nnxport-test/tiny-vit"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViTModel (no prefix, with its pooler)."""
    return build_replica(TINY, tmp_path_factory.mktemp("vit") / "tiny-vit-base", seed=2, hub_config=True,
                         base_model=True)


def test_from_offline_hub_cache_with_automatic_mapping(tiny_hub: str, tiny_dir: Path, tmp_path: Path,
                                                       cli) -> None:
    out = tmp_path / "out"
    result = convert_json(cli, tiny_hub, out)
    assert result["mapping"] == "vit" and result["family"] == "vit"
    # Per layer, the 6 q/k/v weights and biases fill 2 fused targets.
    assert result["tensors"] == len(read_tensors(tiny_dir)) - TINY["num_hidden_layers"] * (6 - 2)
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is True and report["reference"] == "transformers.ViTForImageClassification"
    assert report["inputs"] == [
        {"name": "pixel_values", "shape": [2, 32, 32, 3], "dtype": "float32", "seed": 0}]
    (logits,) = report["outputs"]
    assert logits["name"] == "logits" and logits["shape"] == [2, 10]
    assert logits["violations"] == 0 and logits["top1_agreement"] == 1.0 and logits["cosine"] > 0.999999
    assert logits["top5_agreement"] == 1.0 and 0.0 <= logits["kl_divergence"] < 1e-8
    print("vit tiny fp32:", {k: logits[k] for k in ("max_abs_diff", "max_rel_diff", "kl_divergence")})
    manifest = json.loads((out / "nnxport.json").read_text())
    assert manifest["mapping"]["text"] == VIT_YAML and manifest["model"]["options"] == {"pooler": False}
    assert manifest["source"]["repo_id"] == tiny_hub

    # The fused qkv kernel is [q | k | v] of the transposed torch weights; [CLS] and positions reshaped.
    model = nnxport.load(out)
    assert isinstance(model, ViT)
    src = read_tensors(tiny_dir)
    attn = "vit.encoder.layer.1.attention.attention."
    want = np.concatenate([src[f"{attn}{n}.weight"].T for n in ("query", "key", "value")], axis=1)
    np.testing.assert_array_equal(np.asarray(model.layers[1].attn.qkv.kernel[...]), want)
    want_bias = np.concatenate([src[f"{attn}{n}.bias"] for n in ("query", "key", "value")])
    qkv_bias = model.layers[1].attn.qkv.bias
    assert qkv_bias is not None
    np.testing.assert_array_equal(np.asarray(qkv_bias[...]), want_bias)
    emb = "vit.embeddings."
    np.testing.assert_array_equal(np.asarray(model.cls_token[...]), src[f"{emb}cls_token"].reshape(64))
    np.testing.assert_array_equal(np.asarray(model.pos_embed[...]),
                                  src[f"{emb}position_embeddings"].reshape(TOKENS, 64))
    np.testing.assert_array_equal(np.asarray(model.patch_embed.kernel[...]),
                                  src[f"{emb}patch_embeddings.projection.weight"].transpose(2, 3, 1, 0))


@pytest.mark.parametrize("pooler", [True, False], ids=["with-pooler", "without-pooler"])
def test_vit_model_with_and_without_pooler(base_dir: Path, tmp_path: Path, cli, pooler: bool) -> None:
    src = base_dir if pooler else copy_source(base_dir, tmp_path)
    if not pooler:
        edit_safetensors(src, drop=["pooler.dense.weight", "pooler.dense.bias"])
    assert not any(k.startswith("vit.") for k in read_tensors(src))
    out = tmp_path / "out"
    report = convert_json(cli, src, out)["parity"]
    assert report["passed"] is True and report["reference"] == "transformers.ViTModel"
    shapes = {o["name"]: o["shape"] for o in report["outputs"]}
    expected = {"last_hidden_state": [2, TOKENS, 64]} | ({"pooler_output": [2, 64]} if pooler else {})
    assert shapes == expected
    assert all(o["violations"] == 0 and o["cosine"] > 0.999999 for o in report["outputs"])
    assert json.loads((out / "nnxport.json").read_text())["model"]["options"] == {"pooler": pooler}
    res = cli("verify", out, "--format", "json")  # rebuilds the reference with the recorded options
    assert res.exit_code == 0, res.stderr
    assert [o["name"] for o in json.loads(res.stdout)["outputs"]] == list(expected)


def test_classifier_checkpoint_with_a_stored_pooler_ignores_it(tiny_dir: Path, tmp_path: Path, cli) -> None:
    """Some checkpoints of the classifier carry ViTModel's pooler: the classifier has none, so the keys are
    ignored (reported), not an error."""
    src = copy_source(tiny_dir, tmp_path)
    rng = np.random.default_rng(0)
    edit_safetensors(src, add={"vit.pooler.dense.weight": rng.standard_normal((64, 64), dtype=np.float32),
                               "vit.pooler.dense.bias": rng.standard_normal(64, dtype=np.float32)})
    res = cli("inspect-keys", src, "--format", "json")
    assert res.exit_code == 0, res.stderr
    rows = {r["key"]: r for r in json.loads(res.stdout)["keys"]}
    assert rows["vit.pooler.dense.weight"]["status"] == "ignored"
    assert rows["vit.pooler.dense.bias"]["status"] == "ignored"
    assert convert_json(cli, src, tmp_path / "out")["parity"]["passed"] is True


def test_variants_qkv_without_bias_rectangular_patches_head_dim_and_pooler_settings(tmp_path: Path,
                                                                                   cli) -> None:
    """Config fields that change the computation and are implemented: qkv_bias false, [h, w] image and
    patch sizes, an explicit head_dim, pooler_output_size, pooler_act, another hidden_act."""
    config = {**TINY, "qkv_bias": False, "image_size": [32, 24], "patch_size": [8, 4], "head_dim": 8,
              "pooler_output_size": 48, "pooler_act": "relu", "hidden_act": "gelu_new"}
    src = build_replica(config, tmp_path / "src", seed=3, hub_config=True, base_model=True)
    assert not any(k.endswith("query.bias") for k in read_tensors(src))
    report = convert_json(cli, src, tmp_path / "out")["parity"]
    assert report["passed"] is True
    assert report["inputs"][0]["shape"] == [2, 32, 24, 3]
    tokens = (32 // 8) * (24 // 4) + 1
    assert {o["name"]: o["shape"] for o in report["outputs"]} == {
        "last_hidden_state": [2, tokens, 64], "pooler_output": [2, 48]}


def test_classifier_with_zero_labels_outputs_the_cls_state(tmp_path: Path, cli) -> None:
    """num_labels 0: transformers' classifier is the identity, its logits the final [CLS] state."""
    src = build_replica({**TINY, "num_labels": 0}, tmp_path / "src", seed=5, hub_config=True)
    assert not any(k.startswith("classifier") for k in read_tensors(src))
    report = convert_json(cli, src, tmp_path / "out")["parity"]
    assert report["passed"] is True and report["reference"] == "transformers.ViTForImageClassification"
    assert [(o["name"], o["shape"]) for o in report["outputs"]] == [("logits", [2, 64])]


def test_wrong_qkv_concat_order_fails_parity(tiny_dir: Path, tmp_path: Path, cli) -> None:
    text = VIT_YAML.replace("order: [query, key, value]", "order: [key, query, value]")
    assert text.count("order: [key, query, value]") == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    out = tmp_path / "out"
    res = cli("convert", tiny_dir, "--mapping", bad, "--out", out)
    assert res.exit_code == 3, res.stderr
    assert "parity FAILED" in res.stderr and "Traceback" not in res.stderr
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is False
    assert report["outputs"][0]["violations"] > 0 and report["outputs"][0]["max_rel_diff"] > 0.05


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_act", "swiglu"),
        ("pooler_act", "softmax"),
        ("qkv_bias", "yes"),
        ("architectures", ["ViTForMaskedImageModeling"]),
        ("image_size", "224"),
        ("num_attention_heads", 5),
    ],
)
def test_config_drift_is_refused_naming_the_field(tiny_dir: Path, tmp_path: Path, cli, field: str,
                                                  value: Any) -> None:
    src = copy_source(tiny_dir, tmp_path)
    config = json.loads((src / "config.json").read_text())
    config[field] = value
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    res = cli("convert", src, "--out", out, "-q")
    assert res.exit_code == 1
    (line,) = res.stderr.strip().splitlines()  # one clear line
    assert f"'{field}'" in line and "config.json" in line
    assert not out.exists()


def test_harmless_extra_fields_are_accepted(tiny_dir: Path, tmp_path: Path, cli) -> None:
    """encoder_stride only shapes the masked-image-modeling decoder, id2label only names classes."""
    src = copy_source(tiny_dir, tmp_path)
    config = json.loads((src / "config.json").read_text())
    config |= {"encoder_stride": 8, "id2label": {str(i): f"c{i}" for i in range(10)}}
    (src / "config.json").write_text(json.dumps(config))
    assert convert_json(cli, src, tmp_path / "out")["parity"]["passed"] is True


def test_bfloat16_replica_passes_at_bf16_tolerance(tmp_path: Path, cli) -> None:
    src = build_replica(TINY, tmp_path / "src", seed=4, hub_config=True, dtype="bfloat16")
    report = convert_json(cli, src, tmp_path / "out")["parity"]
    assert report["passed"] is True and report["dtype"] == "bfloat16"
    assert report["tolerance"] == {"atol": 2e-2, "rtol": 2e-2, "atol_relative_to": "max_abs_reference"}
    (logits,) = report["outputs"]
    assert logits["top1_agreement"] == 1.0


@pytest.mark.slow
def test_full_size_vit_base_from_hub_cache(hub_cache: Path, tmp_path: Path, cli) -> None:
    from nnxport.testing.hub import write_hub_cache

    folder = build_replica(published_config(REPO), tmp_path / "src", hub_config=True)
    write_hub_cache(hub_cache, REPO, folder)
    report = convert_json(cli, REPO, tmp_path / "out")["parity"]
    assert report["passed"] is True and report["reference"] == "transformers.ViTForImageClassification"
    (logits,) = report["outputs"]
    assert logits["shape"] == [2, 1000] and logits["top1_agreement"] == 1.0
    print("vit-base fp32:", {k: logits[k] for k in ("max_abs_diff", "max_rel_diff", "kl_divergence")})
