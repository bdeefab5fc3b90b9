"""Building blocks shared by the families: activations, LayerNorm and attention with torch's numerics,
and the default sharding annotations of their parameters."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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
              scale: float | None = None, dropout: nnx.Dropout | None = None,
              sinks: jax.Array | None = None, softcap: float | None = None) -> jax.Array:
    """Softmax attention in float32. q [B, T, H, D]; k, v [B, S, KV, D] with H a multiple of KV
    (grouped-query attention repeats each key/value head H/KV times); mask [B|1, 1|H, T, S] bool.
    ``dropout`` is applied to the attention probabilities (transformers' attention dropout; active only
    in train mode). ``sinks`` [H] (GPT-OSS's attention sinks): one more logit per head joins each query's
    softmax and is dropped after it, so the weights of the real keys sum to less than one. ``softcap``
    (Gemma 2) maps the scaled scores to ``softcap * tanh(scores / softcap)`` before masking. Returns
    [B, T, H, D] in q's dtype. A query that may attend to no key (a padded position under a sliding
    window) outputs zeros, as torch's scaled_dot_product_attention does."""
    dtype = q.dtype
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads != kv_heads:
        k = jnp.repeat(k, heads // kv_heads, axis=2)
        v = jnp.repeat(v, heads // kv_heads, axis=2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q32, k32, v32 = (t.astype(jnp.float32) for t in (q, k, v))
    scores = jnp.einsum("bthd,bshd->bhts", q32, k32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    if sinks is None:
        weights = jax.nn.softmax(scores, axis=-1)
    else:
        sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None, None], (*scores.shape[:-1], 1))
        weights = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
    weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)
    if dropout is not None:
        weights = dropout(weights)
    return jnp.einsum("bhts,bshd->bthd", weights, v32).astype(dtype)


# ------------------------------------------------------------------------------------- training

def dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
    """An ``nnx.Dropout`` at ``rate`` (a config.json dropout field), off until ``model.train()``: models
    are built deterministic (eval mode), so inference and parity never drop anything.

    Args:
        rate: the drop probability, in [0, 1).
        rngs: the model's random streams; the layer forks the ``dropout`` stream (``default`` if the
            Rngs has none). A converted model loaded by :func:`nnxport.load` gets its streams from
            :func:`seed_dropout`.
    """
    return nnx.Dropout(rate, deterministic=True, rngs=rngs)


def strip_dropout_rngs(model: nnx.Module) -> None:
    """Remove the random streams of every ``nnx.Dropout`` in ``model`` (in place), so that its state is
    Params and BatchStats only: the abstract model a conversion fills and saves holds no RNG state."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Dropout):
            module.rngs = None


def seed_dropout(model: nnx.Module, seed: int = 0) -> nnx.Module:
    """Give every ``nnx.Dropout`` in ``model`` a fresh random stream forked from
    ``nnx.Rngs(dropout=seed)`` (in place; returns ``model``). :func:`nnxport.load` calls it with seed 0;
    call it again (or ``nnx.reseed(model, dropout=seed)``) to draw other dropout masks."""
    rngs = nnx.Rngs(dropout=seed)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Dropout):
            module.rngs = rngs.dropout.fork()
    return model


class TorchBatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` with torch's ``BatchNorm2d`` training rule: normalise with the biased batch
    variance (two passes), but move the running variance towards the *unbiased* one (n / (n - 1)), as
    torch does; flax's own BatchNorm uses the biased variance for both. ``momentum`` is flax's (the weight
    of the old statistics): torch's momentum m is flax's ``1 - m``. In eval mode
    (``use_running_average``) it is ``nnx.BatchNorm`` unchanged."""

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        running = self.use_running_average if use_running_average is None else use_running_average
        if running or mask is not None:
            return super().__call__(x, use_running_average, mask=mask)
        axes = tuple(range(x.ndim - 1))  # features last (NHWC)
        n = math.prod(x.shape[a] for a in axes)
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=axes)
        var = jnp.mean(jnp.square(h - mean), axis=axes)
        unbiased = var * (n / (n - 1)) if n > 1 else var
        m = self.momentum
        self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
        self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * unbiased)
        y = (h - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.scale is not None:
            y = y * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)


def padding_no_grad(x: jax.Array, input_ids: jax.Array, padding_idx: int | None) -> jax.Array:
    """Embedded tokens ``x`` [..., dim] whose lookups of ``padding_idx`` pass no gradient to the table,
    as torch's ``nn.Embedding(padding_idx=...)`` (the values are unchanged)."""
    if padding_idx is None:
        return x
    return jnp.where((input_ids == padding_idx)[..., None], jax.lax.stop_gradient(x), x)


# ---------------------------------------------------------------------------------------- inputs

def is_traced(x: Any) -> bool:
    """Whether ``x`` is a tracer (inside ``jit``, ``grad``, ``eval_shape``...): no value to check."""
    return isinstance(x, jax.core.Tracer)


def check_length(length: int, table: int, field: str) -> None:
    """ValueError when a sequence is longer than a learned position table (static shapes: raised when
    traced, before anything runs)."""
    if length > table:
        raise ValueError(f"input length {length} exceeds the model's position table: config.json "
                         f"'{field}' is {table}")


def check_token_ids(input_ids: Any, vocab_size: int) -> None:
    """ValueError naming the first id outside ``[0, vocab_size)``, for concrete ids (eager calls);
    traced ids are not checked (call :func:`nnxport.check_inputs` before a jitted call)."""
    if is_traced(input_ids):
        return
    ids = np.asarray(input_ids)
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"input_ids{list(where)} is {int(ids[where])}, outside the vocabulary "
                         f"[0, {vocab_size}) (vocab_size {vocab_size})")


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
               scale: float | None = None, sinks: jax.Array | None = None, softcap: float | None = None
               ) -> tuple[jax.Array, KVCache]:
        """Write layer ``layer``'s new keys and values k, v [B, T, KV, D] at ``filled`` and attend q
        [B, T, H, D] over the whole buffer with ``mask`` (from :meth:`mask`; ``scale`` and ``softcap`` as
        :func:`attention`). Returns the attention
        output [B, T, H, D] and the cache with the layer's buffers updated (``filled`` unchanged)."""
        start = (0, self.filled, 0, 0)
        keys = jax.lax.dynamic_update_slice(self.keys[layer], k.astype(self.keys[layer].dtype), start)
        values = jax.lax.dynamic_update_slice(self.values[layer], v.astype(self.values[layer].dtype), start)
        out = attention(q, keys, values, mask, scale=scale, sinks=sinks, softcap=softcap)
        replace = lambda old, new: (*old[:layer], new, *old[layer + 1:])  # noqa: E731
        return out, self._replace(keys=replace(self.keys, keys), values=replace(self.values, values))

    def advance(self, length: int) -> KVCache:
        """The cache after ``length`` tokens were written."""
        return self._replace(filled=self.filled + length)
