"""The decoder family (Llama 3.x, Qwen2/2.5, Qwen3, Mistral): conversion from the offline hub cache with the
mapping picked by model_type, parity against the transformers *ForCausalLM, both config.json layouts,
tied heads, broken mappings, config drift, bf16 weights; full-size published configs are marked slow."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nnxport
from nnxport.models import get_family
from nnxport.models.decoder import DEFAULTS, Decoder, Rope, resolve
from nnxport.parity.metrics import compare
from nnxport.testing.hub import write_hub_cache
from nnxport.testing.replicas import build_replica, edit_safetensors, published_config
from tests.helpers import MAPPINGS

MAPPING = MAPPINGS / "decoder.yaml"
FAMILY = get_family("decoder")

TINY: dict[str, Any] = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 512}
# The published llama3 scaling, with original_max_position_embeddings so small that at 16 positions and
# head_dim 16 some frequencies are divided by the factor and one is smoothed: the scaling matters.
LLAMA3_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
               "original_max_position_embeddings": 16, "rope_type": "llama3"}
NO_HEAD_DIM = {k: v for k, v in TINY.items() if k != "head_dim"}

CASES: dict[str, dict[str, Any]] = {
    "llama3-tied": published_config("meta-llama/Llama-3.2-1B", **TINY, rope_scaling=LLAMA3_ROPE),
    "llama3-untied": published_config("meta-llama/Llama-3.2-1B", **TINY, rope_scaling=LLAMA3_ROPE,
                                      tie_word_embeddings=False),
    "llama-bias-linear": published_config("meta-llama/Llama-3.2-1B", **TINY, attention_bias=True,
                                          mlp_bias=True, rope_scaling={"type": "linear", "factor": 4.0}),
    "qwen2": published_config("Qwen/Qwen2.5-0.5B", **NO_HEAD_DIM),
    # Layer 1 of 2 slides with a window of 4 over 16 tokens.
    "qwen2-sliding": published_config("Qwen/Qwen2.5-0.5B", **NO_HEAD_DIM, use_sliding_window=True,
                                      sliding_window=4, max_window_layers=1),
    # head_dim 32 != hidden_size / num_attention_heads (16)
    "qwen3": published_config("Qwen/Qwen3-0.6B", **{**TINY, "head_dim": 32}),
    "mistral": published_config("mistralai/Mistral-7B-v0.1", **NO_HEAD_DIM, sliding_window=4),
}
REFERENCE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "mistral": "MistralForCausalLM"}
@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``replicas(name, config=None, **build_replica_kwargs)``: a replica folder of CASES[name] (or
    ``config``), hub-style config.json unless ``hub_config=False``; built once per module and arguments."""
    root = tmp_path_factory.mktemp("decoder")
    built: dict[str, Path] = {}

    def make(name: str, config: dict[str, Any] | None = None, **kwargs: Any) -> Path:
        tag = f"{name}-{'-'.join(f'{k}={v}' for k, v in sorted(kwargs.items()))}"
        if tag not in built:
            kwargs.setdefault("hub_config", True)
            # deepcopy: transformers' config classes fill nested rope dicts in place
            built[tag] = build_replica(copy.deepcopy(config or CASES[name]), root / tag.replace("=", "_"),
                                       seed=len(built), **kwargs)
        return built[tag]

    return make


def _convert_ok(cli: Callable[..., Any], source: str | Path, out: Path, *extra: str) -> dict[str, Any]:
    res = cli("convert", source, "--out", out, "--format", "json", *extra)
    assert res.exit_code == 0, res.stderr
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is True and json.loads(res.stdout)["parity"]["passed"] is True
    return report


def _logits(report: dict[str, Any], vocab: int) -> dict[str, Any]:
    (logits,) = report["outputs"]
    assert logits["name"] == "logits"
    assert logits["shape"] == [2 * 16 - 5, vocab]  # valid positions only (the second row is padded by 5)
    assert [i["name"] for i in report["inputs"]] == ["input_ids", "attention_mask"]
    return logits


# ------------------------------------------------------------------------------- conversions (tiny)

@pytest.mark.parametrize("name", list(CASES))
def test_converts_from_hub_cache_with_automatic_mapping(name: str, replicas: Callable[..., Path],
                                                        hub_cache: Path, tmp_path: Path, cli) -> None:
    config = CASES[name]
    sharded = name == "mistral"
    folder = replicas(name, max_shard_size="100KB") if sharded else replicas(name)
    if sharded:
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("*.safetensors"))) >= 3
    repo = f"nnxport-test/tiny-{name}"
    write_hub_cache(hub_cache, repo, folder)
    report = _convert_ok(cli, repo, tmp_path / "out")

    assert report["reference"] == f"transformers.{REFERENCE[config['model_type']]}"
    assert report["dtype"] == "float32" and report["tolerance"] == {"atol": 1e-4, "rtol": 1e-3}
    logits = _logits(report, config["vocab_size"])
    assert logits["max_abs_diff"] < 1e-5 and logits["violations"] == 0
    assert logits["kl_divergence"] is not None and logits["kl_divergence"] < 1e-9
    assert logits["top1_agreement"] == 1.0 and logits["top5_agreement"] == 1.0
    manifest = json.loads((tmp_path / "out" / "nnxport.json").read_text())
    assert manifest["mapping"]["name"] == "decoder" and manifest["model"]["family"] == "decoder"
    assert manifest["source"]["kind"] == "hub"

    model = nnxport.load(tmp_path / "out")
    assert isinstance(model, Decoder)
    assert (model.lm_head is None) == config["tie_word_embeddings"]  # tied: no head leaf, stored once
    has_qkv_bias = name in ("qwen2", "qwen2-sliding", "llama-bias-linear")
    assert (model.layers[0].attn.q.bias is not None) == has_qkv_bias
    assert (model.layers[0].attn.o.bias is not None) == (name == "llama-bias-linear")
    assert (model.layers[0].mlp.up.bias is not None) == (name == "llama-bias-linear")
    assert (model.layers[0].attn.q_norm is not None) == (name == "qwen3")
    if sharded:  # verify rebuilds the reference from the recorded hub snapshot (index.json and shards)
        res = cli("verify", tmp_path / "out", "--format", "json")
        assert res.exit_code == 0, res.stderr
        assert json.loads(res.stdout)["passed"] is True


@pytest.mark.parametrize(("name", "wrong"), [
    ("mistral", {"windows": (None, None)}),
    ("qwen2-sliding", {"windows": (None, None)}),
    ("llama3-tied", {"rope": Rope("default", 500000.0, 16)}),
    ("llama-bias-linear", {"rope": Rope("default", 500000.0, 16)}),
], ids=["mistral-window", "qwen2-window", "llama3-scaling", "linear-scaling"])
def test_the_switch_matters(name: str, wrong: dict[str, Any], replicas: Callable[..., Path],
                            tmp_path: Path, cli) -> None:
    """The tiny configs exercise the sliding window and RoPE scaling: without them parity fails."""
    import torch
    import transformers

    folder = replicas(name)
    res = cli("convert", folder, "--out", tmp_path / "out", "--no-parity", "-q")
    assert res.exit_code == 0, res.stderr
    model = nnxport.load(tmp_path / "out")
    assert isinstance(model, Decoder)
    config = json.loads((folder / "config.json").read_text())
    harness = FAMILY.parity
    inputs = harness.parity_inputs(config, 0)
    ref_class = getattr(transformers, REFERENCE[config["model_type"]])
    ref_model = ref_class.from_pretrained(folder, dtype=torch.float32).eval()
    ref = harness.run_reference(ref_model, inputs)["logits"]
    good = compare("logits", harness.run_nnx(model, inputs)["logits"], ref, harness.tolerance("float32"))
    assert good.passed
    model.spec = dataclasses.replace(model.spec, **wrong)
    bad = compare("logits", harness.run_nnx(model, inputs)["logits"], ref, harness.tolerance("float32"))
    assert not bad.passed and bad.max_abs_diff > 100 * good.max_abs_diff


@pytest.mark.parametrize("name", ["llama3-untied", "qwen2-sliding", "qwen3", "mistral"])
def test_transformers5_config_layout(name: str, replicas: Callable[..., Path], tmp_path: Path, cli) -> None:
    """config.json as transformers 5 writes it: rope_parameters (and layer_types for Qwen)."""
    folder = replicas(name, hub_config=False)
    written = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in written and "rope_scaling" not in written and "rope_theta" not in written
    if name == "llama3-untied":
        assert written["rope_parameters"]["rope_type"] == "llama3"
    if name == "qwen2-sliding":
        assert written["layer_types"] == ["full_attention", "sliding_attention"]
    assert resolve(written) == resolve(CASES[name])
    logits = _logits(_convert_ok(cli, folder, tmp_path / "out"), TINY["vocab_size"])
    assert logits["max_abs_diff"] < 1e-5


def test_tied_checkpoint_storing_lm_head(replicas: Callable[..., Path], tmp_path: Path, cli) -> None:
    """Older tied checkpoints store lm_head.weight too: it is reported tied and not read."""
    import ml_dtypes  # noqa: F401
    from safetensors.numpy import load_file

    src = tmp_path / "stored-head"
    shutil.copytree(replicas("llama3-tied"), src)
    embed = load_file(src / "model.safetensors")["model.embed_tokens.weight"]
    edit_safetensors(src, add={"lm_head.weight": embed.copy()})
    res = cli("inspect-keys", src, "--format", "json")
    assert res.exit_code == 0, res.stderr
    rows = {r["key"]: r for r in json.loads(res.stdout)["keys"]}
    assert rows["lm_head.weight"]["status"] == "tied"
    assert rows["model.embed_tokens.weight"]["status"] == "mapped"
    assert all(r["status"] in ("mapped", "tied") for r in rows.values())
    result = json.loads(cli("convert", src, "--out", tmp_path / "out", "--format", "json").stdout)
    assert result["parity"]["passed"] is True
    assert result["tensors"] == len(rows) - 1  # the stored head is not read


def test_q_and_k_swapped_fails_parity(replicas: Callable[..., Path], tmp_path: Path, cli) -> None:
    """Same shapes (num_key_value_heads == num_attention_heads), wrong model: exit 3, not a crash."""
    config = {**CASES["llama3-untied"], "num_key_value_heads": 4}
    folder = replicas("llama-mha", config)
    text = MAPPING.read_text()
    rule = ("  - from: '^model\\.layers\\.(\\d+)\\.self_attn\\.([qkv])_proj\\.weight$'\n"
            "    to: 'layers.\\1.attn.\\2.kernel'\n    shard: [data, model]\n"
            "    ops: [{transpose: [1, 0]}]\n")
    assert rule in text
    swapped = rule.replace("[qkv]", "[v]")
    for src, dst in (("q", "k"), ("k", "q")):
        swapped += (f"  - from: '^model\\.layers\\.(\\d+)\\.self_attn\\.{src}_proj\\.weight$'\n"
                    f"    to: 'layers.\\1.attn.{dst}.kernel'\n    ops: [{{transpose: [1, 0]}}]\n")
    bad = tmp_path / "swapped.yaml"
    bad.write_text(text.replace(rule, swapped))
    out = tmp_path / "out"
    res = cli("convert", folder, "--mapping", bad, "--out", out)
    assert res.exit_code == 3, res.stderr
    assert "parity FAILED" in res.stderr
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is False and report["outputs"][0]["violations"] > 0
    assert report["outputs"][0]["kl_divergence"] > 1e-6


DRIFT = [
    ("llama3-tied",
     {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
     ["'rope_scaling'", "yarn"]),
    ("llama3-tied", {"rope_scaling": None, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                               "rope_theta": 10000.0}},
     ["'rope_parameters'", "dynamic"]),
    ("qwen2", {"hidden_act": "relu2"}, ["'hidden_act'", "relu2"]),
    ("qwen3", {"partial_rotary_factor": 0.5}, ["'partial_rotary_factor'"]),
    ("mistral", {"quantization_config": {"quant_method": "gptq", "bits": 4}},
     ["'quantization_config.quant_method'", "gptq"]),
    ("qwen2", {"layer_types": ["full_attention", "chunked_attention"]},
     ["'layer_types'", "chunked_attention"]),
    ("llama3-tied", {"architectures": ["LlamaForSequenceClassification"]}, ["'architectures'"]),
    ("mistral", {"num_key_value_heads": 3}, ["'num_key_value_heads'"]),
]


@pytest.mark.parametrize(("name", "change", "words"), DRIFT,
                         ids=["yarn", "dynamic", "hidden_act", "partial_rotary", "quantized", "layer_types",
                              "architectures", "kv_heads"])
def test_config_drift_is_refused(name: str, change: dict[str, Any], words: list[str],
                                 replicas: Callable[..., Path], tmp_path: Path, cli) -> None:
    src = tmp_path / "drifted"
    shutil.copytree(replicas(name), src)
    config = {**json.loads((src / "config.json").read_text()), **change}
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    res = cli("convert", src, "--out", out)
    assert res.exit_code == 1
    assert "config.json: field" in res.stderr and "Traceback" not in res.stderr
    for word in words:
        assert word in res.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drifted"]  # no staging folder left


def test_bfloat16_replica_within_bf16_tolerance(replicas: Callable[..., Path], tmp_path: Path, cli) -> None:
    folder = replicas("qwen3", dtype="bfloat16")
    report = _convert_ok(cli, folder, tmp_path / "out")
    assert report["dtype"] == "bfloat16"
    assert report["tolerance"] == {"atol": 5e-2, "rtol": 5e-2, "atol_relative_to": "max_abs_reference"}
    logits = _logits(report, TINY["vocab_size"])
    # Measured: max |Δ| about 0.5% of max |logit|, KL ~5e-7 (bf16 compute against an fp32 reference).
    assert 1e-5 < logits["max_rel_diff"] < 2e-2
    assert logits["kl_divergence"] < 1e-4 and logits["top1_agreement"] >= 0.9


# ------------------------------------------------------------------------------------- config units

@pytest.mark.parametrize("model_type", list(DEFAULTS))
def test_defaults_are_the_transformers_config_defaults(model_type: str) -> None:
    import transformers

    cls = type(transformers.AutoConfig.for_model(model_type))
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    for field, value in DEFAULTS[model_type].items():
        assert fields[field] == value, (model_type, field)


@pytest.mark.parametrize("rope", [
    {},
    {"rope_scaling": {"type": "linear", "factor": 4.0}},
    {"rope_scaling": LLAMA3_ROPE},
    {"rope_scaling": {**LLAMA3_ROPE, "original_max_position_embeddings": 8192}},
], ids=["default", "linear", "llama3-small-context", "llama3-published"])
def test_inv_freq_equals_transformers(rope: dict[str, Any]) -> None:
    import torch
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = published_config("meta-llama/Llama-3.2-1B", **{**TINY, "rope_scaling": None,
                                                            "rope_theta": 500000.0, **rope})
    fields = {k: v for k, v in copy.deepcopy(config).items() if k not in ("architectures", "model_type")}
    hf = transformers.LlamaConfig(**fields)
    rope_type = str(dict(hf.rope_parameters or {})["rope_type"])
    if rope_type == "default":
        expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    ours = resolve(config).rope
    assert ours.rope_type == rope_type
    np.testing.assert_allclose(ours.inv_freq(), expected.numpy(), rtol=1e-6, atol=0)
    default = Rope("default", ours.theta, ours.head_dim).inv_freq()
    if rope_type != "default":
        assert not np.allclose(ours.inv_freq(), default)


@pytest.mark.parametrize(("model_type", "overrides"), [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    ("qwen2", {"use_sliding_window": False, "sliding_window": 4, "max_window_layers": 0}),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 8,
               "layer_types": ["sliding_attention", "full_attention"]}),
    ("mistral", {"sliding_window": None}),
    ("mistral", {}),
])
def test_sliding_windows_as_transformers_decides(model_type: str, overrides: dict[str, Any]) -> None:
    import transformers

    config = {"model_type": model_type, **NO_HEAD_DIM, **overrides}
    spec = resolve(config)
    fields = {k: v for k, v in copy.deepcopy(config).items() if k != "model_type"}
    hf = transformers.AutoConfig.for_model(model_type, **fields)
    if model_type == "mistral":
        expected = [hf.sliding_window] * 2
    else:
        expected = [hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types]
    assert list(spec.windows) == expected


def test_head_dim_rules() -> None:
    # Qwen3Config's head_dim defaults to 128 (not hidden_size / heads); the others derive it.
    assert resolve({"model_type": "qwen3", **NO_HEAD_DIM}).head_dim == 128
    for model_type in ("llama", "qwen2", "mistral"):
        assert resolve({"model_type": model_type, **NO_HEAD_DIM}).head_dim == 16
    assert resolve({"model_type": "mistral", **NO_HEAD_DIM, "head_dim": 32}).head_dim == 32
    # Old and new rope layouts agree; an explicit rope_scaling wins over rope_parameters as in transformers.
    old = resolve({"model_type": "llama", **TINY, "rope_theta": 123.0, "rope_scaling": LLAMA3_ROPE})
    new = resolve({"model_type": "llama", **TINY, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 123.0}})
    assert old == new and old.rope.theta == 123.0


# ------------------------------------------------------------------------------ published sizes (slow)

SLOW = [
    ("meta-llama/Llama-3.2-1B", {}),
    ("Qwen/Qwen2.5-0.5B", {}),
    ("Qwen/Qwen3-0.6B", {}),
    ("mistralai/Mistral-7B-v0.1", {"num_hidden_layers": 2}),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(("repo", "overrides"), SLOW, ids=[r for r, _ in SLOW])
def test_published_size(repo: str, overrides: dict[str, Any], dtype: str, hub_cache: Path,
                        tmp_path_factory: pytest.TempPathFactory, cli) -> None:
    """Full published configs, in bf16 as published and in fp32 (sharded like the hub), from the offline
    cache.

    Mistral-7B keeps its full width (hidden 4096, 32 heads, 8 kv heads, intermediate 14336, vocab 32000,
    sliding_window 4096) with num_hidden_layers reduced to 2: the float32 transformers reference of all 32
    layers (29 GB) does not fit in this machine's 24 GiB.
    """
    config = published_config(repo, **overrides)
    tmp = tmp_path_factory.mktemp("published")
    folder = build_replica(config, tmp / "src", dtype=dtype, hub_config=True, max_shard_size="1GB")
    repo_id = f"nnxport-test/{repo.split('/')[1]}-{dtype}"
    write_hub_cache(hub_cache, repo_id, folder)
    shutil.rmtree(folder)
    report = _convert_ok(cli, repo_id, tmp / "out")
    assert report["dtype"] == dtype
    logits = _logits(report, config["vocab_size"])
    print(f"{repo} {dtype}:", {k: logits[k] for k in ("max_abs_diff", "max_rel_diff", "top1_agreement",
                                                      "top5_agreement", "kl_divergence")})
    assert logits["kl_divergence"] < 1e-3 and logits["top5_agreement"] > 0.85
