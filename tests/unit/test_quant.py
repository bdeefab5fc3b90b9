"""Dequantization arithmetic against transformers 5.24's own functions, bit for bit (fp8: Fp8Dequantize and
_dequantize_fp8_weight; mxfp4: convert_moe_packed_tensors), parts equal to the whole, and quantization_config
refusals (unsupported methods, hostile weight_block_size values), each one line naming the field."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from nnxport.errors import ConfigError
from nnxport.quant.dequant import fp8_box, mxfp4_box
from nnxport.quant.scheme import Scheme, scheme_of
from nnxport.testing.quantized import quantize_fp8_tensor, random_mxfp4


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    if t.dtype == torch.float8_e8m0fnu:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e8m0fnu)
    return t.numpy()


def _bits(arr: Any) -> np.ndarray:
    """The bit patterns of a float32 / bfloat16 array (numpy or torch): equal means bit for bit equal."""
    if isinstance(arr, torch.Tensor):
        return (arr.view(torch.int16) if arr.dtype == torch.bfloat16 else arr.view(torch.int32)).numpy()
    return arr.view(np.int16) if arr.dtype == ml_dtypes.bfloat16 else arr.view(np.int32)


def _cast(arr: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    return arr.astype(ml_dtypes.bfloat16) if dtype == torch.bfloat16 else arr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 384), (3, 128, 256)], ids=["linear", "experts"])
def test_fp8_matches_fp8dequantize(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    q, s = quantize_fp8_tensor(torch.randn(shape) * torch.rand(shape) * 5, (128, 128))
    s = s * torch.rand(s.shape)  # scales of every magnitude, not only max/448
    want = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=dtype)
    got = _cast(fp8_box(_np(q), _np(s), (128, 128)), dtype)
    np.testing.assert_array_equal(_bits(got), _bits(want))


@pytest.mark.parametrize(("shape", "block"), [((200, 300), (128, 128)), ((576, 7168 // 8), (128, 128)),
                                              ((70, 50), (32, 64))],
                         ids=["partial", "kv_a_proj-like", "uneven-block"])
def test_fp8_partial_blocks_match_dequantize_fp8_weight(shape: tuple[int, int],
                                                        block: tuple[int, int]) -> None:
    """A grid with a partial last block (DeepSeek-V3's kv_a_proj_with_mqa is 576 rows in 128-row blocks)
    follows the configured block as ``_dequantize_fp8_weight`` does (Fp8Dequantize refuses such grids)."""
    torch.manual_seed(1)
    q, s = quantize_fp8_tensor(torch.randn(shape), block)
    want = _dequantize_fp8_weight(q.clone(), s, list(block), torch.float32)
    np.testing.assert_array_equal(_bits(fp8_box(_np(q), _np(s), block)), _bits(want))
    if shape[0] % s.shape[0]:
        with pytest.raises(ValueError, match="not divisible"):
            Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.float32)


def test_fp8_e8m0_scales_every_byte() -> None:
    """ue8m0 scales, as raw bytes (uint8) or float8_e8m0fnu, every one of the 256 exponents."""
    torch.manual_seed(2)
    q, _ = quantize_fp8_tensor(torch.randn(256 * 4, 32), (4, 32))
    raw = torch.arange(256, dtype=torch.uint8).reshape(256, 1)
    for scale in (raw, raw.view(torch.float8_e8m0fnu)):
        want = Fp8Dequantize(None)._dequantize_one(q, scale, output_dtype=torch.float32).numpy()
        with np.errstate(over="ignore", invalid="ignore"):
            got = fp8_box(_np(q), _np(scale), (4, 32))
        nan = np.isnan(want)
        assert nan.sum() == (32 * 4 if scale.dtype == torch.float8_e8m0fnu else 0)  # 0xFF is e8m0's NaN
        np.testing.assert_array_equal(np.isnan(got), nan)
        np.testing.assert_array_equal(_bits(got[~nan]), _bits(want[~nan]))


def test_fp8_per_tensor_scale() -> None:
    torch.manual_seed(3)
    q, s = quantize_fp8_tensor(torch.randn(64, 48), None)
    want = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.float32)
    np.testing.assert_array_equal(_bits(fp8_box(_np(q), _np(s), None)), _bits(want))


def test_fp8_parts_equal_the_whole() -> None:
    """What a device reads: any box, with the scales of just the blocks it touches."""
    torch.manual_seed(4)
    q, s = quantize_fp8_tensor(torch.randn(2, 200, 300), (64, 128))
    qn, sn = _np(q), _np(s)
    whole = fp8_box(qn, sn, (64, 128))
    rng = np.random.default_rng(0)
    for _ in range(25):
        r0, c0 = int(rng.integers(0, 199)), int(rng.integers(0, 299))
        r1, c1 = int(rng.integers(r0 + 1, 201)), int(rng.integers(c0 + 1, 301))
        part = fp8_box(qn[1:, r0:r1, c0:c1], sn[1:, r0 // 64:-(-r1 // 64), c0 // 128:-(-c1 // 128)],
                       (64, 128), (r0, c0))
        np.testing.assert_array_equal(_bits(part), _bits(np.ascontiguousarray(whole[1:, r0:r1, c0:c1])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_matches_convert_moe_packed_tensors(dtype: torch.dtype) -> None:
    """Every nibble with every exponent (0..255: zeros stay zero, the largest overflow to Inf alike)."""
    blocks, scales = random_mxfp4((4, 64, 3, 16), seed=5, exponents=(0, 255))
    blocks[0, 0, 0, :] = np.arange(16, dtype=np.uint8) * 17  # both nibbles of each value
    scales[1, :, :] = np.arange(64 * 3).reshape(64, 3) % 256
    want = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=dtype)
    with np.errstate(over="ignore"):
        got = _cast(mxfp4_box(blocks, scales, 0, 3 * 32), dtype)
    assert got.shape == tuple(want.shape) == (4, 96, 64)
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_mxfp4_parts_equal_the_whole() -> None:
    blocks, scales = random_mxfp4((2, 40, 4, 16), seed=6)
    whole = mxfp4_box(blocks, scales, 0, 128)
    rng = np.random.default_rng(1)
    for _ in range(25):
        v0, r0 = int(rng.integers(0, 127)), int(rng.integers(0, 39))
        v1, r1 = int(rng.integers(v0 + 1, 129)), int(rng.integers(r0 + 1, 41))
        g0, g1 = v0 // 32, -(-v1 // 32)
        part = mxfp4_box(blocks[:1, r0:r1, g0:g1], scales[:1, r0:r1, g0:g1], v0 - 32 * g0, v1 - v0)
        np.testing.assert_array_equal(part, whole[:1, v0:v1, r0:r1])


# ------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize(("qc", "words"), [
    ({"quant_method": "gptq", "bits": 4}, ["quant_method", "'gptq'"]),
    ({"quant_method": "awq"}, ["'awq'"]),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, ["'bitsandbytes'"]),
    ({"quant_method": "compressed-tensors"}, ["'compressed-tensors'"]),
    ({"load_in_8bit": True}, ["has no 'quant_method'"]),
    ("fp8", ["must be a mapping"]),
    ({"quant_method": "fp8", "fmt": "e5m2"}, ["fmt", "e5m2"]),
    ({"quant_method": "fp8", "expert_dtype": "fp4"}, ["expert_dtype"]),
    ({"quant_method": "fp8", "activation_scheme": 3}, ["activation_scheme"]),
    ({"quant_method": "fp8", "group_size": 64}, ["group_size", "does not implement"]),
    ({"quant_method": "fp8", "weight_block_size": [0, 128]}, ["weight_block_size", "[0, 128]"]),
    ({"quant_method": "fp8", "weight_block_size": [-128, 128]}, ["weight_block_size"]),
    ({"quant_method": "fp8", "weight_block_size": [128]}, ["weight_block_size"]),
    ({"quant_method": "fp8", "weight_block_size": [128, 128, 128]}, ["weight_block_size"]),
    ({"quant_method": "fp8", "weight_block_size": "128x128"}, ["weight_block_size"]),
    ({"quant_method": "fp8", "weight_block_size": [True, 128]}, ["weight_block_size"]),
    ({"quant_method": "fp8", "weight_block_size": [128.0, 128]}, ["weight_block_size"]),
    ({"quant_method": "fp8", "weight_block_size": [2**64, 1]}, ["weight_block_size"]),
    ({"quant_method": "mxfp4", "bits": 4}, ["bits"]),
], ids=lambda v: str(v)[:40])
def test_quantization_config_refusals(qc: Any, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        scheme_of({"model_type": "llama", "quantization_config": qc})
    text = str(info.value)
    assert text.startswith("config.json: field 'quantization_config") and "\n" not in text
    for word in words:
        assert word in text


def test_schemes() -> None:
    assert scheme_of({"model_type": "llama"}) is None
    assert scheme_of({"quantization_config": None}) is None
    deepseek = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": [128, 128]}
    assert scheme_of({"quantization_config": deepseek}) == Scheme("fp8", (128, 128))
    assert scheme_of({"quantization_config": {"quant_method": "fp8"}}) == Scheme("fp8", (128, 128))
    assert scheme_of({"quantization_config": {"quant_method": "fp8", "weight_block_size": None}}
                     ) == Scheme("fp8", None)
    gpt_oss = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.embed_tokens", "lm_head"],
               "quant_method": "mxfp4"}
    assert scheme_of({"quantization_config": gpt_oss}) == Scheme("mxfp4")
