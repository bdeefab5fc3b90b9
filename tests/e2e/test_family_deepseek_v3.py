"""The deepseek_v3 family against transformers' DeepseekV3ForCausalLM on random replicas: logits and greedy
generation (KV cache) in float32 and bfloat16, with YaRN + mscale and the default RoPE, q LoRA and a plain q
projection, interleaved and half-split rotary layouts; both expert layouts (per-expert keys stacked, fused
3-D tensors); a broken mapping (experts stacked in the wrong order) failing parity; config drift refused in
one line; the fp8 checkpoint (128-style block scales on every projection, experts included) converting
dequantized; --mesh equal to one device; gradients equal to torch's in train mode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

import nnxport
from nnxport.testing.quantized import quantize_fp8_folder
from nnxport.testing.replicas import build_replica, published_config
from tests.helpers import MAPPINGS

TINY = published_config(
    "deepseek-ai/DeepSeek-V3", vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=4,
    topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48,
    qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=24, max_position_embeddings=1024,
    rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 16, "mscale": 1.0, "mscale_all_dim": 1.0,
                  "original_max_position_embeddings": 64, "type": "yarn"},
    initializer_range=0.1)
#: No q LoRA, default RoPE in halves, attention biases, tied embeddings, two shared experts, no top-k norm.
PLAIN = {**TINY, "q_lora_rank": None, "rope_scaling": None, "rope_interleave": False, "attention_bias": True,
         "tie_word_embeddings": True, "n_shared_experts": 2, "norm_topk_prob": False,
         "routed_scaling_factor": 1.0}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deepseek")
    tiny = build_replica(TINY, root / "tiny", seed=1)
    with torch.no_grad():  # a correction bias that changes which experts are chosen
        tensors = load_file(tiny / "model.safetensors")
        for k in [k for k in tensors if k.endswith("e_score_correction_bias")]:
            tensors[k] = torch.randn(tensors[k].shape) * 0.3
        save_file(tensors, tiny / "model.safetensors", metadata={"format": "pt"})
    return {"tiny": tiny, "plain": build_replica(PLAIN, root / "plain", seed=2),
            "bf16": build_replica(TINY, root / "bf16", seed=3, dtype="bfloat16")}


def _leaves(folder: Path) -> dict[str, np.ndarray]:
    state = nnx.state(nnxport.load(folder, device="cpu"), (nnx.Param, nnx.BatchStat))
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("name", ["tiny", "plain"])
def test_float32_parity_and_generation(name: str, replicas: dict[str, Path], tmp_path: Path) -> None:
    res = nnxport.convert(replicas[name], tmp_path / "out", dtype="float32")
    assert res.parity is not None and res.parity.passed, res.parity
    logits = res.parity.outputs[0]
    assert logits.max_abs_diff < 2e-5, logits  # measured 3.3e-6 (tiny), same order (plain)
    assert logits.top1_agreement == 1.0
    assert res.parity.generation is not None and res.parity.generation.all_match
    assert res.manifest["model"]["family"] == "deepseek_v3"


def test_bfloat16_within_tolerance(replicas: dict[str, Path], tmp_path: Path) -> None:
    res = nnxport.convert(replicas["bf16"], tmp_path / "out")
    assert res.parity is not None and res.parity.passed, res.parity
    assert res.parity.outputs[0].max_rel_diff < 3e-2


def _fused(tiny: Path, fused: Path) -> Path:
    """``tiny`` with transformers 5's internal expert layout: experts.gate_up_proj [E, 2I, H] and
    experts.down_proj [E, H, I]."""
    shutil.copytree(tiny, fused)
    tensors = load_file(fused / "model.safetensors")
    for layer in (1, 2):
        p = f"model.layers.{layer}.mlp.experts."
        gate = [tensors.pop(f"{p}{e}.gate_proj.weight") for e in range(8)]
        up = [tensors.pop(f"{p}{e}.up_proj.weight") for e in range(8)]
        down = [tensors.pop(f"{p}{e}.down_proj.weight") for e in range(8)]
        tensors[p + "gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up, strict=True)])
        tensors[p + "down_proj"] = torch.stack(down)
    save_file(tensors, fused / "model.safetensors", metadata={"format": "pt"})
    return fused


def test_fused_expert_layout_converts_to_the_same_weights(replicas: dict[str, Path], tmp_path: Path) -> None:
    fused = _fused(replicas["tiny"], tmp_path / "fused")
    nnxport.convert(replicas["tiny"], tmp_path / "a", dtype="float32", parity=False)
    res = nnxport.convert(fused, tmp_path / "b", dtype="float32")
    assert res.parity is not None and res.parity.passed
    a, b = _leaves(tmp_path / "a"), _leaves(tmp_path / "b")
    assert a.keys() == b.keys() and "layers.1.mlp.gate" in a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_experts_in_the_wrong_order_fail_parity(replicas: dict[str, Path], tmp_path: Path, cli: Any) -> None:
    text = (MAPPINGS / "deepseek_v3.yaml").read_text()
    rule = "{stack: {axis: 0, by: '\\2'}}"
    assert rule in text
    bad = tmp_path / "reversed.yaml"
    bad.write_text(text.replace(rule, "{stack: {axis: 0, by: '\\2', order: ['1', '0', '2', '3', '4', '5', "
                                      "'6', '7']}}"))
    res = cli("convert", replicas["tiny"], "--mapping", bad, "--out", tmp_path / "out", "--dtype", "float32")
    assert res.exit_code == 3, res.stderr
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert report["passed"] is False and report["outputs"][0]["violations"] > 0


DRIFT = [
    ({"scoring_func": "softmax"}, ["'scoring_func'", "softmax"]),
    ({"topk_method": "greedy"}, ["'topk_method'"]),
    ({"num_key_value_heads": 2}, ["'num_key_value_heads'"]),
    ({"hidden_act": "gelu"}, ["'hidden_act'"]),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     ["'rope_scaling'", "dynamic"]),
    ({"rope_parameters": None, "rope_scaling": {"type": "yarn", "factor": 4.0}},
     ["original_max_position_embeddings"]),
    ({"n_group": 3}, ["'n_group'"]),
    ({"topk_group": 5}, ["'topk_group'"]),
    ({"quantization_config": {"quant_method": "gptq"}}, ["quant_method", "gptq"]),
]


@pytest.mark.parametrize(("change", "words"), DRIFT,
                         ids=[f"{next(iter(c))}-{i}" for i, (c, _) in enumerate(DRIFT)])
def test_config_drift_is_refused(change: dict[str, Any], words: list[str], replicas: dict[str, Path],
                                 tmp_path: Path, cli: Any) -> None:
    src = tmp_path / "drifted"
    shutil.copytree(replicas["tiny"], src)
    config = {**json.loads((src / "config.json").read_text()), **change}
    (src / "config.json").write_text(json.dumps(config))
    res = cli("convert", src, "--out", tmp_path / "out", "-q")
    assert res.exit_code == 1, res.stderr
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1, res.stderr
    for word in words:
        assert word in res.stderr
    assert not (tmp_path / "out").exists()


def test_fp8_checkpoint_converts_dequantized(replicas: dict[str, Path], tmp_path: Path) -> None:
    """As published: every projection (MLA, dense, shared and routed experts) fp8 with block scales; the
    router, norms, embedding and head unquantized."""
    fp8 = quantize_fp8_folder(replicas["tiny"], tmp_path / "fp8", block=(16, 32),
                              pattern=r"(_proj|_proj_with_mqa)\.weight$")
    tensors = load_file(fp8 / "model.safetensors")
    assert tensors["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.float8_e4m3fn
    res = nnxport.convert(fp8, tmp_path / "out", dtype="float32")
    assert res.parity is not None and res.parity.passed, res.parity
    assert res.parity.outputs[0].max_abs_diff < 2e-5
    assert res.parity.generation is not None and res.parity.generation.all_match


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
def test_mesh_equals_one_device(replicas: dict[str, Path], tmp_path: Path) -> None:
    nnxport.convert(replicas["tiny"], tmp_path / "one", dtype="float32", parity=False)
    nnxport.convert(replicas["tiny"], tmp_path / "mesh", dtype="float32", parity=False, mesh="data=2,model=4")
    manifest = json.loads((tmp_path / "mesh" / "nnxport.json").read_text())
    assert manifest["partition_specs"]["layers.1.mlp.gate"] == ["model"]  # experts split over `model`
    a, b = _leaves(tmp_path / "one"), _leaves(tmp_path / "mesh")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
def test_fp8_fused_experts_under_mesh(replicas: dict[str, Path], tmp_path: Path) -> None:
    """3-D fp8 expert tensors [E, rows, cols] with [E, row blocks, col blocks] scales: parity on one device
    (the reference dequantized by transformers), and each device's expert slice read alone equal to it."""
    fp8 = quantize_fp8_folder(_fused(replicas["tiny"], tmp_path / "fused"), tmp_path / "fp8", block=(16, 32),
                              pattern=r"(_proj|_proj_with_mqa)(\.weight)?$")
    scales = load_file(fp8 / "model.safetensors")["model.layers.1.mlp.experts.gate_up_proj_scale_inv"]
    assert scales.shape == (8, 4, 2)
    res = nnxport.convert(fp8, tmp_path / "one", dtype="float32")
    assert res.parity is not None and res.parity.passed, res.parity
    nnxport.convert(fp8, tmp_path / "mesh", dtype="float32", parity=False, mesh="data=2,model=4")
    a, b = _leaves(tmp_path / "one"), _leaves(tmp_path / "mesh")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_published_attention_and_routing_dims(tmp_path: Path) -> None:
    """DeepSeek-V3's published attention (hidden 7168, 128 heads, q/kv LoRA 1536/512, nope/rope/v 128/64/128,
    YaRN factor 40 with mscale) and routing (8 groups, 4 kept, 8 experts a token, scaling 2.5) on 2 layers
    with 16 small experts and a small vocabulary. The whole published model (671B parameters, 61 layers of
    256 experts) cannot be built here: its float32 reference alone needs ~2.7 TB."""
    config = published_config("deepseek-ai/DeepSeek-V3", num_hidden_layers=2, first_k_dense_replace=1,
                              vocab_size=1024, intermediate_size=2048, moe_intermediate_size=128,
                              n_routed_experts=16, initializer_range=0.02)
    src = build_replica(config, tmp_path / "src", seed=5)
    res = nnxport.convert(src, tmp_path / "out", dtype="float32")
    logits = res.parity.outputs[0] if res.parity else None
    print(f"deepseek-v3 published dims: {logits}")
    assert res.parity is not None and res.parity.passed, res.parity


def test_published_mtp_layer_keys_are_ignored(replicas: dict[str, Path], tmp_path: Path) -> None:
    """DeepSeek-V3's checkpoint holds a multi-token-prediction layer as model.layers.61.* (a full block and
    its eh_proj / enorm / hnorm / shared_head): ignored, as transformers ignores it."""
    src = tmp_path / "mtp"
    shutil.copytree(replicas["tiny"], src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.61.self_attn.q_a_proj.weight"] = torch.zeros(48, 64)
    tensors["model.layers.61.mlp.experts.0.up_proj.weight"] = torch.zeros(32, 64)
    tensors["model.layers.61.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    rows = {r["key"]: r for r in nnxport.inspect_keys(src).rows()}
    assert {rows[k]["status"] for k in rows if k.startswith("model.layers.61.")} == {"ignored"}
    assert {r["status"] for k, r in rows.items() if not k.startswith("model.layers.61.")} == {"mapped"}
    res = nnxport.convert(src, tmp_path / "out", dtype="float32", parity=False)
    assert res.manifest["model"]["family"] == "deepseek_v3"


def test_gradients_match_torch(replicas: dict[str, Path], tmp_path: Path) -> None:
    """d loss / d every parameter in train() mode on both sides, routing included (gradients flow through
    the chosen experts' scores). torch's gradients are saved under its parameter names (transformers 5
    fuses the experts: the fused layout's rules) and converted by the mapping into the NNX layout."""
    import jax.numpy as jnp
    import transformers

    src = replicas["tiny"]
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(src, dtype=torch.float32)
    ref.train()
    ids = np.random.default_rng(7).integers(0, 512, size=(2, 12))
    logits = ref(input_ids=torch.from_numpy(ids)).logits
    weights = np.random.default_rng(3).standard_normal(tuple(logits.shape)).astype(np.float32)
    (logits * torch.from_numpy(weights)).sum().backward()
    grads = {k: torch.zeros_like(p) if p.grad is None else p.grad.contiguous()
             for k, p in ref.named_parameters()}
    grads.update({k: b for k, b in ref.named_buffers() if k.endswith("e_score_correction_bias")})
    folder = tmp_path / "grads"
    folder.mkdir()
    save_file(grads, folder / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(src / "config.json", folder / "config.json")
    nnxport.convert(folder, tmp_path / "expected", dtype="float32", parity=False)
    nnxport.convert(src, tmp_path / "out", dtype="float32", parity=False)
    expected = _leaves(tmp_path / "expected")
    model = nnxport.load(tmp_path / "out", device="cpu")
    model.train()
    got = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(ids, jnp.int32)) * weights))(model)
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(got)}
    buffers = {k for k in expected if k.endswith("correction_bias")}  # state, not parameters
    assert buffers and set(flat) == set(_leaves(tmp_path / "out")) - buffers
    for path, g in flat.items():
        scale = float(np.abs(expected[path]).max())
        diff = float(np.abs(g - expected[path]).max())
        assert diff <= 1e-4 * scale + 1e-6, f"d loss / d {path}: max |Δ| {diff:.3g} (max |g| {scale:.3g})"
