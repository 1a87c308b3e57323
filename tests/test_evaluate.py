from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from clipscrub.params import BaseSettings, EvaluateSettings, ThresholdSettings
from clipscrub.stages.evaluate import detection_metrics, evaluate_detectors


def test_perfect_and_inverted_detectors():
    y = np.array([0, 0, 0, 0, 1, 1, 0, 0, 0, 0], dtype=bool)
    perfect = y.astype(float) + np.linspace(0, 0.1, 10)
    m = detection_metrics(y=y, values=perfect, detector="dao", tpr_target=0.95, flagged=perfect > 0.9)
    assert m["auroc"] == 1.0 and m["pr_auc"] == 1.0 and m["fpr_at_tpr"] == 0.0
    assert m["precision_at_threshold"] == 1.0 and m["recall_at_threshold"] == 1.0
    inv = detection_metrics(y=y, values=perfect, detector="clip", tpr_target=0.95, flagged=np.zeros(10, bool))
    assert inv["auroc"] == 0.0 and inv["precision_at_threshold"] == 0.0 and inv["fpr_at_tpr"] == 1.0


def test_non_finite_scores_count_as_most_suspicious():
    y = np.array([1, 0, 0, 0], dtype=bool)
    m = detection_metrics(y=y, values=np.array([np.nan, 0.1, 0.2, 0.3]), detector="kdist", tpr_target=0.95, flagged=np.array([1, 0, 0, 0], bool))
    assert m["auroc"] == 1.0


@pytest.fixture(params=["tiny_run", "planted_run"])
def a_run(request):
    """(root, params, poisoned) of the tiny demo (whose victim learns nothing) and of the planted
    embeddings (where the default finds every poisoned sample)."""
    run = request.getfixturevalue(request.param)
    return run[0], run[1], {"tiny_run": 4, "planted_run": 40}[request.param]


def test_metrics_and_plots(a_run):
    root, params, poisoned = a_run
    metrics = json.loads((root / "metrics" / "detection.json").read_text())
    assert metrics["ground_truth"] is True
    assert metrics["poisoned"] == poisoned
    assert set(metrics["detectors"]) == set(params.score.detectors)
    flags = pl.read_parquet(root / "flags" / "flags.parquet")
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    # the threshold detector's precision/recall equal what the flags say
    tp = flags.join(manifest, on="id").filter(pl.col("is_flagged") & pl.col("is_poison")).height
    chosen = metrics["detectors"][params.threshold.detector]
    assert chosen["precision_at_threshold"] == pytest.approx(tp / flags["is_flagged"].sum())
    assert chosen["recall_at_threshold"] == pytest.approx(tp / poisoned)
    if poisoned == 40:  # detection works: the figures checked are not zeros
        assert tp == 40 and chosen["precision_at_threshold"] >= 0.8 and chosen["auroc"] >= 0.99
    scores = pl.read_parquet(root / "scores" / "scores.parquet").join(manifest.select("id", "is_poison"), on="id")
    y = scores["is_poison"].to_numpy()
    for d in params.score.detectors:
        # AUROC from its definition, P(poison scores above clean) with ties half, on the stage's own scores
        s = scores[f"{d}_score"].to_numpy() * (-1 if d == "clip" else 1)  # clip: low = suspicious
        pos, neg = s[y][:, None], s[~y][None, :]
        want = ((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size)
        assert metrics["detectors"][d]["auroc"] == pytest.approx(want, abs=1e-6), d
        assert roc_auc_score(y, s) == pytest.approx(want, abs=1e-9)
        roc = pl.read_csv(root / "plots" / "roc" / f"{d}.csv")
        assert roc.columns == ["fpr", "tpr"]
        # the plotted curve is that detector's: its area is the AUROC
        assert np.trapezoid(roc["tpr"].to_numpy(), roc["fpr"].to_numpy()) == pytest.approx(want, abs=1e-5), d
        hist = pl.read_csv(root / "plots" / "hist" / f"{d}.csv")
        assert hist["clean"].sum() + hist["poisoned"].sum() == manifest.height
        assert hist["poisoned"].sum() == poisoned


def copy_raw_without_truth(root, tmp_path) -> None:
    """``tmp_path/raw``: the tiny run's raw data with is_poison unknown."""
    _nulled_raw(root, tmp_path)


def test_without_ground_truth(tiny_run, tmp_path):
    root, params = tiny_run
    copy_raw_without_truth(root, tmp_path)
    metrics = evaluate_detectors(
        raw_dir=tmp_path / "raw", scores_dir=root / "scores", metrics_path=tmp_path / "m.json",
        plots_dir=tmp_path / "plots", settings=EvaluateSettings(), threshold=ThresholdSettings(), base=BaseSettings(),
    )
    assert metrics == {"ground_truth": False, "samples": 400}
    assert json.loads((tmp_path / "m.json").read_text()) == metrics


def test_applied_block_agrees_with_what_filter_removed(tiny_run):
    from clipscrub.metrics import APPLIED_KEYS

    root, params = tiny_run
    applied = json.loads((root / "metrics" / "applied.json").read_text())
    assert list(applied) == sorted(APPLIED_KEYS)  # flat, one value per key
    removed = set(pl.read_parquet(root / "clean" / "removed.parquet")["id"].to_list())
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    poison = set(manifest.filter(pl.col("is_poison"))["id"].to_list())
    assert applied["detector"] == params.threshold.detector and applied["rule"] == "top_fraction 0.05"
    assert (applied["samples"], applied["removed"]) == (400, len(removed)) == (400, 20)
    assert applied["removed_fraction"] == 0.05 and applied["removed_non_finite"] == 0
    assert applied["poison_known"] is True and applied["poison"] == len(poison) == 4
    assert applied["poison_removed"] == len(removed & poison)
    assert applied["poison_missed"] == len(poison - removed)
    assert applied["precision"] == round(len(removed & poison) / len(removed), 6)
    assert applied["recall"] == round(len(removed & poison) / len(poison), 6)
    # the same figures as detection.json's row for the detector thresholded
    chosen = json.loads((root / "metrics" / "detection.json").read_text())["detectors"][params.threshold.detector]
    assert (applied["precision"], applied["recall"]) == (chosen["precision_at_threshold"], chosen["recall_at_threshold"])


def test_applied_block_without_ground_truth(tiny_run, tmp_path):
    root, params = tiny_run
    copy_raw_without_truth(root, tmp_path)
    summary = evaluate_detectors(
        raw_dir=tmp_path / "raw", scores_dir=root / "scores", metrics_path=tmp_path / "m.json",
        plots_dir=tmp_path / "plots", settings=params.evaluate, threshold=params.threshold, base=params.base,
        flags_dir=root / "flags", applied_path=tmp_path / "applied.json",
    )
    applied = json.loads((tmp_path / "applied.json").read_text())
    assert summary["applied"] == applied
    assert (applied["samples"], applied["removed"], applied["removed_fraction"]) == (400, 20, 0.05)
    assert applied["poison_known"] is False
    assert all(applied[k] is None for k in ("poison", "poison_removed", "poison_missed", "precision", "recall"))


# --- evaluate.truth: ground truth from a table, joined by id or by key ---------------------------

def _nulled_raw(root, tmp_path):
    """A copy of the tiny run's raw data whose manifest knows no poison."""
    import shutil

    from clipscrub.io import seal_outputs

    shutil.copytree(root / "raw", tmp_path / "raw")
    m = pl.read_parquet(tmp_path / "raw" / "manifest.parquet").with_columns(is_poison=pl.lit(None, dtype=pl.Boolean))
    m.write_parquet(tmp_path / "raw" / "manifest.parquet")
    seal_outputs(tmp_path / "raw")  # as a download without ground truth would have written it
    return tmp_path / "raw"


def _evaluate(raw, root, tmp_path, truth):
    return evaluate_detectors(
        raw_dir=raw, scores_dir=root / "scores", metrics_path=tmp_path / "m.json", plots_dir=tmp_path / "plots",
        settings=EvaluateSettings(truth=str(truth)), threshold=ThresholdSettings(), base=BaseSettings(),
    )


def test_truth_table_by_id_wins_over_the_manifest(tiny_run, tmp_path):
    root, _ = tiny_run
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    chosen = set(range(5, 400, 40))  # 10 samples, none of the 4 the manifest marks
    assert not chosen & set(manifest.filter(pl.col("is_poison"))["id"].to_list())
    path = tmp_path / "truth.parquet"
    pl.DataFrame({"id": manifest["id"], "is_poison": [i in chosen for i in manifest["id"]]}).write_parquet(path)
    metrics = _evaluate(root / "raw", root, tmp_path, path)
    assert metrics["ground_truth"] is True and metrics["poisoned"] == 10
    scores = pl.read_parquet(root / "scores" / "scores.parquet")
    y = np.isin(scores["id"].to_numpy(), list(chosen))
    want = detection_metrics(y=y, values=scores["kdist_score"].to_numpy(), detector="kdist", tpr_target=0.95,
                             flagged=np.zeros(len(y), bool))
    assert metrics["detectors"]["kdist"]["auroc"] == want["auroc"]
    assert pl.read_csv(tmp_path / "plots" / "hist" / "kdist.csv")["poisoned"].sum() == 10


def test_truth_table_by_key_lists_only_the_poison(tiny_run, tmp_path):
    """Keys as text in a csv; samples the table does not list count as clean."""
    root, _ = tiny_run
    raw = _nulled_raw(root, tmp_path)
    keys = pl.read_parquet(raw / "manifest.parquet")["key"].to_list()
    path = tmp_path / "truth.csv"
    pl.DataFrame({"key": keys[:6], "is_poison": ["true", "TRUE", "1", "true", "false", "0"]}).write_csv(path)
    metrics = _evaluate(raw, root, tmp_path, path)
    assert metrics["ground_truth"] is True and metrics["poisoned"] == 4


@pytest.mark.parametrize("table,fragment", [
    ({"id": [0, 99999, 123456], "is_poison": [True, True, False]}, "2 ids in truth.csv are not samples of this dataset, e.g. [99999, 123456]"),
    ({"key": ["000000000", "nope"], "is_poison": [True, False]}, "1 keys in truth.csv are not samples of this dataset, e.g. ['nope']"),
    ({"id": [0, 1], "is_poison": ["true", "perhaps"]}, "column 'is_poison' holds 'perhaps' (row 1), not a boolean"),
    ({"id": [0, 0], "is_poison": [True, True]}, "1 ids are listed more than once, e.g. [0]"),
    ({"id": [0, 1], "poisoned": [True, True]}, "needs an 'is_poison' column and an 'id' or 'key' column"),
    ({"id": ["0", "x"], "is_poison": [True, True]}, "column 'id' holds 'x' (row 1), not an integer id"),
])
def test_bad_truth_tables_are_errors(tiny_run, tmp_path, table, fragment):
    from clipscrub.errors import DataError

    root, _ = tiny_run
    path = tmp_path / "truth.csv"
    pl.DataFrame(table).write_csv(path)
    with pytest.raises(DataError) as info:
        _evaluate(root / "raw", root, tmp_path, path)
    assert info.value.param == "evaluate.truth"
    assert fragment in info.value.message and "\n" not in str(info.value)
    assert not (tmp_path / "m.json").exists()


def test_truth_reaches_evaluate_and_report_through_the_pipeline(tiny_run, tmp_path):
    """`evaluate.truth` in params: both stages read it (one library function), the flow's cache
    key covers its content, and the report's lineage records it."""
    import shutil

    from clipscrub.flows.pipeline import Layout, run_stage, stage_inputs
    from tests.conftest import tiny_params

    root, _ = tiny_run
    data = tmp_path / "data"
    for d in ("embeddings", "index", "scores", "flags", "clean"):
        shutil.copytree(root / d, data / d)
    _nulled_raw(root, data)
    ids = pl.read_parquet(data / "raw" / "manifest.parquet")["id"]
    path = tmp_path / "truth.parquet"
    pl.DataFrame({"id": ids[:7], "is_poison": [True] * 7}).write_parquet(path)
    params = tiny_params([f"evaluate.truth={path}"])
    for stage in ("evaluate", "report"):
        assert stage_inputs(stage, params, Layout(data))["evaluate.truth"] == path
    assert "evaluate.truth" not in stage_inputs("report", tiny_params(), Layout(data))
    ev = run_stage("evaluate", params, data)
    assert ev["ground_truth"] is True and ev["poisoned"] == 7
    report = run_stage("report", params, data)
    assert report["ground_truth"] is True
    assert "Against the 7 samples" in (data / "report" / "index.html").read_text()
    lineage = json.loads((data / "report" / "lineage.json").read_text())["stages"]["report"]
    assert lineage["params"]["evaluate.truth"] == str(path) and "truth" in lineage["inputs"]
    # without the table the nulled manifest has no ground truth
    assert run_stage("report", tiny_params(), data)["ground_truth"] is False


# --- the review: applied.json counts what filter removed after filter.keep_ids / remove_ids -------

def reviewed_clean(root, out, *, keep: list[int], remove: list[int]):
    """The tiny run's flags filtered again with a keep list and a remove list (ids output: no
    shards); returns the params used."""
    from clipscrub.stages.filter import filter_dataset
    from tests.conftest import tiny_params

    out.parent.mkdir(parents=True, exist_ok=True)
    keep_path, remove_path = out.parent / "keep.txt", out.parent / "remove.txt"
    keep_path.write_text("".join(f"{i}\n" for i in keep))
    remove_path.write_text("".join(f"{i}\n" for i in remove))
    params = tiny_params([f"filter.keep_ids={keep_path}", f"filter.remove_ids={remove_path}", "filter.output=ids"])
    filter_dataset(raw_dir=root / "raw", scores_dir=root / "scores", flags_dir=root / "flags", out_dir=out,
                   settings=params.filter, params=params)
    return params


def review_choice(root) -> tuple[list[int], list[int]]:
    """Keep the two most suspicious flagged samples; remove the two known poison the flags missed
    and the first unflagged sample just under the cut."""
    flags = pl.read_parquet(root / "flags" / "flags.parquet").sort("rank")
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    poison = set(manifest.filter(pl.col("is_poison"))["id"].to_list())
    unflagged = flags.filter(~pl.col("is_flagged"))["id"].to_list()
    missed = [i for i in unflagged if i in poison][:2]
    assert len(missed) == 2
    keep = flags.filter(pl.col("is_flagged"))["id"].head(2).to_list()
    return keep, missed + [next(i for i in unflagged if i not in poison)]


def test_applied_block_counts_the_review(tiny_run, tmp_path):
    """With the filter's output, applied.json is of what filter removed: flags - keep + remove,
    its precision / recall against the truth recomputed here, and the review's share named."""
    root, params = tiny_run
    keep, remove = review_choice(root)
    reviewed_clean(root, tmp_path / "clean", keep=keep, remove=remove)
    summary = evaluate_detectors(
        raw_dir=root / "raw", scores_dir=root / "scores", metrics_path=tmp_path / "m.json",
        plots_dir=tmp_path / "plots", settings=params.evaluate, threshold=params.threshold, base=params.base,
        flags_dir=root / "flags", applied_path=tmp_path / "applied.json", clean_dir=tmp_path / "clean",
    )
    applied = json.loads((tmp_path / "applied.json").read_text())
    assert summary["applied"] == applied
    flags = pl.read_parquet(root / "flags" / "flags.parquet")
    flagged = set(flags.filter(pl.col("is_flagged"))["id"].to_list())
    poison = set(pl.read_parquet(root / "raw" / "manifest.parquet").filter(pl.col("is_poison"))["id"].to_list())
    removed = flagged - set(keep) | set(remove)
    assert set(pl.read_parquet(tmp_path / "clean" / "removed.parquet")["id"].to_list()) == removed
    assert (applied["removed"], applied["flagged"]) == (len(removed), len(flagged)) == (21, 20)
    assert (applied["removed_by_review"], applied["kept_by_review"]) == (3, 2)
    assert applied["poison_removed"] == len(removed & poison) == len(flagged & poison) + 2
    assert applied["poison_missed"] == len(poison - removed)
    assert applied["precision"] == round(len(removed & poison) / len(removed), 6)
    assert applied["recall"] == round(len(removed & poison) / len(poison), 6)
    assert applied["removed_fraction"] == round(len(removed) / 400, 6)
    # without the filter's output: the flags, as before (and no review keys)
    evaluate_detectors(
        raw_dir=root / "raw", scores_dir=root / "scores", metrics_path=tmp_path / "m2.json",
        plots_dir=tmp_path / "plots2", settings=params.evaluate, threshold=params.threshold, base=params.base,
        flags_dir=root / "flags", applied_path=tmp_path / "applied2.json",
    )
    from clipscrub.metrics import APPLIED_KEYS

    plain = json.loads((tmp_path / "applied2.json").read_text())
    assert set(plain) == set(APPLIED_KEYS) and plain["removed"] == len(flagged)


def test_applied_block_of_a_clean_version_from_other_scores_is_an_error(tiny_run, tmp_path):
    import shutil

    from clipscrub.errors import DataError

    root, params = tiny_run
    shutil.copytree(root / "clean", tmp_path / "clean", ignore=shutil.ignore_patterns("shards"))
    removed = pl.read_parquet(tmp_path / "clean" / "removed.parquet")
    pl.concat([removed, removed.head(1).with_columns(id=pl.lit(10_000, dtype=removed.schema["id"]))]).write_parquet(
        tmp_path / "clean" / "removed.parquet")
    with pytest.raises(DataError) as info:
        evaluate_detectors(
            raw_dir=root / "raw", scores_dir=root / "scores", metrics_path=tmp_path / "m.json",
            plots_dir=tmp_path / "plots", settings=params.evaluate, threshold=params.threshold, base=params.base,
            flags_dir=root / "flags", applied_path=tmp_path / "applied.json", clean_dir=tmp_path / "clean",
        )
    assert str(info.value) == "--clean: the cleaned version removed samples the scores do not hold: rerun filter"
