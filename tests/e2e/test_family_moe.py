"""Sparse MoE decoders (Mixtral, Qwen3-MoE, GPT-OSS unquantized; nnxport/models/decoder/moe.py):
conversion with the mapping picked by model_type, parity of logits and greedy generation against
MixtralForCausalLM / Qwen3MoeForCausalLM / GptOssForCausalLM in float32 and bfloat16, both expert layouts
(per-expert keys stacked, transformers 5's fused 3-D tensors split), dense and sparse layers mixed,
KV-cache decoding, broken mappings, config drift, the mesh layout of the expert kernels; full-size
published configs are marked slow."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

import nnxport
from nnxport.models.decoder import Decoder, resolve
from nnxport.models.decoder.moe import GATINGS, MOE_DEFAULTS, SparseMoE
from nnxport.models.layers import generation_positions
from nnxport.testing.replicas import build_replica, edit_safetensors, published_config
from tests.helpers import MAPPINGS, run_subprocess

TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "vocab_size": 512}
CASES: dict[str, dict[str, Any]] = {
    # Mixtral's sliding window (4 of 16 tokens) on every layer; 4 experts, top 2 (renormalised).
    "mixtral": published_config("mistralai/Mixtral-8x7B-v0.1", **TINY, intermediate_size=96,
                                num_local_experts=4, sliding_window=4),
    # head_dim 32 != 64 / 4; norm_topk_prob true (as published); 8 experts, top 3.
    "qwen3_moe": published_config("Qwen/Qwen3-30B-A3B", **TINY, head_dim=32, intermediate_size=96,
                                  moe_intermediate_size=48, num_experts=8, num_experts_per_tok=3),
    # Layers 0 and 2 dense (mlp_only_layers, decoder_sparse_step 1... and 2 for layer 2), layer 1 sparse;
    # norm_topk_prob false; attention biases.
    "qwen3_moe-mixed": published_config("Qwen/Qwen3-30B-A3B", **{**TINY, "num_hidden_layers": 3}, head_dim=16,
                                        intermediate_size=96, moe_intermediate_size=48, num_experts=4,
                                        num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[0],
                                        decoder_sparse_step=2, attention_bias=True),
}
#: openai/gpt-oss-20b's config.json without its quantization_config (the MXFP4 experts: this is the bf16
#: layout) and with default RoPE in place of its yarn scaling (yarn: tests/e2e/test_family_gpt_oss.py).
GPT_OSS_20B: dict[str, Any] = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
    "attention_dropout": 0.0, "eos_token_id": 200002, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2880, "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
    "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999, "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_type": "default", "rope_theta": 150000.0}, "router_aux_loss_coef": 0.9,
    "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 201088,
}
# GPT-OSS: window 4 on layer 0 (sliding, full alternate); swiglu_limit so small that the clamp acts on most
# gate/up values; sinks randomised by the fixture (the replica initialises them near 0).
CASES["gpt_oss"] = {**GPT_OSS_20B, **TINY, "head_dim": 16, "intermediate_size": 48, "num_local_experts": 4,
                    "num_experts_per_tok": 2, "sliding_window": 4, "swiglu_limit": 0.1, "pad_token_id": None,
                    "eos_token_id": None, "layer_types": ["sliding_attention", "full_attention"]}
SPARSE = {"mixtral": [True, True], "qwen3_moe": [True, True], "qwen3_moe-mixed": [False, True, False],
          "gpt_oss": [True, True]}
EXPERT_RULE = re.compile(r"experts\.(\d+)\.")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``replicas(name, **build_replica_kwargs)``: a hub-style replica of CASES[name], built once."""
    root = tmp_path_factory.mktemp("moe")
    built: dict[str, Path] = {}

    def make(name: str, **kwargs: Any) -> Path:
        tag = f"{name}-{'-'.join(f'{k}={v}' for k, v in sorted(kwargs.items()))}"
        if tag not in built:
            built[tag] = build_replica(copy.deepcopy(CASES[name]), root / tag.replace("=", "_"),
                                       seed=len(built) + 1, hub_config=True, **kwargs)
            if name == "gpt_oss":  # sinks of a size that matters
                rng = np.random.default_rng(0)
                dtype = ml_dtypes.bfloat16 if kwargs.get("dtype") == "bfloat16" else np.float32
                sinks = {f"model.layers.{i}.self_attn.sinks": rng.normal(0, 1.5, 4).astype(dtype)
                         for i in range(2)}
                edit_safetensors(built[tag], add=sinks)
        return built[tag]

    return make


def _fused(src: Path, out: Path) -> Path:
    """The checkpoint as transformers 5 holds it after loading (experts fused into 3-D gate_up_proj /
    down_proj, Mixtral's block_sparse_moe renamed mlp), saved from its state dict."""
    import torch
    import transformers
    from safetensors.torch import save_file

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    out.mkdir()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(src / "config.json", out / "config.json")
    return out


def _convert_ok(cli: Callable[..., Any], source: Path, out: Path, *extra: str) -> dict[str, Any]:
    res = cli("convert", source, "--out", out, "--format", "json", *extra)
    assert res.exit_code == 0, res.stderr
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is True
    return report


def _weights(model: nnx.Module) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Param)
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


# ------------------------------------------------------------------------------------ conversions

@pytest.mark.parametrize("name", list(CASES))
def test_float32_parity_and_greedy_generation(name: str, replicas: Callable[..., Path], tmp_path: Path,
                                              cli) -> None:
    config = CASES[name]
    report = _convert_ok(cli, replicas(name), tmp_path / "out")
    reference = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "gpt_oss": "GptOssForCausalLM"}[config["model_type"]]
    assert report["reference"] == f"transformers.{reference}"
    (logits,) = report["outputs"]
    print(name, {k: logits[k] for k in ("max_abs_diff", "max_rel_diff", "kl_divergence", "top1_agreement")})
    assert logits["shape"] == [27, 512] and logits["violations"] == 0
    assert logits["max_abs_diff"] < 1e-5 and logits["kl_divergence"] < 1e-9
    assert logits["top1_agreement"] == 1.0
    assert report["generation"]["passed"] is True and report["generation"]["all_match"] is True
    manifest = json.loads((tmp_path / "out" / "nnxport.json").read_text())
    assert manifest["mapping"]["name"] == config["model_type"]

    model = nnxport.load(tmp_path / "out")
    assert isinstance(model, Decoder)
    assert [isinstance(b.mlp, SparseMoE) for b in model.layers] == SPARSE[name]
    experts = next(b.mlp for b in model.layers if isinstance(b.mlp, SparseMoE)).experts
    e = config.get("num_local_experts", config.get("num_experts"))
    inner = config.get("moe_intermediate_size", config["intermediate_size"])
    assert experts.gate.shape == (e, 64, inner) and experts.down.shape == (e, inner, 64)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_fused_expert_layout(name: str, replicas: Callable[..., Path], tmp_path: Path, cli) -> None:
    """Checkpoints saved from transformers 5's state dict (gate_up_proj [E, 2I, H], down_proj [E, H, I])
    convert to the same weights as the per-expert keys, and pass parity."""
    per_expert = replicas(name)
    fused = _fused(per_expert, tmp_path / "fused")
    _convert_ok(cli, fused, tmp_path / "a")
    res = cli("verify", tmp_path / "a", "--format", "json")  # the reference reloaded from the fused layout
    assert res.exit_code == 0, res.stderr
    verified = json.loads(res.stdout)
    assert verified["passed"] is True and any(r["target"] == "layers.0.attn.q" for r in verified["layers"])
    res = cli("convert", per_expert, "--out", tmp_path / "b", "--no-parity", "-q")
    assert res.exit_code == 0, res.stderr
    a, b = _weights(nnxport.load(tmp_path / "a")), _weights(nnxport.load(tmp_path / "b"))
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_bfloat16_replica(name: str, replicas: Callable[..., Path], tmp_path: Path, cli) -> None:
    report = _convert_ok(cli, replicas(name, dtype="bfloat16"), tmp_path / "out")
    assert report["dtype"] == "bfloat16"
    (logits,) = report["outputs"]
    print(name, {k: logits[k] for k in ("max_abs_diff", "max_rel_diff", "kl_divergence", "top1_agreement")})
    assert 1e-5 < logits["max_rel_diff"] < 3e-2  # bf16 compute against the fp32 reference
    assert logits["kl_divergence"] < 1e-4 and logits["top1_agreement"] >= 0.9
    assert report["generation"]["passed"] is True


def test_kv_cache_decode_equals_the_full_forward(replicas: Callable[..., Path], tmp_path: Path, cli) -> None:
    """A prompt through decode(), then one token at a time, gives the logits of one full forward pass."""
    res = cli("convert", replicas("qwen3_moe"), "--out", tmp_path / "out", "--no-parity", "-q")
    assert res.exit_code == 0, res.stderr
    model = nnxport.load(tmp_path / "out")
    assert isinstance(model, Decoder)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, size=(2, 10)), jnp.int32)
    full = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
    decode = nnx.jit(lambda m, *args: m.decode(*args))
    cache = model.init_cache(2, 16)
    mask = jnp.ones((2, 10), jnp.int32)
    positions = generation_positions(mask)
    got, cache = decode(model, ids[:, :6], positions[:, :6], mask[:, :6], cache)
    steps = [np.asarray(got)]
    for t in range(6, 10):
        step, cache = decode(model, ids[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(np.asarray(step))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-4)


def test_gpt_oss_sinks_and_clamp_matter(replicas: Callable[..., Path], tmp_path: Path, cli) -> None:
    """The tiny GPT-OSS case exercises the attention sinks and the SwiGLU clamp (parity above passes with
    them): without either, the logits move far beyond the parity tolerance."""
    res = cli("convert", replicas("gpt_oss"), "--out", tmp_path / "out", "--no-parity", "-q")
    assert res.exit_code == 0, res.stderr
    model = nnxport.load(tmp_path / "out")
    assert isinstance(model, Decoder)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 512, size=(2, 16)), jnp.int32)
    base = np.asarray(model(ids))
    sinks = [b.attn.sinks.get_value() for b in model.layers]
    for block in model.layers:
        block.attn.sinks.set_value(jnp.zeros_like(block.attn.sinks.get_value()))
    assert np.abs(np.asarray(model(ids)) - base).max() > 1e-3
    for block, value in zip(model.layers, sinks, strict=True):
        block.attn.sinks.set_value(value)
        experts = block.mlp.experts
        unclamped = dataclasses.replace(experts.spec, swiglu_limit=1e9)
        experts.combine = GATINGS["clamped_swiglu"]("silu", unclamped)
    assert np.abs(np.asarray(model(ids)) - base).max() > 1e-3


# ----------------------------------------------------------------------------------- broken mappings

def test_two_experts_swapped_fails_parity(replicas: Callable[..., Path], tmp_path: Path, cli) -> None:
    """Stacking experts 0 and 1 in each other's slot keeps every shape: parity catches it (exit 3)."""
    text = (MAPPINGS / "mixtral.yaml").read_text()
    stack = "{stack: {axis: 0, by: '\\2', order: indices}}"
    assert text.count(stack) == 3
    bad = tmp_path / "swapped.yaml"
    bad.write_text(text.replace(stack, "{stack: {axis: 0, by: '\\2', order: [1, 0, 2, 3]}}"))
    out = tmp_path / "out"
    res = cli("convert", replicas("mixtral"), "--mapping", bad, "--out", out)
    assert res.exit_code == 3, res.stderr
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is False and report["outputs"][0]["violations"] > 0


def test_gpt_oss_gate_and_up_swapped_fails_parity(replicas: Callable[..., Path], tmp_path: Path,
                                                  cli) -> None:
    """Reading the interleaved gate_up_proj the wrong way round (up as gate) keeps every shape."""
    text = (MAPPINGS / "gpt_oss.yaml").read_text()
    to = "    to: ['layers.\\1.mlp.experts.gate', 'layers.\\1.mlp.experts.up']\n"
    assert to in text
    bad = tmp_path / "swapped.yaml"
    bad.write_text(text.replace(to, "    to: ['layers.\\1.mlp.experts.up', 'layers.\\1.mlp.experts.gate']\n"))
    res = cli("convert", replicas("gpt_oss"), "--mapping", bad, "--out", tmp_path / "out")
    assert res.exit_code == 3, res.stderr


def test_a_gap_in_the_expert_numbers_is_refused(replicas: Callable[..., Path], tmp_path: Path, cli) -> None:
    """Experts 0, 1, 2, 5 are four pieces (the shape fits) but not 0..3: refused before anything is read."""
    src = tmp_path / "gap"
    shutil.copytree(replicas("qwen3_moe-mixed"), src)
    edit_safetensors(src, rename=lambda k: k.replace("mlp.experts.3.", "mlp.experts.5."))
    out = tmp_path / "out"
    res = cli("convert", src, "--out", out)
    assert res.exit_code == 1
    assert "missing piece '3'" in res.stderr and "unexpected piece '5'" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


DRIFT = [
    ("mixtral", {"router_jitter_noise": 0.1}, ["'router_jitter_noise'"]),
    ("mixtral", {"num_experts_per_tok": 5}, ["'num_experts_per_tok'", "'num_local_experts'"]),
    ("qwen3_moe", {"num_local_experts": 16}, ["'num_experts'", "'num_local_experts'", "disagree"]),
    ("qwen3_moe", {"mlp_only_layers": "0"}, ["'mlp_only_layers'"]),
    ("qwen3_moe", {"norm_topk_prob": "yes"}, ["'norm_topk_prob'"]),
    ("qwen3_moe", {"decoder_sparse_step": 0}, ["'decoder_sparse_step'"]),
    ("gpt_oss", {"rope_parameters": {"rope_type": "yarn", "factor": 32.0, "truncate": "no"}},
     ["'rope_parameters.truncate'"]),
    ("gpt_oss", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
     ["'rope_parameters'", "dynamic"]),
    ("gpt_oss", {"swiglu_limit": "7"}, ["'swiglu_limit'"]),
]


@pytest.mark.parametrize(("name", "change", "words"), DRIFT,
                         ids=["jitter", "top_k", "expert_count", "mlp_only", "norm_topk", "sparse_step",
                              "gpt_oss-truncate", "gpt_oss-dynamic", "swiglu_limit"])
def test_config_drift_is_refused(name: str, change: dict[str, Any], words: list[str],
                                 replicas: Callable[..., Path], tmp_path: Path, cli) -> None:
    src = tmp_path / "drifted"
    shutil.copytree(replicas(name), src)
    config = {**json.loads((src / "config.json").read_text()), **change}
    (src / "config.json").write_text(json.dumps(config))
    res = cli("convert", src, "--out", tmp_path / "out")
    assert res.exit_code == 1
    assert "config.json: field" in res.stderr and "Traceback" not in res.stderr
    assert sum("config.json" in line for line in res.stderr.splitlines()) == 1  # one line
    for word in words:
        assert word in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("overrides", "sparse"), [
    ({}, [True, True, True, True]),
    ({"decoder_sparse_step": 2}, [False, True, False, True]),
    ({"mlp_only_layers": [0, 3]}, [False, True, True, False]),
    ({"decoder_sparse_step": 2, "mlp_only_layers": [1]}, [False, False, False, True]),
    ({"num_experts": 0}, [False, False, False, False]),
])
def test_sparse_layers_as_transformers_decides(overrides: dict[str, Any], sparse: list[bool]) -> None:
    import transformers

    config = published_config("Qwen/Qwen3-30B-A3B", **{**TINY, "num_hidden_layers": 4, "num_experts": 4,
                                                        "num_experts_per_tok": 2, "moe_intermediate_size": 8,
                                                        "intermediate_size": 16, **overrides})
    spec = resolve(config)
    ours = [False] * 4 if spec.moe is None else list(spec.moe.sparse)
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    with __import__("torch").device("meta"):
        ref = transformers.Qwen3MoeForCausalLM(hf_config)
    theirs = [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in ref.model.layers]
    assert ours == theirs == sparse


@pytest.mark.parametrize("model_type", list(MOE_DEFAULTS))
def test_moe_defaults_are_the_transformers_config_defaults(model_type: str) -> None:
    import dataclasses

    import transformers

    cls = type(transformers.AutoConfig.for_model(model_type))
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    for field, value in MOE_DEFAULTS[model_type].items():
        assert fields[field] == value, (model_type, field)


@pytest.mark.parametrize("layer_types", [None, ["full_attention", "sliding_attention", "sliding_attention"]])
def test_gpt_oss_windows_as_transformers_decides(layer_types: list[str] | None) -> None:
    import transformers

    config = {**CASES["gpt_oss"], "num_hidden_layers": 3, "layer_types": layer_types}
    hf = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    assert list(resolve(config).windows) == [4 if t == "sliding_attention" else None for t in hf.layer_types]


# ---------------------------------------------------------------------------------------------- mesh

@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
def test_experts_are_split_over_the_mesh(replicas: Callable[..., Path], tmp_path: Path, cli) -> None:
    """--mesh data=2,model=4: each expert kernel split by experts over `model` and hidden over `data`,
    values equal to a single-device conversion, and the same logits from a jitted sharded forward."""
    src = replicas("mixtral")
    for out, extra in (("single", ()), ("mesh", ("--mesh", "data=2,model=4"))):
        res = cli("convert", src, "--out", tmp_path / out, "--no-parity", "-q", *extra)
        assert res.exit_code == 0, res.stderr
    single = nnxport.load(tmp_path / "single")
    sharded = nnxport.load(tmp_path / "mesh", mesh="recorded")
    want = {"gate": PartitionSpec("model", "data"), "up": PartitionSpec("model", "data"),
            "down": PartitionSpec("model", None, "data")}
    ref = _weights(single)
    for path, leaf in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
        name = ".".join(map(str, path))
        arr = leaf.get_value()
        np.testing.assert_array_equal(np.asarray(arr), ref[name], err_msg=name)
        if name.startswith("layers.") and ".mlp.experts." in name:
            assert arr.sharding.spec == want[name.rsplit(".", 1)[1]], name
            assert arr.addressable_shards[0].data.shape[0] == 1  # 4 experts over model=4
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 512, size=(2, 12)), jnp.int32)
    run = nnx.jit(lambda m, x: m(x))
    np.testing.assert_allclose(np.asarray(run(sharded, ids)), np.asarray(run(single, ids)), atol=1e-5,
                               rtol=1e-5)


# ------------------------------------------------------------------------------ full published configs

def _available_gb() -> float:
    """MemAvailable of /proc/meminfo, in GB (0 where it cannot be read)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        line = next(x for x in lines if x.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 0.0
    return int(line.split()[1]) / 2**20


# The parity reference runs in float32 whatever the checkpoint's dtype, next to the converted model and the
# parity inputs' activations: one layer of Mixtral-8x7B is 1.71 B parameters with the embeddings (6.9 GB in
# float32), of Qwen3-30B-A3B 1.25 B (5.0 GB), of gpt-oss-20b 1.98 B (7.9 GB; its 201088-token embedding and
# head alone are 4.6 GB). Each full-width config runs with 1 of its layers, bf16 as published. Measured:
# Qwen3-30B-A3B, 1 layer, bf16: 15.9 GB peak (replica build and conversion in one process), so every case
# needs more than the ~12 GB a test may take; each runs where the machine has the memory it needs free
# (the estimates below scale that measurement by the parameters) and is skipped, saying so, elsewhere.
SLOW = [
    pytest.param(published_config("mistralai/Mixtral-8x7B-v0.1", num_hidden_layers=1), "bfloat16", 22,
                 id="Mixtral-8x7B-1-layer-bf16"),
    pytest.param(published_config("mistralai/Mixtral-8x7B-v0.1", num_hidden_layers=1), "float32", 30,
                 id="Mixtral-8x7B-1-layer-fp32"),
    pytest.param(published_config("Qwen/Qwen3-30B-A3B", num_hidden_layers=1), "bfloat16", 16,
                 id="Qwen3-30B-A3B-1-layer-bf16"),
    pytest.param(published_config("Qwen/Qwen3-30B-A3B", num_hidden_layers=1), "float32", 22,
                 id="Qwen3-30B-A3B-1-layer-fp32"),
    pytest.param({**GPT_OSS_20B, "num_hidden_layers": 1, "layer_types": ["sliding_attention"]}, "bfloat16",
                 26, id="gpt-oss-20b-1-layer-bf16"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("config", "dtype", "need_gb"), SLOW)
def test_published_size(config: dict[str, Any], dtype: str, need_gb: int,
                        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A full-width published config (random weights, sharded like the hub) through convert and parity,
    each step in its own interpreter (so that one's memory is not added to the next); prints the numbers
    and the peak RSS of the two."""
    import resource
    import subprocess
    import sys

    if _available_gb() < need_gb:
        pytest.skip(f"needs about {need_gb} GB of free memory (more than the ~12 GB a test may take); "
                    f"{_available_gb():.0f} GB available")
    tmp = tmp_path_factory.mktemp("published")
    folder = tmp / "src"
    build = ("import json, sys; from pathlib import Path; "
             "from nnxport.testing.replicas import build_replica; "
             "build_replica(json.loads(sys.argv[1]), Path(sys.argv[2]), dtype=sys.argv[3], hub_config=True, "
             "max_shard_size='1GB')")
    subprocess.run([sys.executable, "-c", build, json.dumps(config), str(folder), dtype], check=True,
                   timeout=1800)
    res = run_subprocess("convert", folder, "--out", tmp / "out", "--format", "json", "-q")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp / "out" / "parity.json").read_text())
    assert report["passed"] is True
    (logits,) = report["outputs"]
    shown = ("max_abs_diff", "max_rel_diff", "top1_agreement", "top5_agreement", "kl_divergence")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"{config['model_type']} {dtype}:", {k: logits[k] for k in shown}, f"peak RSS {peak:.1f} GB")
    assert logits["kl_divergence"] < 1e-3 and report["generation"]["passed"] is True
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert any(EXPERT_RULE.search(k) for k in index["weight_map"])  # per-expert keys, stacked
