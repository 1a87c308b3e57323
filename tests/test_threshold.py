from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipscrub.params import BaseSettings, ThresholdSettings
from clipscrub.flagging import flag_outliers, tail_cut
from clipscrub.stages.threshold import threshold_scores


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
    mask, cut = flag_outliers(values=v, ids=ids, detector="dao", settings=ThresholdSettings(method="top_fraction", fraction=fraction))
    assert mask.sum() == max(1, int(round(fraction * len(v))))
    assert v[mask].min() >= v[~mask].max() if (~mask).any() else True
    assert cut == v[mask].min()


def test_clip_score_low_is_suspicious():
    v = np.array([0.9, 0.1, 0.8, 0.95, -0.2])
    mask, _ = flag_outliers(values=v, ids=np.arange(5), detector="clip", settings=ThresholdSettings(detector="clip", method="top_fraction", fraction=0.4))
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
    mask, _ = flag_outliers(values=v, ids=np.arange(5), detector="dao", settings=ThresholdSettings(method="top_fraction", fraction=0.4))
    assert np.flatnonzero(mask).tolist() == [1, 2]


def test_non_finite_scores_are_flagged_not_dropped(tmp_path):
    scores = write_scores(tmp_path / "scores", dao=np.array([0.1, np.nan, 0.3, np.inf, 0.2, 0.0, -0.1, 0.05, 0.02, 0.01]))
    summary = threshold_scores(scores_dir=scores, out_dir=tmp_path / "flags", settings=ThresholdSettings(detector="dao", method="top_fraction", fraction=0.1), base=BaseSettings())
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


def test_auto_cut_is_median_plus_z_robust_mad():
    """The cut is exactly median + z x 1.4826 x MAD, on data where the usual slips (no 1.4826,
    std for MAD, mean for median) give clearly different cuts and flagged sets."""
    import statistics

    v = np.concatenate([np.linspace(-1, 1, 101), [2.0, 2.2, 3.0, 10.0, 50.0, 100.0]])
    z = 3.5
    med = statistics.median(v.tolist())
    mad = statistics.median([abs(x - med) for x in v.tolist()])
    want = med + z * 1.4826 * mad  # 2.862
    slips = {"no 1.4826": med + z * mad, "std": med + z * statistics.pstdev(v.tolist()),
             "mean": statistics.fmean(v.tolist()) + z * 1.4826 * mad}
    for name, other in slips.items():  # the data tell the slips apart
        assert abs(other - want) > 0.5 and (v >= other).tolist() != (v >= want).tolist(), name
    mask, cut = flag_outliers(values=v, ids=np.arange(len(v)), detector="kdist",
                              settings=ThresholdSettings(detector="kdist", method="auto", auto_z=z))
    assert cut == pytest.approx(want, rel=1e-12)
    assert sorted(v[mask].tolist()) == [3.0, 10.0, 50.0, 100.0]
    # low = suspicious: the same rule on the mirrored scores, its cut in cosine units
    mask, cut = flag_outliers(values=-v, ids=np.arange(len(v)), detector="clip",
                              settings=ThresholdSettings(detector="clip", method="auto", auto_z=z))
    assert cut == pytest.approx(-want, rel=1e-12)
    assert sorted((-v)[mask].tolist()) == [-100.0, -50.0, -10.0, -3.0]


@pytest.mark.parametrize("detector", ["clip", "kdist"])
@pytest.mark.parametrize("rule", [{"method": "top_fraction", "fraction": 0.05}, {"method": "auto", "auto_z": 2.0},
                                  {"method": "tail"}])
def test_written_cut_fed_back_as_score_flags_the_same(tmp_path, detector, rule):
    """The cut is written in the detector's own units (clip: a cosine inside the data, not its
    negation) with its direction, and ``method: score`` with it flags the same samples."""
    import json

    rng = np.random.default_rng(3)
    values = rng.normal(0.75 if detector == "clip" else 1.0, 0.05, size=200)
    values[[7, 50]] = [0.2, 0.1] if detector == "clip" else [2.0, 2.5]
    scores = write_scores(tmp_path / "scores", **{detector: values})
    first = threshold_scores(scores_dir=scores, out_dir=tmp_path / "flags",
                             settings=ThresholdSettings(detector=detector, **rule), base=BaseSettings())
    written = json.loads((tmp_path / "flags" / "threshold.json").read_text())
    assert written["cut"] == first["cut"]
    assert values.min() <= written["cut"] <= values.max()
    assert written["direction"] == ("below" if detector == "clip" else "above")
    flagged = pl.read_parquet(tmp_path / "flags" / "flags.parquet")["is_flagged"].to_list()
    assert 2 <= sum(flagged) < 200 and "warning" not in written
    again = threshold_scores(scores_dir=scores, out_dir=tmp_path / "again",
                             settings=ThresholdSettings(detector=detector, method="score", score=written["cut"]),
                             base=BaseSettings())
    assert pl.read_parquet(tmp_path / "again" / "flags.parquet")["is_flagged"].to_list() == flagged
    assert again["cut"] == written["cut"]


def test_auto_cut_without_spread_fed_back_flags_the_same():
    v = np.array([1.0] * 9 + [1.5])
    mask, cut = flag_outliers(values=v, ids=np.arange(10), detector="kdist", settings=ThresholdSettings(method="auto"))
    assert np.flatnonzero(mask).tolist() == [9] and 1.0 < cut <= 1.5
    again, _ = flag_outliers(values=v, ids=np.arange(10), detector="kdist",
                             settings=ThresholdSettings(method="score", score=cut))
    assert again.tolist() == mask.tolist()


def test_a_rule_that_flags_nothing_says_so(tmp_path, caplog):
    import logging

    scores = write_scores(tmp_path / "scores", clip=np.array([0.81, 0.9, np.nan, 0.97, 0.85]))
    with caplog.at_level(logging.WARNING, logger="clipscrub.threshold"):
        summary = threshold_scores(scores_dir=scores, out_dir=tmp_path / "flags",
                                   settings=ThresholdSettings(detector="clip", method="score", score=0.774),
                                   base=BaseSettings())
    want = "the rule flags 0 of 5 samples: no clip_score <= 0.774 (the finite scores range from 0.81 to 0.97)"
    assert summary["warning"] == want
    assert [r.getMessage() for r in caplog.records] == [f"threshold: {want}"]
    assert summary["flagged"] == 1  # the NaN, flagged for itself
    assert (tmp_path / "flags" / "flags.parquet").is_file()  # told, not stopped


def bulk_with_group(*, n: int, rate: float, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A normal bulk and a group of ``rate`` x n samples ``shift`` deviations above its median,
    spread as widely as the bulk: (values, is_group)."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=n)
    group = np.zeros(n, dtype=bool)
    group[rng.choice(n, size=int(round(rate * n)), replace=False)] = True
    sd = float(np.std(values))
    values[group] = np.median(values) + shift * sd + rng.normal(0, sd, size=int(group.sum()))
    return values, group


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("bulk", "at_most"), [("normal", 0.0005), ("gamma", 0.01)])
def test_tail_flags_little_of_a_bulk_alone(seed, bulk, at_most):
    """No group: a normal bulk loses a handful; a skewed one (gamma, skewness 0.7, a heavier tail
    than the normal the rule assumes) only the far end of its tail, not a fixed share."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=20_000) if bulk == "normal" else rng.gamma(8.0, 1.0, size=20_000)
    mask, cut = flag_outliers(values=values, ids=np.arange(len(values)), detector="kdist",
                              settings=ThresholdSettings(method="tail"))
    assert mask.sum() <= at_most * len(values)
    assert (values[mask] >= cut).all() and (values[~mask] < cut).all()


@pytest.mark.parametrize("rate", [0.001, 0.005, 0.03])
def test_tail_follows_the_size_of_a_group_that_stands_out(rate):
    """The same rule removes nearly all of a group at 0.1% and at 3%, and little else (its false
    share stays near tail_fdr or below)."""
    values, group = bulk_with_group(n=20_000, rate=rate, shift=8.0, seed=4)
    mask, _ = flag_outliers(values=values, ids=np.arange(len(values)), detector="kdist",
                            settings=ThresholdSettings(method="tail"))
    assert (mask & group).sum() >= 0.95 * group.sum()
    assert (mask & ~group).sum() <= max(5, 0.25 * group.sum())


def test_tail_cut_fdr_orders_the_cuts():
    """A larger tail_fdr accepts more of the bulk's tail: its cut is never higher."""
    values, _ = bulk_with_group(n=5000, rate=0.01, shift=5.0, seed=5)
    cuts = [tail_cut(values, fdr=q) for q in (0.01, 0.05, 0.2, 0.5)]
    assert cuts == sorted(cuts, reverse=True)


def _tail_cut_by_definition(values: np.ndarray, fdr: float) -> float:
    """tail_cut's rule over every value sorted: the lowest value t with N x P(Z >= z(t)) <= fdr x rank(t)."""
    from scipy.stats import norm

    from clipscrub.detectors import robust_scales

    v = np.sort(values)[::-1]
    med, _, scale = robust_scales(v)
    with np.errstate(over="ignore"):
        ok = np.flatnonzero(len(v) * norm.sf((v - med) / scale) <= fdr * np.arange(1, len(v) + 1))
    return float(v[ok.max()]) if ok.size else float(np.nextafter(v[0], np.inf))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from([0.0, 1.0, 1.5, 4.0]), st.floats(-1e3, 1e3)), min_size=1, max_size=300),
       st.sampled_from([0.01, 0.1, 0.5, 0.99]))
def test_tail_cut_sorts_only_the_tail_and_finds_the_same_cut(values, fdr):
    values = np.array(values)
    assert tail_cut(values, fdr=fdr) == _tail_cut_by_definition(values, fdr)


def test_tail_on_constant_scores_flags_nothing():
    mask, cut = flag_outliers(values=np.full(50, 2.0), ids=np.arange(50), detector="kdist",
                              settings=ThresholdSettings(method="tail"))
    assert not mask.any() and cut > 2.0


def test_a_rule_that_flags_more_than_half_says_so_where_a_person_looks(tmp_path):
    """The warning reaches the stage's words, `clipscrub show` and the Prefect artifact, not only
    a log line: a cut that takes the bulk (here 4 of 5) is no tail cut."""
    from clipscrub.flows.clean import summary_markdown
    from clipscrub.flows.cli import show_run, summary_text
    from clipscrub.params import parse_params

    scores = write_scores(tmp_path / "scores", clip=np.array([0.81, 0.9, 0.95, 0.97, 0.85]))
    summary = threshold_scores(scores_dir=scores, out_dir=tmp_path / "flags",
                               settings=ThresholdSettings(detector="clip", method="score", score=0.96),
                               base=BaseSettings())
    want = "the rule flags 4 of 5 samples, more than half: it is not cutting off a tail (check threshold.method and its cut)"
    assert summary["warning"] == want
    assert f"  warning: {want}" in summary_text("threshold", summary, wrote=[tmp_path / "flags"])
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "flags").rename(root / "flags")
    assert f"warning: {want}" in show_run(str(root)).splitlines()
    md = summary_markdown(parse_params({}), root, {"threshold": summary}, {"threshold": "Completed"})
    assert f"**Warning (threshold):** {want}" in md


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, -0.0, 1.0, 2.5, -3.0, float("nan"), float("inf"), float("-inf")])
                       | st.floats(-5, 5), min_size=1, max_size=40),
       detector=st.sampled_from(["kdist", "clip"]), shuffled=st.booleans())
def test_ranks_are_lexsorts_of_suspicion_then_id(values, detector, shuffled):
    """rank_samples (a search in the sorted keys and a count of earlier ties, where ids ascend)
    ranks as a lexsort of the oriented scores (non-finite first) and the ids does, ids in any
    order, a block of rows at a time."""
    from clipscrub.detectors import suspicion
    from clipscrub.stages.threshold import rank_samples

    values = np.array(values)
    ids = np.arange(len(values), dtype=np.int64) * 3
    if shuffled:
        ids = np.random.default_rng(len(values)).permutation(ids)
    s = suspicion(values, detector)
    expected = np.empty(len(values), dtype=np.int64)
    expected[np.lexsort((ids, -np.where(np.isfinite(s), s, np.inf)))] = np.arange(1, len(values) + 1)
    for block in (3, 1000):  # blocks cut anywhere, runs of ties among them
        got = np.concatenate(list(rank_samples(values=values, ids=ids, detector=detector, block=block)))
        np.testing.assert_array_equal(got, expected)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, -0.0, 1.0, 2.5, float("nan"), float("inf"), float("-inf")])
                       | st.floats(-5, 5), min_size=1, max_size=40),
       n=st.integers(1, 45), shuffled=st.booleans())
def test_top_rows_are_the_head_of_a_sort_of_every_finite_score(values, n, shuffled):
    """top_fraction's rows, taken from those at or above the n-th largest score, are the first n
    of every finite score sorted by (score descending, id)."""
    from clipscrub.flagging import top_rows

    s = np.array(values)
    ids = np.arange(len(s), dtype=np.int64)
    if shuffled:
        ids = np.random.default_rng(len(s)).permutation(ids)
    finite = np.isfinite(s)
    fin = np.flatnonzero(finite)
    expected = fin[np.lexsort((ids[fin], -s[fin]))][:n]
    np.testing.assert_array_equal(top_rows(s, finite=finite, ids=ids, n=n), expected)
