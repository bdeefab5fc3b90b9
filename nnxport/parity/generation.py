"""Greedy-generation parity for causal LMs: N new tokens from ``nnxport.generate`` against transformers'
``generate(do_sample=False)`` on the same left-padded prompt.

Token agreement is what a user sees, but a greedy choice between two near-equal logits may flip under
differences far inside the logits' tolerance, and every later token then differs. So the check passes when
each row either matches token for token or first diverges at a near tie: where the reference's logit of its
own choice exceeds its logit of the NNX model's choice by at most the logits' tolerance (atol + rtol·|logit|,
the parity tolerance of the weights' dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flax import nnx

from nnxport.models.base import Tolerance


@dataclass(frozen=True)
class Reference:
    """transformers' greedy continuation: ``tokens`` [B, N] and the logits it chose from, [B, N, vocab]."""

    tokens: np.ndarray
    scores: np.ndarray


@dataclass
class GenerationCheck:
    """parity.json's ``generation``."""

    new_tokens: int
    prompt_shape: list[int]
    agreement: float
    all_match: bool
    #: Rows that diverge: row, step of the first differing token, both tokens, and the reference's logit
    #: margin between them (a near tie when within ``tolerance``).
    divergences: list[dict[str, Any]]
    passed: bool

    def to_json(self) -> dict[str, Any]:
        return {"new_tokens": self.new_tokens, "prompt_shape": self.prompt_shape, "agreement": self.agreement,
                "all_match": self.all_match, "divergences": self.divergences, "passed": self.passed}


def left_padded(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same prompts left-padded (pad id 0), as transformers wants them for decoder-only generation."""
    ids, mask = np.asarray(ids), np.asarray(mask).astype(bool)
    out_ids, out_mask = np.zeros_like(ids), np.zeros_like(mask, dtype=np.int32)
    for r in range(ids.shape[0]):
        tokens = ids[r][mask[r]]
        if len(tokens):
            out_ids[r, -len(tokens):] = tokens
            out_mask[r, -len(tokens):] = 1
    return out_ids, out_mask


def reference_generate(model: Any, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> Reference:
    """Greedy ``new_tokens`` from a transformers causal LM with its KV cache, no eos stopping."""
    import torch

    config = model.generation_config
    config.eos_token_id, config.pad_token_id = None, 0  # exactly new_tokens tokens, as nnxport's side
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids.astype(np.int64)),
                             attention_mask=torch.from_numpy(mask.astype(np.int64)),
                             max_new_tokens=new_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[:, ids.shape[1]:].numpy().astype(np.int32)
    scores = np.stack([s.float().numpy() for s in out.scores], axis=1)
    return Reference(tokens, scores)


def nnx_generate(model: nnx.Module, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy ``new_tokens`` from the NNX model (``nnxport.generate``), [B, new_tokens]."""
    from nnxport.generation import generate

    out = generate(model, ids, attention_mask=mask, max_new_tokens=new_tokens)
    return out[:, ids.shape[1]:]


def compare_generation(got: np.ndarray, expected: Reference, prompt_shape: list[int],
                       tol: Tolerance) -> GenerationCheck:
    """The check of the module docstring; ``got`` [B, N] tokens from the NNX model."""
    ref = expected.tokens
    n = ref.shape[1]
    got = np.asarray(got)[:, :n]
    same = got == ref if got.shape == ref.shape else np.zeros_like(ref, dtype=bool)
    divergences: list[dict[str, Any]] = []
    passed = got.shape == ref.shape
    for row in np.flatnonzero(~same.all(axis=1)) if passed else []:
        step = int(np.argmin(same[row]))
        logits = expected.scores[row, step]
        mine, theirs = int(got[row, step]), int(ref[row, step])
        margin = float(logits[theirs] - logits[mine])
        allowed = tol.effective_atol(float(np.max(np.abs(logits)))) + tol.rtol * abs(float(logits[theirs]))
        near_tie = margin <= allowed
        passed = passed and near_tie
        divergences.append({"row": int(row), "step": step, "reference_token": theirs, "nnx_token": mine,
                            "reference_margin": margin, "near_tie": near_tie})
    return GenerationCheck(new_tokens=n, prompt_shape=prompt_shape, agreement=float(same.mean()),
                           all_match=bool(same.all()), divergences=divergences, passed=passed)
