"""ResNet (v1.5, as in transformers' ``ResNetModel``): basic and bottleneck blocks, NHWC.

Target paths (what ``mappings/resnet.yaml`` fills)::

    stem.conv.kernel, stem.bn.{scale,bias,mean,var}
    stages.S.blocks.B.conv{0,1[,2]}.kernel, stages.S.blocks.B.bn{0,1[,2]}.*
    stages.S.blocks.B.shortcut.conv.kernel, stages.S.blocks.B.shortcut.bn.*   (where channels/stride change)
    classifier.kernel, classifier.bias                                        (when num_labels > 0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxport.errors import ConfigError
from nnxport.models.base import Family, ParityHarness, ParityInput, Tolerance, require
from nnxport.models.base import num_labels as _num_labels
from nnxport.models.layers import ACTIVATIONS, TorchBatchNorm

LAYER_TYPES = ("basic", "bottleneck")


# ------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class ResNetSpec:
    """Everything the NNX model needs, resolved from config.json (see :func:`resolve`).

    Attributes:
        num_channels: input image channels.
        embedding_size: channels of the stem (7x7 conv, stride 2, then 3x3 max pool).
        hidden_sizes: output channels of each stage.
        depths: blocks per stage (as many as ``hidden_sizes``).
        layer_type: ``basic`` (two 3x3 convs) or ``bottleneck`` (1x1, 3x3, 1x1 with ``size / 4`` inside).
        hidden_act: transformers' activation name (a key of ``ACTIVATIONS``).
        downsample_in_first_stage: the first stage's first block has stride 2 too.
        downsample_in_bottleneck: bottleneck blocks stride in their first 1x1 conv (v1) rather than in the
            3x3 (v1.5, the default).
        num_labels: classifier outputs; 0 for the headless ``ResNetModel`` (pooled features out).
        batch_norm_eps: BatchNorm epsilon. transformers' ResNet builds ``nn.BatchNorm2d(channels)`` with
            torch's defaults and no config.json field: 1e-5.
        batch_norm_momentum: BatchNorm momentum *in torch's convention* (the weight of the new batch,
            torch's default 0.1); the NNX layers use flax's ``1 - momentum`` (0.9), see
            :class:`~nnxport.models.layers.TorchBatchNorm`.
    """

    num_channels: int
    embedding_size: int
    hidden_sizes: tuple[int, ...]
    depths: tuple[int, ...]
    layer_type: str
    hidden_act: str
    downsample_in_first_stage: bool
    downsample_in_bottleneck: bool
    num_labels: int
    batch_norm_eps: float = 1e-5
    batch_norm_momentum: float = 0.1

    @property
    def flax_momentum(self) -> float:
        """flax's BatchNorm momentum (the weight of the running statistics): ``1 - torch momentum``."""
        return 1.0 - self.batch_norm_momentum


def num_labels(config: Mapping[str, Any]) -> int:
    """Size of the classification head: 0 for a base model (``architectures: [ResNetModel]``), else
    transformers' rule: ``len(id2label)``, or ``num_labels`` (default 2)."""
    return _num_labels(config, base_model="ResNetModel" in (config.get("architectures") or []))


def resolve(config: Mapping[str, Any]) -> ResNetSpec:
    """The :class:`ResNetSpec` of ``config``; ConfigError naming the field for anything not implemented."""
    depths = require(config, "depths", list)
    sizes = require(config, "hidden_sizes", list)
    if len(depths) != len(sizes) or not depths:
        raise ConfigError(f"config.json: 'depths' ({len(depths)} stages) and 'hidden_sizes' "
                          f"({len(sizes)}) must be non-empty and of equal length")
    if not all(isinstance(v, int) and v > 0 for v in [*depths, *sizes]):
        raise ConfigError("config.json: 'depths' and 'hidden_sizes' must hold positive integers")
    layer_type = config.get("layer_type", "bottleneck")
    if layer_type not in LAYER_TYPES:
        raise ConfigError(f"config.json: layer_type {layer_type!r} is not supported "
                          "(nnxport's resnet family has 'basic' and 'bottleneck')")
    act = config.get("hidden_act", "relu")
    if act not in ACTIVATIONS:
        raise ConfigError(f"config.json: hidden_act {act!r} is not supported "
                          f"(supported: {', '.join(sorted(ACTIVATIONS))})")
    if layer_type == "bottleneck" and any(s % 4 for s in sizes):
        raise ConfigError("config.json: bottleneck 'hidden_sizes' must be multiples of 4")
    return ResNetSpec(
        num_channels=int(config.get("num_channels", 3)),
        embedding_size=int(config.get("embedding_size", 64)),
        hidden_sizes=tuple(sizes),
        depths=tuple(depths),
        layer_type=str(layer_type),
        hidden_act=str(act),
        downsample_in_first_stage=bool(config.get("downsample_in_first_stage", False)),
        downsample_in_bottleneck=bool(config.get("downsample_in_bottleneck", False)),
        num_labels=num_labels(config),
    )


# -------------------------------------------------------------------------------------------- model

def _conv(cin: int, cout: int, k: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    # torch pads k // 2 on every side; "SAME" would differ for stride 2 with even inputs.
    p = k // 2
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((p, p), (p, p)), use_bias=False, rngs=rngs)


def _bn(c: int, spec: ResNetSpec, rngs: nnx.Rngs) -> nnx.BatchNorm:
    # Eval mode (running statistics) until model.train(); torch's momentum and epsilon (ResNetSpec).
    return TorchBatchNorm(c, use_running_average=True, epsilon=spec.batch_norm_eps,
                          momentum=spec.flax_momentum, rngs=rngs)


class Shortcut(nnx.Module):
    """The projection shortcut of a block whose channels or stride change: 1x1 conv + BatchNorm.

    Args:
        cin: input channels.
        cout: output channels.
        stride: the block's stride.
        spec: the model's spec (BatchNorm settings).
        rngs: random streams.
    """

    def __init__(self, cin: int, cout: int, stride: int, spec: ResNetSpec, *, rngs: nnx.Rngs):
        self.conv = _conv(cin, cout, 1, stride, rngs)
        self.bn = _bn(cout, spec, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """The projected residual (no activation).

        Args:
            x: NHWC activations.
        """
        return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
    """Two 3x3 conv + BatchNorm layers and a residual (ResNet-18/34).

    Args:
        cin: input channels.
        cout: output channels.
        stride: stride of the first conv (and of the shortcut).
        spec: the model's spec (activation).
        rngs: random streams.
    """

    def __init__(self, cin: int, cout: int, stride: int, spec: ResNetSpec, *, rngs: nnx.Rngs):
        self.conv0 = _conv(cin, cout, 3, stride, rngs)
        self.bn0 = _bn(cout, spec, rngs)
        self.conv1 = _conv(cout, cout, 3, 1, rngs)
        self.bn1 = _bn(cout, spec, rngs)
        self.shortcut = Shortcut(cin, cout, stride, spec, rngs=rngs) if cin != cout or stride != 1 else None
        self.act = spec.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        """The block's output [B, H / stride, W / stride, cout].

        Args:
            x: NHWC activations [B, H, W, cin].
        """
        act = ACTIVATIONS[self.act]
        residual = x if self.shortcut is None else self.shortcut(x)
        h = act(self.bn0(self.conv0(x)))
        h = self.bn1(self.conv1(h))
        return act(h + residual)


class BottleneckBlock(nnx.Module):
    """1x1 (reduce to ``cout / 4``), 3x3, 1x1 (expand) conv + BatchNorm layers and a residual (ResNet-50+).

    Args:
        cin: input channels.
        cout: output channels (a multiple of 4).
        stride: the block's stride: in the 3x3 conv (v1.5), or in the first 1x1 with the spec's
            ``downsample_in_bottleneck``.
        spec: the model's spec (activation, where the stride goes).
        rngs: random streams.
    """

    def __init__(self, cin: int, cout: int, stride: int, spec: ResNetSpec, *, rngs: nnx.Rngs):
        mid = cout // 4
        first = spec.downsample_in_bottleneck
        self.conv0 = _conv(cin, mid, 1, stride if first else 1, rngs)
        self.bn0 = _bn(mid, spec, rngs)
        self.conv1 = _conv(mid, mid, 3, 1 if first else stride, rngs)
        self.bn1 = _bn(mid, spec, rngs)
        self.conv2 = _conv(mid, cout, 1, 1, rngs)
        self.bn2 = _bn(cout, spec, rngs)
        self.shortcut = Shortcut(cin, cout, stride, spec, rngs=rngs) if cin != cout or stride != 1 else None
        self.act = spec.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        """The block's output [B, H / stride, W / stride, cout].

        Args:
            x: NHWC activations [B, H, W, cin].
        """
        act = ACTIVATIONS[self.act]
        residual = x if self.shortcut is None else self.shortcut(x)
        h = act(self.bn0(self.conv0(x)))
        h = act(self.bn1(self.conv1(h)))
        h = self.bn2(self.conv2(h))
        return act(h + residual)


class Stage(nnx.Module):
    """A sequence of blocks; the first one changes channels and stride.

    Args:
        blocks: the blocks, in order.
    """

    def __init__(self, blocks: Sequence[nnx.Module]):
        self.blocks = nnx.List(list(blocks))

    def __call__(self, x: jax.Array) -> jax.Array:
        """The last block's output.

        Args:
            x: NHWC activations.
        """
        for block in self.blocks:
            x = block(x)
        return x


class Stem(nnx.Module):
    """7x7 conv (stride 2) + BatchNorm + activation, then a 3x3 max pool (stride 2).

    Args:
        spec: the model's spec (``num_channels``, ``embedding_size``, activation).
        rngs: random streams.
    """

    def __init__(self, spec: ResNetSpec, *, rngs: nnx.Rngs):
        self.conv = _conv(spec.num_channels, spec.embedding_size, 7, 2, rngs)
        self.bn = _bn(spec.embedding_size, spec, rngs)
        self.act = spec.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        """Features [B, H / 4, W / 4, embedding_size].

        Args:
            x: NHWC images [B, H, W, num_channels].
        """
        x = ACTIVATIONS[self.act](self.bn(self.conv(x)))
        return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _stage(spec: ResNetSpec, s: int, cin: int, *, rngs: nnx.Rngs) -> Stage:
    cout, depth = spec.hidden_sizes[s], spec.depths[s]
    stride = 2 if s > 0 or spec.downsample_in_first_stage else 1
    block = BottleneckBlock if spec.layer_type == "bottleneck" else BasicBlock
    blocks = [block(cin, cout, stride, spec, rngs=rngs)]
    blocks += [block(cout, cout, 1, spec, rngs=rngs) for _ in range(depth - 1)]
    return Stage(blocks)


class ResNet(nnx.Module):
    """ResNet for image classification, NHWC (transformers' ``ResNetForImageClassification`` /
    ``ResNetModel``).

    Args:
        spec: the resolved config (:func:`resolve`).
        rngs: random streams for the initialisers.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from nnxport.models.resnet import ResNet, resolve
        >>> spec = resolve({"depths": [1, 1], "hidden_sizes": [8, 16], "embedding_size": 8,
        ...                 "layer_type": "basic", "num_labels": 3})
        >>> model = ResNet(spec, rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 32, 32, 3))).shape
        (2, 3)
    """

    def __init__(self, spec: ResNetSpec, *, rngs: nnx.Rngs):
        self.stem = Stem(spec, rngs=rngs)
        cins = (spec.embedding_size, *spec.hidden_sizes[:-1])
        self.stages = nnx.List([_stage(spec, s, cin, rngs=rngs) for s, cin in enumerate(cins)])
        cout = spec.hidden_sizes[-1]
        self.classifier = nnx.Linear(cout, spec.num_labels, rngs=rngs) if spec.num_labels > 0 else None

    def features(self, x: jax.Array) -> jax.Array:
        """Pooled features (transformers' ``pooler_output``, flattened).

        Args:
            x: NHWC float images [B, H, W, num_channels].

        Returns:
            [B, hidden_sizes[-1]]: the last stage's output averaged over H and W.
        """
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits [B, num_labels] (the pooled features when the model has no classifier).

        Args:
            x: NHWC float images [B, H, W, num_channels].
        """
        pooled = self.features(x)
        return pooled if self.classifier is None else self.classifier(pooled)


# ------------------------------------------------------------------------------------------- family

class ResNetParity(ParityHarness):
    """ResNet parity: two seeded 224x224 NHWC images (NCHW for the reference); logits, or the pooled
    features of a base model."""

    image_size = 224
    batch = 2
    channels_first_reference = True

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


class ResNetFamily(Family):
    """The ``resnet`` family: config.json of ``model_type: resnet`` -> :class:`ResNetSpec` -> :class:`ResNet`.

    Mapping: ``mappings/resnet.yaml``; parity: :class:`ResNetParity`; tests: tests/e2e/test_convert.py.
    """

    name = "resnet"
    description = "ResNet-18/34/50/101/152 (transformers ResNetForImageClassification / ResNetModel)"
    mappings = ("resnet",)
    layer_keys: ClassVar[Mapping[str, str]] = {
        "depths": r"^(?:resnet\.)?encoder\.stages\.(\d{1,9})\.layers\.(\d{1,9})\.",
    }
    parity = ResNetParity()

    def resolve(self, config: Mapping[str, Any]) -> ResNetSpec:
        """See :func:`resolve`."""
        return resolve(config)

    def build(self, config: Mapping[str, Any], rngs: nnx.Rngs, options: Mapping[str, Any]) -> ResNet:
        return ResNet(resolve(config), rngs=rngs)


FAMILY = ResNetFamily()
