from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from clipscrub.params import BaseSettings, EvaluateSettings, ThresholdSettings
from stages.evaluate import detection_metrics, evaluate_detectors


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


def test_metrics_and_plots_of_the_tiny_run(tiny_run):
    root, params = tiny_run
    metrics = json.loads((root / "metrics" / "detection.json").read_text())
    assert metrics["ground_truth"] is True
    assert metrics["poisoned"] == 4
    assert set(metrics["detectors"]) == set(params.score.detectors)
    flags = pl.read_parquet(root / "flags" / "flags.parquet")
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    # the threshold detector's precision/recall equal what the flags say
    tp = flags.join(manifest, on="id").filter(pl.col("is_flagged") & pl.col("is_poison")).height
    chosen = metrics["detectors"][params.threshold.detector]
    assert chosen["precision_at_threshold"] == pytest.approx(tp / flags["is_flagged"].sum())
    assert chosen["recall_at_threshold"] == pytest.approx(tp / 4)
    for d in params.score.detectors:
        roc = pl.read_csv(root / "plots" / "roc" / f"{d}.csv")
        assert roc.columns == ["fpr", "tpr"] and roc["tpr"][-1] == 1.0
        hist = pl.read_csv(root / "plots" / "hist" / f"{d}.csv")
        assert hist["clean"].sum() + hist["poisoned"].sum() == manifest.height
        assert hist["poisoned"].sum() == 4


def test_without_ground_truth(tiny_run, tmp_path):
    import shutil

    root, params = tiny_run
    shutil.copytree(root / "raw", tmp_path / "raw")
    m = pl.read_parquet(tmp_path / "raw" / "manifest.parquet").with_columns(is_poison=pl.lit(None, dtype=pl.Boolean))
    m.write_parquet(tmp_path / "raw" / "manifest.parquet")
    metrics = evaluate_detectors(
        raw_dir=tmp_path / "raw", scores_dir=root / "scores", metrics_path=tmp_path / "m.json",
        plots_dir=tmp_path / "plots", settings=EvaluateSettings(), threshold=ThresholdSettings(), base=BaseSettings(),
    )
    assert metrics == {"ground_truth": False, "samples": 400}
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
