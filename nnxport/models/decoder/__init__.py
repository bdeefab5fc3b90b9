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
mixtral           no; no                      (MoE)         no          sliding_window (every layer)
qwen3_moe         attention_bias; same        no            yes         use_sliding_window (every layer)
gpt_oss           attention_bias; same        (MoE)         no          layer_types (default: sliding,
                                                                        full, ... alternating)
================  ==========================  ============  ==========  ================================

The MoE model types (:mod:`nnxport.models.decoder.moe`) replace a block's MLP by a sparse MoE layer:
every layer for mixtral and gpt_oss; for qwen3_moe where ``decoder_sparse_step`` and ``mlp_only_layers``
say (:attr:`MoESpec.sparse`; the other layers keep the dense MLP). gpt_oss also has per-head attention
sinks and GptOssRMSNorm's order (scale in float32, then the cast); its RoPE is yarn (published: factor 32,
not truncated; also GptOssConfig's default when config.json names none).

RoPE types ``default``, ``linear`` and ``llama3`` (and ``yarn`` for gpt_oss) are implemented as in
transformers' modeling_rope_utils;
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
    layers.N.mlp.router.kernel                        (sparse layers) [hidden, E]; .bias (gpt_oss) [E]
    layers.N.mlp.experts.{gate,up}                    (sparse layers) [E, hidden, inner]
    layers.N.mlp.experts.down                         (sparse layers) [E, inner, hidden]
    layers.N.mlp.experts.{gate,up,down}_bias          (gpt_oss) [E, out]
    layers.N.attn.sinks                               (gpt_oss) [num_heads]
    norm.scale
    lm_head.kernel                                    [hidden, vocab], only when tie_word_embeddings is false
"""


from nnxport.models.decoder.config import DEFAULTS, MODEL_TYPES, DecoderSpec, Rope, resolve
from nnxport.models.decoder.family import FAMILY, DecoderFamily, DecoderParity
from nnxport.models.decoder.modules import Attention, Block, Decoder, RMSNorm
from nnxport.models.decoder.moe import MoESpec, SparseMoE

__all__ = ["DEFAULTS", "FAMILY", "MODEL_TYPES", "Attention", "Block", "Decoder", "DecoderFamily",
           "DecoderParity", "DecoderSpec", "MoESpec", "RMSNorm", "Rope", "SparseMoE", "resolve"]
