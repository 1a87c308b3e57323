from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipscrub.params import BaseSettings, ThresholdSettings
from stages.threshold import flag_outliers, threshold_scores


def write_scores(directory, **columns):
    directory.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(columns.values())))
    pl.DataFrame({"id": np.arange(n), **{f"{k}_score": v for k, v in columns.items()}}).write_parquet(directory / "scores.parquet")
    return directory


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=300),
    fraction=st.floats(0.001, 0.999),
)
def test_top_fraction_flags_the_highest(values, fraction):
    v = np.array(values)
    ids = np.arange(len(v))
    mask, cut = flag_outliers(values=v, ids=ids, detector="dao", settings=ThresholdSettings(fraction=fraction))
    assert mask.sum() == max(1, int(round(fraction * len(v))))
    assert v[mask].min() >= v[~mask].max() if (~mask).any() else True
    assert cut == v[mask].min()


def test_clip_score_low_is_suspicious():
    v = np.array([0.9, 0.1, 0.8, 0.95, -0.2])
    mask, _ = flag_outliers(values=v, ids=np.arange(5), detector="clip", settings=ThresholdSettings(detector="clip", fraction=0.4))
    assert mask.tolist() == [False, True, False, False, True]
    mask, _ = flag_outliers(values=v, ids=np.arange(5), detector="clip", settings=ThresholdSettings(detector="clip", method="score", score=0.5))
    assert mask.tolist() == [False, True, False, False, True]


def test_fixed_score_and_auto_rules():
    rng = np.random.default_rng(0)
    v = rng.normal(size=1000)
    v[[3, 500]] = [25.0, 30.0]
    mask, cut = flag_outliers(values=v, ids=np.arange(1000), detector="kdist", settings=ThresholdSettings(detector="kdist", method="score", score=2.0))
    assert mask.tolist() == (v >= 2.0).tolist() and cut == 2.0
    mask, cut = flag_outliers(values=v, ids=np.arange(1000), detector="kdist", settings=ThresholdSettings(detector="kdist", method="auto", auto_z=6.0))
    assert np.flatnonzero(mask).tolist() == [3, 500]


def test_ties_at_the_cut_break_by_id():
    v = np.array([1.0, 5.0, 5.0, 5.0, 0.0])
    mask, _ = flag_outliers(values=v, ids=np.arange(5), detector="dao", settings=ThresholdSettings(fraction=0.4))
    assert np.flatnonzero(mask).tolist() == [1, 2]


def test_non_finite_scores_are_flagged_not_dropped(tmp_path):
    scores = write_scores(tmp_path / "scores", dao=np.array([0.1, np.nan, 0.3, np.inf, 0.2, 0.0, -0.1, 0.05, 0.02, 0.01]))
    summary = threshold_scores(scores_dir=scores, out_dir=tmp_path / "flags", settings=ThresholdSettings(detector="dao", fraction=0.1), base=BaseSettings())
    flags = pl.read_parquet(tmp_path / "flags" / "flags.parquet")
    assert flags.height == 10
    assert flags.filter(pl.col("is_non_finite"))["id"].to_list() == [1, 3]
    assert flags.filter(pl.col("is_flagged"))["id"].to_list() == [1, 2, 3]
    assert flags.filter(pl.col("id") == 1)["reason"].item() == "non_finite_dao_score"
    assert flags.filter(pl.col("id") == 2)["reason"].item() == "dao_score_top_fraction"
    assert summary["flagged"] == 3 and summary["non_finite"] == 2
    assert sorted(flags["rank"].to_list()) == list(range(1, 11))


def test_threshold_needs_the_detector_column(tmp_path):
    from clipscrub.errors import DataError

    scores = write_scores(tmp_path / "scores", kdist=np.arange(5.0))
    with pytest.raises(DataError) as info:
        threshold_scores(scores_dir=scores, out_dir=tmp_path / "flags", settings=ThresholdSettings(detector="dao"), base=BaseSettings())
    assert info.value.param == "threshold.detector"
    assert not (tmp_path / "flags").exists()
