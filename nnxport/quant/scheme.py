"""config.json ``quantization_config`` -> a :class:`Scheme` nnxport dequantizes, or a one-line refusal.

This is the one place that decides whether a quantized checkpoint can be converted: families never see
the field (they build the unquantized model; :mod:`nnxport.quant.view` gives them dequantized tensors).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nnxport.errors import ConfigError
from nnxport.mapping.ops import show_value

SUPPORTED = ("fp8", "mxfp4")
#: Largest block side accepted in ``weight_block_size`` (real ones are 128; 1 << 20 is far beyond any
#: tensor dimension, so a larger value can only be an error).
MAX_BLOCK = 1 << 20
FIELD = "quantization_config"

# Fields of transformers 5.24's FineGrainedFP8Config / Mxfp4Config that do not change the dequantized
# values: which modules the checkpoint left unquantized shows in the tensors' dtypes, and activation
# quantization is what transformers' dequantizing load (the CPU path) drops too.
_FP8_INERT = ("quant_method", "weight_block_size", "activation_scheme", "fmt", "scale_fmt", "dequantize",
              "modules_to_not_convert", "ignored_layers", "modules_to_convert", "expert_dtype")
_MXFP4_INERT = ("quant_method", "modules_to_not_convert", "dequantize")


@dataclass(frozen=True)
class Scheme:
    """What ``quantization_config`` says, validated.

    ``method``: ``fp8`` (float8_e4m3fn weights ``K``, each with a ``K_scale_inv`` of one float per
    ``block`` of the weight's last two dimensions; ``block`` None: one scale per tensor) or ``mxfp4``
    (``K_blocks`` packed e2m1 pairs, ``K_scales`` e8m0 exponents per 32 values; the GPT-OSS layout).
    """

    method: str
    block: tuple[int, int] | None = None

    def describe(self) -> str:
        if self.method == "mxfp4":
            return "mxfp4 (e2m1 values, one e8m0 scale per 32)"
        blocks = "one scale per tensor" if self.block is None else f"{self.block[0]}x{self.block[1]} blocks"
        return f"fp8 (float8_e4m3fn, {blocks})"


def _where(name: str) -> str:
    return f"config.json: field '{FIELD}.{name}'"


def _block(qc: Mapping[str, Any]) -> tuple[int, int] | None:
    if "weight_block_size" not in qc:
        return (128, 128)  # FineGrainedFP8Config's default
    value = qc["weight_block_size"]
    if value is None:
        return None
    if (not isinstance(value, list | tuple) or len(value) != 2
            or not all(type(v) is int and 1 <= v <= MAX_BLOCK for v in value)):
        raise ConfigError(f"{_where('weight_block_size')} must be two integers [rows, cols] from 1 to "
                          f"{MAX_BLOCK}, got {show_value(value)}")
    return (value[0], value[1])


def _fp8(qc: Mapping[str, Any]) -> Scheme:
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"{_where('fmt')} is {show_value(fmt)}; nnxport dequantizes e4m3 fp8 weights only")
    scheme = qc.get("activation_scheme", "dynamic")
    if not isinstance(scheme, str) or scheme.lower() not in ("dynamic", "static"):
        raise ConfigError(f"{_where('activation_scheme')} is {show_value(scheme)} (transformers knows "
                          "dynamic and static)")
    scale_fmt = qc.get("scale_fmt", "float")
    if scale_fmt not in ("float", "ue8m0", None):
        raise ConfigError(f"{_where('scale_fmt')} is {show_value(scale_fmt)} (transformers knows float and "
                          "ue8m0)")
    experts = qc.get("expert_dtype", "fp8")
    if experts != "fp8":
        raise ConfigError(f"{_where('expert_dtype')} is {show_value(experts)}; nnxport dequantizes fp8 "
                          "experts only (not DeepSeek-V4's packed fp4 ones)")
    return Scheme("fp8", _block(qc))


def scheme_of(config: Mapping[str, Any] | None) -> Scheme | None:
    """The config's quantization scheme (None when it has none); ConfigError naming the field for a
    method nnxport does not dequantize or a value it cannot take."""
    if config is None or config.get(FIELD) is None:
        return None
    qc = config[FIELD]
    if not isinstance(qc, Mapping):
        raise ConfigError(f"config.json: field '{FIELD}' must be a mapping, got {show_value(qc)}")
    method = qc.get("quant_method")
    if method not in SUPPORTED:
        what = "has no 'quant_method'" if method is None else f"is {show_value(method)}"
        raise ConfigError(f"{_where('quant_method')} {what}: nnxport dequantizes {' and '.join(SUPPORTED)} "
                          "checkpoints only; convert the unquantized weights")
    known = _FP8_INERT if method == "fp8" else _MXFP4_INERT
    for key in qc:
        if key not in known and qc[key] not in (None, False, [], {}):
            raise ConfigError(f"{_where(str(key))} is {show_value(qc[key])}, which nnxport's {method} "
                              f"dequantization does not implement")
    return _fp8(qc) if method == "fp8" else Scheme("mxfp4")
