"""The phi3 family (Phi-3 4k / 128k, Phi-4): fused qkv_proj and gate_up_proj split by the mapping, longrope
(short and long factors, attention factor, the switch at original_max_position_embeddings in the forward
pass and in generation), partial rotary embeddings, the sliding window, residual dropout; parity of logits
and greedy generation against transformers (float32 and bf16), broken mappings, config drift, gradients;
full-size published configs are marked slow."""

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
from nnxport.models.decoder import Decoder
from nnxport.models.phi3 import resolve
from nnxport.parity.metrics import compare
from nnxport.testing.hub import write_hub_cache
from nnxport.testing.replicas import build_replica, published_config
from tests.helpers import MAPPINGS, lm_generate_reference, lm_reference, lm_reference_logits

FAMILY = get_family("phi3")
TINY: dict[str, Any] = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 300,
                        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# head_dim 16: 8 frequencies; with partial_rotary_factor 0.75, 12 rotary channels and 6 frequencies.
LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 1.2, 1.1, 3.0, 1.3, 2.5],
            "long_factor": [20.0, 40.0, 80.0, 30.0, 50.0, 90.0, 60.0, 70.0]}
CASES: dict[str, dict[str, Any]] = {
    "phi3-4k": published_config("microsoft/Phi-3-mini-4k-instruct", **TINY, sliding_window=3),
    # original_max_position_embeddings 12 < the 16 parity tokens: the long factors apply; factor 64 / 12.
    # initializer_range 0.1: logits large enough that greedy tokens show a generation that does not
    # re-encode at the switch.
    "phi3-128k": published_config("microsoft/Phi-3-mini-128k-instruct", **TINY, max_position_embeddings=64,
                                  initializer_range=0.1,
                                  original_max_position_embeddings=12, rope_scaling=LONGROPE,
                                  sliding_window=3),
    # Phi-4-mini's shape of things: partial rotary 0.75, tied embeddings, longrope
    "phi4-mini": published_config("microsoft/Phi-3-mini-128k-instruct", **TINY, max_position_embeddings=64,
                                  original_max_position_embeddings=12, partial_rotary_factor=0.75,
                                  tie_word_embeddings=True,
                                  rope_scaling={**LONGROPE, "short_factor": LONGROPE["short_factor"][:6],
                                                "long_factor": LONGROPE["long_factor"][:6]}),
    "phi4": published_config("microsoft/phi-4", **TINY),
}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    root = tmp_path_factory.mktemp("phi3")
    built: dict[str, Path] = {}

    def make(name: str, **kwargs: Any) -> Path:
        tag = f"{name}-{'-'.join(f'{k}={v}' for k, v in sorted(kwargs.items()))}"
        if tag not in built:
            kwargs.setdefault("hub_config", True)
            built[tag] = build_replica(copy.deepcopy(CASES[name]), root / tag.replace("=", "_"),
                                       seed=len(built) + 1, **kwargs)
        return built[tag]

    return make


@pytest.fixture(scope="module")
def converted(replicas: Callable[..., Path],
              tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("phi3-nnx")
    done: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in done:
            nnxport.convert(replicas(name), root / name, parity=False)
            done[name] = root / name
        return done[name]

    return make


def _convert(cli: Callable[..., Any], source: str | Path, out: Path,
             *extra: str) -> tuple[int, dict[str, Any]]:
    res = cli("convert", source, "--out", out, "--format", "json", *extra)
    assert res.exit_code in (0, 3), res.stderr
    return res.exit_code, json.loads((out / "parity.json").read_text())


# ------------------------------------------------------------------------------- conversions (tiny)

@pytest.mark.parametrize("name", list(CASES))
def test_converts_with_parity_and_greedy_generation(name: str, replicas: Callable[..., Path], hub_cache: Path,
                                                    tmp_path: Path, cli) -> None:
    repo = f"nnxport-test/tiny-{name}"
    write_hub_cache(hub_cache, repo, replicas(name))
    code, report = _convert(cli, repo, tmp_path / "out")
    assert code == 0 and report["passed"] is True
    assert report["reference"] == "transformers.Phi3ForCausalLM"
    (logits,) = report["outputs"]
    # Measured (CPU, float32): max |Δ| 2-3e-7, KL ~1e-15.
    assert logits["max_abs_diff"] < 1e-5 and logits["violations"] == 0 and logits["kl_divergence"] < 1e-9
    assert report["generation"]["all_match"] is True
    manifest = json.loads((tmp_path / "out" / "nnxport.json").read_text())
    assert manifest["mapping"]["name"] == "phi3" and manifest["model"]["family"] == "phi3"
    model = nnxport.load(tmp_path / "out")
    assert isinstance(model, Decoder)
    assert (model.lm_head is None) == (name == "phi4-mini")
    assert model.layers[0].attn.k.kernel.shape == (64, 32)  # GQA: the split's k part is kv_heads * 16
    rope = model.spec.rope
    assert rope.rope_type == ("default" if name in ("phi3-4k", "phi4") else "longrope")
    assert rope.dim == (12 if name == "phi4-mini" else 16)


SWITCHES: dict[str, list[Any]] = {
    "phi3-128k": [{"rope_type": "default"}, {"attention_factor": 1.0},
                  {"original_max_position_embeddings": 10_000}],  # the short factors instead of the long
    "phi4-mini": [{"rotary_dim": None, "short_factor": tuple(LONGROPE["short_factor"]),
                   "long_factor": tuple(LONGROPE["long_factor"])}],  # every channel rotating
    "phi3-4k": ["windows"],
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_each_switch_matters(name: str, replicas: Callable[..., Path],
                             converted: Callable[[str], Path]) -> None:
    """Longrope, its attention factor, the long factors past the switch, partial rotary, the window: any
    one turned off, parity fails."""
    folder = replicas(name)
    config = json.loads((folder / "config.json").read_text())
    harness = FAMILY.parity
    inputs = harness.parity_inputs(config, 0)
    ref = lm_reference_logits(folder, harness, inputs)
    for wrong in SWITCHES[name]:
        model = nnxport.load(converted(name))
        assert isinstance(model, Decoder)
        good = compare("logits", harness.run_nnx(model, inputs)["logits"], ref, harness.tolerance("float32"))
        if wrong == "windows":
            model.spec = dataclasses.replace(model.spec, windows=(None, None))
        else:
            model.spec = dataclasses.replace(model.spec, rope=dataclasses.replace(model.spec.rope, **wrong))
        bad = compare("logits", harness.run_nnx(model, inputs)["logits"], ref, harness.tolerance("float32"))
        assert good.passed and not bad.passed and bad.max_abs_diff > 100 * good.max_abs_diff, wrong


@pytest.mark.parametrize("name", ["phi3-128k"])
def test_bfloat16_replica_within_bf16_tolerance(name: str, replicas: Callable[..., Path], tmp_path: Path,
                                                cli) -> None:
    code, report = _convert(cli, replicas(name, dtype="bfloat16"), tmp_path / "out")
    assert code == 0 and report["dtype"] == "bfloat16"
    (logits,) = report["outputs"]
    print(name, {k: logits[k] for k in ("max_abs_diff", "max_rel_diff", "kl_divergence", "top1_agreement")})
    assert 1e-5 < logits["max_rel_diff"] < 3e-2
    assert logits["kl_divergence"] < 1e-4 and logits["top1_agreement"] >= 0.9


def test_inv_freq_and_attention_factor_equal_transformers() -> None:
    import torch
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for name in ("phi3-128k", "phi4-mini"):
        fields = {k: v for k, v in copy.deepcopy(CASES[name]).items()
                  if k not in ("architectures", "model_type")}
        hf = transformers.Phi3Config(**fields)
        rope = resolve(CASES[name]).rope
        short, scaling = ROPE_INIT_FUNCTIONS["longrope"](hf, torch.device("cpu"))
        long, _ = ROPE_INIT_FUNCTIONS["longrope"](hf, torch.device("cpu"), seq_len=13)
        np.testing.assert_allclose(rope.inv_freq(), short.numpy(), rtol=1e-6, atol=0)
        np.testing.assert_allclose(rope.inv_freq(long=True), long.numpy(), rtol=1e-6, atol=0)
        assert rope.attention_factor == pytest.approx(scaling, rel=1e-12) and scaling > 1.1


# ------------------------------------------------------------------------- generation (KV cache)

def _prompts() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    ids, mask = np.zeros((3, 9), np.int64), np.zeros((3, 9), np.int64)
    for row, n in enumerate((9, 5, 7)):
        ids[row, 9 - n:] = rng.integers(3, 300, size=n)
        mask[row, 9 - n:] = 1
    return ids, mask


@pytest.mark.parametrize("name", ["phi3-4k", "phi3-128k", "phi4-mini"])
def test_greedy_generation_across_the_longrope_switch_equals_transformers(
        name: str, replicas: Callable[..., Path], converted: Callable[[str], Path]) -> None:
    """Prompts of 9 columns and 10 new tokens: the sequence passes original_max_position_embeddings (12),
    where transformers re-encodes it with the long factors, and the sliding window of 3."""
    ids, mask = _prompts()
    expected = lm_generate_reference(replicas(name), ids, mask, 10)
    got = nnxport.generate(nnxport.load(converted(name)), ids, attention_mask=mask, max_new_tokens=10)
    np.testing.assert_array_equal(got, expected)


def test_the_reencoding_is_what_transformers_computes(replicas: Callable[..., Path],
                                                      converted: Callable[[str], Path]) -> None:
    """At the step where the sequence reaches 13 tokens transformers' logits are those of a fresh forward
    pass over all 13 (long factors everywhere), not of a cached step over keys rotated with the short
    factors: why generate() re-encodes."""
    import jax.numpy as jnp
    import torch

    from nnxport.models.layers import generation_positions

    ids = np.random.default_rng(2).integers(3, 300, size=(1, 9))
    ref = lm_reference(replicas("phi3-128k"))
    ref.generation_config.eos_token_id, ref.generation_config.pad_token_id = None, 0
    with torch.no_grad():
        out = ref.generate(torch.from_numpy(ids), max_new_tokens=6, do_sample=False, output_scores=True,
                           return_dict_in_generate=True)
    tokens = out.sequences.numpy()  # [1, 15]
    crossing = out.scores[4].numpy()  # predicted from the first 13 tokens
    model = nnxport.load(converted("phi3-128k"))
    fresh = np.asarray(model(jnp.asarray(tokens[:, :13], jnp.int32)))[:, -1]
    seq = jnp.asarray(tokens[:, :13], jnp.int32)
    ones = jnp.ones_like(seq)
    positions = generation_positions(ones)
    _, cache = model.decode(seq[:, :12], positions[:, :12], ones[:, :12], model.init_cache(1, 64))
    stale, _ = model.decode(seq[:, 12:], positions[:, 12:], ones[:, 12:], cache)
    right, wrong = np.abs(fresh - crossing).max(), np.abs(np.asarray(stale)[:, -1] - crossing).max()
    assert right < 1e-5 and wrong > 1e-3 and wrong > 100 * right


def test_eos_rows_stay_ended_across_the_reencoding(converted: Callable[[str], Path]) -> None:
    """A row that ends before the re-encoding keeps its padding; the others continue as in one run."""
    model = nnxport.load(converted("phi3-128k"))
    ids, mask = _prompts()
    free = nnxport.generate(model, ids, attention_mask=mask, max_new_tokens=10)
    eos = int(free[0, 9 + 1])  # row 0's second new token (before the switch at 4 new tokens)
    got = nnxport.generate(model, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos,
                           pad_token_id=0)
    row0 = got[0, 9:]
    assert row0[1] == eos and (row0[2:] == 0).all()
    for r in (1, 2):
        new = free[r, 9:]
        hit = np.flatnonzero(new == eos)
        upto = int(hit[0]) + 1 if hit.size else len(new)
        np.testing.assert_array_equal(got[r, 9:9 + upto], new[:upto])


# ------------------------------------------------------------------------------ broken mapping, drift

def test_gate_and_up_swapped_in_the_split_fail_parity(replicas: Callable[..., Path], tmp_path: Path,
                                                      cli) -> None:
    text = (MAPPINGS / "phi3.yaml").read_text()
    targets = "to: ['layers.\\1.mlp.gate.kernel', 'layers.\\1.mlp.up.kernel']"
    assert targets in text
    bad = tmp_path / "swapped.yaml"
    bad.write_text(text.replace(targets, "to: ['layers.\\1.mlp.up.kernel', 'layers.\\1.mlp.gate.kernel']"))
    code, report = _convert(cli, replicas("phi4"), tmp_path / "out", "--mapping", str(bad))
    assert code == 3 and report["passed"] is False and report["outputs"][0]["violations"] > 0


def test_wrong_split_sizes_are_refused_before_reading(replicas: Callable[..., Path], tmp_path: Path,
                                                      cli) -> None:
    """q takes kv_heads * head_dim rows: the shapes no longer fit and the analysis says so (exit 1)."""
    text = (MAPPINGS / "phi3.yaml").read_text()
    q = "sizes: ['num_attention_heads * (hidden_size // num_attention_heads)',"
    assert q in text
    bad = tmp_path / "sizes.yaml"
    bad.write_text(text.replace(q, "sizes: ['num_key_value_heads * (hidden_size // num_attention_heads)',"))
    res = cli("convert", replicas("phi4"), "--mapping", bad, "--out", tmp_path / "out")
    assert res.exit_code == 1 and "Traceback" not in res.stderr
    assert "qkv_proj" in res.stderr and not (tmp_path / "out").exists()


DRIFT = [
    ("phi4", {"rope_scaling": {"type": "linear", "factor": 2.0}}, ["'rope_scaling'", "linear"]),
    ("phi3-128k", {"rope_scaling": {**LONGROPE, "long_factor": [1.0, 2.0]}}, ["'rope_scaling.long_factor'"]),
    ("phi4", {"partial_rotary_factor": 0.2}, ["'partial_rotary_factor'"]),  # 3 rotary channels
    ("phi4", {"head_dim": 32}, ["'head_dim'"]),
    ("phi4", {"hidden_act": "relu2"}, ["'hidden_act'"]),
    ("phi4", {"quantization_config": {"quant_method": "gptq"}}, ["'quantization_config.quant_method'"]),
    ("phi4", {"architectures": ["Phi3ForTokenClassification"]}, ["'architectures'"]),
    ("phi4", {"resid_pdrop": 1.5}, ["'resid_pdrop'"]),
]


@pytest.mark.parametrize(("name", "change", "words"), DRIFT,
                         ids=["linear", "factor-length", "partial-odd", "head_dim", "activation", "quantized",
                              "architectures", "resid_pdrop"])
def test_config_drift_is_refused(name: str, change: dict[str, Any], words: list[str],
                                 replicas: Callable[..., Path], tmp_path: Path, cli) -> None:
    src = tmp_path / "drifted"
    shutil.copytree(replicas(name), src)
    config = {**json.loads((src / "config.json").read_text()), **change}
    (src / "config.json").write_text(json.dumps(config))
    res = cli("convert", src, "--out", tmp_path / "out")
    assert res.exit_code == 1
    assert "config.json: field" in res.stderr and "Traceback" not in res.stderr
    for word in words:
        assert word in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drifted"]


def test_transformers5_config_layout_resolves_the_same(replicas: Callable[..., Path]) -> None:
    for name in CASES:
        written = json.loads((replicas(name, hub_config=False) / "config.json").read_text())
        assert resolve(written) == resolve(CASES[name]), name


# ---------------------------------------------------------------------------------------- training

def test_gradients_match_torch(replicas: Callable[..., Path], converted: Callable[[str], Path],
                               tmp_path: Path) -> None:
    """Through the split kernels too: torch's qkv_proj / gate_up_proj gradients split by the mapping."""
    from tests.helpers import lm_gradients_match

    lm_gradients_match(replicas("phi4-mini"), converted("phi4-mini"), tmp_path, vocab=TINY["vocab_size"])


def test_resid_pdrop_drops_in_train_mode_only(tmp_path: Path) -> None:
    import jax.numpy as jnp

    src = build_replica(copy.deepcopy({**CASES["phi4"], "resid_pdrop": 0.5}), tmp_path / "src", seed=4)
    nnxport.convert(src, tmp_path / "out", parity=False)
    model = nnxport.load(tmp_path / "out")
    assert isinstance(model, Decoder) and model.spec.resid_dropout == 0.5
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 300, size=(2, 8)), jnp.int32)
    eval_a, eval_b = np.asarray(model(ids)), np.asarray(model(ids))
    np.testing.assert_array_equal(eval_a, eval_b)
    model.train()
    train = np.asarray(model(ids))
    assert np.abs(train - eval_a).max() > 1e-2
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(ids)), eval_a)


# ------------------------------------------------------------------------------ published sizes (slow)

SLOW = [
    # full width and vocabulary; fewer layers where the float32 reference and model would not fit together
    # in this machine's 23 GB (3.8B: 32 -> 8 layers; phi-4, 14.7B: 40 -> 2)
    ("microsoft/Phi-3-mini-4k-instruct", {"num_hidden_layers": 8}),
    ("microsoft/Phi-3-mini-128k-instruct", {"num_hidden_layers": 8}),
    ("microsoft/phi-4", {"num_hidden_layers": 2}),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(("repo", "overrides"), SLOW, ids=[r for r, _ in SLOW])
def test_published_size(repo: str, overrides: dict[str, Any], dtype: str, hub_cache: Path,
                        tmp_path_factory: pytest.TempPathFactory, cli) -> None:
    config = published_config(repo, **overrides)
    tmp = tmp_path_factory.mktemp("published")
    folder = build_replica(config, tmp / "src", dtype=dtype, hub_config=True, max_shard_size="1GB")
    repo_id = f"nnxport-test/{repo.split('/')[1]}-{dtype}"
    write_hub_cache(hub_cache, repo_id, folder)
    shutil.rmtree(folder)
    code, report = _convert(cli, repo_id, tmp / "out")
    (logits,) = report["outputs"]
    print(f"{repo} {dtype}:", {k: logits[k] for k in ("max_abs_diff", "max_rel_diff", "top1_agreement",
                                                      "top5_agreement", "kl_divergence")},
          report.get("generation", {}).get("agreement"))
    assert code == 0 and logits["kl_divergence"] < 1e-3 and logits["top5_agreement"] > 0.85
