"""The dequantization arithmetic, on numpy arrays, part by part (a device's box or a whole tensor).

Both give float32, computed as transformers 5.24 does on CPU, bit for bit (tests/unit/test_quant.py):

- fp8 (``Fp8Dequantize._dequantize_one``, and ``_dequantize_fp8_weight`` for grids with a partial last
  block): ``float32(w) * float32(scale[i // bm, j // bn])``. A later cast to bfloat16 rounds that product
  once, as transformers' ``.to(output_dtype)`` does.
- mxfp4 (``convert_moe_packed_tensors``): each byte holds two e2m1 values (low nibble first), each group
  of bytes shares one e8m0 exponent ``e``: ``ldexp(value, e - 127)`` in float32 (exact: 0 stays 0 even
  at e = 255, large values overflow to Inf), and the result's last two dimensions swapped.
"""

from __future__ import annotations

import numpy as np

#: e2m1 values by nibble (transformers.integrations.mxfp4.FP4_VALUES).
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)


def scale_values(scale: np.ndarray) -> np.ndarray:
    """Stored scales as float32 multipliers: floats as they are; raw e8m0 bytes (uint8) as
    ``2 ** (byte - 127)``, as transformers reads MXFP8 / ue8m0 scales stored as bytes."""
    if scale.dtype == np.uint8:
        return np.ldexp(np.float32(1), scale.astype(np.int32) - 127)  # exact (np.exp2 is not, near 2**127)
    return scale.astype(np.float32)


def fp8_box(weight: np.ndarray, scale: np.ndarray, block: tuple[int, int] | None,
            origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """A part of a block-scaled fp8 weight dequantized to float32.

    ``weight``: the part, rows and columns starting at ``origin`` (in the whole weight's last two
    dimensions); ``scale``: the scales of exactly the blocks the part touches (leading dimensions as the
    part's). ``block`` None: ``scale`` is one value for the whole tensor. Memory: the float32 result and
    one row of scales widened to the part's columns.
    """
    out = weight.astype(np.float32)
    if block is None:
        out *= scale_values(scale).reshape(())
        return out
    bm, bn = block
    r0, c0 = origin
    rows, cols = weight.shape[-2:]
    columns = np.arange(c0, c0 + cols) // bn - c0 // bn  # each column's scale column within ``scale``
    values = scale_values(scale)
    first = r0 // bm
    for j in range(first, (r0 + rows - 1) // bm + 1 if rows else first):
        a, b = max(r0, j * bm) - r0, min(r0 + rows, (j + 1) * bm) - r0
        out[..., a:b, :] *= values[..., j - first, :][..., columns][..., None, :]
    return out


def mxfp4_unpacked(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``[..., G, B]`` packed bytes and ``[..., G]`` exponents -> float32 ``[..., G * 2B]`` (not yet
    transposed: see :func:`mxfp4_box`)."""
    *lead, groups, width = blocks.shape
    out = np.empty((*lead, groups, 2 * width), np.float32)
    out[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    out[..., 1::2] = FP4_VALUES[blocks >> 4]
    np.ldexp(out, (scales.astype(np.int32) - 127)[..., None], out=out)
    return out.reshape(*lead, groups * 2 * width)


def mxfp4_box(blocks: np.ndarray, scales: np.ndarray, first_value: int, count: int) -> np.ndarray:
    """A part of an mxfp4 tensor in transformers' layout ``[E, values, rows]``: ``blocks``
    ``[e, r, g, B]`` and ``scales`` ``[e, r, g]`` of the groups holding values ``first_value`` ..
    ``first_value + count`` of each row (``first_value`` counted from the first group given)."""
    unpacked = mxfp4_unpacked(blocks, scales)[..., first_value:first_value + count]
    return np.ascontiguousarray(np.swapaxes(unpacked, -1, -2))
