"""torch's bicubic resize (``F.interpolate(mode="bicubic", align_corners=False)``), exactly: the position
embedding interpolation of vision transformers.

``jax.image.resize(method="cubic")`` is not the same function: it uses Keys' kernel with a = -0.5 and
antialiases when shrinking, where torch uses a = -0.75, no antialiasing, and clamps the taps at the
borders. Sizes are static, so the interpolation is two small weight matrices built with numpy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

#: torch's cubic convolution coefficient (``upsample_bicubic2d``).
A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """[n, 4] tap weights for fractional offsets ``t`` [n] (torch's ``get_cubic_upsample_coefficients``)."""
    def near(x: np.ndarray) -> np.ndarray:  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] matrix M with ``out = M @ in`` along one axis, as torch resizes it with
    ``align_corners=False``: source coordinate ``(i + 0.5) * size_in / size_out - 0.5``, four taps
    around its floor, indices clamped to the edge."""
    scale = np.float32(size_in) / np.float32(size_out)
    src = (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    base = np.floor(src)
    weights = _cubic_weights((src - base).astype(np.float64))
    out = np.zeros((size_out, size_in), dtype=np.float64)
    for tap in range(4):
        index = np.clip(base.astype(np.int64) - 1 + tap, 0, size_in - 1)
        np.add.at(out, (np.arange(size_out), index), weights[:, tap])
    return out


def bicubic_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize ``x`` [height, width, channels] to ``size`` (height, width) with torch's bicubic
    (``align_corners=False``, no antialiasing); float32 arithmetic, the result in x's dtype."""
    rows = jnp.asarray(bicubic_matrix(x.shape[0], size[0]), jnp.float32)
    cols = jnp.asarray(bicubic_matrix(x.shape[1], size[1]), jnp.float32)
    h = x.astype(jnp.float32)
    out = jnp.einsum("oh,hwc->owc", rows, h, precision=jax.lax.Precision.HIGHEST)
    out = jnp.einsum("pw,owc->opc", cols, out, precision=jax.lax.Precision.HIGHEST)
    return out.astype(x.dtype)
