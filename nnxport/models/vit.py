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
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxport.errors import ConfigError
from nnxport.models.base import (
    Family,
    ParityHarness,
    ParityInput,
    Tolerance,
    int_field,
    positive_float_field,
    rate_field,
)
from nnxport.models.base import num_labels as _num_labels
from nnxport.models.layers import ACTIVATIONS, COLUMN, ROW, attention, dropout, sharded, torch_layer_norm
from nnxport.models.resize import bicubic_resize

CLASSIFIER = "ViTForImageClassification"
BASE = "ViTModel"


# ------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class ViTSpec:
    """Everything the NNX model needs, resolved from config.json (see :func:`resolve`).

    Attributes:
        image_size: (height, width) of the input images.
        patch_size: (height, width) of a patch (the patch embedding's kernel and stride).
        num_channels: input image channels.
        hidden_size: hidden size.
        num_hidden_layers: number of encoder layers.
        num_attention_heads: attention heads.
        head_dim: per-head size (config.json's ``head_dim``, else ``hidden_size / num_attention_heads``).
        intermediate_size: MLP hidden size.
        hidden_act: transformers' activation name of the MLP.
        layer_norm_eps: LayerNorm epsilon.
        qkv_bias: the fused q/k/v projection has a bias.
        image_classifier: the model is ``ViTForImageClassification`` (False: ``ViTModel``).
        num_labels: classifier outputs; 0 without a classifier.
        pooler_output_size: the pooler's output size (config.json's ``pooler_output_size``, else hidden).
        pooler_act: transformers' activation name of the pooler.
        hidden_dropout_prob: dropout after the embeddings and after each attention output and MLP (train
            mode only).
        attention_probs_dropout_prob: dropout on the attention probabilities (train mode only).
    """

    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    num_channels: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    qkv_bias: bool
    image_classifier: bool
    num_labels: int
    pooler_output_size: int
    pooler_act: str
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0

    @property
    def num_patches(self) -> int:
        """Patches per image (the sequence is one longer: the CLS token)."""
        return (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])


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
    return _num_labels(config, base_model=is_base_model(config))


def _head_dim(config: Mapping[str, Any]) -> int:
    if "head_dim" in config:  # ViTAttention reads it when present
        return int(config["head_dim"])
    return int(config.get("hidden_size", 768)) // int(config.get("num_attention_heads", 12))


def resolve(config: Mapping[str, Any]) -> ViTSpec:
    """The :class:`ViTSpec` of ``config``; ConfigError naming the field for anything not implemented."""
    archs = config.get("architectures") or []
    if archs and not {CLASSIFIER, BASE} & set(archs):
        raise ConfigError(f"config.json: field 'architectures' {archs!r} is not supported by nnxport's "
                          f"vit family (supported: {CLASSIFIER}, {BASE})")
    hidden = int_field(config, "hidden_size", 768)
    heads = int_field(config, "num_attention_heads", 12)
    layers = int_field(config, "num_hidden_layers", 12)
    intermediate = int_field(config, "intermediate_size", 3072)
    channels = int_field(config, "num_channels", 3)
    if "head_dim" in config:
        int_field(config, "head_dim", 64)
    elif hidden % heads:
        raise ConfigError(f"config.json: field 'num_attention_heads' ({heads}) must divide "
                          f"'hidden_size' ({hidden})")
    image, patch = _pair(config, "image_size", 224), _pair(config, "patch_size", 16)
    if image[0] < patch[0] or image[1] < patch[1]:
        raise ConfigError(f"config.json: field 'patch_size' {list(patch)} is larger than 'image_size' "
                          f"{list(image)}")
    acts = {"hidden_act": config.get("hidden_act", "gelu"), "pooler_act": config.get("pooler_act", "tanh")}
    for field, act in acts.items():
        if act not in ACTIVATIONS:
            raise ConfigError(f"config.json: field '{field}' {act!r} is not supported "
                              f"(supported: {', '.join(sorted(ACTIVATIONS))})")
    qkv_bias = config.get("qkv_bias", True)
    if not isinstance(qkv_bias, bool):
        raise ConfigError(f"config.json: field 'qkv_bias' must be true or false, got {qkv_bias!r}")
    if config.get("pooler_output_size") is not None:
        int_field(config, "pooler_output_size", hidden)
    eps = positive_float_field(config, "layer_norm_eps", 1e-12)
    if "id2label" not in config:
        int_field(config, "num_labels", 2, minimum=0)
    return ViTSpec(
        image_size=image, patch_size=patch, num_channels=channels, hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=heads, head_dim=_head_dim(config),
        intermediate_size=intermediate, hidden_act=str(acts["hidden_act"]), layer_norm_eps=eps,
        qkv_bias=qkv_bias, image_classifier=not is_base_model(config), num_labels=num_labels(config),
        pooler_output_size=int(config.get("pooler_output_size") or hidden),
        pooler_act=str(acts["pooler_act"]),
        hidden_dropout_prob=rate_field(config, "hidden_dropout_prob", 0.0),
        attention_probs_dropout_prob=rate_field(config, "attention_probs_dropout_prob", 0.0),
    )


# -------------------------------------------------------------------------------------------- model

class Attention(nnx.Module):
    """Multi-head self-attention with one fused q/k/v projection (q, k, v in that order on the output
    axis).

    Args:
        spec: the model's spec (``hidden_size``, heads, ``head_dim``, ``qkv_bias``).
        rngs: random streams.
    """

    def __init__(self, spec: ViTSpec, *, rngs: nnx.Rngs):
        self.heads = spec.num_attention_heads
        self.head_dim = spec.head_dim
        inner = self.heads * self.head_dim
        self.qkv = nnx.Linear(spec.hidden_size, 3 * inner, use_bias=spec.qkv_bias,
                              kernel_metadata=sharded(COLUMN), rngs=rngs)
        self.o = nnx.Linear(inner, spec.hidden_size, kernel_metadata=sharded(ROW), rngs=rngs)
        self.dropout = dropout(spec.attention_probs_dropout_prob, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Attend (every token to every token) and project back.

        Args:
            x: hidden states [B, T, hidden_size].
        """
        b, t, _ = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        shape = (b, t, self.heads, self.head_dim)
        mask = jnp.ones((1, 1, t, t), dtype=bool)
        out = attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), mask, dropout=self.dropout)
        return self.o(out.reshape(b, t, self.heads * self.head_dim))


class Mlp(nnx.Module):
    """``fc2(act(fc1(x)))``.

    Args:
        spec: the model's spec (``hidden_size``, ``intermediate_size``, ``hidden_act``).
        rngs: random streams.
    """

    def __init__(self, spec: ViTSpec, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(spec.hidden_size, spec.intermediate_size, kernel_metadata=sharded(COLUMN),
                              rngs=rngs)
        self.fc2 = nnx.Linear(spec.intermediate_size, spec.hidden_size, kernel_metadata=sharded(ROW),
                              rngs=rngs)
        self.act = spec.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the MLP.

        Args:
            x: hidden states [..., hidden_size].
        """
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class Layer(nnx.Module):
    """Pre-LN transformer block: x + drop(attn(ln(x))), then x + drop(mlp(ln(x))).

    Args:
        spec: the model's spec.
        rngs: random streams.
    """

    def __init__(self, spec: ViTSpec, *, rngs: nnx.Rngs):
        self.layernorm_before = torch_layer_norm(spec.hidden_size, spec.layer_norm_eps, rngs)
        self.attn = Attention(spec, rngs=rngs)
        self.layernorm_after = torch_layer_norm(spec.hidden_size, spec.layer_norm_eps, rngs)
        self.mlp = Mlp(spec, rngs=rngs)
        self.dropout = dropout(spec.hidden_dropout_prob, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the block.

        Args:
            x: hidden states [B, T, hidden_size].
        """
        x = x + self.dropout(self.attn(self.layernorm_before(x)))
        return x + self.dropout(self.mlp(self.layernorm_after(x)))


class Pooler(nnx.Module):
    """ViTModel's pooler: dense + activation on the CLS token.

    Args:
        spec: the model's spec (``hidden_size``, ``pooler_output_size``, ``pooler_act``).
        rngs: random streams.
    """

    def __init__(self, spec: ViTSpec, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(spec.hidden_size, spec.pooler_output_size, rngs=rngs)
        self.act = spec.pooler_act

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        """The pooled output [B, pooler_output_size].

        Args:
            hidden_states: the encoder's output [B, T, hidden_size].
        """
        return ACTIVATIONS[self.act](self.dense(hidden_states[:, 0]))


class ViT(nnx.Module):
    """Vision Transformer on NHWC float images (transformers' ``ViTForImageClassification`` /
    ``ViTModel``).

    ``__call__`` gives the classifier's logits (the final [CLS] state when ``num_labels`` is 0);
    :meth:`encode` the final hidden states [batch, patches + 1, hidden]. ``image_classifier`` is False for
    ViTModel (outputs: hidden states and, with a pooler, its output).

    Args:
        spec: the resolved config (:func:`resolve`).
        pooler: whether a ``ViTModel`` has its pooler (the family's ``pooler`` option); a
            ``ViTForImageClassification`` has none.
        rngs: random streams for the initialisers.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from nnxport.models.vit import ViT, resolve
        >>> spec = resolve({"architectures": ["ViTForImageClassification"], "hidden_size": 32,
        ...                 "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
        ...                 "image_size": 32, "patch_size": 8, "num_labels": 10})
        >>> model = ViT(spec, rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 32, 32, 3))).shape
        (2, 10)
    """

    def __init__(self, spec: ViTSpec, *, pooler: bool = True, rngs: nnx.Rngs):
        self.image_classifier = spec.image_classifier
        self.image_size, self.patch_size = spec.image_size, spec.patch_size
        hidden = spec.hidden_size
        self.patch_embed = nnx.Conv(spec.num_channels, hidden, spec.patch_size, strides=spec.patch_size,
                                    padding="VALID", rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((hidden,), jnp.float32))
        self.pos_embed = nnx.Param(jnp.zeros((spec.num_patches + 1, hidden), jnp.float32))
        self.dropout = dropout(spec.hidden_dropout_prob, rngs)
        self.layers = nnx.List([Layer(spec, rngs=rngs) for _ in range(spec.num_hidden_layers)])
        self.layernorm = torch_layer_norm(hidden, spec.layer_norm_eps, rngs)
        self.classifier = nnx.Linear(hidden, spec.num_labels, rngs=rngs) if spec.num_labels > 0 else None
        has_pooler = pooler and not spec.image_classifier
        self.pooler = Pooler(spec, rngs=rngs) if has_pooler else None

    def position_embeddings(self, height: int, width: int, interpolate_pos_encoding: bool) -> jax.Array:
        """The position embeddings [patches + 1, hidden] for images of ``height`` x ``width``.

        Without ``interpolate_pos_encoding`` the images must have the config's ``image_size`` (a
        ValueError naming both sizes otherwise, as transformers raises). With it, the patch part of the
        table is resized to the image's patch grid as transformers' ``ViTEmbeddings.interpolate_pos_encoding``
        does: torch's bicubic (a = -0.75, ``align_corners=False``, no antialiasing), the CLS row kept; an
        image whose grid is the native one and that is square gets the table unchanged.
        """
        table = self.pos_embed[...]
        if not interpolate_pos_encoding:
            if (height, width) != tuple(self.image_size):
                raise ValueError(f"input image size ({height}*{width}) doesn't match the model's "
                                 f"({self.image_size[0]}*{self.image_size[1]}); call the model with "
                                 "interpolate_pos_encoding=True to run at other sizes")
            return table
        (ph, pw), (ih, iw) = self.patch_size, self.image_size
        grid, native = (height // ph, width // pw), (ih // ph, iw // pw)
        if grid == native and height == width:
            return table
        patches = table[1:].reshape(*native, table.shape[-1])
        resized = bicubic_resize(patches, grid)
        return jnp.concatenate([table[:1], resized.reshape(-1, table.shape[-1])], axis=0)

    def encode(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> jax.Array:
        """The final hidden states (after ``layernorm``).

        Args:
            pixel_values: NHWC float images [B, height, width, num_channels]: the config's
                ``image_size``, or any size at least one patch with ``interpolate_pos_encoding``.
            interpolate_pos_encoding: resize the position embeddings to the image's patch grid
                (:meth:`position_embeddings`), as transformers' argument of that name.

        Returns:
            [B, patches + 1, hidden_size]: the CLS token first, then the patches in row-major order.
        """
        pos = self.position_embeddings(pixel_values.shape[1], pixel_values.shape[2], interpolate_pos_encoding)
        x = self.patch_embed(pixel_values)                    # [B, H/p, W/p, hidden], row-major patches
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = self.dropout(jnp.concatenate([cls, x], axis=1) + pos)
        for layer in self.layers:
            x = layer(x)
        return self.layernorm(x)

    def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> jax.Array:
        """Logits [B, num_labels], or the final [CLS] state [B, hidden_size] without a classifier.

        Args:
            pixel_values: NHWC float images [B, height, width, num_channels].
            interpolate_pos_encoding: run at a size other than the config's ``image_size``
                (:meth:`position_embeddings`).
        """
        cls = self.encode(pixel_values, interpolate_pos_encoding)[:, 0]
        return cls if self.classifier is None else self.classifier(cls)


# ------------------------------------------------------------------------------------------- family

class ViTParity(ParityHarness):
    """ViT parity: two seeded NHWC images at the config's ``image_size`` (NCHW for the reference);
    logits, or the base model's hidden states and pooler output."""

    batch = 2
    channels_first_reference = True

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


class ViTFamily(Family):
    """The ``vit`` family: config.json of ``model_type: vit`` -> :class:`ViTSpec` -> :class:`ViT`.

    Mapping: ``mappings/vit.yaml``; parity: :class:`ViTParity`; tests: tests/e2e/test_family_vit.py.
    """

    name = "vit"
    description = "Vision Transformer (transformers ViTForImageClassification / ViTModel)"
    mappings = ("vit",)
    layer_keys: ClassVar[Mapping[str, str]] = {
        "num_hidden_layers": r"^(?:vit\.)?encoder\.layer\.(\d{1,9})\.",
    }
    parity = ViTParity()

    def resolve(self, config: Mapping[str, Any]) -> ViTSpec:
        """See :func:`resolve`."""
        return resolve(config)

    def options(self, config: Mapping[str, Any], keys: Collection[str]) -> dict[str, Any]:
        """``pooler``: whether a ViTModel checkpoint carries its pooler (``pooler.dense.weight``)."""
        if not is_base_model(config):
            return {"pooler": False}
        return {"pooler": any(k == "pooler.dense.weight" or k.endswith(".pooler.dense.weight") for k in keys)}

    def build(self, config: Mapping[str, Any], rngs: nnx.Rngs, options: Mapping[str, Any]) -> ViT:
        return ViT(resolve(config), pooler=bool(options.get("pooler", True)), rngs=rngs)


FAMILY = ViTFamily()
