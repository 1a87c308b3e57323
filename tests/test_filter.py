from __future__ import annotations

import json

import polars as pl
import pytest
import webdataset as wds

from clipscrub.errors import DataError
from clipscrub.io import sha256_file
from stages.filter import filter_dataset
from tests.conftest import tiny_params


def test_kept_plus_removed_is_everything(tiny_run):
    root, params = tiny_run
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    kept = pl.read_parquet(root / "clean" / "manifest.parquet")
    removed = pl.read_parquet(root / "clean" / "removed.parquet")
    flags = pl.read_parquet(root / "flags" / "flags.parquet")
    assert kept.height + removed.height == manifest.height
    assert set(kept["id"]) & set(removed["id"]) == set()
    assert set(removed["id"]) == set(flags.filter(pl.col("is_flagged"))["id"])
    assert removed.height == round(params.threshold.fraction * manifest.height)
    assert kept.columns == manifest.columns
    assert {"id", "key", "caption", "reason", "dao_score", "kdist_score", "slof_score"} <= set(removed.columns)
    assert removed["reason"].unique().to_list() == [f"{params.threshold.detector}_score_top_fraction"]


def test_clean_shards_hold_exactly_the_kept_samples(tiny_run):
    root, params = tiny_run
    kept = pl.read_parquet(root / "clean" / "manifest.parquet")
    raw = {r["key"]: r for r in pl.read_parquet(root / "raw" / "manifest.parquet").iter_rows(named=True)}
    seen = []
    import hashlib

    for shard in sorted((root / "clean" / "shards").iterdir()):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            seen.append(sample["__key__"])
            assert hashlib.sha256(sample["jpg"]).hexdigest() == raw[sample["__key__"]]["image_sha256"]
            assert kept.filter(pl.col("key") == sample["__key__"])["shard"].item() == shard.name
    assert seen == kept["key"].to_list()
    assert max(kept["shard"].value_counts()["count"]) <= params.filter.shard_size


def test_lineage_traces_the_version(tiny_run):
    root, params = tiny_run
    lineage = json.loads((root / "clean" / "lineage.json").read_text())
    assert lineage["input_manifest_sha256"] == sha256_file(root / "raw" / "manifest.parquet")
    assert lineage["model"]["checkpoint_sha256"] == sha256_file(root / "model" / "checkpoint.pt")
    assert lineage["params"]["threshold"] == params.section("threshold")
    assert lineage["params"]["index"]["reference"]["sizes"] == [120]
    assert set(lineage["stages"]) == {"download", "train", "embed", "index", "score", "threshold", "filter"}
    assert lineage["counts"]["kept"] + lineage["counts"]["removed"] == lineage["counts"]["input"]
    assert lineage["code_version"].startswith("0.1.0+")


def test_filter_refuses_artifacts_from_other_params(tiny_run, tmp_path):
    root, _ = tiny_run
    other = tiny_params(extra=["threshold.fraction=0.2"])
    with pytest.raises(DataError) as info:
        filter_dataset(raw_dir=root / "raw", scores_dir=root / "scores", flags_dir=root / "flags",
                       out_dir=tmp_path / "clean", settings=other.filter, params=other)
    assert info.value.param == "threshold"
    assert not (tmp_path / "clean").exists()
