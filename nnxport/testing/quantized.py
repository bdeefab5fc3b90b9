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


#: e2m1 magnitudes by nibble (the sign is the nibble's bit 3), as transformers' FP4_VALUES.
FP4_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
#: The GPT-OSS expert tensors the published checkpoint stores as mxfp4.
GPT_OSS_EXPERTS = r"\.mlp\.experts\.(gate_up_proj|down_proj)$"


def quantize_mxfp4_tensor(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``_blocks`` uint8 [E, out, in / 32, 16], ``_scales`` uint8 [E, out, in / 32]) of a float expert
    tensor ``weight`` [E, in, out] (GPT-OSS's gate_up_proj / down_proj layout): each group of 32 inputs of
    one output shares the e8m0 exponent that brings its max |w| to at most 6, each value rounds to the
    nearest e2m1 (low nibble first), so that transformers' ``convert_moe_packed_tensors`` gives back
    ``weight`` to within e2m1's precision."""
    w = np.swapaxes(np.asarray(weight, np.float32), 1, 2)  # [E, out, in]
    *lead, cols = w.shape
    if cols % 32:
        raise ValueError(f"mxfp4 groups 32 inputs; the tensor has {cols}")
    groups = w.reshape(*lead, cols // 32, 32)
    amax = np.abs(groups).max(axis=-1)
    exp = np.ceil(np.log2(np.maximum(amax, 2.0 ** -126) / 6.0)).astype(np.int32)
    exp = np.clip(exp, -127, 127)
    scaled = groups / np.ldexp(np.float32(1), exp)[..., None]
    nearest = np.abs(np.abs(scaled)[..., None] - FP4_MAGNITUDES).argmin(axis=-1).astype(np.uint8)
    nibbles = nearest | np.where(np.signbit(scaled) & (nearest > 0), 8, 0).astype(np.uint8)
    blocks = (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(blocks), np.ascontiguousarray((exp + 127).astype(np.uint8))


def quantize_mxfp4_folder(src: Path, out: Path, *, pattern: str = GPT_OSS_EXPERTS) -> Path:
    """Copy the GPT-OSS replica folder ``src`` to ``out`` with its expert tensors stored as the published
    checkpoint stores them (``K_blocks`` + ``K_scales`` in place of ``K``; biases unquantized) and
    config.json's ``quantization_config`` as openai/gpt-oss-20b's."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    renamed: dict[str, str] = {}
    for path in sorted(out.glob("*.safetensors")):
        stored: dict[str, Any] = {}
        for key, value in load_file(path).items():
            if re.search(pattern, key):
                blocks, scales = quantize_mxfp4_tensor(value.to(torch.float32).numpy())
                stored[key + "_blocks"] = torch.from_numpy(blocks)
                stored[key + "_scales"] = torch.from_numpy(scales)
                renamed[key] = path.name
            else:
                stored[key] = value
        save_file(stored, path, metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.is_file():
        doc = json.loads(index.read_text())
        for key, name in renamed.items():
            doc["weight_map"].pop(key, None)
            doc["weight_map"].update({key + "_blocks": name, key + "_scales": name})
        index.write_text(json.dumps(doc))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
        "quant_method": "mxfp4"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
