"""`clipscrub diff` between two output directories (DVC revisions and experiments: test_dvc.py)."""

from __future__ import annotations

import json
import re
import shutil

import polars as pl
import pytest

from clipscrub.flows.cli import main
from clipscrub.flows.pipeline import run_stage
from tests.conftest import tiny_params


@pytest.fixture(scope="module")
def two_versions(tiny_run, tmp_path_factory):
    """The tiny run (top 5% removed) and a copy re-thresholded at top 10%."""
    root, _ = tiny_run
    other = tmp_path_factory.mktemp("other") / "data"
    shutil.copytree(root, other)
    params = tiny_params(["threshold.fraction=0.1"])
    for stage in ("threshold", "filter", "evaluate"):
        run_stage(stage, params, other)
    return root, other


def test_diff_json_reconciles_with_both_removed_files(two_versions, tmp_path, capsys):
    a, b = two_versions
    out = tmp_path / "ids.parquet"
    assert main(["diff", str(a), str(b), "--format", "json", "--ids-out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["params"] == {"threshold.fraction": {"a": 0.05, "b": 0.1}}
    assert result["counts"]["a"]["removed"] == 20 and result["counts"]["b"]["removed"] == 40
    ra = set(pl.read_parquet(a / "clean" / "removed.parquet")["id"].to_list())
    rb = set(pl.read_parquet(b / "clean" / "removed.parquet")["id"].to_list())
    assert ra < rb  # a stricter top fraction removes a subset
    assert result["removed"] == {"only_a": 0, "only_b": 20, "both": 20, "jaccard": 0.5}
    ids = pl.read_parquet(out)
    assert set(ids["id"].to_list()) == ra ^ rb
    assert set(ids["removed_in"].to_list()) == {"b"}
    assert ids["reason"].to_list() == ["kdist_score_top_fraction"] * 20
    metrics = result["metrics"]["kdist"]
    assert metrics["auroc"]["delta"] == 0.0  # the scores did not change, only the cut
    assert metrics["recall_at_threshold"]["b"] >= metrics["recall_at_threshold"]["a"]
    # the applied threshold's block of each version, as evaluate wrote it, with B - A
    applied = result["applied"]
    for side, root in (("a", a), ("b", b)):
        block = json.loads((root / "metrics" / "applied.json").read_text())
        assert {k: v[side] for k, v in applied.items()} == block
    assert applied["rule"] == {"a": "top_fraction 0.05", "b": "top_fraction 0.1", "delta": None}
    assert applied["removed"] == {"a": 20, "b": 40, "delta": 20}
    assert applied["removed_fraction"] == {"a": 0.05, "b": 0.1, "delta": 0.05}
    assert applied["poison_known"] == {"a": True, "b": True, "delta": None}
    poison = set(pl.read_parquet(a / "raw" / "manifest.parquet").filter(pl.col("is_poison"))["id"].to_list())
    assert applied["poison_removed"]["a"] == len(ra & poison) and applied["poison_removed"]["b"] == len(rb & poison)
    assert applied["poison_missed"]["delta"] == -applied["poison_removed"]["delta"]
    assert applied["precision"]["a"] == metrics["precision_at_threshold"]["a"]
    assert applied["recall"]["b"] == metrics["recall_at_threshold"]["b"]


def test_diff_table(two_versions, tmp_path, capsys):
    a, b = two_versions
    assert main(["diff", str(a / "clean"), str(b), "--ids-out", str(tmp_path / "d.parquet")]) == 0
    text = capsys.readouterr().out
    assert "threshold.fraction" in text and "0.05 -> 0.1" in text
    assert re.search(r"removed\s+20\s+40\s+\+20", text) and re.search(r"kept\s+380\s+360\s+-20", text)
    assert "removed only in A: 0, only in B: 20, in both: 20 (Jaccard 0.5000)" in text
    assert "applied threshold (each version's metrics/applied.json):" in text
    assert re.search(r"rule\s+top_fraction 0\.05\s+top_fraction 0\.1\n", text)
    assert re.search(r"removed_fraction\s+0\.0500\s+0\.1000\s+\+0\.0500", text)
    assert re.search(r"poison_known\s+yes\s+yes\n", text) and re.search(r"\n  precision\s+\d\.\d{4}\s+\d\.\d{4}\s+[+-]\d", text)
    assert "20 differing ids written to" in text


def test_diff_of_something_that_is_no_version(tmp_path, capsys):
    assert main(["diff", str(tmp_path), "nope-rev", "--project", str(tmp_path), "--ids-out", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err
    assert "clipscrub: error: A:" in err and "holds no cleaned version" in err
    assert not (tmp_path / "x.parquet").exists()


def test_diff_shows_the_review_beside_the_detector(tiny_run, tmp_path, capsys):
    """A version reviewed with keep and remove lists against the unreviewed one: the review's
    counts of each, and the ids it changed with their reasons."""
    from clipscrub.stages.filter import filter_dataset

    root, _ = tiny_run
    flags = pl.read_parquet(root / "flags" / "flags.parquet").sort("id")
    spared = flags.filter(pl.col("is_flagged"))["id"][0]
    dropped = flags.filter(~pl.col("is_flagged"))["id"][:2].to_list()
    keep, remove = tmp_path / "keep.txt", tmp_path / "remove.csv"
    keep.write_text(f"{spared}\n")
    remove.write_text("id\n" + "".join(f"{i}\n" for i in dropped))
    params = tiny_params([f"filter.keep_ids={keep}", f"filter.remove_ids={remove}"])
    b = tmp_path / "reviewed" / "clean"
    filter_dataset(raw_dir=root / "raw", scores_dir=root / "scores", flags_dir=root / "flags", out_dir=b,
                   settings=params.filter, params=params)
    out = tmp_path / "ids.parquet"
    assert main(["diff", str(root), str(b), "--format", "json", "--ids-out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["params"] == {"filter.keep_ids": {"a": None, "b": str(keep)},
                                "filter.remove_ids": {"a": None, "b": str(remove)}}
    assert result["review"] == {"flagged": {"a": 20, "b": 20}, "removed_by_review": {"a": 0, "b": 2},
                                "kept_by_review": {"a": 0, "b": 1}}
    assert result["counts"]["b"]["removed"] == 21
    ids = pl.read_parquet(out)
    assert ids.rows() == sorted([(spared, "a", "kdist_score_top_fraction")] + [(i, "b", "review") for i in dropped])
    assert main(["diff", str(root), str(b), "--ids-out", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"removed\s+20\s+21\s+\+1\n", text) and re.search(r"flagged\s+20\s+20\s+\+0\n", text)
    assert re.search(r"removed_by_review\s+0\s+2\s+\+2\n", text) and re.search(r"kept_by_review\s+0\s+1\s+\+1\n", text)


def test_diff_where_detection_works(planted_run, tmp_path, capsys):
    """The planted run (the tail rule removes all 40 poisoned) against the paper's top 1% cut on the
    same scores (21 of 2,100: poison only, 19 missed): the applied blocks differ in non-zero figures."""
    from tests.conftest import planted_params

    root, params, groups = planted_run
    other = tmp_path / "data"
    shutil.copytree(root, other)
    src = params.download.embeddings.path
    for stage in ("threshold", "filter", "evaluate"):
        run_stage(stage, planted_params(src, ["threshold.method=top_fraction", "threshold.fraction=0.01"]), other)
    assert main(["diff", str(root), str(other), "--format", "json", "--ids-out", str(tmp_path / "ids.parquet")]) == 0
    applied = json.loads(capsys.readouterr().out)["applied"]
    assert applied["rule"] == {"a": "tail fdr 0.1", "b": "top_fraction 0.01", "delta": None}
    assert applied["poison_removed"] == {"a": 40, "b": 21, "delta": -19}
    assert applied["recall"]["a"] == 1.0 and applied["recall"]["b"] == 0.525
    assert applied["precision"]["b"] == 1.0 and applied["precision"]["a"] > 0.8
