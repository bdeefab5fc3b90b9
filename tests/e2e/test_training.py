"""Training fidelity of converted models, against transformers in train() mode on tiny replicas.

Torch's gradients (and its updated BatchNorm statistics) are brought into the NNX layout by the
conversion itself: they are written as a checkpoint with the source's key names and config.json and
converted with the same mapping, so every transpose, split and tie is applied to them exactly as to the
weights (all of the mapping's ops are linear rearrangements, so the gradient of a target is the ops
applied to the gradient of its source). The loss is ``sum(outputs * R)`` with R a fixed random tensor:
linear in the outputs, so the comparison tests the whole backward pass without a softmax flattening it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnxport
from nnxport.errors import ConfigError
from nnxport.models import resolve_family
from nnxport.models.resnet import ResNet
from nnxport.testing.replicas import build_replica, published_config

NO_DROPOUT = {
    "bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "gpt2": {"embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0},
}
CONFIGS: dict[str, dict[str, Any]] = {
    "resnet": published_config("microsoft/resnet-50", depths=[1, 1], hidden_sizes=[16, 32], embedding_size=8,
                               num_labels=5),
    "bert": published_config("google-bert/bert-base-uncased", hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=64, vocab_size=128,
                             max_position_embeddings=32, initializer_range=0.1, **NO_DROPOUT["bert"]),
    "gpt2": published_config("openai-community/gpt2", n_embd=32, n_head=4, n_layer=2, vocab_size=128,
                             n_positions=32, initializer_range=0.1, **NO_DROPOUT["gpt2"]),
    "llama": published_config("meta-llama/Llama-3.2-1B", hidden_size=32, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, num_hidden_layers=2, intermediate_size=64,
                              vocab_size=128, initializer_range=0.1),
    "vit": published_config("google/vit-base-patch16-224", hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
                            num_labels=5, initializer_range=0.1),
}
STATE = (nnx.Param, nnx.BatchStat)


def _flat(state: nnx.State) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Each family's replica (dropout off) and its conversion: name -> (source folder, output folder)."""
    root = tmp_path_factory.mktemp("train")
    out: dict[str, tuple[Path, Path]] = {}
    for name, config in CONFIGS.items():
        src = build_replica(config, root / name / "src", seed=1)
        nnxport.convert(src, root / name / "out", parity=False)
        out[name] = (src, root / name / "out")
    return out


def _torch_model(src: Path) -> Any:
    import transformers

    config = json.loads((src / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    kwargs = {} if config["model_type"] == "resnet" else {"attn_implementation": "eager"}
    return cls.from_pretrained(src, **kwargs)


def _as_nnx(tensors: dict[str, np.ndarray], src: Path, tmp: Path) -> dict[str, np.ndarray]:
    """``tensors`` (named as the source's keys) in the NNX layout: converted with the source's mapping."""
    from safetensors.numpy import save_file

    folder = tmp / "as-source"
    folder.mkdir(parents=True)
    shutil.copy(src / "config.json", folder / "config.json")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    nnxport.convert(folder, tmp / "as-nnx", parity=False)
    return _flat(nnx.state(nnxport.load(tmp / "as-nnx"), STATE))


def _as_saved(model: Any, tensors: dict[str, Any], src: Path) -> dict[str, np.ndarray]:
    """Torch tensors named as in the module (``named_parameters`` / ``named_buffers``) renamed to the
    checkpoint's keys the way ``save_pretrained`` renames them (transformers 5 keeps legacy names on disk,
    e.g. ViT's ``attention.attention.query``), for exactly the source's keys."""
    from transformers.core_model_loading import revert_weight_conversion

    saved = revert_weight_conversion(model, dict(tensors))
    return {k: saved[k].detach().numpy() for k in _source_keys(src)}


def _source_keys(src: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(src / "model.safetensors"))


def _inputs(name: str) -> tuple[list[np.ndarray], list[Any]]:
    """Seeded inputs: NNX's (NHWC images, int32 ids) and torch's (NCHW, int64)."""
    import torch

    rng = np.random.default_rng(7)
    if name in ("resnet", "vit"):
        x = rng.standard_normal((4 if name == "resnet" else 2, 32, 32, 3), dtype=np.float32)
        return [x], [torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))]
    ids = rng.integers(0, 128, size=(2, 12)).astype(np.int32)
    return [ids], [torch.from_numpy(ids.astype(np.int64))]


def _nnx_outputs(name: str, model: nnx.Module, inputs: list[np.ndarray]) -> jax.Array:
    x = jnp.asarray(inputs[0])
    if name == "bert":
        return model.mlm_logits(model(x))  # type: ignore[attr-defined,operator]
    return model(x)  # type: ignore[operator]


def _torch_outputs(model: Any, inputs: list[Any]) -> Any:
    if hasattr(model, "resnet") or hasattr(model, "vit"):
        return model(pixel_values=inputs[0]).logits
    return model(input_ids=inputs[0]).logits


# ------------------------------------------------------------------------------------------ gradients

@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_match_torch(name: str, converted: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """d loss / d every parameter, train() mode on both sides (ResNet: BatchNorm on batch statistics)."""
    import torch

    src, out = converted[name]
    nnx_inputs, torch_inputs = _inputs(name)
    ref = _torch_model(src)
    ref.train()
    logits = _torch_outputs(ref, torch_inputs)
    weights = np.random.default_rng(3).standard_normal(tuple(logits.shape)).astype(np.float32)
    (logits * torch.from_numpy(weights)).sum().backward()
    grads = {k: torch.zeros_like(p) if p.grad is None else p.grad
             for k, p in ref.named_parameters(remove_duplicate=False)}
    expected = _as_nnx(_as_saved(ref, {**dict(ref.named_buffers()), **grads}, src), src, tmp_path)

    model = nnxport.load(out)
    model.train()

    def loss(m: nnx.Module) -> jax.Array:
        return jnp.sum(_nnx_outputs(name, m, nnx_inputs).astype(jnp.float32) * weights)

    got = _flat(nnx.grad(loss)(model))
    assert got and set(got) <= set(expected)
    assert set(got) == set(_flat(nnx.state(model, nnx.Param)))  # every parameter is compared
    # Measured (CPU, float32): max |Δ| <= 9e-6 of each leaf's max |gradient| (ResNet 8.8e-6, BERT 8.5e-7,
    # GPT-2 8.2e-7, Llama 1.1e-6, ViT 8.5e-7). The floor 1e-6 is for the key biases, whose gradient is 0
    # in exact arithmetic (softmax ignores a shift shared by all keys): both sides give ~1e-7 of noise.
    for path, g in got.items():
        scale = float(np.abs(expected[path]).max())
        diff = float(np.abs(g - expected[path]).max())
        assert diff <= 1e-4 * scale + 1e-6, \
            f"{name}: d loss / d {path}: max |Δ| {diff:.3g} (max |g| {scale:.3g})"


# ------------------------------------------------------------------------------------------ BatchNorm

def _one_train_step(model: nnx.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    model.train()
    nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x))
    return _flat(nnx.state(model, nnx.BatchStat))


def test_batchnorm_statistics_match_torch_after_one_step(converted: dict[str, tuple[Path, Path]],
                                                         tmp_path: Path) -> None:
    """One train-mode forward pass moves every running mean and variance as torch's does (momentum 0.1 =
    flax 0.9, the unbiased batch variance); flax's default momentum 0.99 would not."""
    import torch

    src, out = converted["resnet"]
    nnx_inputs, torch_inputs = _inputs("resnet")
    ref = _torch_model(src)
    ref.train()
    with torch.no_grad():
        ref(pixel_values=torch_inputs[0])
    expected = _as_nnx(_as_saved(ref, ref.state_dict(), src), src, tmp_path / "torch")

    before = _flat(nnx.state(nnxport.load(out), nnx.BatchStat))
    got = _one_train_step(nnxport.load(out), nnx_inputs[0])
    assert len(got) == 2 * 9  # mean and var of the stem's and 8 blocks' BatchNorms
    for path, value in got.items():
        assert np.abs(value - before[path]).max() > 1e-3, f"{path} did not move"
        np.testing.assert_allclose(value, expected[path], rtol=1e-5, atol=1e-5, err_msg=path)

    flax_default = nnxport.load(out)
    flax_default.set_attributes(nnx.BatchNorm, momentum=0.99)
    wrong = _one_train_step(flax_default, nnx_inputs[0])
    assert all(np.abs(wrong[p] - expected[p]).max() > 1e-3 for p in wrong)


def test_resnet_spec_records_batchnorm_settings() -> None:
    spec = resolve_family("resnet").resolve(CONFIGS["resnet"])
    assert (spec.batch_norm_momentum, spec.flax_momentum, spec.batch_norm_eps) == (0.1, 0.9, 1e-5)
    model = ResNet(spec, rngs=nnx.Rngs(0))
    assert (model.stem.bn.momentum, model.stem.bn.epsilon) == (0.9, 1e-5)


# -------------------------------------------------------------------------------------------- dropout

@pytest.fixture(scope="module")
def gpt2_dropout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted tiny GPT-2 with GPT2Config's dropout rates (0.1 each)."""
    root = tmp_path_factory.mktemp("drop")
    config = {k: v for k, v in CONFIGS["gpt2"].items() if k not in NO_DROPOUT["gpt2"]}
    src = build_replica({**config, "attn_pdrop": 0.2}, root / "src", seed=2)
    nnxport.convert(src, root / "out", parity=False)
    return root / "out"


def test_dropout_rates_come_from_config(gpt2_dropout: Path) -> None:
    model = nnxport.load(gpt2_dropout)
    attn = model.layers[0].attn  # type: ignore[attr-defined]
    assert (model.drop.rate, attn.attn_dropout.rate, attn.resid_dropout.rate,  # type: ignore[attr-defined]
            model.layers[1].mlp.dropout.rate) == (0.1, 0.2, 0.1, 0.1)  # type: ignore[attr-defined]
    assert all(d.deterministic for _, d in nnx.iter_modules(model) if isinstance(d, nnx.Dropout))


def test_train_mode_drops_and_eval_mode_is_deterministic(gpt2_dropout: Path) -> None:
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, size=(2, 12)), jnp.int32)
    forward = nnx.jit(lambda m, ids: m(ids))
    model = nnxport.load(gpt2_dropout)
    eval_1, eval_2 = forward(model, ids), forward(model, ids)
    np.testing.assert_array_equal(eval_1, eval_2)
    model.train()
    seeded_1 = forward(nnxport.seed_dropout(model, 1), ids)
    again_1 = forward(nnxport.seed_dropout(model, 1), ids)
    seeded_2 = forward(nnxport.seed_dropout(model, 2), ids)
    next_step = forward(model, ids)
    np.testing.assert_array_equal(seeded_1, again_1)  # one seed, one sequence of masks
    assert float(jnp.abs(seeded_1 - seeded_2).max()) > 1e-2
    assert float(jnp.abs(seeded_2 - next_step).max()) > 1e-2  # the stream advances every call
    assert float(jnp.abs(seeded_1 - eval_1).max()) > 1e-2
    nnx.reseed(model, dropout=1)  # flax's own reseeding reaches the loaded model's streams
    np.testing.assert_array_equal(forward(model, ids), seeded_1)
    fresh = nnxport.load(gpt2_dropout)  # load seeds the streams with 0: reproducible
    fresh.train()
    np.testing.assert_array_equal(forward(fresh, ids), forward(nnxport.seed_dropout(model, 0), ids))
    model.eval()
    np.testing.assert_array_equal(forward(model, ids), eval_1)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "vit"])
def test_rate_zero_train_equals_eval(name: str, converted: dict[str, tuple[Path, Path]]) -> None:
    """Dropout-free configs: train() changes nothing (these families have no BatchNorm)."""
    model = nnxport.load(converted[name][1])
    nnx_inputs, _ = _inputs(name)
    eval_out = _nnx_outputs(name, model, nnx_inputs)
    model.train()
    train = _nnx_outputs(name, model, nnx_inputs)
    np.testing.assert_array_equal(np.asarray(train), np.asarray(eval_out))


def test_checkpoint_holds_only_params_and_batch_stats(gpt2_dropout: Path,
                                                      converted: dict[str, tuple[Path, Path]]) -> None:
    from orbax.checkpoint.experimental import v1 as ocp_v1

    for out in (gpt2_dropout, converted["resnet"][1]):
        model = nnxport.load(out)
        saved = ocp_v1.metadata((out / "checkpoint").absolute()).metadata
        paths = {".".join(str(getattr(k, "key", k)) for k in kp)
                 for kp, _ in jax.tree_util.tree_flatten_with_path(saved)[0]}
        assert paths == set(_flat(nnx.state(model, STATE)))
    streams = nnx.to_flat_state(nnx.state(nnxport.load(gpt2_dropout), nnx.RngState))
    assert len(streams) == 2 * 7  # ...and load gives each of the 7 Dropout layers a stream (key, count)


@pytest.mark.parametrize(("family", "field"), [
    ("bert", "hidden_dropout_prob"), ("bert", "attention_probs_dropout_prob"), ("vit", "hidden_dropout_prob"),
    ("vit", "attention_probs_dropout_prob"), ("gpt2", "embd_pdrop"), ("gpt2", "attn_pdrop"),
    ("gpt2", "resid_pdrop"), ("llama", "attention_dropout"),
])
@pytest.mark.parametrize("value", [1.0, -0.1, "0.1", True])
def test_dropout_rate_outside_unit_interval_is_a_config_error(family: str, field: str, value: Any) -> None:
    config = {**CONFIGS[family], field: value}
    with pytest.raises(ConfigError, match=f"'{field}' must be a dropout probability in \\[0, 1\\)"):
        resolve_family("decoder" if family == "llama" else family).resolve(config)


def test_specs_record_dropout_rates() -> None:
    bert = resolve_family("bert").resolve(published_config("google-bert/bert-base-uncased"))
    assert (bert.hidden_dropout_prob, bert.attention_probs_dropout_prob) == (0.1, 0.1)
    gpt2 = resolve_family("gpt2").resolve({**CONFIGS["gpt2"], "resid_pdrop": 0.3})
    assert (gpt2.embd_pdrop, gpt2.attn_pdrop, gpt2.resid_pdrop) == (0.0, 0.0, 0.3)
    llama = resolve_family("decoder").resolve({**CONFIGS["llama"], "attention_dropout": 0.25})
    assert llama.attention_dropout == 0.25
    vit = resolve_family("vit").resolve({**CONFIGS["vit"], "hidden_dropout_prob": 0.5})
    assert (vit.hidden_dropout_prob, vit.attention_probs_dropout_prob) == (0.5, 0.0)
