"""The applied threshold's flat metrics block (clipscrub.metrics), on cases counted by hand."""

from __future__ import annotations

import polars as pl
import pytest

from clipscrub.metrics import APPLIED_KEYS, applied_metrics, applied_sentence, rule_text
from clipscrub.params import ThresholdSettings

# ten samples; 0, 1, 2 and 3 flagged (3 for a non-finite score); 0, 1 and 5 poisoned
FLAGS = pl.DataFrame({
    "id": list(range(10)),
    "is_flagged": [True, True, True, True] + [False] * 6,
    "is_non_finite": [False, False, False, True] + [False] * 6,
})
POISON = {0, 1, 5}
COUNTS = {"samples": 10, "flagged": 4, "kept_by_review": 0, "removed_by_review": 0, "removed": 4,
          "removed_fraction": 0.4, "removed_non_finite": 1}
UNKNOWN = {"poison_known": False, "poison": None, "poison_removed": None, "poison_missed": None,
           "precision": None, "recall": None}


def _truth(values):
    return pl.DataFrame({"id": list(range(10)), "is_poison": values}, schema={"id": pl.Int64, "is_poison": pl.Boolean})


@pytest.mark.parametrize(
    ("truth", "expected"),
    [
        pytest.param(_truth([i in POISON for i in range(10)]),
                     {"poison_known": True, "poison": 3, "poison_removed": 2, "poison_missed": 1,
                      "precision": 0.5, "recall": 0.666667}, id="ground-truth"),
        # the rows in another order, with an id that is not scored: joined by id
        pytest.param(pl.DataFrame({"id": [99, *range(9, -1, -1)], "is_poison": [True, *[i in POISON for i in range(9, -1, -1)]]}),
                     {"poison_known": True, "poison": 3, "poison_removed": 2, "poison_missed": 1,
                      "precision": 0.5, "recall": 0.666667}, id="ground-truth-shuffled"),
        pytest.param(None, UNKNOWN, id="no-truth"),
        pytest.param(_truth([None] * 10), UNKNOWN, id="all-null"),
        pytest.param(_truth([True, None] + [False] * 8), UNKNOWN, id="one-unknown"),
        pytest.param(_truth([True, True] + [False] * 7 + [True]).head(9), UNKNOWN, id="one-missing"),
        # known to be clean: nothing removed is poison; recall has no denominator
        pytest.param(_truth([False] * 10),
                     {"poison_known": True, "poison": 0, "poison_removed": 0, "poison_missed": 0,
                      "precision": 0.0, "recall": None}, id="known-clean"),
    ],
)
def test_applied_block_by_hand(truth, expected):
    block = applied_metrics(flags=FLAGS, truth=truth, threshold=ThresholdSettings(detector="dao", method="top_fraction", fraction=0.3))
    assert block == {"detector": "dao", "rule": "top_fraction 0.3", **COUNTS, **expected}
    assert tuple(block) == APPLIED_KEYS
    assert all(not isinstance(v, (dict, list)) for v in block.values())  # flat


def test_nothing_removed_has_no_precision():
    flags = FLAGS.with_columns(is_flagged=pl.lit(False), is_non_finite=pl.lit(False))
    block = applied_metrics(flags=flags, truth=_truth([i in POISON for i in range(10)]), threshold=ThresholdSettings())
    assert (block["removed"], block["removed_fraction"], block["poison_removed"], block["poison_missed"]) == (0, 0.0, 0, 3)
    assert block["precision"] is None and block["recall"] == 0.0


@pytest.mark.parametrize(
    ("settings", "rule"),
    [
        ({}, "tail fdr 0.1"),
        ({"method": "tail", "tail_fdr": 0.05}, "tail fdr 0.05"),
        ({"method": "top_fraction", "fraction": 0.01}, "top_fraction 0.01"),
        ({"method": "score", "score": 1.3}, "score >= 1.3"),
        ({"method": "score", "score": 0.2, "detector": "clip"}, "score <= 0.2"),
        ({"method": "auto"}, "auto z 3.5"),
        ({"method": "top_fraction", "fraction": 0.0123456789}, "top_fraction 0.0123456789"),
    ],
)
def test_rule_text(settings, rule):
    assert rule_text(ThresholdSettings(**settings)) == rule


def test_sentence():
    with_truth = applied_metrics(flags=FLAGS, truth=_truth([i in POISON for i in range(10)]), threshold=ThresholdSettings())
    assert applied_sentence(with_truth) == (
        "kdist, tail fdr 0.1: removed 4 of 10 (40.00%), 1 of them for a non-finite score; all flagged by the detectors. "
        "2 of the 4 removed are known poison (precision 0.500, recall 0.667; 1 known poison missed).")
    without = applied_metrics(flags=FLAGS, truth=None, threshold=ThresholdSettings())
    assert applied_sentence(without).endswith("No ground truth: precision and recall unknown.")
