"""The parity metrics themselves: element-wise tolerance, KL divergence, top-1 / top-5 agreement."""

from __future__ import annotations

import numpy as np
import pytest

from nnxport.models.base import Tolerance, token_inputs, valid_positions
from nnxport.parity.metrics import compare

TOL = Tolerance(atol=1e-4, rtol=1e-3)


def test_identical_logits_have_zero_kl_and_full_agreement() -> None:
    logits = np.random.default_rng(0).standard_normal((7, 50)).astype(np.float32)
    d = compare("logits", logits, logits.copy(), TOL, distribution=True)
    assert d.passed and d.max_abs_diff == 0.0 and d.violations == 0
    assert d.kl_divergence == pytest.approx(0.0, abs=1e-12)
    assert d.top1_agreement == 1.0 and d.top5_agreement == 1.0


def test_kl_divergence_matches_the_closed_form() -> None:
    ref = np.log(np.array([[0.5, 0.25, 0.25]]))
    got = np.log(np.array([[0.25, 0.5, 0.25]]))
    expected = 0.5 * np.log(0.5 / 0.25) + 0.25 * np.log(0.25 / 0.5)  # KL(ref || got)
    d = compare("logits", got, ref, TOL, distribution=True)
    assert d.kl_divergence == pytest.approx(expected, rel=1e-9)
    assert d.top5_agreement is None  # fewer than 6 classes
    assert not d.passed


def test_top5_agreement_counts_shared_members_of_the_top_five() -> None:
    ref = np.arange(10, dtype=np.float64)[None, :]          # top-5: 5..9
    got = ref.copy()
    got[0, 9], got[0, 0] = got[0, 0], got[0, 9]             # 9 drops out, 0 enters
    d = compare("logits", got, ref, TOL, distribution=True)
    assert d.top5_agreement == pytest.approx(4 / 5)
    assert d.top1_agreement == 0.0


def test_non_distribution_outputs_have_no_kl() -> None:
    x = np.ones((2, 8), dtype=np.float32)
    d = compare("last_hidden_state", x, x, TOL)
    assert d.kl_divergence is None and d.top5_agreement is None


def test_violations_follow_allclose() -> None:
    ref = np.zeros((4, 4))
    got = ref.copy()
    got[0, 0] = 2e-4  # beyond atol 1e-4
    got[1, 1] = 5e-5  # within
    d = compare("x", got, ref, TOL)
    assert d.violations == 1 and not d.passed
    assert d.max_abs_diff == pytest.approx(2e-4)


def test_nan_fails_parity() -> None:
    ref = np.zeros((2, 3))
    got = ref.copy()
    got[0, 0] = np.nan
    assert not compare("x", got, ref, TOL).passed


def test_token_inputs_pad_the_last_row_and_valid_positions_drop_it() -> None:
    ids, mask = token_inputs(100, seed=3)
    assert ids.value.shape == mask.value.shape == (2, 16) and ids.value.dtype == np.int32
    assert mask.value[0].all() and mask.value[1].sum() == 11 and not mask.value[1, 11:].any()
    assert (ids.value[1, 11:] == 0).all() and ids.value.max() < 100
    again, _ = token_inputs(100, seed=3)
    np.testing.assert_array_equal(ids.value, again.value)  # seeded
    out = np.arange(2 * 16 * 3).reshape(2, 16, 3)
    kept = valid_positions(out, mask.value)
    assert kept.shape == (27, 3)
    np.testing.assert_array_equal(kept[16:], out[1, :11])
