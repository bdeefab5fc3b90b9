"""A conv + fc classifier in Flax NNX, following nnxport's custom-model protocol (docs/custom-models.md).

The PyTorch original (:mod:`examples.convfc_torch`) flattens its NCHW activations before the fc layer;
this model flattens its NHWC activations as they are. Same computation, but the fc weight's input axis is
ordered (C, H, W) in torch and (H, W, C) here: the mapping has to reorder it, a transpose alone does not.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
from flax import nnx

from nnxport.errors import ConfigError

FIELDS = ("in_channels", "channels", "kernel_size", "image_size", "num_classes")


def feature_size(config: dict[str, Any]) -> int:
    """Height (= width) of the conv's output: a 'valid' convolution."""
    return int(config["image_size"]) - int(config["kernel_size"]) + 1


class ConvFc(nnx.Module):
    """Conv2d (valid padding) -> flatten -> Linear, on NHWC images."""

    #: the torch module parity compares with, built as TorchConvFc(config)
    reference: ClassVar[str] = "examples.convfc_torch:TorchConvFc"
    #: the reference takes NCHW images: axis order of each parity input for it
    reference_layouts: ClassVar[dict[str, tuple[int, ...]]] = {"images": (0, 3, 1, 2)}

    def __init__(self, config: dict[str, Any], *, rngs: nnx.Rngs):
        k = int(config["kernel_size"])
        self.conv = nnx.Conv(int(config["in_channels"]), int(config["channels"]), (k, k), padding="VALID",
                             rngs=rngs)
        size = feature_size(config)
        self.fc = nnx.Linear(size * size * int(config["channels"]), int(config["num_classes"]), rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.conv(images)                 # [N, H, W, C]
        x = x.reshape(x.shape[0], -1)         # flattened in (H, W, C) order
        return self.fc(x)

    @classmethod
    def check_config(cls, config: dict[str, Any]) -> None:
        for field in FIELDS:
            value = config.get(field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config: field '{field}' must be a positive integer, got {value!r}")
        if config["kernel_size"] > config["image_size"]:
            raise ConfigError("config: 'kernel_size' is larger than 'image_size'")

    @classmethod
    def parity_inputs(cls, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        size = int(config["image_size"])
        return {"images": (2, size, size, int(config["in_channels"]))}
