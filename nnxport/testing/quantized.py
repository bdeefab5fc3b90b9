"""Quantized replicas: a replica's Linear weights stored as block-scaled fp8 (DeepSeek-V3 / Qwen3-FP8
style), and random mxfp4 tensors (the GPT-OSS layout), written offline for the tests and the demo."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

FP8_MAX = 448.0
LINEAR = r"\.(q|k|v|o|gate|up|down)_proj\.weight$"


def quantize_fp8_tensor(weight: Any, block: tuple[int, int] | None) -> tuple[Any, Any]:
    """(float8_e4m3fn weight, float32 ``weight_scale_inv``) for a float torch tensor ``[..., R, C]``: per
    block (the last one partial where the block does not divide) the max |w| maps to 448, as
    transformers' ``Fp8Quantize`` and DeepSeek's tools do. ``block`` None: one scale for the tensor."""
    import torch

    w = weight.to(torch.float32)
    if block is None:
        scale = (w.abs().amax() / FP8_MAX).clamp(min=1e-12)
        return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale.reshape(())
    bm, bn = block
    rows, cols = w.shape[-2:]
    sr, sc = -(-rows // bm), -(-cols // bn)
    padded = torch.zeros(*w.shape[:-2], sr * bm, sc * bn)
    padded[..., :rows, :cols] = w
    tiles = padded.reshape(*w.shape[:-2], sr, bm, sc, bn)
    scale = (tiles.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp(min=1e-12)
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(padded.shape)[..., :rows, :cols].contiguous()
    return q.to(torch.float8_e4m3fn), scale.to(torch.float32)


def quantize_fp8_folder(src: Path, out: Path, *, block: tuple[int, int] | None = (128, 128),
                        pattern: str = LINEAR, scale_dtype: str = "float32",
                        extra_config: dict[str, Any] | None = None) -> Path:
    """Copy the replica folder ``src`` to ``out`` with every tensor whose key matches ``pattern`` stored
    as fp8 + ``<key>_scale_inv``, and config.json's ``quantization_config`` saying so."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    for path in sorted(out.glob("*.safetensors")):
        tensors = load_file(path)
        stored: dict[str, Any] = {}
        for key, value in tensors.items():
            if re.search(pattern, key) and value.ndim >= 2:
                q, s = quantize_fp8_tensor(value, block)
                stored[key], stored[key + "_scale_inv"] = q, s.to(getattr(torch, scale_dtype))
            else:
                stored[key] = value
        save_file(stored, path, metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.is_file():
        doc = json.loads(index.read_text())
        doc["weight_map"].update({k + "_scale_inv": f for k, f in list(doc["weight_map"].items())
                                  if re.search(pattern, k)})
        index.write_text(json.dumps(doc))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": None if block is None else list(block),
                                     **(extra_config or {})}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def random_mxfp4(shape: tuple[int, int, int, int], seed: int, exponents: tuple[int, int] = (118, 130)
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Random ``_blocks`` (uint8 ``shape`` = [E, rows, groups, 16]) and ``_scales`` (uint8 e8m0 exponents
    in ``exponents``) of an mxfp4 tensor."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, shape, dtype=np.uint8)
    scales = rng.integers(exponents[0], exponents[1] + 1, shape[:-1], dtype=np.uint8)
    return blocks, scales
