"""The parity reference of a quantized source: its tensors dequantized by transformers' own functions.

transformers 5.24 dequantizes fp8 and mxfp4 checkpoints while loading them only through its quantizers
(which need accelerate, and a GPU for fp8 unless ``dequantize``), so the reference is loaded from a
scratch folder holding the source's tensors already dequantized, in float32, by the functions those
quantizers call, and config.json without ``quantization_config``. nnxport's own dequantization
(:mod:`nnxport.quant.dequant`) is thereby checked against transformers' in every parity run, not
against itself. One output file per source file: memory stays at about one file's tensors in float32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from nnxport.quant.scheme import FIELD
from nnxport.quant.view import Packed, QuantizedSource


def _torch(arr: np.ndarray) -> Any:
    """A numpy array as a torch tensor; ml_dtypes floats (float8) through their bytes."""
    import torch

    views = {"float8_e4m3fn": (np.uint8, torch.float8_e4m3fn), "bfloat16": (np.int16, torch.bfloat16),
             "float8_e8m0fnu": (np.uint8, torch.float8_e8m0fnu)}
    if arr.dtype.name in views:
        bits, code = views[arr.dtype.name]
        return torch.from_numpy(np.ascontiguousarray(arr).view(bits)).view(code)
    return torch.from_numpy(np.ascontiguousarray(arr))


def dequantize_with_transformers(src: QuantizedSource, p: Packed) -> Any:
    """The float32 torch tensor transformers' dequantization gives for ``p``: ``Fp8Dequantize`` where the
    scale grid tiles the weight exactly, ``_dequantize_fp8_weight`` (the configured block, a partial last
    one) where it does not; ``convert_moe_packed_tensors`` for mxfp4."""
    import torch

    values, scale = _torch(src.read_stored(p.values.key)), _torch(src.read_stored(p.scale.key))
    if p.method == "mxfp4":
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        return convert_moe_packed_tensors(values, scale, dtype=torch.float32)
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    rows, cols = values.shape[-2:]
    if p.block is None or (rows % p.block[0] == 0 and cols % p.block[1] == 0):
        return Fp8Dequantize(None)._dequantize_one(values, scale, output_dtype=torch.float32)
    if scale.dtype == torch.uint8:  # e8m0 bytes, read as Fp8Dequantize reads them
        scale = (scale.to(torch.float32) - 127.0).exp2()
    return _dequantize_fp8_weight(values, scale, list(p.block), torch.float32)


def write_dequantized(src: QuantizedSource, folder: Path, config: dict[str, Any]) -> None:
    """Write the source's logical tensors into ``folder`` (one safetensors file per source file, and an
    index), dequantized by transformers, with ``config`` less its ``quantization_config``."""
    from safetensors.torch import save_file

    by_file: dict[str, list[str]] = {}
    for key, info in src.tensors.items():
        by_file.setdefault(info.file.name, []).append(key)
    weight_map: dict[str, str] = {}
    for i, (_, keys) in enumerate(sorted(by_file.items())):
        name = f"model-{i + 1:05d}-of-{len(by_file):05d}.safetensors"
        tensors = {k: (dequantize_with_transformers(src, src.packed[k]) if k in src.packed
                       else _torch(src.read(k))) for k in keys}
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {},
                                                                     "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != FIELD}))
