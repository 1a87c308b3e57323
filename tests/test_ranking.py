from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from clipscrub.ranking import auroc, average_precision, fpr_at_tpr, pr_points, rank_counts, roc_points


@st.composite
def rankings(draw):
    """(scores, y): few distinct values, so ties between and within the classes are common; some
    scores +inf (non-finite, ranked on top)."""
    n = draw(st.integers(2, 60))
    scores = np.array(draw(st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.25, 1.0, 3.0, np.inf]), min_size=n, max_size=n)))
    y = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    i = draw(st.integers(0, n - 1))
    y[i], y[(i + draw(st.integers(1, n - 1))) % n] = True, False  # both classes
    return scores, y


@settings(max_examples=300, deadline=None)
@given(rankings(), st.sampled_from([1, 3, 1 << 20]))
def test_figures_equal_sklearns(ranking, chunk):
    scores, y = ranking
    finite = np.where(np.isfinite(scores), scores, 1e9)  # sklearn refuses inf: one value above all
    c = rank_counts(scores=scores, y=y, chunk=chunk)
    assert auroc(c) == pytest.approx(roc_auc_score(y, finite), abs=1e-12)
    assert average_precision(c) == pytest.approx(average_precision_score(y, finite), abs=1e-12)
    # every sklearn point (none dropped) lies on the corners' curve, and every corner is one of them
    fpr, tpr, _ = roc_curve(y, finite, drop_intermediate=False)
    mine = roc_points(c)
    assert {(round(a, 9), round(b, 9)) for a, b in zip(*mine)} <= {(round(a, 9), round(b, 9)) for a, b in zip(fpr, tpr)}
    assert mine[0][0] == 0 and mine[1][0] == 0 and mine[0][-1] == 1 and mine[1][-1] == 1
    for target in (0.0, 0.3, 0.5, 0.95, 1.0):
        i = int(np.searchsorted(tpr, target, side="left"))
        assert fpr_at_tpr(c, target) == pytest.approx(fpr[min(i, len(fpr) - 1)], abs=1e-12), target
    precision, recall, _ = precision_recall_curve(y, finite, drop_intermediate=True)
    r, p = pr_points(c)
    theirs = {(round(a, 9), round(b, 9)) for a, b in zip(recall, precision)}
    assert {(round(a, 9), round(b, 9)) for a, b in zip(r, p)} == theirs
    assert np.all(np.diff(r) <= 0) and r[-1] == 0 and p[-1] == 1


def test_counts_by_hand():
    # descending: 3 (pos), 2 (neg, pos), 1 (neg), 0 (pos, neg)
    c = rank_counts(scores=np.array([3.0, 2, 2, 1, 0, 0]), y=np.array([1, 0, 1, 0, 1, 0], bool))
    assert c.pos_ge.tolist() == [1, 2, 3] and c.pos_gt.tolist() == [0, 1, 2]
    assert c.neg_ge.tolist() == [0, 1, 3] and c.neg_gt.tolist() == [0, 0, 2]
    assert (c.positives, c.negatives) == (3, 3)
    # pairs: the top positive outranks 3 negatives; the one at 2 outranks 2 and ties 1; the one at 0 ties 1
    assert auroc(c) == pytest.approx((3 + 2 + 0.5 + 0.5) / 9)


@pytest.mark.parametrize("y", [np.zeros(4, bool), np.ones(4, bool)])
def test_one_class_is_refused(y):
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        rank_counts(scores=np.arange(4.0), y=y)


def test_curves_hold_points_per_positive_not_per_sample():
    rng = np.random.default_rng(0)
    y = np.zeros(200_000, bool)
    y[rng.choice(len(y), 20, replace=False)] = True
    c = rank_counts(scores=rng.normal(size=len(y)), y=y, chunk=4096)
    assert len(roc_points(c)[0]) <= 2 * 20 + 2 and len(pr_points(c)[0]) <= 2 * 20 + 2
