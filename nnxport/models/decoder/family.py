"""The decoder family (:class:`DecoderFamily`) and its parity harness."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxport.models.base import Family, ParityHarness, ParityInput, Tolerance, token_inputs, valid_positions
from nnxport.models.decoder.config import REFERENCE, DecoderSpec, resolve
from nnxport.models.decoder.modules import Decoder


class DecoderParity(ParityHarness):
    """Decoder parity against the model type's transformers class (``LlamaForCausalLM``, ...): seeded
    token ids with a right-padded last row; logits at the unpadded positions (float32); then 8 greedy tokens
    from the same prompts left-padded."""

    generation_tokens = 8

    distributions = ("logits",)

    def reference_class(self, config: Mapping[str, Any], options: Mapping[str, Any]) -> str:
        return REFERENCE[resolve(config).model_type]

    def parity_inputs(self, config: Mapping[str, Any], seed: int) -> list[ParityInput]:
        return token_inputs(resolve(config).vocab_size, seed)

    def run_nnx(self, model: nnx.Module, inputs: list[ParityInput]) -> dict[str, np.ndarray]:
        assert isinstance(model, Decoder)
        ids, mask = (jnp.asarray(i.value) for i in inputs)
        logits = nnx.jit(lambda m, ids, mask: m(ids, mask))(model, ids, mask)
        return {"logits": valid_positions(np.asarray(logits.astype(jnp.float32)), inputs[1].value)}

    def run_reference(self, model: Any, inputs: list[ParityInput]) -> dict[str, np.ndarray]:
        import torch

        ids, mask = (torch.from_numpy(i.value.astype(np.int64)) for i in inputs)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return {"logits": valid_positions(logits.float().numpy(), inputs[1].value)}

    def tolerance(self, dtype: str) -> Tolerance:
        # Measured on CPU against the float32 reference, random replicas, logits at 27 valid positions:
        # float32 max |Δ| <= 3.6e-7 (|logits| up to 1.3; tiny configs of all four model types). Weights
        # in bf16 (the model then computes in bf16, norms and softmax in float32): max |Δ| 0.3-0.6% of
        # max |logit| with 2 layers, growing with depth: 0.9% (8 layers), 1.2% (16), 1.7% (28 layers,
        # hidden 128), 1.0% with hidden 512 and 8 layers; KL <= 1e-5.
        if dtype in ("bfloat16", "float16"):
            return Tolerance(atol=5e-2, rtol=5e-2, atol_relative=True)
        return Tolerance(atol=1e-4, rtol=1e-3)


class DecoderFamily(Family):
    """The ``decoder`` family: config.json of a llama / qwen2 / qwen3 / mistral model -> :class:`DecoderSpec`
    -> :class:`Decoder`.

    Mappings: ``mappings/decoder.yaml``; the MoE model types ``mappings/{mixtral,qwen3_moe,gpt_oss}.yaml``;
    parity: :class:`DecoderParity`; tests: tests/e2e/test_family_decoder.py, tests/e2e/test_family_moe.py.
    """

    name = "decoder"
    description = ("Decoder-only LMs: Llama 2/3.x, Qwen2/2.5, Qwen3, Mistral; sparse MoE: Mixtral, "
                   "Qwen3-MoE, GPT-OSS (unquantized) (transformers LlamaForCausalLM, Qwen2ForCausalLM, "
                   "Qwen3ForCausalLM, MistralForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM, "
                   "GptOssForCausalLM)")
    mappings: tuple[str, ...] = ("decoder", "mixtral", "qwen3_moe", "gpt_oss")
    layer_keys: ClassVar[Mapping[str, str]] = {
        "num_hidden_layers": r"^model\.layers\.(\d{1,9})\.",
    }
    parity = DecoderParity()

    def resolve(self, config: Mapping[str, Any]) -> DecoderSpec:
        """See :func:`resolve`."""
        return resolve(config)

    def build(self, config: Mapping[str, Any], rngs: nnx.Rngs, options: Mapping[str, Any]) -> Decoder:
        return Decoder(resolve(config), rngs=rngs)


FAMILY = DecoderFamily()
