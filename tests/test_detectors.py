"""Fusion of several reference sets' scores (clipscrub.detectors.robust_z, fuse_scores)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from clipscrub.detectors import fuse_scores, robust_z

# whole numbers: spreads that survive the shift (a 1e-112 next to 1.0 would round away)
whole = st.integers(-1000, 1000).map(float)


def test_robust_z_by_hand():
    v = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    # median 3, MAD 1 -> scale 1.4826
    np.testing.assert_allclose(robust_z(v), (v - 3.0) / 1.4826)


def test_each_side_of_the_median_has_its_own_scale():
    v = np.array([0.0, 8.0, 9.0, 10.0, 12.0, 14.0, 30.0])  # median 10; below: deviations 10, 2, 1, 0
    lo, hi = 1.4826 * 1.5, 1.4826 * 3.0  # medians of [10, 2, 1, 0] and of [0, 2, 4, 20]
    np.testing.assert_allclose(robust_z(v), [-10 / lo, -2 / lo, -1 / lo, 0.0, 2 / hi, 4 / hi, 20 / hi])


def test_robust_z_without_spread_uses_the_mean_deviation_then_one():
    np.testing.assert_allclose(robust_z(np.array([5.0, 5.0, 5.0, 9.0])), [0.0, 0.0, 0.0, 4.0 / 1.0])
    np.testing.assert_allclose(robust_z(np.array([2.0, 2.0])), [0.0, 0.0])


def test_non_finite_scores_stay_non_finite_and_do_not_move_the_others():
    v = np.array([1.0, 2.0, 3.0, np.nan, np.inf])
    z = robust_z(v)
    np.testing.assert_allclose(z[:3], robust_z(v[:3]))
    assert np.isnan(z[3]) and z[4] == np.inf
    for rule in ("max_z", "max_abs_z", "mean_z"):
        fused = fuse_scores([v, np.array([3.0, 2.0, 1.0, 0.0, 5.0])], rule)
        assert not np.isfinite(fused[3]) and not np.isfinite(fused[4]), rule
        assert np.isfinite(fused[:3]).all(), rule


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.integers(3, 40), elements=whole), st.floats(0.01, 100), st.floats(-50, 50))
def test_robust_z_ignores_each_sets_units(v, scale, shift):
    """A set's scores in other units (a positive scale and a shift) give the same z-scores, so
    no size dominates the fusion by its units alone."""
    np.testing.assert_allclose(robust_z(v * scale + shift), robust_z(v), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule", ["max_z", "max_abs_z", "mean_z"])
def test_one_set_is_returned_as_it_is(rule):
    v = np.array([0.3, 0.1, 0.7])
    np.testing.assert_array_equal(fuse_scores([v], rule), v)


def test_fusion_rules_by_hand():
    a = np.array([0.0, 1.0, 2.0, 3.0, 10.0])  # z: (a - 2) / 1.4826
    b = np.array([10.0, 3.0, 2.0, 1.0, 0.0])  # mirrored
    za, zb = robust_z(a), robust_z(b)
    np.testing.assert_allclose(fuse_scores([a, b], "max_z"), np.maximum(za, zb))
    np.testing.assert_allclose(fuse_scores([a, b], "mean_z"), (za + zb) / 2)
    np.testing.assert_allclose(fuse_scores([a, b], "max_abs_z"), np.maximum(np.abs(za), np.abs(zb)))


def test_max_z_finds_poison_sparse_at_one_size_and_dense_at_another():
    """The case fusion exists for: at a small reference size the poison is far from everything
    (high score); at a large one it is each other's neighbours (lowest score)."""
    rng = np.random.default_rng(0)
    clean_small, clean_large = rng.normal(1.0, 0.1, 990), rng.normal(0.5, 0.05, 990)
    small = np.concatenate([clean_small, np.full(10, 2.0)])
    large = np.concatenate([clean_large, np.full(10, 0.1)])
    poison = np.arange(1000) >= 990
    fused = fuse_scores([small, large], "max_z")
    assert fused[poison].min() > fused[~poison].max()
    assert fuse_scores([small, large], "mean_z")[poison].min() < fuse_scores([small, large], "mean_z")[~poison].max()


def test_max_abs_z_finds_poison_dense_at_every_size():
    """Copies of one image are each other's neighbours in every reference set: the lowest
    scores everywhere. max_z ranks them last, max_abs_z first."""
    rng = np.random.default_rng(1)
    sets = [np.concatenate([rng.gamma(50.0, 0.02, 990), np.full(10, 0.02)]) for _ in range(3)]
    poison = np.arange(1000) >= 990
    abs_z, top_z = fuse_scores(sets, "max_abs_z"), fuse_scores(sets, "max_z")
    assert abs_z[poison].min() > abs_z[~poison].max()
    assert top_z[poison].max() < np.median(top_z[~poison])


def test_vet_copies_judges_copies_by_their_caption_mismatch():
    """A copy is scored by how unusual its caption is among its look-alikes' (high for a target
    caption, low for a clean re-posted photo), whatever its density said; the rest keep theirs."""
    from clipscrub.detectors import robust_z, vet_copies

    rng = np.random.default_rng(0)
    mismatch = np.abs(rng.normal(0.3, 0.05, size=200))
    mismatch[1], mismatch[2] = 0.0, 5.0  # 1: described like its look-alikes; 2: a caption none of them carries
    mismatch[3] = np.nan  # no look-alike to compare with
    fused = np.full(200, 6.0)
    fused[2] = 0.5  # a copied image the model left among its look-alikes: not sparse
    is_copy = np.zeros(200, dtype=bool)
    is_copy[[1, 2, 3]] = True
    out = vet_copies(fused, is_copy=is_copy, mismatch=mismatch)
    z = robust_z(mismatch)
    assert out[1] == z[1] < 0 and out[2] == z[2] > 6.0 and out[3] == 6.0
    np.testing.assert_array_equal(np.delete(out, [1, 2, 3]), 6.0)
    # fitted on a population: the z-scores of the copies use its median and spread
    population = np.arange(200) % 2 == 0
    np.testing.assert_array_equal(vet_copies(fused, is_copy=is_copy, mismatch=mismatch, population=population)[[1, 2]],
                                  robust_z(mismatch, fit=mismatch[population])[[1, 2]])


def test_caption_view_joins_as_the_mean_of_two_z_scores():
    """Poison unusual on both sides ranks above a sample unusual on one side only; NaN stays NaN."""
    from clipscrub.detectors import join_caption_view, robust_z

    rng = np.random.default_rng(1)
    image_z = rng.normal(size=100)
    caption = rng.gamma(4.0, 1.0, size=100)
    image_z[0], caption[0] = 6.0, 30.0  # poison: both
    image_z[1] = 9.0  # a rare photo under an ordinary caption
    caption[2] = 40.0  # a rare phrasing of an ordinary photo
    image_z[3] = np.nan
    out = join_caption_view(image_z, caption)
    np.testing.assert_allclose(out[4:], (image_z[4:] + robust_z(caption)[4:]) / 2)
    assert out[0] > max(out[1], out[2]) and np.isnan(out[3])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_iforest_scores_rows_in_threads_bit_for_bit(threads):
    """Rows split among threads score exactly as in one call; outliers score higher."""
    from clipscrub.detectors import IFOREST_MIN_ROWS, fit_iforest, iforest_score

    rng = np.random.default_rng(0)
    fit = rng.normal(size=(500, 8)).astype(np.float32)
    rows = rng.normal(size=(3 * IFOREST_MIN_ROWS + 17, 8)).astype(np.float32)
    rows[:5] += 8.0
    forest = fit_iforest(fit, n_estimators=20, max_samples=256, seed=0)
    one = -forest.score_samples(rows).astype(np.float64)
    got = iforest_score(forest, rows, threads=threads)
    np.testing.assert_array_equal(got, one)
    assert got[:5].min() > np.median(got[5:])


@pytest.mark.parametrize(("noise", "low", "high"), [(0.05, 0.99, 1.0), (None, 0.4, 0.6)])
def test_caption_alignment_tells_a_trained_pairing_from_chance(noise, low, high):
    """Captions near their own images: a sample's own caption outranks nearly all others; captions
    unrelated to the images: about half (chance)."""
    from clipscrub.detectors import caption_alignment

    rng = np.random.default_rng(0)
    image = rng.normal(size=(3000, 32))
    text = image + noise * rng.normal(size=image.shape) if noise else rng.normal(size=image.shape)
    got = caption_alignment(image, text, seed=0)
    assert got["samples"] == 1000 and low <= got["percentile"] <= high
    assert got == caption_alignment(image, text, seed=0)  # seeded
