"""GPT-OSS as published (openai/gpt-oss-20b, shrunk): yarn RoPE (factor 32, not truncated, its attention
factor on cos/sin; nnxport/models/rope.py, shared with DeepSeek-V3) and MXFP4 experts
(``mlp.experts.gate_up_proj_blocks`` / ``_scales``, ``down_proj_blocks`` / ``_scales``, quantized from a
replica as the published checkpoint stores them) converted through nnxport.quant and mappings/gpt_oss.yaml,
parity of logits and greedy generation against GptOssForCausalLM in float32 and bfloat16 (on the weights
transformers' own ``convert_moe_packed_tensors`` dequantizes), broken cases caught."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import nnxport
from nnxport.models.decoder import Decoder, resolve
from nnxport.models.rope import Rope
from nnxport.quant import view
from nnxport.testing.published import published_config
from nnxport.testing.quantized import quantize_mxfp4_folder, quantize_mxfp4_tensor
from nnxport.testing.replicas import build_replica, edit_safetensors
from tests.helpers import run_subprocess

#: openai/gpt-oss-20b shrunk: its yarn RoPE as published (head_dim 16 puts the ramp between the 2nd and
#: 5th of 8 frequencies), window 4 on layer 0, a SwiGLU clamp that acts, intermediate 64 (mxfp4 groups 32).
TINY = published_config("openai/gpt-oss-20b", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, num_hidden_layers=2, vocab_size=512, intermediate_size=64,
                        num_local_experts=4, num_experts_per_tok=2, sliding_window=4, swiglu_limit=0.5,
                        pad_token_id=None, eos_token_id=None,
                        layer_types=["sliding_attention", "full_attention"])


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``replicas(kind)``: ``float32`` / ``bfloat16`` replicas of TINY (sinks, q and k weights
    randomised larger: the replica initialises them near 0), ``mxfp4``: the float32 one with its experts
    stored as mxfp4."""
    root = tmp_path_factory.mktemp("gpt_oss")
    built: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind in built:
            return built[kind]
        if kind == "mxfp4":
            built[kind] = quantize_mxfp4_folder(make("float32"), root / "mxfp4")
            return built[kind]
        built[kind] = build_replica(TINY, root / kind, seed=3, dtype=kind, hub_config=True)
        rng = np.random.default_rng(0)
        dtype = ml_dtypes.bfloat16 if kind == "bfloat16" else np.float32
        sinks = {f"model.layers.{i}.self_attn.sinks": rng.normal(0, 1.5, 4).astype(dtype) for i in range(2)}
        # queries and keys large enough that the rotary angles (and so yarn) move the attention weights
        qk = {f"model.layers.{i}.self_attn.{p}_proj.weight": rng.normal(0, 0.15, (n, 64)).astype(dtype)
              for i in range(2) for p, n in (("q", 64), ("k", 32))}
        edit_safetensors(built[kind], add={**sinks, **qk})
        return built[kind]

    return make


def _convert(cli: Callable[..., Any], source: Path, out: Path, *extra: str, code: int = 0) -> dict[str, Any]:
    res = cli("convert", source, "--out", out, "--format", "json", *extra)
    assert res.exit_code == code, res.stderr
    return json.loads((out / "parity.json").read_text())


def _numbers(report: dict[str, Any]) -> dict[str, Any]:
    (logits,) = report["outputs"]
    return {**{k: logits[k] for k in ("max_abs_diff", "max_rel_diff", "kl_divergence", "top1_agreement")},
            "greedy_all_match": report["generation"]["all_match"]}


# ------------------------------------------------------------------------------------------------ yarn

YARN_CASES = {
    "published": {},
    "truncated": {"rope_scaling": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 8.0, "beta_slow": 2.0,
                                   "truncate": True, "original_max_position_embeddings": 64}},
    "mscale": {"rope_scaling": {"rope_type": "yarn", "factor": 8.0, "mscale": 0.7, "mscale_all_dim": 1.0,
                                "original_max_position_embeddings": 64}},
    "attention_factor": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.3,
                                          "beta_fast": 0, "original_max_position_embeddings": 64}},
    "config-default": {"rope_scaling": None, "rope_theta": None},
}


@pytest.mark.parametrize("name", list(YARN_CASES))
def test_yarn_frequencies_and_attention_factor_are_transformers(name: str) -> None:
    """inv_freq and the cos/sin factor as GptOssRotaryEmbedding computes them (``_compute_yarn_parameters``):
    the factor exactly, the frequencies to torch's float32 pow (its vectorised pow is within 1 ulp)."""
    import transformers
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    config = {k: v for k, v in {**TINY, **YARN_CASES[name]}.items() if v is not None}
    spec = resolve(config)
    hf = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    ref = GptOssRotaryEmbedding(hf)
    assert spec.rope.rope_type == "yarn"
    assert spec.rope.attention_factor == ref.attention_scaling
    np.testing.assert_allclose(spec.rope.inv_freq(), ref.inv_freq.numpy(), rtol=3e-7, atol=0)
    assert not np.allclose(spec.rope.inv_freq(), Rope("default", spec.rope.theta, 16).inv_freq(), rtol=1e-3)


def test_float32_parity_and_greedy_generation(replicas: Callable[[str], Path], tmp_path: Path, cli) -> None:
    report = _convert(cli, replicas("float32"), tmp_path / "out")
    print("gpt_oss yarn float32", _numbers(report))
    (logits,) = report["outputs"]
    assert report["passed"] is True and report["reference"] == "transformers.GptOssForCausalLM"
    assert logits["violations"] == 0 and logits["max_abs_diff"] < 1e-5 and logits["kl_divergence"] < 1e-9
    assert logits["top1_agreement"] == 1.0
    assert report["generation"]["passed"] is True and report["generation"]["all_match"] is True
    model = nnxport.load(tmp_path / "out")
    assert isinstance(model, Decoder) and model.spec.rope.rope_type == "yarn"
    # yarn's frequencies and its attention factor each move the logits a thousand times the parity diff
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 512, size=(2, 16)), jnp.int32)
    base = np.asarray(model(ids))
    yarn = model.spec.rope
    for rope in (dataclasses.replace(yarn, attention_factor=1.0), Rope("default", yarn.theta, yarn.head_dim,
                                                                     attention_factor=yarn.attention_factor)):
        model.spec = dataclasses.replace(model.spec, rope=rope)
        moved = np.abs(np.asarray(model(ids)) - base).max()
        print(rope.rope_type, rope.attention_factor, "moves the logits by", moved)
        assert moved > 1000 * logits["max_abs_diff"] and moved > 1e-4


def test_bfloat16_parity(replicas: Callable[[str], Path], tmp_path: Path, cli) -> None:
    report = _convert(cli, replicas("bfloat16"), tmp_path / "out")
    print("gpt_oss yarn bfloat16", _numbers(report))
    (logits,) = report["outputs"]
    assert report["passed"] is True and report["dtype"] == "bfloat16"
    assert 1e-5 < logits["max_rel_diff"] < 3e-2 and logits["kl_divergence"] < 1e-4
    assert logits["top1_agreement"] >= 0.9 and report["generation"]["passed"] is True


@pytest.mark.parametrize(("change", "words"), [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 32.0, "truncate": "no",
                       "original_max_position_embeddings": 4096}}, ["'rope_scaling.truncate'"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 0}},
     ["'rope_scaling.original_max_position_embeddings'"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": -2.0, "original_max_position_embeddings": 64}},
     ["'rope_scaling.factor'"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": "fast",
                       "original_max_position_embeddings": 64}}, ["'rope_scaling.beta_fast'"]),
    ({"rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 64}},
     ["'rope_scaling'", "'factor'"]),
], ids=["truncate", "original", "factor", "beta_fast", "no-factor"])
def test_bad_yarn_fields_are_refused(change: dict[str, Any], words: list[str]) -> None:
    from nnxport.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        resolve({**TINY, **change})
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words)


# ----------------------------------------------------------------------------------------------- mxfp4

def test_mxfp4_quantizer_stores_the_published_layout(replicas: Callable[[str], Path]) -> None:
    """Blocks [E, rows, in / 32, 16] and scales [E, rows, in / 32] in place of each expert tensor, which
    transformers' convert_moe_packed_tensors turns back into the tensor to within e2m1's precision."""
    from safetensors.numpy import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    src = load_file(replicas("float32") / "model.safetensors")
    q = load_file(replicas("mxfp4") / "model.safetensors")
    for key, shape in (("gate_up_proj", (4, 128, 2, 16)), ("down_proj", (4, 64, 2, 16))):
        full = f"model.layers.1.mlp.experts.{key}"
        assert full not in q and q[full + "_blocks"].shape == shape
        assert q[full + "_scales"].shape == shape[:-1]
        back = convert_moe_packed_tensors(torch.from_numpy(q[full + "_blocks"]),
                                          torch.from_numpy(q[full + "_scales"]), dtype=torch.float32).numpy()
        # per group of 32 inputs: the scale 2**e puts max |w| / 2**e in (3, 6], so e2m1's rounding (steps of
        # 2 at most) errs by at most 2**e < max |w| / 3
        e, n, o = back.shape
        err = np.abs(back - src[full]).reshape(e, n // 32, 32, o).max(axis=2)
        assert (err <= np.abs(src[full]).reshape(e, n // 32, 32, o).max(axis=2) / 3 + 1e-7).all()
        assert np.corrcoef(back.ravel(), src[full].ravel())[0, 1] > 0.98
    blocks, scales = quantize_mxfp4_tensor(np.array([[[6.0] * 32, [-0.5] * 32]]).transpose(0, 2, 1))
    assert scales.tolist() == [[[127], [124]]]  # 6 = 6 * 2**0, -0.5 = -4 * 2**-3
    assert blocks[0, 0, 0, 0] == 0x77 and blocks[0, 1, 0, 0] == 0xEE
    config = json.loads((replicas("mxfp4") / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mxfp4_converts_and_passes_parity(dtype: str, replicas: Callable[[str], Path], tmp_path: Path,
                                          cli) -> None:
    from safetensors.numpy import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    report = _convert(cli, replicas("mxfp4"), tmp_path / "out", "--dtype", dtype)
    print(f"gpt_oss mxfp4 {dtype}", _numbers(report))
    (logits,) = report["outputs"]
    assert report["passed"] is True and report["dtype"] == dtype
    assert report["generation"]["passed"] is True and logits["top1_agreement"] >= 0.9
    if dtype == "float32":
        assert logits["max_abs_diff"] < 1e-5 and report["generation"]["all_match"] is True
    else:
        assert logits["max_rel_diff"] < 3e-2 and logits["kl_divergence"] < 1e-4
    model = nnxport.load(tmp_path / "out")
    assert isinstance(model, Decoder)
    stored = load_file(replicas("mxfp4") / "model.safetensors")
    key = "model.layers.1.mlp.experts.gate_up_proj"
    want = convert_moe_packed_tensors(torch.from_numpy(stored[key + "_blocks"]),
                                      torch.from_numpy(stored[key + "_scales"]), dtype=torch.float32)
    want = want.to(getattr(torch, dtype)).float().numpy()
    experts = model.layers[1].mlp.experts
    np.testing.assert_array_equal(np.asarray(experts.gate.get_value(), np.float32), want[..., 0::2])
    np.testing.assert_array_equal(np.asarray(experts.up.get_value(), np.float32), want[..., 1::2])


def test_mxfp4_scales_swapped_between_experts_fail_parity(replicas: Callable[[str], Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """nnxport's read of the expert tensors pairing expert 0's blocks with expert 1's scales (and back):
    every shape fits and the values stay in range; parity, whose reference transformers dequantizes from
    the stored pairs, fails."""
    original = view.QuantizedSource._stored_box

    def swapped(self: view.QuantizedSource, key: str, box: tuple[tuple[int, int], ...]) -> np.ndarray:
        out = original(self, key, box)
        if key.endswith("gate_up_proj_scales") and box[0] == (0, 4):
            out = out[[1, 0, 2, 3]]
        return out

    monkeypatch.setattr(view.QuantizedSource, "_stored_box", swapped)
    res = nnxport.convert(replicas("mxfp4"), tmp_path / "out", dtype="float32")
    assert res.passed is False
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert report["outputs"][0]["violations"] > 0


def test_mxfp4_gate_and_up_swapped_fails_parity(replicas: Callable[[str], Path], tmp_path: Path, cli) -> None:
    """The mapping reading the dequantized interleaved gate_up_proj the wrong way round: exit 3."""
    text = (Path(__file__).parents[2] / "mappings" / "gpt_oss.yaml").read_text()
    to = "    to: ['layers.\\1.mlp.experts.gate', 'layers.\\1.mlp.experts.up']\n"
    assert to in text
    bad = tmp_path / "swapped.yaml"
    bad.write_text(text.replace(to, "    to: ['layers.\\1.mlp.experts.up', 'layers.\\1.mlp.experts.gate']\n"))
    report = _convert(cli, replicas("mxfp4"), tmp_path / "out", "--mapping", bad, "--dtype", "float32",
                      code=3)
    assert report["passed"] is False


def test_mxfp4_without_dtype_is_refused(replicas: Callable[[str], Path], tmp_path: Path, cli) -> None:
    res = cli("convert", replicas("mxfp4"), "--out", tmp_path / "out", "--dtype", "keep")
    assert res.exit_code != 0 and "mxfp4" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ full published config

def _available_gb() -> float:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        line = next(x for x in lines if x.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 0.0
    return int(line.split()[1]) / 2**20


@pytest.mark.slow
def test_published_gpt_oss_20b_one_layer_mxfp4(tmp_path_factory: pytest.TempPathFactory) -> None:
    """openai/gpt-oss-20b at full width (1 of its 24 layers: 1.98 B parameters with its 201088-token
    embedding and head), yarn RoPE and MXFP4 experts as published, converted to bfloat16 with parity.
    Needs about 26 GB free (the moe tests' gpt-oss estimate): skipped, saying so, elsewhere."""
    import subprocess
    import sys

    if _available_gb() < 26:
        pytest.skip(f"needs about 26 GB of free memory; {_available_gb():.0f} GB available")
    tmp = tmp_path_factory.mktemp("gpt_oss_20b")
    config = published_config("openai/gpt-oss-20b", num_hidden_layers=1, layer_types=["sliding_attention"])
    build = ("import json, sys; from pathlib import Path; "
             "from nnxport.testing.replicas import build_replica; "
             "from nnxport.testing.quantized import quantize_mxfp4_folder; "
             "src = build_replica(json.loads(sys.argv[1]), Path(sys.argv[2]) / 'src', dtype='bfloat16', "
             "hub_config=True, max_shard_size='1GB'); quantize_mxfp4_folder(src, Path(sys.argv[2]) / 'q')")
    subprocess.run([sys.executable, "-c", build, json.dumps(config), str(tmp)], check=True, timeout=1800)
    shutil.rmtree(tmp / "src")
    res = run_subprocess("convert", tmp / "q", "--out", tmp / "out", "--dtype", "bfloat16",
                         "--format", "json", "-q")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp / "out" / "parity.json").read_text())
    print("gpt-oss-20b 1 layer mxfp4 bf16:", _numbers(report))
    assert report["passed"] is True and report["generation"]["passed"] is True


def test_deepseek_v3_yarn_is_the_same_code() -> None:
    """DeepSeek-V3's published yarn (factor 40, mscale 1 / mscale_all_dim 1, truncated) is a
    :class:`Rope` of rope.py too, equal to DeepseekV3RotaryEmbedding's frequencies and factor; its
    softmax scale takes mscale(40, mscale_all_dim) squared."""
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    from nnxport.models import deepseek_v3
    from nnxport.models.rope import yarn_mscale

    config = published_config("deepseek-ai/DeepSeek-V3")
    rope = deepseek_v3.resolve(config).attention.rope
    assert isinstance(rope.rope, Rope) and rope.rope.rope_type == "yarn" and rope.rope.truncate
    hf = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    ref = DeepseekV3RotaryEmbedding(hf)
    assert rope.rope.attention_factor == ref.attention_scaling
    np.testing.assert_allclose(rope.rope.inv_freq(), ref.inv_freq.numpy(), rtol=3e-7, atol=0)
    assert rope.softmax_scale(192) == pytest.approx(192 ** -0.5 * yarn_mscale(40.0, 1.0) ** 2, rel=1e-12)
