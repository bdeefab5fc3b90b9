"""Rotary position embeddings shared by the decoder families: the parameters (:class:`Rope`), their reading
from config.json (:func:`parse_rope`) and the cos/sin tables (:func:`cos_sin`), as transformers 5.24's
``modeling_rope_utils`` computes them.

Implemented types: ``default``, ``linear``, ``llama3``, ``longrope`` (Phi-3's short/long factors with its
attention scaling; the long factors apply to a whole forward pass once its longest position exceeds
``original_max_position_embeddings``, as ``dynamic_rope_update`` decides) and ``yarn``
(``_compute_yarn_parameters``: interpolated and extrapolated frequencies blended by a ramp between the
``beta_fast`` / ``beta_slow`` correction dimensions, optionally not truncated to integers, cos and sin times
the attention factor / mscale; GPT-OSS and DeepSeek-V3 use it). A partial rotary factor rotates
only the first ``rotary_dim`` channels of each head (Phi-3's ``apply_rotary_pos_emb``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnxport.errors import ConfigError

__all__ = ["Rope", "apply_rope", "cos_sin", "parse_rope", "yarn_mscale"]


@dataclass(frozen=True)
class Rope:
    """Rotary embedding parameters (transformers' ``rope_parameters`` after standardisation).

    ``rotary_dim``: how many channels of a head rotate (None: all, ``head_dim``); ``short_factor`` /
    ``long_factor``: longrope's per-frequency divisors; ``attention_factor``: the factor cos and sin are
    multiplied by (longrope, yarn; 1 otherwise); ``beta_fast`` / ``beta_slow`` / ``truncate``: yarn's ramp.
    """

    rope_type: str
    theta: float
    head_dim: int
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rotary_dim: int | None = None
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    @property
    def dim(self) -> int:
        """The rotated channels per head."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def inv_freq(self, long: bool = False) -> np.ndarray:
        """Inverse frequencies [dim // 2] in float32, computed in float32 in transformers' order
        (``long``: longrope's long factors instead of the short ones)."""
        f32 = np.float32
        exponent = np.arange(0, self.dim, 2, dtype=np.int64).astype(f32) / f32(self.dim)
        # torch's pow of a Python base by a float32 tensor rounds the float64 power (exact for these sizes)
        powers = np.power(np.float64(self.theta), exponent.astype(np.float64)).astype(f32)
        if self.rope_type == "longrope":  # _compute_longrope_parameters
            ext = np.asarray(self.long_factor if long else self.short_factor, dtype=f32)
            return (f32(1.0) / (ext * powers)).astype(f32)
        inv = f32(1.0) / powers
        if self.rope_type == "yarn":
            return self._yarn(powers)
        if self.rope_type == "linear":
            return (inv / f32(self.factor)).astype(f32)
        if self.rope_type != "llama3":
            return inv.astype(f32)
        # transformers.modeling_rope_utils._compute_llama3_parameters
        factor, low, high = f32(self.factor), f32(self.low_freq_factor), f32(self.high_freq_factor)
        old = f32(self.original_max_position_embeddings)
        low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = (f32(2 * math.pi) / inv).astype(f32)
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(f32)
        smooth = ((old / wavelen - low) / (high - low)).astype(f32)
        smoothed = ((f32(1) - smooth) * scaled / factor + smooth * scaled).astype(f32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(f32)

    def _yarn(self, pos_freqs: np.ndarray) -> np.ndarray:
        """transformers' ``_compute_yarn_parameters`` frequencies, float32 in its order of operations."""
        f32 = np.float32
        extrapolation = (f32(1.0) / pos_freqs).astype(f32)
        interpolation = (f32(1.0) / (f32(self.factor) * pos_freqs)).astype(f32)
        original, dim = self.original_max_position_embeddings, self.dim

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(self.theta))

        low: float = correction_dim(self.beta_fast)
        high: float = correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
        extra = (f32(1) - ramp).astype(f32)
        return (interpolation * (f32(1) - extra) + extrapolation * extra).astype(f32)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """transformers' ``get_mscale`` / ``yarn_get_mscale``: 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def cos_sin(rope: Rope, positions: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B|1, T, dim] of position ids [B|1, T]: computed in float32, times the attention factor,
    cast to ``dtype``. Longrope takes its long factors when ``max(positions) + 1`` exceeds
    ``original_max_position_embeddings`` (for the whole call, as transformers does)."""
    pos = positions.astype(jnp.float32)[..., None]

    def table(inv: np.ndarray) -> tuple[jax.Array, jax.Array]:
        freqs = pos * jnp.asarray(inv)
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb) * rope.attention_factor, jnp.sin(emb) * rope.attention_factor

    cos, sin = table(rope.inv_freq())
    if rope.rope_type == "longrope":
        long_cos, long_sin = table(rope.inv_freq(long=True))
        use_long = jnp.max(positions) + 1 > rope.original_max_position_embeddings
        cos, sin = jnp.where(use_long, long_cos, cos), jnp.where(use_long, long_sin, sin)
    return cos.astype(dtype), sin.astype(dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, D]; cos, sin [B|1, T, R] (already in x's dtype), R <= D: the first R channels rotate,
    the rest pass unchanged (partial rotary embeddings)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    head, rest = x[..., :rot], x[..., rot:]
    return jnp.concatenate([head * cos + _rotate_half(head) * sin, rest], axis=-1)


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"config.json: field '{field}' must be a number, got {value!r}")
    return float(value)


def _factors(params: Mapping[str, Any], field: str, key: str, count: int) -> tuple[float, ...]:
    values = params.get(key)
    if not isinstance(values, list) or len(values) != count:
        raise ConfigError(f"config.json: field '{field}.{key}' must list {count} numbers (rotary dim / 2), "
                          f"got {values if not isinstance(values, list) else f'{len(values)} values'}")
    return tuple(_number(v, f"{field}.{key}") for v in values)


def parse_rope(params: Any, field: str, *, model_type: str, types: Collection[str], theta: Any,
               head_dim: int, max_positions: int, original: Any, partial: Any = None,
               aliases: Mapping[str, str] | None = None) -> Rope:
    """The :class:`Rope` of one standardised ``rope_parameters`` dict (``params``, read from config.json
    field ``field``); ConfigError naming the field for a type outside ``types`` or a bad value.

    Args:
        theta: ``rope_theta`` when the dict has none (the caller's precedence: top level, default).
        original: ``original_max_position_embeddings`` as transformers resolves it for this model
            (read only by the types that need it).
        partial: the partial rotary factor (None or 1.0: every channel rotates); refused when the model
            does not take one is the caller's business.
        aliases: older type names -> the implemented one (Phi-3's ``su`` / ``yarn`` are ``longrope``).
    """
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: field '{field}' must be a mapping, got {params!r}")
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    rope_type = (aliases or {}).get(rope_type, rope_type)
    if rope_type not in types:
        raise ConfigError(f"config.json: field '{field}' has rope_type {rope_type!r}, which nnxport's "
                          f"{model_type} models do not implement (supported: {', '.join(types)})")
    theta = _number(params.get("rope_theta", theta), "rope_theta")
    rotary_dim = None
    if partial is not None and partial != 1.0:
        factor = _number(partial, "partial_rotary_factor")
        rotary_dim = int(head_dim * factor)
        if not 0 < rotary_dim <= head_dim or rotary_dim % 2:
            raise ConfigError(f"config.json: field 'partial_rotary_factor' ({partial}) gives {rotary_dim} "
                              f"rotary channels of {head_dim}; they must be even and at least 2")
    if rope_type == "default":
        return Rope("default", theta, head_dim, rotary_dim=rotary_dim)

    def need(key: str) -> float:
        if params.get(key) is None:
            raise ConfigError(f"config.json: field '{field}' of rope_type {rope_type!r} needs '{key}'")
        return _number(params[key], f"{field}.{key}")

    if rope_type == "linear":
        return Rope("linear", theta, head_dim, factor=need("factor"), rotary_dim=rotary_dim)
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise ConfigError(f"config.json: field '{field}.original_max_position_embeddings' must be a "
                          f"positive integer, got {original!r}")
    if rope_type == "longrope":
        return _longrope(params, field, theta, head_dim, rotary_dim, max_positions, original)
    if rope_type == "yarn":
        return _yarn(params, field, theta, head_dim, rotary_dim, max_positions, original)
    factor, low, high = need("factor"), need("low_freq_factor"), need("high_freq_factor")
    if high <= low:
        raise ConfigError(f"config.json: field '{field}': high_freq_factor ({high}) must exceed "
                          f"low_freq_factor ({low})")
    return Rope("llama3", theta, head_dim, factor=factor, low_freq_factor=low, high_freq_factor=high,
                original_max_position_embeddings=original, rotary_dim=rotary_dim)


def _longrope(params: Mapping[str, Any], field: str, theta: float, head_dim: int, rotary_dim: int | None,
              max_positions: int, original: int) -> Rope:
    """transformers' ``_compute_longrope_parameters``: ``factor`` defaults to max_position_embeddings /
    original_max_position_embeddings, ``attention_factor`` to sqrt(1 + ln(factor) / ln(original))."""
    count = (head_dim if rotary_dim is None else rotary_dim) // 2
    short, long = (_factors(params, field, k, count) for k in ("short_factor", "long_factor"))
    factor = params.get("factor")
    factor = max_positions / original if factor is None else _number(factor, f"{field}.factor")
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    attention = _number(attention, f"{field}.attention_factor")
    return Rope("longrope", theta, head_dim, factor=factor, original_max_position_embeddings=original,
                rotary_dim=rotary_dim, short_factor=short, long_factor=long, attention_factor=attention)


def _yarn(params: Mapping[str, Any], field: str, theta: float, head_dim: int, rotary_dim: int | None,
          max_positions: int, original: int) -> Rope:
    """transformers' ``_compute_yarn_parameters``: ``factor`` is required (as transformers' validation
    requires it); ``attention_factor`` to mscale(factor, mscale) / mscale(factor,
    mscale_all_dim) when both are set (and non-zero), else mscale(factor); ``beta_fast`` / ``beta_slow``
    to 32 / 1 (also when 0); ``truncate`` to true."""
    if params.get("factor") is None:
        raise ConfigError(f"config.json: field '{field}' of rope_type 'yarn' needs 'factor'")
    factor = _number(params["factor"], f"{field}.factor")
    if factor <= 0:
        raise ConfigError(f"config.json: field '{field}.factor' must be positive, got {factor}")
    opt = {k: None if params.get(k) is None else _number(params[k], f"{field}.{k}")
           for k in ("mscale", "mscale_all_dim", "attention_factor", "beta_fast", "beta_slow")}
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConfigError(f"config.json: field '{field}.truncate' must be true or false, got {truncate!r}")
    attention = opt["attention_factor"]
    if attention is None:
        mscale, all_dim = opt["mscale"], opt["mscale_all_dim"]
        attention = (yarn_mscale(factor, mscale) / yarn_mscale(factor, all_dim) if mscale and all_dim
                     else yarn_mscale(factor))
    return Rope("yarn", theta, head_dim, factor=factor, original_max_position_embeddings=original,
                rotary_dim=rotary_dim, attention_factor=attention, beta_fast=opt["beta_fast"] or 32.0,
                beta_slow=opt["beta_slow"] or 1.0, truncate=truncate)
