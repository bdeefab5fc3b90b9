"""config.json -> :class:`DecoderSpec` for the decoder family (see the package docstring): every field
that changes the forward pass is implemented or refused by :func:`resolve`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nnxport.errors import ConfigError
from nnxport.models.base import padding_idx_field, rate_field
from nnxport.models.decoder.moe import MoESpec, resolve_moe
from nnxport.models.layers import ACTIVATIONS
from nnxport.models.rope import Rope, parse_rope

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe", "gpt_oss")
REFERENCE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
             "qwen3_moe": "Qwen3MoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")

#: Defaults of the transformers 5.23 config classes for every field this module reads (a field missing
#: from config.json takes them). ``None`` head_dim / num_key_value_heads: derived as transformers does.
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "attention_bias": False, "mlp_bias": False},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28},
    "qwen3": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096,
              "max_window_layers": 28},
    "mistral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
                "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "sliding_window": 4096},
    # MoE fields: nnxport.models.decoder.moe.MOE_DEFAULTS
    "mixtral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
                "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                "sliding_window": None},
    "qwen3_moe": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                  "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 4,
                  "hidden_act": "silu",  # no head_dim field: hidden_size // num_attention_heads
                  "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                  "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096},
    "gpt_oss": {"vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 36,
                "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "hidden_act": "silu",
                "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                "sliding_window": 128, "attention_bias": True},
    # The Gemma and Phi-3 families (nnxport.models.gemma, nnxport.models.phi3) read their fields with the
    # helpers of this module too.
    "gemma2": {"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
               "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
               "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
               "rms_norm_eps": 1e-6,
               "tie_word_embeddings": True, "attention_bias": False, "query_pre_attn_scalar": 256,
               "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
               "pad_token_id": 0},
    "gemma3_text": {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
                    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                    "head_dim": 256,
                    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
                    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "attention_bias": False,
                    "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": None,
                    "attn_logit_softcapping": None, "pad_token_id": 0},
    "gemma3": {"tie_word_embeddings": True},
    "phi3": {"vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
             "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False, "pad_token_id": 32000, "sliding_window": None,
             "resid_pdrop": 0.0},
}
#: GptOssConfig.default_theta (with rope_parameters that give no rope_theta).
GPT_OSS_ROPE_THETA = 150000.0
DEFAULT_ROPE_THETA = 10000.0



@dataclass(frozen=True)
class DecoderSpec:
    """Everything the NNX model needs, resolved from config.json (see :func:`resolve`)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    rope: Rope
    #: Per layer: the sliding window W (query i sees keys i-W < j <= i), or None for full causal attention.
    windows: tuple[int | None, ...]
    #: ``attention_dropout``: dropout on the attention probabilities (train mode only); these models have
    #: no other dropout.
    attention_dropout: float = 0.0
    #: ``pad_token_id``: the embedding row that lookups pass no gradient to (torch's ``padding_idx``).
    pad_token_id: int | None = None
    #: The sparse MoE layers (mixtral, qwen3_moe, gpt_oss; :mod:`nnxport.models.decoder.moe`), or None.
    moe: MoESpec | None = None
    #: GPT-OSS: a learned per-head logit joins every attention softmax (``layers.N.attn.sinks``).
    attention_sinks: bool = False
    #: GPT-OSS's RMSNorm order: the scale multiplies in float32, then the cast.
    norm_scale_first: bool = False
    # Switches of the Gemma and Phi-3 families (nnxport.models.gemma, nnxport.models.phi3); the defaults
    # are the Llama architecture.
    #: RMSNorm scales stored as offsets: ``normed * (1 + w)`` in float32, then cast (Gemma's order).
    norm_plus_one: bool = False
    #: Four norms per block: the attention and MLP outputs are normed before their residual adds (Gemma).
    sandwich_norms: bool = False
    #: Embeddings are multiplied by this, cast to the activations' dtype (Gemma: sqrt(hidden_size)).
    embed_scale: float | None = None
    #: Attention score scale (Gemma: query_pre_attn_scalar ** -0.5); None: head_dim ** -0.5.
    query_scale: float | None = None
    #: ``cap * tanh(x / cap)`` on the attention scores / on the final logits (Gemma 2); None: none.
    attn_softcap: float | None = None
    final_softcap: float | None = None
    #: The RoPE of the sliding-window layers (Gemma 3's local base); None: ``rope`` in every layer.
    local_rope: Rope | None = None
    #: Dropout on the attention and MLP outputs before their residual adds, train mode only (Phi-3's
    #: resid_pdrop); None: the model has no such dropout.
    resid_dropout: float | None = None

    def layer_ropes(self) -> tuple[Rope, ...]:
        """Each layer's RoPE: ``local_rope`` for the sliding-window layers when set, else ``rope``."""
        local = self.local_rope
        return tuple(self.rope if local is None or w is None else local for w in self.windows)


def _get(config: Mapping[str, Any], field: str) -> Any:
    """``config[field]``, or the config class's default when config.json does not have it."""
    defaults = DEFAULTS[config.get("model_type", "llama")]
    return config[field] if field in config else defaults.get(field)


def _int(config: Mapping[str, Any], field: str, *, minimum: int = 1) -> int:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config.json: field '{field}' must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"config.json: field '{field}' must be a number, got {value!r}")
    return float(value)


def _flag(config: Mapping[str, Any], field: str) -> bool:
    value = _get(config, field)
    if not isinstance(value, bool):
        raise ConfigError(f"config.json: field '{field}' must be true or false, got {value!r}")
    return value


def _rope(config: Mapping[str, Any], head_dim: int, max_positions: int,
          default_theta: float = DEFAULT_ROPE_THETA, types: tuple[str, ...] = ROPE_TYPES) -> Rope:
    """RoPE parameters the way transformers 5 standardises them (``convert_rope_params_to_dict``): a
    hub ``rope_scaling`` wins over ``rope_parameters``; ``rope_theta`` comes from that dict, else the top
    level, else 10000; the type from ``rope_type``, else the older ``type``, else ``default``; a top-level
    ``original_max_position_embeddings`` wins over the dict's, then max_position_embeddings."""
    field = "rope_scaling" if config.get("rope_scaling") is not None else "rope_parameters"
    params = config.get(field) or {}
    if isinstance(params, dict) and any(k in LAYER_TYPES for k in params):
        raise ConfigError(f"config.json: field '{field}' holds per-layer-type RoPE parameters, which "
                          f"{config.get('model_type')} models do not have")
    for where, prf in (("partial_rotary_factor", config.get("partial_rotary_factor")),
                       (f"{field}.partial_rotary_factor",
                        params.get("partial_rotary_factor") if isinstance(params, dict) else None)):
        if prf is not None and prf != 1.0:
            raise ConfigError(f"config.json: field '{where}' is {prf!r}; only full rotary embeddings (1.0) "
                              f"are supported for {config.get('model_type')} models")
    original = config.get("original_max_position_embeddings",
                          params.get("original_max_position_embeddings", max_positions)
                          if isinstance(params, dict) else max_positions)
    return parse_rope(params, field, model_type=str(config.get("model_type")), types=types,
                      theta=config.get("rope_theta", default_theta), head_dim=head_dim,
                      max_positions=max_positions, original=original)


def _windows(config: Mapping[str, Any], model_type: str, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding windows, as the transformers 5.23 classes decide them."""
    if model_type == "llama":
        return (None,) * num_layers
    window = _get(config, "sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ConfigError(f"config.json: field 'sliding_window' must be a positive integer or null, "
                          f"got {window!r}")
    if model_type in ("mistral", "mixtral"):  # one mask for every layer (layer_types is ignored)
        return (window,) * num_layers
    if model_type == "qwen3_moe":  # Qwen3MoeConfig: the window with use_sliding_window, on every layer
        return ((window if _flag(config, "use_sliding_window") else None),) * num_layers
    layer_types = config.get("layer_types")
    if model_type == "gpt_oss":  # GptOssConfig: sliding and full layers alternate, sliding first
        if layer_types is None:
            layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                           for i in range(num_layers)]
    # Qwen2Config / Qwen3Config.__post_init__: the window exists only with use_sliding_window; layer_types
    # (written by transformers 5) wins over max_window_layers.
    elif not _flag(config, "use_sliding_window"):
        window = None
    if layer_types is None:
        first = _int(config, "max_window_layers", minimum=0)
        layer_types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                       for i in range(num_layers)]
    return layer_windows(layer_types, window, num_layers)


def layer_windows(layer_types: Any, window: int | None, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer windows of a ``layer_types`` list: ``window`` for sliding_attention, None for
    full_attention; ConfigError naming the field for a short list, an unknown type, or a sliding layer
    without a window."""
    if not isinstance(layer_types, list) or len(layer_types) < num_layers:
        raise ConfigError(f"config.json: field 'layer_types' must list one type per layer "
                          f"({num_layers}), got {layer_types!r}")
    out: list[int | None] = []
    for t in layer_types[:num_layers]:
        if t not in LAYER_TYPES:
            raise ConfigError(f"config.json: field 'layer_types' has {t!r} "
                              f"(supported: {', '.join(LAYER_TYPES)})")
        if t == "sliding_attention" and window is None:
            raise ConfigError("config.json: field 'layer_types' asks for sliding_attention but "
                              "'sliding_window' is not set (or use_sliding_window is false)")
        out.append(window if t == "sliding_attention" else None)
    return tuple(out)


def resolve(config: Mapping[str, Any]) -> DecoderSpec:
    """The :class:`DecoderSpec` of ``config``; ConfigError naming the field for anything not implemented."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"config.json: field 'model_type' is {model_type!r}; the decoder family covers "
                          f"{', '.join(MODEL_TYPES)}")
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"config.json: field 'architectures' must be a list of class names, got {archs!r}")
    if archs and not any(a.lower().endswith("forcausallm") for a in archs):
        raise ConfigError(f"config.json: field 'architectures' is {archs}; the decoder family converts "
                          f"causal language models ({REFERENCE[model_type]})")
    # quantization_config is decided where sources are opened (nnxport.quant); the model is unquantized
    hidden, heads = _int(config, "hidden_size"), _int(config, "num_attention_heads")
    kv_heads = _get(config, "num_key_value_heads")
    kv_heads = heads if kv_heads is None else _int(config, "num_key_value_heads")
    if heads % kv_heads:
        raise ConfigError(f"config.json: field 'num_key_value_heads' ({kv_heads}) must divide "
                          f"num_attention_heads ({heads})")
    head_dim = _get(config, "head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"config.json: field 'hidden_size' ({hidden}) is not a multiple of "
                              f"num_attention_heads ({heads}) and 'head_dim' is not set")
        head_dim = hidden // heads
    else:
        head_dim = _int(config, "head_dim")
    if head_dim % 2:
        raise ConfigError(f"config.json: field 'head_dim' ({head_dim}) must be even for rotary embeddings")
    if model_type == "llama" and hidden % heads:  # LlamaConfig.validate_architecture
        raise ConfigError(f"config.json: field 'hidden_size' ({hidden}) must be a multiple of "
                          f"num_attention_heads ({heads}) for llama models")
    act = _get(config, "hidden_act")
    if act not in ACTIVATIONS:
        raise ConfigError(f"config.json: field 'hidden_act' is {act!r}, which nnxport's decoder family does "
                          f"not implement (supported: {', '.join(sorted(ACTIVATIONS))})")
    eps = _number(_get(config, "rms_norm_eps"), "rms_norm_eps")
    num_layers = _int(config, "num_hidden_layers")
    max_positions = _int(config, "max_position_embeddings")
    if model_type == "llama":
        qkv_bias = o_bias = _flag(config, "attention_bias")
        mlp_bias = _flag(config, "mlp_bias")
    elif model_type in ("qwen3", "qwen3_moe", "gpt_oss"):
        qkv_bias = o_bias = _flag(config, "attention_bias")
        mlp_bias = False
    else:
        qkv_bias, o_bias, mlp_bias = model_type == "qwen2", False, False
    return DecoderSpec(
        model_type=model_type,
        vocab_size=_int(config, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(config, "intermediate_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=eps,
        hidden_act=act,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        tie_word_embeddings=_flag(config, "tie_word_embeddings"),
        rope=_gpt_oss_rope(config, head_dim, max_positions) if model_type == "gpt_oss"
        else _rope(config, head_dim, max_positions),
        windows=_windows(config, model_type, num_layers),
        attention_dropout=rate_field(config, "attention_dropout", 0.0),
        pad_token_id=padding_idx_field(config, _int(config, "vocab_size"), None),
        moe=resolve_moe(config, model_type, num_layers, _int(config, "intermediate_size")),
        attention_sinks=model_type == "gpt_oss",
        norm_scale_first=model_type == "gpt_oss",
    )


#: GptOssConfig.__post_init__'s RoPE when config.json gives none (theta: GPT_OSS_ROPE_THETA).
GPT_OSS_DEFAULT_ROPE: dict[str, Any] = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                        "beta_slow": 1.0, "truncate": False,
                                        "original_max_position_embeddings": 4096}


def _gpt_oss_rope(config: Mapping[str, Any], head_dim: int, max_positions: int) -> Rope:
    """GptOssConfig's RoPE: default, linear, llama3 or yarn (published: yarn, factor 32, not truncated);
    yarn with factor 32 on an original 4096 positions when config.json names none; theta 150000 by
    default."""
    if config.get("rope_scaling") is None and config.get("rope_parameters") is None:
        config = {**config, "rope_parameters": dict(GPT_OSS_DEFAULT_ROPE)}
    return _rope(config, head_dim, max_positions, GPT_OSS_ROPE_THETA, (*ROPE_TYPES, "yarn"))
