"""How two outputs are compared: the one function used for model outputs and for per-layer activations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from nnxport.errors import NnxportError
from nnxport.models import Tolerance


@dataclass(frozen=True)
class OutputDiff:
    """How one named output of the NNX model differs from the reference's.

    ``max_rel_diff`` is max |Δ| divided by max |reference| (the error relative to the output's scale);
    ``violations`` counts elements outside ``|Δ| <= atol + rtol * |reference|`` (numpy.allclose).
    For logits of a distribution: ``top5_agreement`` is the mean fraction of the reference's 5 most
    likely classes that are also among the NNX model's 5, and ``kl_divergence`` is the mean over rows of
    KL(reference || NNX) of the softmax over the last axis, in nats.
    """

    name: str
    shape: list[int]
    max_abs_diff: float
    max_rel_diff: float
    mean_abs_diff: float
    cosine: float
    top1_agreement: float | None
    violations: int
    passed: bool
    top5_agreement: float | None = None
    kl_divergence: float | None = None


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _distribution_metrics(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float]:
    """top-5 agreement (None with fewer than 6 classes) and mean KL(b || a) over the rows of the last
    axis; ``a`` is NNX, ``b`` the reference, both float64 logits."""
    log_p, log_q = _log_softmax(b), _log_softmax(a)
    kl = float((np.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean())
    top5 = None
    if a.shape[-1] > 5:
        mine = np.argpartition(-a, 5, axis=-1)[..., :5]
        theirs = np.argpartition(-b, 5, axis=-1)[..., :5]
        shared = (mine[..., :, None] == theirs[..., None, :]).any(-1).sum(-1)
        top5 = float(shared.mean() / 5)
    return top5, max(kl, 0.0)


@dataclass(frozen=True)
class Diff:
    """Element-wise difference of ``got`` and ``ref`` and its summary, as both outputs and per-layer
    activations are compared (:func:`difference`)."""

    a: np.ndarray  # got, in the computing dtype
    b: np.ndarray  # the reference, same dtype
    abs: np.ndarray  # |a - b|
    finite: bool  # both sides finite everywhere
    scale: float  # max |reference| (0 for an empty one)
    max_abs: float
    mean_abs: float

    @property
    def max_rel(self) -> float:
        """max |Δ| over max |reference| (0 when both are 0, inf when only the reference is 0)."""
        if self.scale > 0:
            return self.max_abs / self.scale
        return 0.0 if self.max_abs == 0 else float("inf")


def difference(got: np.ndarray, ref: np.ndarray, dtype: type[np.floating[Any]] = np.float64) -> Diff:
    """The one comparison of two arrays of the same shape, computed in ``dtype``."""
    a = np.asarray(got, dtype=dtype)
    b = np.asarray(ref, dtype=dtype)
    diff = np.abs(a - b)
    return Diff(a, b, diff, finite=bool(np.isfinite(a).all() and np.isfinite(b).all()),
                scale=float(np.abs(b).max()) if b.size else 0.0,
                max_abs=float(diff.max()) if diff.size else 0.0,
                mean_abs=float(diff.mean(dtype=np.float64)) if diff.size else 0.0)


def compare(name: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance, *,
            distribution: bool = False) -> OutputDiff:
    """Metrics of ``got`` (NNX) against ``ref`` (reference), computed in float64. ``distribution``:
    the last axis holds logits of a distribution (adds top-5 agreement and KL divergence)."""
    if got.shape != ref.shape:
        raise NnxportError(f"parity: output '{name}' has shape {got.shape} in NNX but {ref.shape} in the "
                           "reference")
    d = difference(got, ref)
    a, b, diff, finite, scale, max_abs = d.a, d.b, d.abs, d.finite, d.scale, d.max_abs
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(np.dot(a.ravel(), b.ravel()) / denom) if denom > 0 else float(max_abs == 0.0)
    top1 = None
    if a.ndim >= 2 and a.shape[-1] > 1:
        top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    violations = int((~(diff <= tol.effective_atol(scale) + tol.rtol * np.abs(b))).sum())
    top5, kl = None, None
    if distribution and finite and a.ndim >= 1 and a.size:
        top5, kl = _distribution_metrics(a, b)
    return OutputDiff(
        name=name,
        shape=list(a.shape),
        max_abs_diff=max_abs,
        max_rel_diff=d.max_rel,
        mean_abs_diff=d.mean_abs,
        cosine=cosine,
        top1_agreement=top1,
        violations=violations,
        passed=finite and violations == 0,
        top5_agreement=top5,
        kl_divergence=kl,
    )
