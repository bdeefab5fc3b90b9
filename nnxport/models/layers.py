"""Building blocks shared by the families: activations, LayerNorm and attention with torch's numerics,
and the default sharding annotations of their parameters."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

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


#: Megatron-style default layouts of ``[in, out]`` kernels and ``[rows, features]`` embeddings, in the mesh
#: axis names nnxport uses (``--mesh data=2,model=4``): the big dimension over ``model``, the other over
#: ``data``. Column-parallel projections (q, k, v, gate, up, fc1, LM heads) split their output features.
COLUMN = ("data", "model")
#: Row-parallel projections (o, down, fc2) split their input features.
ROW = ("model", "data")
#: Token embeddings split their vocabulary rows.
EMBEDDING = ("model", "data")


def sharded(axes: tuple[str | None, ...]) -> dict[str, Any]:
    """Variable metadata annotating a parameter's default layout, for ``kernel_metadata`` /
    ``embedding_metadata`` of nnx.Linear / nnx.Embed (``nnx.get_partition_spec`` reads it).

    The annotation is metadata only (``eager_sharding`` off): the models are built under
    ``nnx.eval_shape`` without a mesh, and nnxport places every array itself. A conversion with ``--mesh``
    lays each target out as annotated unless its mapping rule's ``shard`` says otherwise; an axis the mesh
    does not have, or one that does not divide the dimension, leaves that dimension whole.

    Args:
        axes: per dimension, a mesh axis name or None (whole).

    Returns:
        ``{"out_sharding": axes, "eager_sharding": False}``.
    """
    return {"out_sharding": axes, "eager_sharding": False}


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
    Returns [B, T, H, D] in q's dtype. A query that may attend to no key (a padded position under a sliding
    window) outputs zeros, as torch's scaled_dot_product_attention does."""
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
    weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)
    return jnp.einsum("bhts,bshd->bthd", weights, v32).astype(dtype)


# ------------------------------------------------------------------------------------ KV cache

#: Cache buffers hold a multiple of this many positions (prompt + new tokens, rounded up), so that the
#: compiled prefill and step functions are reused across prompts and lengths within one bucket.
CACHE_BUCKET = 64


def bucket_length(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`CACHE_BUCKET` (at least one bucket)."""
    return max(1, -(-n // CACHE_BUCKET)) * CACHE_BUCKET


def generation_positions(mask: jax.Array) -> jax.Array:
    """Position ids of a padded batch as transformers' generate makes them: ``cumsum(mask) - 1``, with
    padded positions set to 0 (so left padding starts each row's tokens at position 0)."""
    mask = mask.astype(jnp.int32)
    return jnp.where(mask == 0, 0, jnp.cumsum(mask, axis=-1) - 1)


class KVCache(NamedTuple):
    """A fixed-size key/value cache (a pytree): per layer ``[B, max_len, kv_heads, head_dim]`` buffers,
    which slots hold a token (``valid`` [B, max_len], False for padding and for slots not written yet),
    and ``filled``, the number of slots written (the next write position, the same for every row).

    Slots are written in order with ``jax.lax.dynamic_update_slice``, so every step has the same shapes
    and compiles once. Masks follow transformers' rules on slot indices (its ``cache_position``): causal
    ``key slot <= query slot``, padding from ``valid``, a sliding window W keeps ``query - key < W``.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    filled: jax.Array

    @staticmethod
    def empty(batch: int, max_len: int, layers: int, kv_heads: int, head_dim: int,
              dtype: Any) -> KVCache:
        """An empty cache of ``layers`` layers of [batch, max_len, kv_heads, head_dim] in ``dtype``."""
        shape = (batch, max_len, kv_heads, head_dim)
        return KVCache(keys=tuple(jnp.zeros(shape, dtype) for _ in range(layers)),
                       values=tuple(jnp.zeros(shape, dtype) for _ in range(layers)),
                       valid=jnp.zeros((batch, max_len), bool), filled=jnp.zeros((), jnp.int32))

    def admit(self, mask: jax.Array) -> KVCache:
        """Mark the slots ``filled .. filled + T`` as holding the T new tokens of ``mask`` [B, T] (1 = token,
        0 = padding). Call before the layers attend (a token sees itself)."""
        valid = jax.lax.dynamic_update_slice(self.valid, mask.astype(bool), (0, self.filled))
        return self._replace(valid=valid)

    def mask(self, length: int, window: int | None = None) -> jax.Array:
        """Boolean [B, 1, length, max_len] mask of the ``length`` queries at slots ``filled ..``: True where
        the query may attend to a key slot (causal, valid, within ``window`` when given)."""
        query = self.filled + jnp.arange(length)[:, None]
        key = jnp.arange(self.valid.shape[1])[None, :]
        allowed = key <= query
        if window is not None:
            allowed = allowed & (query - key < window)
        return allowed[None, None] & self.valid[:, None, None, :]

    def attend(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
               scale: float | None = None) -> tuple[jax.Array, KVCache]:
        """Write layer ``layer``'s new keys and values k, v [B, T, KV, D] at ``filled`` and attend q
        [B, T, H, D] over the whole buffer with ``mask`` (from :meth:`mask`). Returns the attention
        output [B, T, H, D] and the cache with the layer's buffers updated (``filled`` unchanged)."""
        start = (0, self.filled, 0, 0)
        keys = jax.lax.dynamic_update_slice(self.keys[layer], k.astype(self.keys[layer].dtype), start)
        values = jax.lax.dynamic_update_slice(self.values[layer], v.astype(self.values[layer].dtype), start)
        out = attention(q, keys, values, mask, scale=scale)
        replace = lambda old, new: (*old[:layer], new, *old[layer + 1:])  # noqa: E731
        return out, self._replace(keys=replace(self.keys, keys), values=replace(self.values, values))

    def advance(self, length: int) -> KVCache:
        """The cache after ``length`` tokens were written."""
        return self._replace(filled=self.filled + length)
