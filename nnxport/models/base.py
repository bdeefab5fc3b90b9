"""What a model family provides: config.json -> spec -> NNX model (:class:`Family`), and, separately, how
parity compares that model with its reference (:class:`ParityHarness`)."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from nnxport.errors import ConfigError


@dataclass(frozen=True)
class ParityInput:
    """One seeded input, in the NNX model's layout (e.g. NHWC images)."""

    name: str
    value: np.ndarray
    seed: int

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.value.shape), "dtype": str(self.value.dtype),
                "seed": self.seed}


@dataclass(frozen=True)
class Tolerance:
    """Element-wise ``|Δ| <= atol + rtol·|reference|``. With ``atol_relative``, ``atol`` is a fraction of
    max |reference| (for low-precision weights, whose error grows with the output's scale)."""

    atol: float
    rtol: float
    atol_relative: bool = False

    def effective_atol(self, scale: float) -> float:
        return self.atol * scale if self.atol_relative else self.atol

    def describe(self) -> dict[str, float | str]:
        out: dict[str, float | str] = {"atol": self.atol, "rtol": self.rtol}
        if self.atol_relative:
            out["atol_relative_to"] = "max_abs_reference"
        return out


class ParityHarness(ABC):
    """How parity compares a family's NNX model with its reference implementation.

    One harness per family, reachable as ``family.parity``; :func:`nnxport.parity.run_parity` drives it:
    :meth:`load_reference` (or ``transformers.<reference_class>.from_pretrained`` with
    :meth:`reference_kwargs`), :meth:`parity_inputs`, :meth:`run_reference` and :meth:`run_nnx` on them,
    then compares the named outputs within :meth:`tolerance`. Every method takes the config.json dict and
    the family's ``options`` as recorded in the manifest, so ``nnxport verify`` can rebuild the comparison
    from the output folder alone.
    """

    #: Outputs that are logits of a distribution over the last axis: parity also reports KL divergence
    #: and top-1 / top-5 agreement for them.
    distributions: tuple[str, ...] = ("logits",)
    #: The reference's 4-D activations are NCHW where the NNX model's are NHWC (vision families): per-layer
    #: parity transposes them before comparing.
    channels_first_reference: bool = False
    #: Causal LMs: parity also generates this many tokens greedily on both sides (``nnxport.generate``
    #: against the reference's ``generate(do_sample=False)``) from the ``input_ids`` / ``attention_mask``
    #: inputs, left-padded; 0: no generation check (nnxport.parity.generation).
    generation_tokens: int = 0

    def has_reference(self) -> bool:
        """Whether parity has a reference to compare with (a custom model may declare none)."""
        return True

    def load_reference(self, source: Any, config: Mapping[str, Any], options: Mapping[str, Any]
                       ) -> tuple[Any, str] | None:
        """The reference model and its name, when the harness builds it itself.

        Returns:
            ``(model, name)``, or None: the transformers class of :meth:`reference_class`, loaded from
            the source with ``from_pretrained``.
        """
        return None

    def reference_kwargs(self, config: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
        """Extra keyword arguments for the reference's ``from_pretrained`` (e.g. ``add_pooling_layer``)."""
        return {}

    @abstractmethod
    def reference_class(self, config: Mapping[str, Any], options: Mapping[str, Any]) -> str:
        """Name of the ``transformers`` class that is the reference implementation."""

    @abstractmethod
    def parity_inputs(self, config: Mapping[str, Any], seed: int) -> list[ParityInput]:
        """Seeded inputs in the NNX layout (the reference's layout is :meth:`run_reference`'s business)."""

    @abstractmethod
    def run_nnx(self, model: nnx.Module, inputs: list[ParityInput]) -> dict[str, np.ndarray]:
        """Named outputs of the NNX model on ``inputs``."""

    @abstractmethod
    def run_reference(self, model: Any, inputs: list[ParityInput]) -> dict[str, np.ndarray]:
        """Named outputs of the torch reference (same names and layout as :meth:`run_nnx`)."""

    @abstractmethod
    def tolerance(self, dtype: str) -> Tolerance:
        """Tolerance for outputs of a model whose weights are stored in ``dtype``."""


class Family(ABC):
    """A model family: one NNX implementation configured from a Hugging Face ``config.json``.

    The protocol is small (as keras-hub's converters): :meth:`resolve` turns config.json into the
    family's typed, frozen spec (refusing, with a ConfigError naming the field, anything that would change
    the computation and is not implemented), :meth:`build` constructs the model from it, and
    :meth:`options` derives the architecture choices that config.json does not state but the checkpoint's
    keys do (e.g. whether a BERT base model was saved with its pooler); they are recorded in the manifest
    and passed back to :meth:`build` and the parity harness. How the model is compared with its reference
    lives in :attr:`parity` (a :class:`ParityHarness`); the published configs that tests replicate live in
    :mod:`nnxport.testing.published`.
    """

    name: str
    description: str
    #: Built-in mappings (file stems in ``mappings/``) that target this family.
    mappings: tuple[str, ...]
    #: How parity compares this family's model with its reference.
    parity: ParityHarness
    #: config.json fields that count layers -> a regex over the source's keys whose group 1 is a layer's
    #: index (for a field holding a list per stage, as ResNet's ``depths``: group 1 the stage, group 2 the
    #: layer within it). :meth:`check_layers` compares the two before the model is built.
    layer_keys: ClassVar[Mapping[str, str]] = {}

    def check_layers(self, config: Mapping[str, Any], keys: Collection[str] | None) -> None:
        """ConfigError naming the field when config.json asks for more than :data:`MAX_LAYERS` layers, or
        (``keys``: the source's) for more layers than the checkpoint's keys hold — before anything is
        built, since building the abstract model takes time in proportion to its layers."""
        for field, regex in self.layer_keys.items():
            value = config.get(field)
            counts = value if isinstance(value, list) else [value]
            if not counts or not all(type(c) is int for c in counts):
                continue  # missing or mistyped: resolve() reports it
            if sum(counts) > MAX_LAYERS:
                raise ConfigError(f"config.json: field '{field}' asks for {sum(counts)} layers, more than "
                                  f"nnxport builds ({MAX_LAYERS})")
            have = _layers_in_keys(regex, keys or (), stages=isinstance(value, list))
            if not have:
                continue  # the keys are named some other way (a custom mapping): nothing to compare
            if isinstance(value, list):
                short = len(value) > len(have) or any(c > h for c, h in zip(value, have, strict=False))
                if short:
                    raise ConfigError(f"config.json: field '{field}' is {value}, but the checkpoint's keys "
                                      f"hold {have} layers per stage")
            elif isinstance(value, int) and value > have[0]:
                raise ConfigError(f"config.json: field '{field}' is {value}, but the checkpoint's keys hold "
                                  f"only {have[0]} layers (0..{have[0] - 1})")

    def options(self, config: Mapping[str, Any], keys: Collection[str]) -> dict[str, Any]:
        """Architecture options read from the source's tensor names (JSON-serialisable; default none).

        Args:
            config: config.json fields.
            keys: the source's tensor names.
        """
        return {}

    @abstractmethod
    def resolve(self, config: Mapping[str, Any]) -> Any:
        """The family's spec for ``config`` (a pure function of it).

        Raises:
            ConfigError: naming the field, for anything this family cannot represent.
        """

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Raise ConfigError naming the field if ``config`` asks for something this family cannot do."""
        self.resolve(config)

    @abstractmethod
    def build(self, config: Mapping[str, Any], rngs: nnx.Rngs, options: Mapping[str, Any]) -> nnx.Module:
        """Construct the model (called under ``nnx.eval_shape``: never materialised randomly).

        Args:
            config: config.json fields (resolved with :meth:`resolve`).
            rngs: the random streams of the initialisers (unused under ``nnx.eval_shape``).
            options: what :meth:`options` derived at conversion (from the manifest when reloading).
        """


def annotated_shards(state: nnx.State) -> dict[str, tuple[tuple[str, ...] | None, ...]]:
    """Each annotated leaf's default layout (its ``out_sharding`` metadata, as ``nnx.get_partition_spec``
    reads it), by dotted path, in the form of a mapping's ``shard:`` entry: per dimension, None (whole)
    or the mesh axes it is split over. Leaves without an annotation are absent (replicated)."""
    ndims = {path: len(leaf.get_value().shape) for path, leaf in nnx.to_flat_state(state)}
    out: dict[str, tuple[tuple[str, ...] | None, ...]] = {}
    for path, leaf in nnx.to_flat_state(nnx.get_partition_spec(state)):
        spec = leaf.get_value()
        if not isinstance(spec, PartitionSpec) or not any(d is not None for d in spec):
            continue
        dims = [None if d is None else (d,) if isinstance(d, str) else tuple(d) for d in spec]
        out[".".join(map(str, path))] = tuple(dims + [None] * (ndims[path] - len(dims)))
    return out


def require(config: Mapping[str, Any], field: str, kind: type | tuple[type, ...]) -> Any:
    """``config[field]``, checked to be of ``kind``; ConfigError naming the field otherwise."""
    if field not in config:
        raise ConfigError(f"config.json: missing field '{field}'")
    value = config[field]
    if isinstance(value, bool) and kind is not bool and not (isinstance(kind, tuple) and bool in kind):
        raise ConfigError(f"config.json: field '{field}' must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"config.json: field '{field}' must be {_kind_name(kind)}, got {value!r}")
    return value


def int_field(config: Mapping[str, Any], field: str, default: int, *, minimum: int = 1) -> int:
    """``config[field]`` (``default`` when absent), checked to be an integer >= ``minimum``."""
    value = config.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"config.json: field '{field}' must be an integer >= {minimum}, got {value!r}")
    return value


def positive_float_field(config: Mapping[str, Any], field: str, default: float) -> float:
    """``config[field]`` (``default`` when absent), checked to be a positive number."""
    value = config.get(field, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"config.json: field '{field}' must be a positive number, got {value!r}")
    return float(value)


def rate_field(config: Mapping[str, Any], field: str, default: float) -> float:
    """A dropout probability: ``config[field]`` (``default`` when absent or null), checked to lie in
    [0, 1); ConfigError naming the field otherwise."""
    value = config.get(field)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"config.json: field '{field}' must be a dropout probability in [0, 1), "
                          f"got {value!r}")
    return float(value)


def padding_idx_field(config: Mapping[str, Any], vocab_size: int, default: int | None) -> int | None:
    """``pad_token_id`` as torch's ``nn.Embedding(padding_idx=...)`` takes it (the row whose lookups get
    no gradient): None, or an id in ``[-vocab_size, vocab_size)`` (a negative one counts from the end);
    ConfigError naming the field otherwise (transformers could not build the model either)."""
    value = config.get("pad_token_id", default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not -vocab_size <= value < vocab_size:
        raise ConfigError(f"config.json: field 'pad_token_id' must be null or an id in "
                          f"[-{vocab_size}, {vocab_size}), got {value!r}")
    return value % vocab_size


def num_labels(config: Mapping[str, Any], *, base_model: bool) -> int:
    """Size of a classification head: 0 for a base model, else transformers' rule: ``len(id2label)``,
    or ``num_labels`` (default 2)."""
    if base_model:
        return 0
    if "id2label" in config and isinstance(config["id2label"], dict):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def token_inputs(vocab_size: int, seed: int, *, batch: int = 2, length: int = 16, padding: int = 5,
                 low: int = 0) -> list[ParityInput]:
    """Seeded ``input_ids`` [batch, length] (int32) and ``attention_mask``: the last row is right-padded
    with ``padding`` masked positions (pad id 0). Token ids are drawn from ``[low, vocab_size)``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(low, vocab_size, size=(batch, length), dtype=np.int64).astype(np.int32)
    mask = np.ones((batch, length), dtype=np.int32)
    if padding:
        mask[-1, length - padding:] = 0
        ids[-1, length - padding:] = 0
    return [ParityInput("input_ids", ids, seed), ParityInput("attention_mask", mask, seed)]


def valid_positions(out: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rows of a [batch, length, ...] output at unmasked positions, as [n_valid, ...]: padded positions
    carry no meaning and are not compared."""
    return np.asarray(out)[np.asarray(mask).astype(bool)]


MAX_LAYERS = 4096
"""The most layers (summed over stages) a config may ask for; published models have at most a few
hundred."""


def _layers_in_keys(regex: str, keys: Collection[str], *, stages: bool) -> list[int]:
    """Layers per stage (one entry without ``stages``) that the keys matching ``regex`` show: the highest
    index + 1; [] if no key matches."""
    pattern = re.compile(regex)
    top: dict[int, int] = {}
    for key in keys:
        if m := pattern.search(key):
            stage, index = (int(m[1]), int(m[2])) if stages else (0, int(m[1]))
            top[stage] = max(top.get(stage, 0), index + 1)
    return [top.get(i, 0) for i in range(max(top) + 1)] if top else []
