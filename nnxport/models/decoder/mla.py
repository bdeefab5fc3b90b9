"""Multi-head latent attention (DeepSeek-V2/V3), computed as transformers 5.24's ``DeepseekV3Attention``
does; its YaRN rotary tables are :mod:`nnxport.models.rope`'s.

Queries come from a low-rank path (``q_a`` -> RMSNorm -> ``q_b``; or one ``q`` projection when
``q_lora_rank`` is null); keys and values from one compressed latent: ``kv_a`` gives ``kv_lora_rank``
latent values (RMSNorm'd, then ``kv_b`` expands them to per-head nope-keys and values) and one shared
``qk_rope_head_dim`` rotary key. Each head's key is ``[k_nope, k_rot]``, its query ``[q_nope, q_rot]``; the
softmax scale is ``qk_head_dim ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` under YaRN.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from nnxport.models.decoder.modules import RMSNorm
from nnxport.models.layers import COLUMN, ROW, KVCache, attention, dropout, sharded
from nnxport.models.rope import Rope, cos_sin, yarn_mscale


@dataclass(frozen=True)
class MlaRope:
    """Rotary parameters of the ``qk_rope_head_dim`` dimensions: a ``default`` or ``yarn``
    :class:`~nnxport.models.rope.Rope` (frequencies and the cos/sin attention factor computed there, as for
    every decoder), plus DeepSeek's ``mscale_all_dim``, which also scales the softmax."""

    rope: Rope
    mscale_all_dim: float | None = None

    def softmax_scale(self, qk_head_dim: int) -> float:
        """``yarn_apply_mscale(rope_parameters, qk_head_dim ** -0.5)``."""
        scale = qk_head_dim ** -0.5
        if self.rope.rope_type == "yarn" and self.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.mscale_all_dim)
            scale = scale * m * m
        return scale

    def tables(self, positions: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
        """cos, sin [B|1, T, dim] of position ids [B|1, T]: float32, scaled, cast to ``dtype``."""
        return cos_sin(self.rope, positions, dtype)


@dataclass(frozen=True)
class MlaSpec:
    """The sizes and switches of :class:`MLA`."""

    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float
    attention_bias: bool
    rope_interleave: bool
    rope: MlaRope
    attention_dropout: float = 0.0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array, interleave: bool) -> jax.Array:
    """x [B, T, H, D] rotated by cos, sin [B|1, T, D]: pairs (x0, x1), (x2, x3), ... with ``interleave``
    (DeepSeek's layout; the result de-interleaved, as transformers returns it), else halves."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if interleave:
        half = x.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class MLA(nnx.Module):
    """Multi-head latent attention (see the module docstring).

    Args:
        spec: sizes and switches.
        rngs: random streams.
    """

    def __init__(self, spec: MlaSpec, *, rngs: nnx.Rngs):
        h, heads, bias = spec.hidden_size, spec.num_heads, spec.attention_bias
        self.q: nnx.Linear | None
        self.q_a: nnx.Linear | None
        self.q_norm: RMSNorm | None
        self.q_b: nnx.Linear | None
        if spec.q_lora_rank is None:
            self.q = nnx.Linear(h, heads * spec.qk_head_dim, use_bias=False, kernel_metadata=sharded(COLUMN),
                                rngs=rngs)
            self.q_a = self.q_norm = self.q_b = None
        else:
            self.q = None
            self.q_a = nnx.Linear(h, spec.q_lora_rank, use_bias=bias, kernel_metadata=sharded(COLUMN),
                                  rngs=rngs)
            self.q_norm = RMSNorm(spec.q_lora_rank, spec.rms_norm_eps)
            self.q_b = nnx.Linear(spec.q_lora_rank, heads * spec.qk_head_dim, use_bias=False,
                                  kernel_metadata=sharded(COLUMN), rngs=rngs)
        self.kv_a = nnx.Linear(h, spec.kv_lora_rank + spec.qk_rope_head_dim, use_bias=bias,
                               kernel_metadata=sharded(COLUMN), rngs=rngs)
        self.kv_norm = RMSNorm(spec.kv_lora_rank, spec.rms_norm_eps)
        self.kv_b = nnx.Linear(spec.kv_lora_rank, heads * (spec.qk_nope_head_dim + spec.v_head_dim),
                               use_bias=False, kernel_metadata=sharded(COLUMN), rngs=rngs)
        self.o = nnx.Linear(heads * spec.v_head_dim, h, use_bias=bias, kernel_metadata=sharded(ROW),
                            rngs=rngs)
        self.spec = spec
        self.dropout = dropout(spec.attention_dropout, rngs)

    def _qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        s = self.spec
        b, t, _ = x.shape
        if self.q is not None:
            q = self.q(x)
        else:
            assert self.q_a is not None and self.q_norm is not None and self.q_b is not None
            q = self.q_b(self.q_norm(self.q_a(x)))
        q = q.reshape(b, t, s.num_heads, s.qk_head_dim)
        q_nope, q_rot = q[..., :s.qk_nope_head_dim], q[..., s.qk_nope_head_dim:]
        latent = self.kv_a(x)
        kv, k_rot = latent[..., :s.kv_lora_rank], latent[..., s.kv_lora_rank:]
        kv = self.kv_b(self.kv_norm(kv)).reshape(b, t, s.num_heads, s.qk_nope_head_dim + s.v_head_dim)
        k_nope, v = kv[..., :s.qk_nope_head_dim], kv[..., s.qk_nope_head_dim:]
        q_rot = _rotate(q_rot, cos, sin, s.rope_interleave)
        k_rot = _rotate(k_rot[:, :, None, :], cos, sin, s.rope_interleave)
        k_rot = jnp.broadcast_to(k_rot, (b, t, s.num_heads, s.qk_rope_head_dim))
        return (jnp.concatenate([q_nope, q_rot], axis=-1), jnp.concatenate([k_nope, k_rot], axis=-1), v)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x [B, T, hidden]; cos, sin [B|1, T, qk_rope_head_dim] (:meth:`MlaRope.tables`); mask boolean
        [B|1, 1, T, T]."""
        q, k, v = self._qkv(x, cos, sin)
        out = attention(q, k, v, mask, scale=self.spec.rope.softmax_scale(self.spec.qk_head_dim),
                        dropout=self.dropout)
        return self.o(out.reshape(*x.shape[:2], -1))

    def step(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache: KVCache,
             layer: int) -> tuple[jax.Array, KVCache]:
        """New tokens against the cache, which holds the expanded keys [.., heads, qk_head_dim] and
        values [.., heads, v_head_dim] (the same numbers transformers gets by expanding its cached
        latents)."""
        q, k, v = self._qkv(x, cos, sin)
        scale = self.spec.rope.softmax_scale(self.spec.qk_head_dim)
        out, cache = cache.attend(layer, q, k, v, mask, scale=scale)
        return self.o(out.reshape(*x.shape[:2], -1)), cache

    def empty_cache(self, batch: int, max_len: int, layers: int, dtype: jnp.dtype) -> KVCache:
        """An empty cache for ``layers`` MLA layers (keys and values of different widths)."""
        s = self.spec
        keys = tuple(jnp.zeros((batch, max_len, s.num_heads, s.qk_head_dim), dtype) for _ in range(layers))
        values = tuple(jnp.zeros((batch, max_len, s.num_heads, s.v_head_dim), dtype) for _ in range(layers))
        return KVCache(keys=keys, values=values, valid=jnp.zeros((batch, max_len), bool),
                       filled=jnp.zeros((), jnp.int32))
