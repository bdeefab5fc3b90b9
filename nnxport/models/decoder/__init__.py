"""Decoder-only language models: Llama (2, 3.x), Qwen2 / Qwen2.5, Qwen3 and Mistral, one implementation.

The four transformers classes (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``,
``MistralForCausalLM``) share one architecture: token embedding, pre-norm blocks of grouped-query
self-attention with rotary position embeddings and a SwiGLU MLP, a final RMSNorm and a language-model head
(tied to the embedding or not). They differ only in switches, resolved from config.json by
:func:`resolve` into a :class:`DecoderSpec`:

================  ==========================  ============  ==========  ================================
model_type        q/k/v bias; o bias          MLP bias      q/k norm    sliding window
================  ==========================  ============  ==========  ================================
llama             attention_bias; same        mlp_bias      no          no
qwen2             always; never               no            no          use_sliding_window, layers >=
                                                                        max_window_layers (layer_types)
qwen3             attention_bias; same        no            yes         as qwen2
mistral           no; no                      no            no          sliding_window (every layer)
================  ==========================  ============  ==========  ================================

RoPE types ``default``, ``linear`` and ``llama3`` are implemented as in transformers' modeling_rope_utils;
both config layouts are read: the hub's (``rope_theta`` and ``rope_scaling`` at the top level) and what
transformers 5 writes (``rope_parameters: {rope_type, rope_theta, ...}``).

Numerics follow transformers: RMSNorm in float32 (``weight * normed.to(input_dtype)``), cos/sin in float32
cast to the activations' dtype, attention scores, softmax and weighted sum in float32; everything else in
the dtype the weights are stored in (bf16 weights: bf16 matmuls, as transformers runs a bf16 model).
Every config.json field that changes the forward pass is implemented or refused by :func:`resolve`.

The Gemma and Phi-3 families (:mod:`nnxport.models.gemma`, :mod:`nnxport.models.phi3`) resolve their configs
into the same :class:`DecoderSpec` and run these modules, with the spec's switches on (``norm_plus_one``,
``sandwich_norms``, ``embed_scale``, ``query_scale``, ``attn_softcap``, ``final_softcap``, ``local_rope``,
``resid_dropout``); RoPE lives in :mod:`nnxport.models.rope`.

Target paths (what ``mappings/decoder.yaml`` fills)::

    embed.embedding                                   [vocab, hidden]
    layers.N.input_norm.scale, layers.N.post_attn_norm.scale
    layers.N.attn.{q,k,v,o}.kernel                    [in, out]; .bias where the model has biases
    layers.N.attn.{q_norm,k_norm}.scale               (qwen3) [head_dim]
    layers.N.mlp.{gate,up,down}.kernel                (.bias with llama's mlp_bias)
    norm.scale
    lm_head.kernel                                    [hidden, vocab], only when tie_word_embeddings is false
"""


from nnxport.models.decoder.config import DEFAULTS, MODEL_TYPES, DecoderSpec, Rope, resolve
from nnxport.models.decoder.family import FAMILY, DecoderFamily, DecoderParity
from nnxport.models.decoder.modules import Attention, Block, Decoder, RMSNorm

__all__ = ["DEFAULTS", "FAMILY", "MODEL_TYPES", "Attention", "Block", "Decoder", "DecoderFamily",
           "DecoderParity", "DecoderSpec", "RMSNorm", "Rope", "resolve"]
