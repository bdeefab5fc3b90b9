"""A quantized source seen as the unquantized checkpoint it stands for, dequantized part by part on read.

:func:`dequantizing` pairs every quantized weight with its scales as the checkpoint's
``quantization_config`` says (:data:`LAYOUTS`: key patterns, data not code) and gives a
:class:`QuantizedSource` whose ``tensors`` are what the unquantized checkpoint would hold: the fp8 weight
``K`` (float32, its ``K_scale_inv`` consumed), the mxfp4 tensor ``K`` (float32 ``[E, values, rows]``, from
``K_blocks`` and ``K_scales``). Mappings, shape checks, per-device reads and parity then work on those
as on any checkpoint: every family can take a quantized source with the mapping of its unquantized one.
A read computes only the part asked for (``read_box``: a device's shard reads just the rows, columns and
scale blocks it covers), so memory stays at about one tensor (one shard under ``--mesh``) in float32.
Every pairing problem is a one-line SourceError naming the file and key, raised before any data is read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nnxport.errors import NnxportError, SourceError, option
from nnxport.mapping.ops import box_slices
from nnxport.quant.dequant import fp8_box, mxfp4_box
from nnxport.quant.scheme import FIELD, Scheme, scheme_of
from nnxport.sources.base import Source, TensorInfo
from nnxport.sources.safetensors import PACKED_DTYPES

#: How each method stores a tensor ``K``: the suffix of its scale key (``K`` + scale_suffix) and of its
#: values key (``K`` + values_suffix; fp8 keeps the weight's own name), keys the dequantization drops
#: (``dropped``: static activation scales, which transformers' dequantizing load drops too), and the dtypes
#: the values and scales may have.
LAYOUTS: dict[str, dict[str, Any]] = {
    "fp8": {"scale_suffix": "_scale_inv", "values_suffix": "", "dropped": r"\.activation_scale$",
            "value_dtypes": ("float8_e4m3fn",),
            "scale_dtypes": ("float32", "bfloat16", "float16", "float8_e8m0fnu", "uint8")},
    "mxfp4": {"scale_suffix": "_scales", "values_suffix": "_blocks", "value_dtypes": ("uint8",),
              "scale_dtypes": ("uint8",)},
}


@dataclass(frozen=True)
class Packed:
    """A logical tensor stored quantized: its ``values`` and ``scale`` keys (stored), its shape."""

    key: str
    method: str
    values: TensorInfo
    scale: TensorInfo
    shape: tuple[int, ...]
    block: tuple[int, int] | None = None


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _fp8(key: str, values: TensorInfo, scale: TensorInfo, scheme: Scheme) -> Packed:
    where = f"{values.file}: fp8 weight {key!r}"
    if len(values.shape) < 2:
        raise SourceError(f"{where} has shape {values.shape}; block-scaled fp8 weights have 2 or more "
                          "dimensions")
    if scheme.block is None:
        want: tuple[int, ...] = ()
        if math.prod(scale.shape) != 1:
            raise SourceError(f"{where}: scale {scale.key!r} has shape {scale.shape}, but "
                              f"{FIELD}.weight_block_size null means one scale per tensor")
    else:
        (bm, bn), (rows, cols) = scheme.block, values.shape[-2:]
        want = (*values.shape[:-2], _ceil(rows, bm), _ceil(cols, bn))
        if scale.shape != want:
            raise SourceError(f"{where} of shape {values.shape}: scale {scale.key!r} has shape "
                              f"{scale.shape}, expected {want} ({bm}x{bn} blocks, {FIELD}.weight_block_size)")
    return Packed(key, "fp8", values, scale, values.shape, scheme.block)


def _mxfp4(key: str, values: TensorInfo, scale: TensorInfo) -> Packed:
    where = f"{values.file}: mxfp4 tensor {key!r}"
    if len(values.shape) != 4:
        raise SourceError(f"{where}: {values.key!r} has shape {values.shape}; mxfp4 blocks are "
                          "[experts, rows, groups, bytes] (the GPT-OSS layout)")
    if scale.shape != values.shape[:-1]:
        raise SourceError(f"{where}: scales {scale.key!r} have shape {scale.shape}, expected "
                          f"{values.shape[:-1]} (one per group of {values.key!r} {values.shape})")
    experts, rows, groups, width = values.shape
    return Packed(key, "mxfp4", values, scale, (experts, groups * 2 * width, rows))


def _check_dtypes(method: str, key: str, values: TensorInfo, scale: TensorInfo) -> None:
    layout = LAYOUTS[method]
    for info, what, allowed in ((values, "values", layout["value_dtypes"]),
                                (scale, "scale", layout["scale_dtypes"])):
        if info.dtype not in allowed:
            raise SourceError(f"{info.file}: {method} {what} {info.key!r} (of {key!r}) is {info.dtype}, "
                              f"expected {' or '.join(allowed)}")


def pair(stored: dict[str, TensorInfo], scheme: Scheme) -> tuple[dict[str, TensorInfo], dict[str, Packed],
                                                                 dict[str, str]]:
    """The logical tensors (in stored order), the packed ones among them, and each consumed stored key ->
    what it was (for listings). SourceError for the first key that does not pair."""
    layout = LAYOUTS[scheme.method]
    suffix, values_suffix = layout["scale_suffix"], layout["values_suffix"]
    dropped = re.compile(layout["dropped"]) if "dropped" in layout else None
    packed: dict[str, Packed] = {}
    consumed: dict[str, str] = {}
    for skey, scale in stored.items():
        if not skey.endswith(suffix):
            continue
        key = skey[: -len(suffix)]
        vkey = key + values_suffix
        values = stored.get(vkey)
        if values is None:
            raise SourceError(f"{scale.file}: {scheme.method} scale {skey!r} has no {vkey!r} to scale")
        if values_suffix and key in stored:
            raise SourceError(f"{values.file}: {key!r} is stored both unquantized and as {vkey!r}")
        _check_dtypes(scheme.method, key, values, scale)
        packed[key] = (_fp8(key, values, scale, scheme) if scheme.method == "fp8"
                       else _mxfp4(key, values, scale))
        consumed[skey] = f"scale of {key!r}"
        if values_suffix:
            consumed[vkey] = f"values of {key!r}"
    logical: dict[str, TensorInfo] = {}
    for key, info in stored.items():
        p = packed.get(key.removesuffix(values_suffix) if values_suffix else key)
        if p is not None and key == p.values.key:
            logical[p.key] = TensorInfo(p.key, p.shape, "float32", info.file, 4 * math.prod(p.shape))
        elif key in consumed:
            continue
        elif dropped is not None and dropped.search(key):
            consumed[key] = "activation scale (dequantization drops it, as transformers' does)"
        elif info.dtype.startswith("float8") or (values_suffix and key.endswith(values_suffix)):
            want = key.removesuffix(values_suffix) + suffix
            raise SourceError(f"{info.file}: {key!r} is {info.dtype} but has no scale {want!r} "
                              f"({FIELD} quant_method {scheme.method})")
        else:
            logical[key] = info
    return logical, packed, consumed


class QuantizedSource(Source):
    """A :class:`Source` whose ``tensors`` are the dequantized ones (see the module docstring); the keys
    as stored stay in ``stored``, the pairs in ``packed``, the keys consumed (scales, packed values,
    dropped activation scales) in ``consumed``."""

    def __init__(self, base: Source, scheme: Scheme) -> None:
        logical, self.packed, self.consumed = pair(base.tensors, scheme)
        super().__init__(spec=base.spec, kind=base.kind, repo_id=base.repo_id, revision=base.revision,
                         root=base.root, files=base.files, config=base.config, config_path=base.config_path,
                         tensors=logical)
        self.stored = base.tensors
        self.scheme = scheme

    def _info(self, key: str) -> TensorInfo:
        """The stored tensor ``key``: what the reads of :class:`Source` read (the packed keys' parts)."""
        info = self.stored.get(key)
        if info is None:
            raise SourceError(f"{self.spec}: no tensor named {key!r}")
        if info.dtype in PACKED_DTYPES:
            raise SourceError(f"{info.file}: {key!r} is {info.dtype} (packed sub-byte), which nnxport "
                              "cannot read")
        return info

    def read_stored(self, key: str) -> np.ndarray:
        """The stored tensor ``key`` as stored (fp8 values, packed bytes, scales): not dequantized."""
        return super().read(key)

    def read(self, key: str) -> np.ndarray:
        p = self.packed.get(key)
        return super().read(key) if p is None else self.read_box(key, tuple((0, n) for n in p.shape))

    def read_box(self, key: str, box: Sequence[tuple[int, int]]) -> np.ndarray:
        p = self.packed.get(key)
        if p is None:
            return super().read_box(key, box)
        box = tuple(box)
        if p.method == "fp8":
            return self._fp8_box(p, box)
        (e0, e1), (v0, v1), (r0, r1) = box
        group = 2 * p.values.shape[-1]
        g0, g1 = v0 // group, _ceil(v1, group)
        blocks = self._stored_box(p.values.key, ((e0, e1), (r0, r1), (g0, g1), (0, p.values.shape[-1])))
        scales = self._stored_box(p.scale.key, ((e0, e1), (r0, r1), (g0, g1)))
        return mxfp4_box(blocks, scales, v0 - g0 * group, v1 - v0)

    def _fp8_box(self, p: Packed, box: tuple[tuple[int, int], ...]) -> np.ndarray:
        weight = self._stored_box(p.values.key, box)
        if p.block is None:
            return fp8_box(weight, self.read_stored(p.scale.key), None)
        (bm, bn), ((r0, r1), (c0, c1)) = p.block, box[-2:]
        part = (*box[:-2], (r0 // bm, _ceil(r1, bm)), (c0 // bn, _ceil(c1, bn)))
        return fp8_box(weight, self._stored_box(p.scale.key, part), p.block, (r0, c0))

    def _stored_box(self, key: str, box: tuple[tuple[int, int], ...]) -> np.ndarray:
        """Part ``box`` of the stored tensor ``key`` as stored (what :meth:`Source.read_box` reads: one
        ``pread`` for whole rows, else safetensors' slices)."""
        info = self._info(key)
        if all(b == (0, n) for b, n in zip(box[1:], info.shape[1:], strict=True)):
            return self._pread(info, *box[0]) if box else self.read_stored(key)
        return Source.read_slice(self, key, box_slices(box))

    def read_slice(self, key: str, index: tuple[slice | int, ...]) -> np.ndarray:
        if key not in self.packed:
            return super().read_slice(key, index)
        return self.read(key)[index]


def dequantizing(src: Source) -> Source:
    """``src`` itself when its config has no ``quantization_config``, else its :class:`QuantizedSource`;
    ConfigError for a method nnxport does not dequantize, SourceError for keys that do not pair."""
    scheme = scheme_of(src.config)
    if scheme is None or isinstance(src, QuantizedSource):
        return src
    if type(src) is not Source:
        raise SourceError(f"{src.spec}: quantized ({scheme.method}) weights are read from safetensors files "
                          "only, not pickle")
    view = QuantizedSource(src, scheme)
    src.close()  # the view opens its own handles
    return view


def check_dtype(src: Source, dtype: str) -> None:
    """``--dtype keep`` keeps stored dtypes; a quantized source's would be float8 / packed bytes, which
    no nnxport family computes with: refused in one line."""
    if dtype == "keep" and isinstance(src, QuantizedSource):
        raise NnxportError(f"{option('dtype', 'keep')}: {src.spec} is quantized ({src.scheme.describe()}, "
                           f"config.json {FIELD}), which nnxport dequantizes and no family runs as stored; "
                           f"pass {option('dtype', 'bfloat16')} (as transformers loads it on CPU) or "
                           f"{option('dtype', 'float32')}")


__all__ = ["LAYOUTS", "Packed", "QuantizedSource", "check_dtype", "dequantizing", "pair"]
