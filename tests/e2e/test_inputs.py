"""Inputs a model cannot take fail clearly; ViT runs at other image sizes as transformers'
``interpolate_pos_encoding=True`` does (parity at non-native sizes)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnxport
from nnxport.models.bert import Bert
from nnxport.models.bert import resolve as bert_spec
from nnxport.models.decoder import Decoder
from nnxport.models.decoder import resolve as decoder_spec
from nnxport.models.gpt2 import GPT2
from nnxport.models.gpt2 import resolve as gpt2_spec
from nnxport.models.resize import bicubic_matrix, bicubic_resize
from nnxport.testing.replicas import build_replica, published_config

VIT = published_config("google/vit-base-patch16-224", hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8, num_labels=5,
                       initializer_range=0.1)


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nnx.Module]:
    """A tiny ViTForImageClassification replica (32x32, patch 8) and its converted model."""
    root = tmp_path_factory.mktemp("vit-sizes")
    src = build_replica(VIT, root / "src", seed=4)
    nnxport.convert(src, root / "out", parity=False)
    return src, nnxport.load(root / "out")


@pytest.mark.parametrize(("height", "width"), [(48, 48), (40, 56), (16, 24), (32, 48), (32, 32)])
def test_vit_interpolated_position_embeddings_match_transformers(vit: tuple[Path, nnx.Module], height: int,
                                                                 width: int) -> None:
    import torch
    import transformers

    src, model = vit
    ref = transformers.ViTForImageClassification.from_pretrained(src).eval()
    x = np.random.default_rng(height * width).standard_normal((2, height, width, 3), dtype=np.float32)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                   interpolate_pos_encoding=True).logits.numpy()
    got = np.asarray(nnx.jit(lambda m, x: m(x, interpolate_pos_encoding=True))(model, jnp.asarray(x)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
    if (height, width) != (32, 32):  # without interpolation the logits differ (the table is resized)
        table = model.position_embeddings(height, width, True)  # type: ignore[attr-defined]
        assert table.shape == ((height // 8) * (width // 8) + 1, 32)


def test_vit_other_size_without_interpolation_is_a_clear_error(vit: tuple[Path, nnx.Module]) -> None:
    _, model = vit
    with pytest.raises(ValueError, match=r"input image size \(48\*40\) doesn't match the model's \(32\*32\); "
                                         r"call the model with interpolate_pos_encoding=True"):
        nnx.jit(lambda m, x: m(x))(model, jnp.zeros((1, 48, 40, 3)))


@pytest.mark.parametrize(("size_in", "size_out"), [(4, 6), (4, 5), (4, 2), (14, 24), (14, 9), (3, 3), (1, 4)])
def test_bicubic_is_torch_bicubic(size_in: int, size_out: int) -> None:
    """torch's a = -0.75 kernel with clamped taps, align_corners=False (jax.image.resize's cubic is not)."""
    import torch

    rng = np.random.default_rng(size_in * 31 + size_out)
    x = rng.standard_normal((size_in, size_in + 1, 5)).astype(np.float32)
    nchw = torch.from_numpy(x).permute(2, 0, 1)[None]
    want = torch.nn.functional.interpolate(nchw, size=(size_out, size_out + 2), mode="bicubic",
                                           align_corners=False)[0].permute(1, 2, 0).numpy()
    got = np.asarray(bicubic_resize(jnp.asarray(x), (size_out, size_out + 2)))
    np.testing.assert_allclose(got, want, atol=5e-6, rtol=1e-5)
    np.testing.assert_allclose(bicubic_matrix(size_in, size_out).sum(axis=1), 1.0, atol=1e-12)


# ------------------------------------------------------------------------------------- text inputs

@functools.cache
def _models() -> dict[str, Any]:
    rngs = nnx.Rngs(0)
    gpt2 = {"n_embd": 32, "n_head": 4, "n_layer": 1, "vocab_size": 100, "n_positions": 16}
    bert = {"architectures": ["BertForMaskedLM"], "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 100,
            "max_position_embeddings": 16}
    return {
        "gpt2": GPT2(gpt2_spec(gpt2), rngs=rngs),
        "bert": Bert(bert_spec(bert), rngs=rngs),
        "llama": Decoder(decoder_spec({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4,
                                       "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 100}),
                         rngs=rngs),
    }


@pytest.mark.parametrize(("name", "field"), [("gpt2", "n_positions"), ("bert", "max_position_embeddings")])
def test_sequence_longer_than_the_position_table_raises_when_traced(name: str, field: str) -> None:
    model = _models()[name]
    message = rf"input length 17 exceeds the model's position table: config.json '{field}' is 16"
    with pytest.raises(ValueError, match=message):
        nnx.jit(lambda m, ids: m(ids))(model, jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match=message):
        nnxport.check_inputs(model, np.zeros((1, 17), np.int32))
    assert nnx.jit(lambda m, ids: m(ids))(model, jnp.zeros((1, 16), jnp.int32)).shape[:2] == (1, 16)


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize(("bad", "where"), [(100, "[1, 2]"), (-1, "[1, 2]"), (12345, "[1, 2]")])
def test_out_of_vocabulary_ids_raise_in_eager_calls(name: str, bad: int, where: str) -> None:
    model = _models()[name]
    ids = np.arange(8, dtype=np.int32).reshape(2, 4)
    ids[1, 2] = bad
    message = rf"input_ids\{where[:-1]}\] is {bad}, outside the vocabulary \[0, 100\) \(vocab_size 100\)"
    with pytest.raises(ValueError, match=message):
        model(jnp.asarray(ids))
    with pytest.raises(ValueError, match=message):  # the check to run before a jitted call
        nnxport.check_inputs(model, ids)
    ids[1, 2] = 99
    nnxport.check_inputs(model, ids)
    assert model(jnp.asarray(ids)).shape == (2, 4) + ((32,) if name == "bert" else (100,))


def test_check_inputs_refuses_other_models_and_shapes() -> None:
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, length\], got shape \[4\]"):
        nnxport.check_inputs(_models()["gpt2"], np.zeros(4, np.int32))
    with pytest.raises(TypeError, match="not one of nnxport's text models"):
        nnxport.check_inputs(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), np.zeros((1, 4), np.int32))
