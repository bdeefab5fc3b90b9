"""nnxport.parity.generation on synthetic tokens: agreement, near ties, left padding."""

from __future__ import annotations

import numpy as np

from nnxport.models.base import Tolerance
from nnxport.parity.generation import Reference, compare_generation, left_padded

TOL = Tolerance(atol=1e-4, rtol=1e-3)


def _reference(tokens: list[list[int]], margin: float) -> Reference:
    """Logits over 5 tokens where the chosen token beats token 4 by ``margin`` and the rest by 1."""
    ref = np.asarray(tokens)
    scores = np.zeros((*ref.shape, 5), np.float32)
    for (r, s), t in np.ndenumerate(ref):
        scores[r, s] = -1.0
        scores[r, s, 4] = 1.0 - margin
        scores[r, s, t] = 1.0
    return Reference(ref, scores)


def test_all_match() -> None:
    check = compare_generation(np.array([[1, 2, 3], [0, 1, 2]]), _reference([[1, 2, 3], [0, 1, 2]], 0.5),
                               [2, 4], TOL)
    assert check.passed and check.all_match and check.agreement == 1.0 and check.divergences == []


def test_divergence_at_a_near_tie_passes_elsewhere_fails() -> None:
    got = np.array([[1, 4, 0], [0, 1, 2]])  # row 0 takes token 4 at step 1, then goes its own way
    near = compare_generation(got, _reference([[1, 2, 3], [0, 1, 2]], 5e-4), [2, 4], TOL)
    assert near.passed and not near.all_match and near.agreement == 4 / 6
    (d,) = near.divergences
    assert (d["row"], d["step"], d["reference_token"], d["nnx_token"], d["near_tie"]) == (0, 1, 2, 4, True)
    assert abs(d["reference_margin"] - 5e-4) < 1e-6
    far = compare_generation(got, _reference([[1, 2, 3], [0, 1, 2]], 0.5), [2, 4], TOL)
    assert not far.passed and far.divergences[0]["near_tie"] is False
    short = compare_generation(got[:, :2], _reference([[1, 2, 3], [0, 1, 2]], 0.5), [2, 4], TOL)
    assert not short.passed


def test_left_padded() -> None:
    ids = np.array([[5, 6, 7], [8, 9, 0]])
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    out_ids, out_mask = left_padded(ids, mask)
    np.testing.assert_array_equal(out_ids, [[5, 6, 7], [0, 8, 9]])
    np.testing.assert_array_equal(out_mask, [[1, 1, 1], [0, 1, 1]])
