"""ViT (transformers ``ViTForImageClassification`` / ``ViTModel``): patch embedding, CLS token, pre-LN
encoder, NHWC images.

Target paths (what ``mappings/vit.yaml`` fills)::

    patch_embed.{kernel,bias}                     conv with kernel = stride = patch size (HWIO)
    cls_token [hidden], pos_embed [patches + 1, hidden]
    layers.N.layernorm_before.{scale,bias}, layers.N.layernorm_after.{scale,bias}
    layers.N.attn.qkv.{kernel,bias}               fused: kernel [hidden, 3 * heads * head_dim]
    layers.N.attn.o.{kernel,bias}
    layers.N.mlp.fc1.{kernel,bias}, layers.N.mlp.fc2.{kernel,bias}
    layernorm.{scale,bias}
    classifier.{kernel,bias}                      (ViTForImageClassification with num_labels > 0)
    pooler.dense.{kernel,bias}                    (ViTModel saved with its pooler)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxport.errors import ConfigError
from nnxport.models.base import Family, ParityInput, Tolerance
from nnxport.models.layers import ACTIVATIONS, attention

CLASSIFIER = "ViTForImageClassification"
BASE = "ViTModel"


def _layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # torch computes the variance in two passes; flax's fast variance (E[x²] - E[x]²) loses digits.
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with one fused q/k/v projection (q, k, v in that order on the output
    axis)."""

    def __init__(self, hidden: int, heads: int, head_dim: int, qkv_bias: bool, *, rngs: nnx.Rngs):
        self.heads = heads
        self.head_dim = head_dim
        self.qkv = nnx.Linear(hidden, 3 * heads * head_dim, use_bias=qkv_bias, rngs=rngs)
        self.o = nnx.Linear(heads * head_dim, hidden, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        shape = (b, t, self.heads, self.head_dim)
        mask = jnp.ones((1, 1, t, t), dtype=bool)
        out = attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), mask)
        return self.o(out.reshape(b, t, self.heads * self.head_dim))


class Mlp(nnx.Module):
    def __init__(self, hidden: int, intermediate: int, act: str, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(hidden, intermediate, rngs=rngs)
        self.fc2 = nnx.Linear(intermediate, hidden, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class Layer(nnx.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, hidden: int, heads: int, head_dim: int, intermediate: int, act: str, eps: float,
                 qkv_bias: bool, *, rngs: nnx.Rngs):
        self.layernorm_before = _layer_norm(hidden, eps, rngs)
        self.attn = Attention(hidden, heads, head_dim, qkv_bias, rngs=rngs)
        self.layernorm_after = _layer_norm(hidden, eps, rngs)
        self.mlp = Mlp(hidden, intermediate, act, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.layernorm_before(x))
        return x + self.mlp(self.layernorm_after(x))


class Pooler(nnx.Module):
    """ViTModel's pooler: dense + activation on the CLS token."""

    def __init__(self, hidden: int, out: int, act: str, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(hidden, out, rngs=rngs)
        self.act = act

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.act](self.dense(hidden_states[:, 0]))


class ViT(nnx.Module):
    """Vision Transformer on NHWC float images. ``__call__`` gives the classifier's logits (the final [CLS]
    state when ``num_labels`` is 0); :meth:`encode` the final hidden states [batch, patches + 1, hidden].
    ``image_classifier`` is False for ViTModel (outputs: hidden states and, with a pooler, its output)."""

    def __init__(
        self,
        *,
        image_size: tuple[int, int],
        patch_size: tuple[int, int],
        num_channels: int,
        hidden_size: int,
        num_hidden_layers: int,
        num_attention_heads: int,
        head_dim: int,
        intermediate_size: int,
        hidden_act: str,
        layer_norm_eps: float,
        qkv_bias: bool,
        image_classifier: bool,
        num_labels: int,
        pooler: tuple[int, str] | None,
        rngs: nnx.Rngs,
    ):
        self.image_classifier = image_classifier
        num_patches = (image_size[0] // patch_size[0]) * (image_size[1] // patch_size[1])
        self.patch_embed = nnx.Conv(num_channels, hidden_size, patch_size, strides=patch_size,
                                    padding="VALID", rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((hidden_size,), jnp.float32))
        self.pos_embed = nnx.Param(jnp.zeros((num_patches + 1, hidden_size), jnp.float32))
        self.layers = nnx.List([
            Layer(hidden_size, num_attention_heads, head_dim, intermediate_size, hidden_act, layer_norm_eps,
                  qkv_bias, rngs=rngs)
            for _ in range(num_hidden_layers)
        ])
        self.layernorm = _layer_norm(hidden_size, layer_norm_eps, rngs)
        self.classifier = nnx.Linear(hidden_size, num_labels, rngs=rngs) if num_labels > 0 else None
        self.pooler = Pooler(hidden_size, pooler[0], pooler[1], rngs=rngs) if pooler is not None else None

    def encode(self, pixel_values: jax.Array) -> jax.Array:
        x = self.patch_embed(pixel_values)                    # [B, H/p, W/p, hidden], row-major patches
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
        for layer in self.layers:
            x = layer(x)
        return self.layernorm(x)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cls = self.encode(pixel_values)[:, 0]
        return cls if self.classifier is None else self.classifier(cls)


def _pair(config: Mapping[str, Any], field: str, default: int) -> tuple[int, int]:
    value = config.get(field, default)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, value
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return value[0], value[1]
    raise ConfigError(f"config.json: field '{field}' must be a positive integer or a [height, width] pair, "
                      f"got {value!r}")


def is_base_model(config: Mapping[str, Any]) -> bool:
    """Whether config.json describes the headless ViTModel (no architectures counts as one)."""
    archs = config.get("architectures") or []
    return CLASSIFIER not in archs


def num_labels(config: Mapping[str, Any]) -> int:
    """Size of the classification head: 0 for ViTModel, else transformers' rule: ``len(id2label)``, or
    ``num_labels`` (default 2)."""
    if is_base_model(config):
        return 0
    if "id2label" in config and isinstance(config["id2label"], dict):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


def _int(config: Mapping[str, Any], field: str, default: int, *, minimum: int = 1) -> int:
    value = config.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"config.json: field '{field}' must be an integer >= {minimum}, got {value!r}")
    return value


def _head_dim(config: Mapping[str, Any]) -> int:
    if "head_dim" in config:  # ViTAttention reads it when present
        return int(config["head_dim"])
    return int(config.get("hidden_size", 768)) // int(config.get("num_attention_heads", 12))


class ViTFamily(Family):
    name = "vit"
    description = "Vision Transformer (transformers ViTForImageClassification / ViTModel)"
    mappings = ("vit",)
    published: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "google/vit-base-patch16-224": {
            "architectures": [CLASSIFIER], "model_type": "vit",
            "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02, "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16,
            "num_channels": 3, "qkv_bias": True, "num_labels": 1000,
        },
    }
    batch = 2
    channels_first_reference = True

    layer_keys: ClassVar[Mapping[str, str]] = {
        "num_hidden_layers": r"^(?:vit\.)?encoder\.layer\.(\d{1,9})\.",
    }

    def check_config(self, config: Mapping[str, Any]) -> None:
        archs = config.get("architectures") or []
        if archs and not {CLASSIFIER, BASE} & set(archs):
            raise ConfigError(f"config.json: field 'architectures' {archs!r} is not supported by nnxport's "
                              f"vit family (supported: {CLASSIFIER}, {BASE})")
        hidden = _int(config, "hidden_size", 768)
        heads = _int(config, "num_attention_heads", 12)
        for field, default in (("num_hidden_layers", 12), ("intermediate_size", 3072), ("num_channels", 3)):
            _int(config, field, default)
        if "head_dim" in config:
            _int(config, "head_dim", 64)
        elif hidden % heads:
            raise ConfigError(f"config.json: field 'num_attention_heads' ({heads}) must divide "
                              f"'hidden_size' ({hidden})")
        image, patch = _pair(config, "image_size", 224), _pair(config, "patch_size", 16)
        if image[0] < patch[0] or image[1] < patch[1]:
            raise ConfigError(f"config.json: field 'patch_size' {list(patch)} is larger than 'image_size' "
                              f"{list(image)}")
        for field, act in (("hidden_act", config.get("hidden_act", "gelu")),
                           ("pooler_act", config.get("pooler_act", "tanh"))):
            if act not in ACTIVATIONS:
                raise ConfigError(f"config.json: field '{field}' {act!r} is not supported "
                                  f"(supported: {', '.join(sorted(ACTIVATIONS))})")
        qkv_bias = config.get("qkv_bias", True)
        if not isinstance(qkv_bias, bool):
            raise ConfigError(f"config.json: field 'qkv_bias' must be true or false, got {qkv_bias!r}")
        if config.get("pooler_output_size") is not None:
            _int(config, "pooler_output_size", hidden)
        eps = config.get("layer_norm_eps", 1e-12)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
            raise ConfigError(f"config.json: field 'layer_norm_eps' must be a positive number, got {eps!r}")
        if "id2label" not in config:
            _int(config, "num_labels", 2, minimum=0)

    def options(self, config: Mapping[str, Any], keys: Collection[str]) -> dict[str, Any]:
        """``pooler``: whether a ViTModel checkpoint carries its pooler (``pooler.dense.weight``)."""
        if not is_base_model(config):
            return {"pooler": False}
        return {"pooler": any(k == "pooler.dense.weight" or k.endswith(".pooler.dense.weight") for k in keys)}

    def build(self, config: Mapping[str, Any], rngs: nnx.Rngs, options: Mapping[str, Any]) -> nnx.Module:
        self.check_config(config)
        hidden = int(config.get("hidden_size", 768))
        pooler = None
        if is_base_model(config) and options.get("pooler", True):
            pooler = (int(config.get("pooler_output_size") or hidden), str(config.get("pooler_act", "tanh")))
        return ViT(
            image_size=_pair(config, "image_size", 224),
            patch_size=_pair(config, "patch_size", 16),
            num_channels=int(config.get("num_channels", 3)),
            hidden_size=hidden,
            num_hidden_layers=int(config.get("num_hidden_layers", 12)),
            num_attention_heads=int(config.get("num_attention_heads", 12)),
            head_dim=_head_dim(config),
            intermediate_size=int(config.get("intermediate_size", 3072)),
            hidden_act=str(config.get("hidden_act", "gelu")),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            qkv_bias=bool(config.get("qkv_bias", True)),
            image_classifier=not is_base_model(config),
            num_labels=num_labels(config),
            pooler=pooler,
            rngs=rngs,
        )

    def reference_class(self, config: Mapping[str, Any], options: Mapping[str, Any]) -> str:
        return BASE if is_base_model(config) else CLASSIFIER

    def reference_kwargs(self, config: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
        if is_base_model(config):
            return {"add_pooling_layer": bool(options.get("pooler", True))}
        return {}

    def parity_inputs(self, config: Mapping[str, Any], seed: int) -> list[ParityInput]:
        rng = np.random.default_rng(seed)
        height, width = _pair(config, "image_size", 224)
        shape = (self.batch, height, width, int(config.get("num_channels", 3)))
        return [ParityInput("pixel_values", rng.standard_normal(shape, dtype=np.float32), seed)]

    def run_nnx(self, model: nnx.Module, inputs: list[ParityInput]) -> dict[str, np.ndarray]:
        assert isinstance(model, ViT)
        x = jnp.asarray(inputs[0].value)
        if model.image_classifier:
            return {"logits": np.asarray(nnx.jit(lambda m, x: m(x))(model, x))}

        def base(m: ViT, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
            hidden = m.encode(x)
            return hidden, (None if m.pooler is None else m.pooler(hidden))

        hidden, pooled = nnx.jit(base)(model, x)
        out = {"last_hidden_state": np.asarray(hidden)}
        if pooled is not None:
            out["pooler_output"] = np.asarray(pooled)
        return out

    def run_reference(self, model: Any, inputs: list[ParityInput]) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(inputs[0].value.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
        with torch.no_grad():
            out = model(pixel_values=x)
        if hasattr(out, "logits"):
            return {"logits": out.logits.float().numpy()}
        result = {"last_hidden_state": out.last_hidden_state.float().numpy()}
        if out.pooler_output is not None:
            result["pooler_output"] = out.pooler_output.float().numpy()
        return result

    def tolerance(self, dtype: str) -> Tolerance:
        # Measured on CPU with random replicas (2 and 12 layers, hidden 64-128, initializer_range 0.02 and
        # 0.1): fp32 max |Δ| <= 4.6e-6 (relative 1.1e-6); weights cast to bf16 vs the fp32 reference
        # max |Δ| <= 0.85% of max |ref|, fp16 <= 0.09%. Checkpoints stored in bf16 compare at fp32 level
        # (the model computes in fp32 from the same rounded weights).
        if dtype == "bfloat16":
            return Tolerance(atol=2e-2, rtol=2e-2, atol_relative=True)
        if dtype == "float16":
            return Tolerance(atol=5e-3, rtol=5e-3, atol_relative=True)
        return Tolerance(atol=1e-4, rtol=1e-3)


FAMILY = ViTFamily()
