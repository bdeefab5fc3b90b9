"""The Phi-3 family: Phi-3 (mini/small-sized ``Phi3ForCausalLM`` checkpoints, 4k and 128k context) and
Phi-4 (``model_type: phi3``), on the decoder family's modules (:class:`~nnxport.models.decoder.Decoder`).

The architecture is Llama's with fused projections in the checkpoint: ``qkv_proj`` ([q; k; v] rows) and
``gate_up_proj`` ([gate; up] rows) are split by the mapping (``mappings/phi3.yaml``, a ``split`` op) into
the decoder's separate kernels. What differs in the computation, resolved by :func:`resolve`:

- RoPE ``default`` or ``longrope`` (``rope_scaling`` with ``short_factor`` / ``long_factor``; older
  checkpoints call it ``su``): the long factors apply once a forward pass's longest position exceeds
  ``original_max_position_embeddings``, cos and sin are multiplied by the attention factor
  (``sqrt(1 + ln(factor) / ln(original))``, factor = max_position_embeddings / original), and generation
  re-encodes the whole sequence when it crosses that length, as transformers' ``Phi3ForCausalLM`` does;
- ``partial_rotary_factor`` (Phi-4-mini: 0.75): only the first channels of each head rotate;
- ``sliding_window`` (not null): every layer attends to that many keys;
- ``resid_pdrop``: dropout on the attention and MLP outputs in train mode (``embd_pdrop`` is read by no
  transformers 5 code and changes nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from flax import nnx

from nnxport.errors import ConfigError
from nnxport.models.base import ParityInput, padding_idx_field, rate_field, token_inputs
from nnxport.models.decoder.config import DecoderSpec, _flag, _get, _int, _number
from nnxport.models.decoder.family import DecoderFamily, DecoderParity
from nnxport.models.decoder.modules import Decoder
from nnxport.models.layers import ACTIVATIONS
from nnxport.models.rope import Rope, parse_rope

REFERENCE = "Phi3ForCausalLM"
ROPE_TYPES = ("default", "longrope")


def resolve(config: Mapping[str, Any]) -> DecoderSpec:
    """The :class:`DecoderSpec` of a Phi-3 / Phi-4 config.json; ConfigError naming the field for anything
    not implemented."""
    if config.get("model_type") != "phi3":
        raise ConfigError(f"config.json: field 'model_type' is {config.get('model_type')!r}; the phi3 family "
                          "covers phi3")
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"config.json: field 'architectures' must be a list of class names, got {archs!r}")
    if archs and REFERENCE not in archs:
        raise ConfigError(f"config.json: field 'architectures' is {archs}; the phi3 family converts "
                          f"{REFERENCE}")
    if config.get("quantization_config") is not None:
        raise ConfigError("config.json: field 'quantization_config' is set; quantized checkpoints are not "
                          "supported (convert the unquantized weights)")
    hidden, heads = _int(config, "hidden_size"), _int(config, "num_attention_heads")
    kv_heads = heads if _get(config, "num_key_value_heads") is None else _int(config, "num_key_value_heads")
    if heads % kv_heads:
        raise ConfigError(f"config.json: field 'num_key_value_heads' ({kv_heads}) must divide "
                          f"num_attention_heads ({heads})")
    if hidden % heads:
        raise ConfigError(f"config.json: field 'hidden_size' ({hidden}) must be a multiple of "
                          f"num_attention_heads ({heads})")
    head_dim = hidden // heads
    if config.get("head_dim", head_dim) != head_dim:
        raise ConfigError(f"config.json: field 'head_dim' is {config['head_dim']!r}; phi3 models have "
                          f"hidden_size / num_attention_heads ({head_dim})")
    act = _get(config, "hidden_act")
    if act not in ACTIVATIONS:
        raise ConfigError(f"config.json: field 'hidden_act' is {act!r}, which nnxport does not implement "
                          f"(supported: {', '.join(sorted(ACTIVATIONS))})")
    window = _get(config, "sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ConfigError(f"config.json: field 'sliding_window' must be a positive integer or null, "
                          f"got {window!r}")
    num_layers, vocab = _int(config, "num_hidden_layers"), _int(config, "vocab_size")
    return DecoderSpec(
        model_type="phi3", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=_int(config, "intermediate_size"), num_layers=num_layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=_number(_get(config, "rms_norm_eps"), "rms_norm_eps"), hidden_act=act,
        qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False,
        tie_word_embeddings=_flag(config, "tie_word_embeddings"),
        rope=_rope(config, head_dim, _int(config, "max_position_embeddings")),
        windows=(window,) * num_layers,  # Phi3Model: one (sliding) causal mask for every layer
        attention_dropout=rate_field(config, "attention_dropout", 0.0),
        pad_token_id=padding_idx_field(config, vocab, 32000),
        resid_dropout=rate_field(config, "resid_pdrop", 0.0),
    )


def _rope(config: Mapping[str, Any], head_dim: int, max_positions: int) -> Rope:
    """Phi3Config.convert_rope_params_to_dict: ``rope_scaling`` or ``rope_parameters`` (one dict), its
    partial_rotary_factor else the top level's, ``su`` / ``yarn`` read as ``longrope``; the top-level
    original_max_position_embeddings (default 4096) wins over the dict's."""
    field = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    params = config.get(field) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: field '{field}' must be a mapping, got {params!r}")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    return parse_rope(params, field, model_type="phi3", types=ROPE_TYPES,
                      theta=config.get("rope_theta", 10000.0), head_dim=head_dim, max_positions=max_positions,
                      original=_get(config, "original_max_position_embeddings"), partial=partial,
                      aliases={"su": "longrope", "yarn": "longrope"})


class Phi3Parity(DecoderParity):
    """:class:`~nnxport.models.decoder.DecoderParity` against ``Phi3ForCausalLM``."""

    def reference_class(self, config: Mapping[str, Any], options: Mapping[str, Any]) -> str:
        resolve(config)
        return REFERENCE

    def parity_inputs(self, config: Mapping[str, Any], seed: int) -> list[ParityInput]:
        return token_inputs(resolve(config).vocab_size, seed)


class Phi3Family(DecoderFamily):
    """The ``phi3`` family: config.json of a phi3 model -> :class:`DecoderSpec` (:func:`resolve`) ->
    :class:`~nnxport.models.decoder.Decoder`.

    Mapping: ``mappings/phi3.yaml``; tests: tests/e2e/test_family_phi3.py.
    """

    name = "phi3"
    description = ("Phi-3 and Phi-4 decoders (transformers Phi3ForCausalLM; fused qkv / gate_up split on "
                   "the way)")
    mappings = ("phi3",)
    layer_keys: ClassVar[Mapping[str, str]] = {"num_hidden_layers": r"^model\.layers\.(\d{1,9})\."}
    parity = Phi3Parity()

    def resolve(self, config: Mapping[str, Any]) -> DecoderSpec:
        """See :func:`resolve`."""
        return resolve(config)

    def build(self, config: Mapping[str, Any], rngs: nnx.Rngs, options: Mapping[str, Any]) -> Decoder:
        return Decoder(resolve(config), rngs=rngs)


FAMILY = Phi3Family()
