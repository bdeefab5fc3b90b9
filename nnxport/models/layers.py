"""Building blocks shared by the families: activations, LayerNorm and attention with torch's numerics."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

#: transformers' ACT2FN names -> jax functions with the same definition.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


def torch_layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """An ``nnx.LayerNorm`` with torch's numerics: the variance in two passes, E[(x - mean)²] (flax's fast
    variance, E[x²] - E[x]², loses digits).

    Args:
        dim: the normalised (last) dimension.
        eps: ``layer_norm_eps`` / ``layer_norm_epsilon`` of config.json.
        rngs: random streams (scale and bias are initialised to ones and zeros).
    """
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


def attention_mask(mask: jax.Array | None, length: int, *, causal: bool,
                   sliding_window: int | None = None) -> jax.Array:
    """Boolean [batch or 1, 1, length, length] mask, True where query i may attend to key j.

    ``mask`` is the [batch, length] padding mask (1 = token). ``causal`` adds ``j <= i``;
    ``sliding_window`` W (with causal) keeps only the last W keys, ``i - j < W`` (transformers' rule).
    """
    i = jnp.arange(length)[:, None]
    j = jnp.arange(length)[None, :]
    allowed = jnp.ones((length, length), dtype=bool)
    if causal:
        allowed = j <= i
        if sliding_window is not None:
            allowed = allowed & (i - j < sliding_window)
    allowed = allowed[None, None]
    if mask is not None:
        allowed = allowed & (mask.astype(bool)[:, None, None, :])
    return allowed


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
              scale: float | None = None) -> jax.Array:
    """Softmax attention in float32. q [B, T, H, D]; k, v [B, S, KV, D] with H a multiple of KV
    (grouped-query attention repeats each key/value head H/KV times); mask [B|1, 1|H, T, S] bool.
    Returns [B, T, H, D] in q's dtype."""
    dtype = q.dtype
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads != kv_heads:
        k = jnp.repeat(k, heads // kv_heads, axis=2)
        v = jnp.repeat(v, heads // kv_heads, axis=2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q32, k32, v32 = (t.astype(jnp.float32) for t in (q, k, v))
    scores = jnp.einsum("bthd,bshd->bhts", q32, k32) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", weights, v32).astype(dtype)
