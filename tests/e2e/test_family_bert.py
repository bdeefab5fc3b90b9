"""BERT family: convert random-weight replicas of google-bert/bert-base-uncased (tiny configs) and check
parity against transformers' BertForMaskedLM / BertModel, the checkpoint layouts found in the wild (prefix
or not, pooler or not, position_ids buffers, gamma/beta names, stored tied decoder, NSP head), a broken
mapping, config drift and bf16 weights."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nnxport
from nnxport.models.bert import Bert
from nnxport.testing.replicas import build_replica, edit_safetensors, published_config
from tests.helpers import MAPPINGS, convert_json, read_tensors

REPO = "google-bert/bert-base-uncased"
BERT_YAML = (MAPPINGS / "bert.yaml").read_text()
# initializer_range 0.1 (published: 0.02) gives non-uniform attention, so that a mapping mistake (e.g. q
# and k swapped) moves the outputs far outside the tolerance (at 0.02 it moves them by ~0.04%).
TINY: dict[str, Any] = published_config(REPO, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, vocab_size=512, max_position_embeddings=64,
                                        initializer_range=0.1)
N_VALID = 2 * 16 - 5  # base.token_inputs: two rows of 16 tokens, the last one right-padded by 5
POOLER = ["pooler.dense.weight", "pooler.dense.bias"]


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BertForMaskedLM as save_pretrained writes it: `bert.` prefix, no pooler, no decoder stored."""
    return build_replica(TINY, tmp_path_factory.mktemp("bert") / "tiny-bert", seed=1, hub_config=True)


@pytest.fixture(scope="module")
def mlm_hub(mlm_dir: Path, hub_cache: Path) -> str:
    from nnxport.testing.hub import write_hub_cache

    write_hub_cache(hub_cache, "nnxport-test/tiny-bert", mlm_dir)
    return "nnxport-test/tiny-bert"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BertModel (architectures [BertModel]): no prefix, with its pooler."""
    return build_replica(TINY, tmp_path_factory.mktemp("bert") / "tiny-bert-base", seed=2, hub_config=True,
                         base_model=True)


def _statuses(cli: Callable[..., Any], source: Path) -> dict[str, str]:
    res = cli("inspect-keys", source, "--format", "json")
    assert res.exit_code == 0, res.stderr
    return {r["key"]: r["status"] for r in json.loads(res.stdout)["keys"]}


def _gamma_beta(key: str) -> str:
    return key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")


def test_mlm_from_offline_hub_cache_with_automatic_mapping(mlm_hub: str, mlm_dir: Path, tmp_path: Path,
                                                           cli) -> None:
    out = tmp_path / "out"
    result = convert_json(cli, mlm_hub, out)
    assert result["mapping"] == "bert" and result["family"] == "bert"
    # One target per key: nothing ignored, nothing tied.
    assert result["tensors"] == len(read_tensors(mlm_dir))
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is True and report["reference"] == "transformers.BertForMaskedLM"
    assert [(i["name"], i["shape"], i["dtype"]) for i in report["inputs"]] == [
        ("input_ids", [2, 16], "int32"), ("attention_mask", [2, 16], "int32"),
        ("token_type_ids", [2, 16], "int32")]
    (logits,) = report["outputs"]
    assert logits["name"] == "logits" and logits["shape"] == [N_VALID, TINY["vocab_size"]]
    assert logits["violations"] == 0 and logits["top1_agreement"] == 1.0 and logits["cosine"] > 0.999999
    assert logits["top5_agreement"] == 1.0 and 0.0 <= logits["kl_divergence"] < 1e-8
    print("bert tiny fp32:", {k: logits[k] for k in ("max_abs_diff", "max_rel_diff", "kl_divergence")})
    manifest = json.loads((out / "nnxport.json").read_text())
    assert manifest["mapping"]["text"] == BERT_YAML and manifest["model"]["options"] == {"pooler": False}
    assert manifest["source"]["repo_id"] == mlm_hub

    # The decoder is the word embeddings (no leaf of its own); its bias is cls.predictions.bias.
    model = nnxport.load(out)
    assert isinstance(model, Bert)
    src = read_tensors(mlm_dir)
    assert model.mlm is not None and model.mlm.decoder is None and model.pooler is None
    assert model.mlm.bias is not None
    np.testing.assert_array_equal(np.asarray(model.mlm.bias[...]), src["cls.predictions.bias"])
    np.testing.assert_array_equal(np.asarray(model.embeddings.word.embedding[...]),
                                  src["bert.embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(np.asarray(model.layers[1].attn.k.kernel[...]),
                                  src["bert.encoder.layer.1.attention.self.key.weight"].T)


def _prefixed(key: str) -> str:
    return "bert." + key


LAYOUTS: dict[str, dict[str, Any]] = {
    "with-pooler": {},
    "without-pooler": {"drop": POOLER},
    "bert-prefix": {"rename": _prefixed},
    "position-ids-buffer": {"add": {"embeddings.position_ids": np.arange(64, dtype=np.int64)[None]}},
    "gamma-beta-names": {"rename": _gamma_beta},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bert_model_layouts(base_dir: Path, tmp_path: Path, cli, layout: str) -> None:
    src = shutil.copytree(base_dir, tmp_path / "src")
    edit_safetensors(src, **LAYOUTS[layout])
    keys = read_tensors(src)
    pooler = layout != "without-pooler"
    assert any("pooler" in k for k in keys) == pooler
    out = tmp_path / "out"
    result = convert_json(cli, src, out)
    assert result["tensors"] == len(keys) - (layout == "position-ids-buffer")
    report = result["parity"]
    assert report["passed"] is True and report["reference"] == "transformers.BertModel"
    shapes = {o["name"]: o["shape"] for o in report["outputs"]}
    assert shapes == {"last_hidden_state": [N_VALID, 64]} | ({"pooler_output": [2, 64]} if pooler else {})
    assert all(o["violations"] == 0 and o["cosine"] > 0.999999 for o in report["outputs"])
    assert json.loads((out / "nnxport.json").read_text())["model"]["options"] == {"pooler": pooler}
    if layout == "without-pooler":
        res = cli("verify", out, "--format", "json")  # rebuilds the reference with the recorded options
        assert res.exit_code == 0, res.stderr
        assert [o["name"] for o in json.loads(res.stdout)["outputs"]] == ["last_hidden_state"]


def test_mlm_checkpoint_in_the_hub_layout_of_bert_base_uncased(mlm_dir: Path, tmp_path: Path, cli) -> None:
    """The layout of the real bert-base-uncased checkpoint: LayerNorm gamma/beta, position_ids, the pooler and
    the next-sentence head (BertForPreTraining's), and the tied decoder stored (weight and bias)."""
    src = shutil.copytree(mlm_dir, tmp_path / "src")
    keys = read_tensors(src)
    rng = np.random.default_rng(0)
    edit_safetensors(src, rename=_gamma_beta, add={
        "cls.predictions.decoder.weight": keys["bert.embeddings.word_embeddings.weight"],
        "cls.predictions.decoder.bias": keys["cls.predictions.bias"],
        "cls.seq_relationship.weight": rng.standard_normal((2, 64), dtype=np.float32),
        "cls.seq_relationship.bias": rng.standard_normal(2, dtype=np.float32),
        "bert.pooler.dense.weight": rng.standard_normal((64, 64), dtype=np.float32),
        "bert.pooler.dense.bias": rng.standard_normal(64, dtype=np.float32),
        "bert.embeddings.position_ids": np.arange(64, dtype=np.int64)[None],
    })
    statuses = _statuses(cli, src)
    assert statuses.pop("bert.embeddings.LayerNorm.gamma") == "mapped"
    expected = {"cls.predictions.decoder.weight": "tied", "cls.predictions.decoder.bias": "tied",
                "cls.seq_relationship.weight": "ignored", "cls.seq_relationship.bias": "ignored",
                "bert.pooler.dense.weight": "ignored", "bert.pooler.dense.bias": "ignored",
                "bert.embeddings.position_ids": "ignored"}
    assert {k: statuses.pop(k) for k in expected} == expected
    assert set(statuses.values()) == {"mapped"}
    report = convert_json(cli, src, tmp_path / "out")["parity"]
    assert report["passed"] is True and report["reference"] == "transformers.BertForMaskedLM"
    assert report["outputs"][0]["top1_agreement"] == 1.0


def test_untied_decoder(tmp_path: Path, cli) -> None:
    """tie_word_embeddings false: the decoder has its own weight and bias (transformers' forward then uses
    decoder.bias, not cls.predictions.bias, which is ignored)."""
    src = build_replica({**TINY, "tie_word_embeddings": False}, tmp_path / "src", seed=3, hub_config=True)
    keys = read_tensors(src)
    assert not np.array_equal(keys["cls.predictions.decoder.bias"], keys["cls.predictions.bias"])
    statuses = _statuses(cli, src)
    assert statuses["cls.predictions.decoder.weight"] == statuses["cls.predictions.decoder.bias"] == "mapped"
    assert statuses["cls.predictions.bias"] == "ignored"
    out = tmp_path / "out"
    assert convert_json(cli, src, out)["parity"]["passed"] is True
    model = nnxport.load(out)
    assert isinstance(model, Bert) and model.mlm is not None and model.mlm.decoder is not None
    np.testing.assert_array_equal(np.asarray(model.mlm.decoder.kernel[...]),
                                  keys["cls.predictions.decoder.weight"].T)


def test_query_and_key_swapped_fails_parity(mlm_dir: Path, tmp_path: Path, cli) -> None:
    text = (BERT_YAML.replace("to: 'layers.\\1.attn.q.kernel'", "to: 'TMP'")
            .replace("to: 'layers.\\1.attn.k.kernel'", "to: 'layers.\\1.attn.q.kernel'")
            .replace("to: 'TMP'", "to: 'layers.\\1.attn.k.kernel'"))
    assert text != BERT_YAML and "TMP" not in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    out = tmp_path / "out"
    res = cli("convert", mlm_dir, "--mapping", bad, "--out", out)
    assert res.exit_code == 3, res.stderr
    assert "parity FAILED" in res.stderr and "Traceback" not in res.stderr
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is False
    assert report["outputs"][0]["violations"] > 0 and report["outputs"][0]["max_rel_diff"] > 0.05


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("position_embedding_type", "relative_key"),
        ("is_decoder", True),
        ("add_cross_attention", True),
        ("hidden_act", "swiglu"),
        ("architectures", ["BertForSequenceClassification"]),
        ("num_attention_heads", 5),
        ("tie_word_embeddings", "no"),
    ],
)
def test_config_drift_is_refused_naming_the_field(mlm_dir: Path, tmp_path: Path, cli, field: str,
                                                  value: Any) -> None:
    src = shutil.copytree(mlm_dir, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config[field] = value
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    res = cli("convert", src, "--out", out, "-q")
    assert res.exit_code == 1
    (line,) = res.stderr.strip().splitlines()  # one clear line
    assert f"'{field}'" in line and "config.json" in line
    assert not out.exists()


def test_bfloat16_replica_passes_at_bf16_tolerance(tmp_path: Path, cli) -> None:
    src = build_replica(TINY, tmp_path / "src", seed=4, hub_config=True, dtype="bfloat16")
    report = convert_json(cli, src, tmp_path / "out")["parity"]
    assert report["passed"] is True and report["dtype"] == "bfloat16"
    assert report["tolerance"] == {"atol": 5e-2, "rtol": 5e-2, "atol_relative_to": "max_abs_reference"}
    (logits,) = report["outputs"]
    assert logits["top1_agreement"] == 1.0


def test_bfloat16_cast_of_float32_weights_passes(mlm_dir: Path, tmp_path: Path, cli) -> None:
    report = convert_json(cli, mlm_dir, tmp_path / "out", "--dtype", "bfloat16")["parity"]
    assert report["passed"] is True and report["dtype"] == "bfloat16"
    (logits,) = report["outputs"]
    assert logits["max_rel_diff"] < 5e-2 / 2 and logits["top1_agreement"] > 0.95


@pytest.mark.slow
def test_full_size_bert_base_uncased_from_hub_cache(hub_cache: Path, tmp_path: Path, cli) -> None:
    from nnxport.testing.hub import write_hub_cache

    folder = build_replica(published_config(REPO), tmp_path / "src", hub_config=True)
    write_hub_cache(hub_cache, REPO, folder)
    report = convert_json(cli, REPO, tmp_path / "out")["parity"]
    assert report["passed"] is True and report["reference"] == "transformers.BertForMaskedLM"
    (logits,) = report["outputs"]
    assert logits["shape"] == [N_VALID, 30522] and logits["top1_agreement"] == 1.0
    print("bert-base fp32:", {k: logits[k] for k in ("max_abs_diff", "max_rel_diff", "kl_divergence")})
