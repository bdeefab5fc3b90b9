"""ResNet (v1.5, as in transformers' ``ResNetModel``): basic and bottleneck blocks, NHWC.

Target paths (what ``mappings/resnet.yaml`` fills)::

    stem.conv.kernel, stem.bn.{scale,bias,mean,var}
    stages.S.blocks.B.conv{0,1[,2]}.kernel, stages.S.blocks.B.bn{0,1[,2]}.*
    stages.S.blocks.B.shortcut.conv.kernel, stages.S.blocks.B.shortcut.bn.*   (where channels/stride change)
    classifier.kernel, classifier.bias                                        (when num_labels > 0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxport.errors import ConfigError
from nnxport.models.base import Family, ParityInput, Tolerance, require
from nnxport.models.layers import ACTIVATIONS


def _conv(cin: int, cout: int, k: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    # torch pads k // 2 on every side; "SAME" would differ for stride 2 with even inputs.
    p = k // 2
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((p, p), (p, p)), use_bias=False, rngs=rngs)


def _bn(c: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(c, use_running_average=True, epsilon=1e-5, rngs=rngs)


class Shortcut(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        self.conv = _conv(cin, cout, 1, stride, rngs)
        self.bn = _bn(cout, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: str, *, rngs: nnx.Rngs):
        self.conv0 = _conv(cin, cout, 3, stride, rngs)
        self.bn0 = _bn(cout, rngs)
        self.conv1 = _conv(cout, cout, 3, 1, rngs)
        self.bn1 = _bn(cout, rngs)
        self.shortcut = Shortcut(cin, cout, stride, rngs=rngs) if cin != cout or stride != 1 else None
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.act]
        residual = x if self.shortcut is None else self.shortcut(x)
        h = act(self.bn0(self.conv0(x)))
        h = self.bn1(self.conv1(h))
        return act(h + residual)


class BottleneckBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: str, stride_in_first: bool, *, rngs: nnx.Rngs):
        mid = cout // 4
        self.conv0 = _conv(cin, mid, 1, stride if stride_in_first else 1, rngs)
        self.bn0 = _bn(mid, rngs)
        self.conv1 = _conv(mid, mid, 3, 1 if stride_in_first else stride, rngs)
        self.bn1 = _bn(mid, rngs)
        self.conv2 = _conv(mid, cout, 1, 1, rngs)
        self.bn2 = _bn(cout, rngs)
        self.shortcut = Shortcut(cin, cout, stride, rngs=rngs) if cin != cout or stride != 1 else None
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.act]
        residual = x if self.shortcut is None else self.shortcut(x)
        h = act(self.bn0(self.conv0(x)))
        h = act(self.bn1(self.conv1(h)))
        h = self.bn2(self.conv2(h))
        return act(h + residual)


class Stage(nnx.Module):
    def __init__(self, blocks: list[nnx.Module]):
        self.blocks = nnx.List(blocks)

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


class Stem(nnx.Module):
    def __init__(self, cin: int, cout: int, act: str, *, rngs: nnx.Rngs):
        self.conv = _conv(cin, cout, 7, 2, rngs)
        self.bn = _bn(cout, rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        x = ACTIVATIONS[self.act](self.bn(self.conv(x)))
        return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNet(nnx.Module):
    """ResNet for image classification; input NHWC float, output logits (or pooled features)."""

    def __init__(
        self,
        *,
        num_channels: int,
        embedding_size: int,
        hidden_sizes: list[int],
        depths: list[int],
        layer_type: str,
        hidden_act: str,
        downsample_in_first_stage: bool,
        downsample_in_bottleneck: bool,
        num_labels: int,
        rngs: nnx.Rngs,
    ):
        self.stem = Stem(num_channels, embedding_size, hidden_act, rngs=rngs)
        stages = []
        cin = embedding_size
        for s, (cout, depth) in enumerate(zip(hidden_sizes, depths, strict=True)):
            stride = 2 if s > 0 or downsample_in_first_stage else 1
            blocks: list[nnx.Module] = []
            for b in range(depth):
                block_in, block_stride = (cin, stride) if b == 0 else (cout, 1)
                if layer_type == "bottleneck":
                    blocks.append(BottleneckBlock(block_in, cout, block_stride, hidden_act,
                                                  downsample_in_bottleneck, rngs=rngs))
                else:
                    blocks.append(BasicBlock(block_in, cout, block_stride, hidden_act, rngs=rngs))
            stages.append(Stage(blocks))
            cin = cout
        self.stages = nnx.List(stages)
        self.classifier = nnx.Linear(cin, num_labels, rngs=rngs) if num_labels > 0 else None

    def features(self, x: jax.Array) -> jax.Array:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        pooled = self.features(x)
        return pooled if self.classifier is None else self.classifier(pooled)


def num_labels(config: Mapping[str, Any]) -> int:
    """Size of the classification head: 0 for a base model (``architectures: [ResNetModel]``), else
    transformers' rule: ``len(id2label)``, or ``num_labels`` (default 2)."""
    if "ResNetModel" in (config.get("architectures") or []):
        return 0
    if "id2label" in config and isinstance(config["id2label"], dict):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


class ResNetFamily(Family):
    name = "resnet"
    description = "ResNet-18/34/50/101/152 (transformers ResNetForImageClassification / ResNetModel)"
    mappings = ("resnet",)
    published: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "microsoft/resnet-50": {
            "architectures": ["ResNetForImageClassification"], "model_type": "resnet",
            "depths": [3, 4, 6, 3], "hidden_sizes": [256, 512, 1024, 2048], "embedding_size": 64,
            "layer_type": "bottleneck", "hidden_act": "relu", "downsample_in_first_stage": False,
            "num_channels": 3, "num_labels": 1000,
        },
        "microsoft/resnet-18": {
            "architectures": ["ResNetForImageClassification"], "model_type": "resnet",
            "depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512], "embedding_size": 64,
            "layer_type": "basic", "hidden_act": "relu", "downsample_in_first_stage": False,
            "num_channels": 3, "num_labels": 1000,
        },
    }
    image_size = 224
    channels_first_reference = True
    batch = 2

    layer_keys: ClassVar[Mapping[str, str]] = {
        "depths": r"^(?:resnet\.)?encoder\.stages\.(\d{1,9})\.layers\.(\d{1,9})\.",
    }

    def check_config(self, config: Mapping[str, Any]) -> None:
        depths = require(config, "depths", list)
        sizes = require(config, "hidden_sizes", list)
        if len(depths) != len(sizes) or not depths:
            raise ConfigError(f"config.json: 'depths' ({len(depths)} stages) and 'hidden_sizes' "
                              f"({len(sizes)}) must be non-empty and of equal length")
        if not all(isinstance(v, int) and v > 0 for v in [*depths, *sizes]):
            raise ConfigError("config.json: 'depths' and 'hidden_sizes' must hold positive integers")
        layer_type = config.get("layer_type", "bottleneck")
        if layer_type not in ("basic", "bottleneck"):
            raise ConfigError(f"config.json: layer_type {layer_type!r} is not supported "
                              "(nnxport's resnet family has 'basic' and 'bottleneck')")
        act = config.get("hidden_act", "relu")
        if act not in ACTIVATIONS:
            raise ConfigError(f"config.json: hidden_act {act!r} is not supported "
                              f"(supported: {', '.join(sorted(ACTIVATIONS))})")
        if layer_type == "bottleneck" and any(s % 4 for s in sizes):
            raise ConfigError("config.json: bottleneck 'hidden_sizes' must be multiples of 4")

    def build(self, config: Mapping[str, Any], rngs: nnx.Rngs, options: Mapping[str, Any]) -> nnx.Module:
        self.check_config(config)
        return ResNet(
            num_channels=int(config.get("num_channels", 3)),
            embedding_size=int(config.get("embedding_size", 64)),
            hidden_sizes=list(config["hidden_sizes"]),
            depths=list(config["depths"]),
            layer_type=str(config.get("layer_type", "bottleneck")),
            hidden_act=str(config.get("hidden_act", "relu")),
            downsample_in_first_stage=bool(config.get("downsample_in_first_stage", False)),
            downsample_in_bottleneck=bool(config.get("downsample_in_bottleneck", False)),
            num_labels=num_labels(config),
            rngs=rngs,
        )

    def reference_class(self, config: Mapping[str, Any], options: Mapping[str, Any]) -> str:
        if num_labels(config) == 0:
            return "ResNetModel"
        return "ResNetForImageClassification"

    def parity_inputs(self, config: Mapping[str, Any], seed: int) -> list[ParityInput]:
        rng = np.random.default_rng(seed)
        shape = (self.batch, self.image_size, self.image_size, int(config.get("num_channels", 3)))
        return [ParityInput("pixel_values", rng.standard_normal(shape, dtype=np.float32), seed)]

    def run_nnx(self, model: nnx.Module, inputs: list[ParityInput]) -> dict[str, np.ndarray]:
        assert isinstance(model, ResNet)
        x = jnp.asarray(inputs[0].value)
        if model.classifier is None:
            return {"pooler_output": np.asarray(nnx.jit(lambda m, x: m.features(x))(model, x))}
        return {"logits": np.asarray(nnx.jit(lambda m, x: m(x))(model, x))}

    def run_reference(self, model: Any, inputs: list[ParityInput]) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(inputs[0].value.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
        with torch.no_grad():
            out = model(pixel_values=x)
        if hasattr(out, "logits"):
            return {"logits": out.logits.float().numpy()}
        return {"pooler_output": out.pooler_output.float().flatten(1).numpy()}

    def tolerance(self, dtype: str) -> Tolerance:
        # From measurements on CPU with random replicas of microsoft/resnet-50 (docs/parity.md): fp32
        # max |Δ| 6.1e-5 on logits up to 82; bf16 weights 0.57 (0.69% of max |logit|), fp16 0.08 (0.1%).
        if dtype in ("bfloat16", "float16"):
            return Tolerance(atol=2e-2, rtol=2e-2, atol_relative=True)
        return Tolerance(atol=1e-4, rtol=1e-3)


FAMILY = ResNetFamily()
