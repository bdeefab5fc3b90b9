"""The gemma family (Gemma 2, Gemma 3 text, the text tower of multimodal Gemma 3): conversion with the mapping
picked by model_type, parity of logits and greedy generation against transformers (float32 and bf16), each
Gemma switch shown to matter, sliding windows in the KV cache past the window, the three key layouts, a
broken mapping, config drift, gradients in train mode; full-size published configs are marked slow."""

from __future__ import annotations

import copy
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
from nnxport.models.gemma import resolve
from nnxport.parity.metrics import compare
from nnxport.testing.hub import write_hub_cache
from nnxport.testing.replicas import build_replica, edit_safetensors, published_config
from tests.helpers import MAPPINGS, lm_generate_reference, lm_reference_logits

FAMILY = get_family("gemma")
TINY: dict[str, Any] = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 512,
                        "query_pre_attn_scalar": 24}
# Layer 0 slides with a window of 3 (shorter than the 16 parity tokens and than prompt + new tokens).
CASES: dict[str, dict[str, Any]] = {
    "gemma2": published_config("google/gemma-2-2b", **TINY, sliding_window=3),
    # caps small enough that the random replica's scores and logits reach them
    "gemma2-caps": published_config("google/gemma-2-2b", **TINY, sliding_window=3, attn_logit_softcapping=1.5,
                                    final_logit_softcapping=2.0, tie_word_embeddings=False),
    # layer 0 sliding (local base 100), layer 1 full (theta 5e4, linear scaling 8)
    "gemma3": published_config("google/gemma-3-1b-pt", **TINY, sliding_window=3, sliding_window_pattern=2,
                               rope_local_base_freq=100.0, rope_theta=50000.0,
                               rope_scaling={"rope_type": "linear", "factor": 8.0}),
}
_TEXT = {k: v for k, v in CASES["gemma3"].items() if k != "architectures"}
CASES["gemma3-multimodal"] = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": _TEXT,
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
    "mm_tokens_per_image": 4, "image_token_index": 511, "boi_token_index": 509, "eoi_token_index": 510,
}
REFERENCE = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
             "gemma3": "Gemma3ForConditionalGeneration"}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``replicas(name, **build_replica_kwargs)``: a replica folder of CASES[name] (hub-style config.json),
    built once per module and arguments."""
    root = tmp_path_factory.mktemp("gemma")
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
    """``converted(name)``: the replica's conversion without parity (built once)."""
    root = tmp_path_factory.mktemp("gemma-nnx")
    done: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in done:
            nnxport.convert(replicas(name), root / name, parity=False)
            done[name] = root / name
        return done[name]

    return make


def _convert_ok(cli: Callable[..., Any], source: str | Path, out: Path, *extra: str) -> dict[str, Any]:
    res = cli("convert", source, "--out", out, "--format", "json", *extra)
    assert res.exit_code == 0, res.stderr
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is True
    return report


# ------------------------------------------------------------------------------- conversions (tiny)

@pytest.mark.parametrize("name", list(CASES))
def test_converts_with_parity_and_greedy_generation(name: str, replicas: Callable[..., Path], hub_cache: Path,
                                                    tmp_path: Path, cli) -> None:
    config = CASES[name]
    repo = f"nnxport-test/tiny-{name}"
    write_hub_cache(hub_cache, repo, replicas(name))
    report = _convert_ok(cli, repo, tmp_path / "out")
    assert report["reference"] == f"transformers.{REFERENCE[config['model_type']]}"
    (logits,) = report["outputs"]
    # Measured (CPU, float32): max |Δ| 1-3e-6 with |logits| up to ~10 (the embedding scale and (1 + w)
    # norms make them larger than Llama's); KL ~1e-13.
    assert logits["max_abs_diff"] < 2e-5 and logits["violations"] == 0
    assert logits["kl_divergence"] < 1e-9 and logits["top1_agreement"] == 1.0
    assert report["generation"]["all_match"] is True and report["generation"]["new_tokens"] == 8
    manifest = json.loads((tmp_path / "out" / "nnxport.json").read_text())
    assert manifest["mapping"]["name"] == "gemma" and manifest["model"]["family"] == "gemma"
    model = nnxport.load(tmp_path / "out")
    assert isinstance(model, Decoder)
    assert (model.lm_head is None) == (name != "gemma2-caps")
    assert (model.layers[0].attn.q_norm is not None) == name.startswith("gemma3")
    assert model.layers[0].pre_mlp_norm is not None and model.layers[0].post_mlp_norm is not None
    assert model.spec.windows == (3, None)


def test_multimodal_keys_vision_ignored_and_both_text_prefixes(replicas: Callable[..., Path], tmp_path: Path,
                                                              cli) -> None:
    """The hub's ``language_model.model.`` keys (what transformers 5 still saves) and the
    ``model.language_model.`` layout; the vision tower and projector are ignored, not converted."""
    src = replicas("gemma3-multimodal")
    res = cli("inspect-keys", src, "--format", "json")
    assert res.exit_code == 0, res.stderr
    rows = {r["key"]: r["status"] for r in json.loads(res.stdout)["keys"]}
    assert rows["language_model.model.embed_tokens.weight"] == "mapped"
    vision = [k for k in rows if k.startswith(("vision_tower.", "multi_modal_projector."))]
    assert vision and all(rows[k] == "ignored" for k in vision)
    assert all(s in ("mapped", "ignored") for s in rows.values())

    moved = tmp_path / "moved"
    shutil.copytree(src, moved)
    edit_safetensors(moved, rename=lambda k: k.replace("language_model.model.", "model.language_model.")
                     .replace("vision_tower.", "model.vision_tower."))
    report = _convert_ok(cli, moved, tmp_path / "out")
    assert report["outputs"][0]["max_abs_diff"] < 2e-5
    res = cli("verify", tmp_path / "out", "--format", "json")  # the reference rebuilt from the record
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["passed"] is True
    first = np.asarray(nnxport.load(tmp_path / "out").embed.embedding[...])
    from safetensors.numpy import load_file

    stored = load_file(src / "model.safetensors")["language_model.model.embed_tokens.weight"]
    np.testing.assert_array_equal(first, stored)


def _patched(model: Decoder, switch: str) -> None:
    """Turn one Gemma switch off in a loaded model (in place)."""
    import dataclasses

    if switch == "norm_plus_one":
        for layer in model.layers:
            layer.input_norm.plus_one = False
    elif switch == "sandwich":
        for layer in model.layers:
            layer.pre_mlp_norm = layer.post_mlp_norm = None
    elif switch in ("query_scale", "attn_softcap"):
        for layer in model.layers:
            if switch == "query_scale":
                layer.attn.scale = layer.attn.head_dim ** -0.5
            else:
                layer.attn.softcap = None
    else:
        value = {"windows": (None, None), "local_rope": None}.get(switch)
        model.spec = dataclasses.replace(model.spec, **{switch: value})


SWITCHES = {
    "gemma2": ["norm_plus_one", "sandwich", "embed_scale", "query_scale", "windows"],
    "gemma2-caps": ["attn_softcap", "final_softcap"],
    "gemma3": ["local_rope", "windows"],
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_each_switch_matters(name: str, replicas: Callable[..., Path],
                             converted: Callable[[str], Path]) -> None:
    """The tiny configs exercise every Gemma switch: any one turned off, parity fails."""
    folder = replicas(name)
    config = json.loads((folder / "config.json").read_text())
    harness = FAMILY.parity
    inputs = harness.parity_inputs(config, 0)
    ref = lm_reference_logits(folder, harness, inputs)
    for switch in SWITCHES[name]:
        model = nnxport.load(converted(name))
        assert isinstance(model, Decoder)
        good = compare("logits", harness.run_nnx(model, inputs)["logits"], ref, harness.tolerance("float32"))
        _patched(model, switch)
        bad = compare("logits", harness.run_nnx(model, inputs)["logits"], ref, harness.tolerance("float32"))
        assert good.passed and not bad.passed and bad.max_abs_diff > 100 * good.max_abs_diff, switch


@pytest.mark.parametrize("name", ["gemma2-caps", "gemma3"])
def test_bfloat16_replica_within_bf16_tolerance(name: str, replicas: Callable[..., Path], tmp_path: Path,
                                                cli) -> None:
    report = _convert_ok(cli, replicas(name, dtype="bfloat16"), tmp_path / "out")
    assert report["dtype"] == "bfloat16"
    (logits,) = report["outputs"]
    print(name, {k: logits[k] for k in ("max_abs_diff", "max_rel_diff", "kl_divergence", "top1_agreement")})
    # Measured: max |Δ| 0.4-0.8% of max |logit|, KL ~1e-6 (bf16 compute against the float32 reference).
    assert 1e-5 < logits["max_rel_diff"] < 3e-2
    assert logits["kl_divergence"] < 1e-4 and logits["top1_agreement"] >= 0.9


# ------------------------------------------------------------------------- generation (KV cache)

@pytest.mark.parametrize("name", ["gemma2-caps", "gemma3", "gemma3-multimodal"])
def test_greedy_generation_past_the_window_equals_transformers(name: str, replicas: Callable[..., Path],
                                                               converted: Callable[[str], Path]) -> None:
    """Prompts of 9, 5 and 7 tokens (left-padded) and 12 new tokens: the sliding layer's window of 3 is
    passed many times over, in the prefill and in the cached steps."""
    ids, mask = _prompts()
    expected = lm_generate_reference(replicas(name), ids, mask, 12)
    got = nnxport.generate(nnxport.load(converted(name)), ids, attention_mask=mask, max_new_tokens=12)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", ["gemma2-caps"])
def test_cached_logits_equal_full_sequence(name: str, converted: Callable[[str], Path]) -> None:
    """Prefill of 5 tokens + 7 one-token steps give the full 12-token forward's logits (windowed layer,
    soft-capping, per-layer RoPE included)."""
    import jax.numpy as jnp

    from nnxport.models.layers import generation_positions

    model = nnxport.load(converted(name))
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 500, size=(2, 12)), jnp.int32)
    full = np.asarray(model(ids))
    ones = jnp.ones((2, 12), jnp.int32)
    positions = generation_positions(ones)
    logits, cache = model.decode(ids[:, :5], positions[:, :5], ones[:, :5], model.init_cache(2, 64))
    steps = [logits]
    for t in range(5, 12):
        logits, cache = model.decode(ids[:, t:t + 1], positions[:, t:t + 1], ones[:, t:t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], axis=1), full, atol=3e-5,
                               rtol=1e-5)
    assert np.abs(full).max() > 0.1


def _prompts() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    ids, mask = np.zeros((3, 9), np.int64), np.zeros((3, 9), np.int64)
    for row, n in enumerate((9, 5, 7)):
        ids[row, 9 - n:] = rng.integers(1, 500, size=n)
        mask[row, 9 - n:] = 1
    return ids, mask


# ------------------------------------------------------------------------------ broken mapping, drift

def test_pre_and_post_feedforward_norms_swapped_fail_parity(replicas: Callable[..., Path], tmp_path: Path,
                                                            cli) -> None:
    """Same shapes, wrong model: the two MLP norms exchanged in the mapping give exit 3."""
    text = (MAPPINGS / "gemma.yaml").read_text()
    pre, post = "pre_feedforward_layernorm\\.weight$'", "post_feedforward_layernorm\\.weight$'"
    assert text.count(pre) == 1 and text.count(post) == 1
    bad = tmp_path / "swapped.yaml"
    bad.write_text(text.replace(pre, "@@").replace(post, pre).replace("@@", post))
    out = tmp_path / "out"
    res = cli("convert", replicas("gemma3"), "--mapping", bad, "--out", out)
    assert res.exit_code == 3, res.stderr
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is False and report["outputs"][0]["violations"] > 0


DRIFT = [
    ("gemma2", {"use_bidirectional_attention": True}, ["'use_bidirectional_attention'"]),
    ("gemma2", {"hidden_activation": "relu2"}, ["'hidden_activation'", "relu2"]),
    ("gemma2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["'rope_scaling'", "yarn"]),
    ("gemma2", {"layer_types": ["sliding_attention", "chunked_attention"]}, ["'layer_types'", "chunked"]),
    ("gemma2", {"quantization_config": {"quant_method": "awq"}}, ["'quantization_config.quant_method'"]),
    ("gemma3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1.0}}, ["'rope_parameters'"]),
    ("gemma3", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, ["'rope_scaling'", "dynamic"]),
    ("gemma3", {"architectures": ["Gemma3ForSequenceClassification"]}, ["'architectures'"]),
    ("gemma3-multimodal", {"text_config": {**_TEXT, "hidden_activation": "relu2"}},
     ["'text_config.hidden_activation'"]),
]


@pytest.mark.parametrize(("name", "change", "words"), DRIFT,
                         ids=["bidirectional", "activation", "yarn", "layer_types", "quantized",
                              "flat-rope-parameters", "dynamic", "architectures", "text_config"])
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


# ------------------------------------------------------------------------------------- config units

@pytest.mark.parametrize(("model_type", "overrides"), [
    ("gemma2", {"num_hidden_layers": 5}),
    ("gemma3_text", {"num_hidden_layers": 13}),
    ("gemma3_text", {"num_hidden_layers": 4, "sliding_window_pattern": 3}),
    ("gemma3_text", {"num_hidden_layers": 3, "layer_types": ["full_attention", "sliding_attention",
                                                              "full_attention"]}),
])
def test_layer_types_and_ropes_as_transformers_decides(model_type: str, overrides: dict[str, Any]) -> None:
    import torch
    import transformers
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    config = {"model_type": model_type, **TINY, "sliding_window": 8, "rope_theta": 40000.0,
              "rope_local_base_freq": 500.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0},
              **overrides}
    spec = resolve(config)
    fields = {k: v for k, v in copy.deepcopy(config).items() if k != "model_type"}
    if model_type == "gemma2":
        fields.pop("rope_local_base_freq")
    hf = transformers.AutoConfig.for_model(model_type, **fields)
    assert list(spec.windows) == [8 if t == "sliding_attention" else None for t in hf.layer_types]
    if model_type == "gemma3_text":
        emb = Gemma3RotaryEmbedding(hf, device=torch.device("cpu"))
        ropes = {"full_attention": spec.rope, "sliding_attention": spec.local_rope}
        for layer_type, rope in ropes.items():
            assert rope is not None
            np.testing.assert_allclose(rope.inv_freq(), getattr(emb, f"{layer_type}_inv_freq").numpy(),
                                       rtol=1e-6, atol=0)
        assert spec.rope.rope_type == "linear" and spec.local_rope is not None
        assert spec.local_rope.rope_type == "default" and spec.local_rope.theta == 500.0


def test_transformers5_config_layout_resolves_the_same(replicas: Callable[..., Path]) -> None:
    """config.json as transformers 5 writes it (nested rope_parameters, layer_types) gives the same spec."""
    for name in ("gemma2", "gemma3", "gemma3-multimodal"):
        written = json.loads((replicas(name, hub_config=False) / "config.json").read_text())
        assert resolve(written) == resolve(CASES[name]), name
    written = json.loads((replicas("gemma3", hub_config=False) / "config.json").read_text())
    assert set(written["rope_parameters"]) == {"full_attention", "sliding_attention"}


def test_defaults_are_the_transformers_config_defaults() -> None:
    import dataclasses

    import transformers

    from nnxport.models.decoder import DEFAULTS

    for model_type in ("gemma2", "gemma3_text", "gemma3", "phi3"):
        cls = type(transformers.AutoConfig.for_model(model_type))
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        for field, value in DEFAULTS[model_type].items():
            assert fields[field] == value, (model_type, field)


# ---------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("name", ["gemma3"])
def test_gradients_match_torch(name: str, replicas: Callable[..., Path], converted: Callable[[str], Path],
                               tmp_path: Path) -> None:
    """d loss / d every parameter in train() mode, torch's gradients converted with the same mapping."""
    from tests.helpers import lm_gradients_match

    lm_gradients_match(replicas(name), converted(name), tmp_path, vocab=TINY["vocab_size"])


# ------------------------------------------------------------------------------ published sizes (slow)

SLOW = [
    # full width and vocabulary; fewer layers where the float32 reference and model would not fit
    # together in this machine's 23 GB (2B: 26 -> 8 layers; 9B: 42 -> 2)
    ("google/gemma-2-2b", {"num_hidden_layers": 8}),
    ("google/gemma-2-9b", {"num_hidden_layers": 2}),
    ("google/gemma-3-1b-pt", {}),
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
    res = cli("convert", repo_id, "--out", tmp / "out", "--format", "json")
    assert res.exit_code in (0, 3), res.stderr
    report = json.loads((tmp / "out" / "parity.json").read_text())
    (logits,) = report["outputs"]
    print(f"{repo} {dtype}:", {k: logits[k] for k in ("max_abs_diff", "max_rel_diff", "top1_agreement",
                                                      "top5_agreement", "kl_divergence", "violations")},
          "generation", report.get("generation", {}).get("agreement"))
    assert res.exit_code == 0 and report["passed"] is True
    if dtype == "float32":
        assert logits["kl_divergence"] < 1e-6 and logits["top1_agreement"] == 1.0
    else:  # as far from float32 as transformers' own bf16 model (docs/parity.md)
        assert logits["kl_divergence"] < 2e-2 and logits["top5_agreement"] > 0.8


@pytest.mark.parametrize("repo", ["google/gemma-2-2b", "google/gemma-3-1b-pt", "microsoft/phi-4"])
def test_big_params_carry_mesh_annotations(repo: str) -> None:
    """The Gemma and Phi-3 models lay out under --mesh as the decoder's (Megatron-style annotations)."""
    from flax import nnx

    from nnxport.models.base import annotated_shards

    config = published_config(repo, num_hidden_layers=1)
    family = get_family("phi3" if repo.startswith("microsoft") else "gemma")
    model = nnx.eval_shape(lambda: family.build(config, nnx.Rngs(0), {}))
    shards = annotated_shards(nnx.state(model, nnx.Param))
    assert shards["embed.embedding"] == (("model",), ("data",))
    assert shards["layers.0.attn.q.kernel"] == (("data",), ("model",))
    assert shards["layers.0.mlp.down.kernel"] == (("model",), ("data",))
    assert not any("norm" in path for path in shards)  # norms stay replicated
