from __future__ import annotations

import json
import shutil
import tarfile

import polars as pl
import pytest
import webdataset as wds

from clipscrub.errors import DataError
from clipscrub.io import sha256_file
from clipscrub.shards import iter_shard
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


UNSAFE_KEYS = ["../../evil", "/abs/x", "sub/dir\\y"]  # as webdataset reads them from a tar


def raw_with_keys(root, out, rename: dict[str, str]):
    """A copy of ``root/raw`` with some samples' keys renamed, in its shards and manifest."""
    shutil.copytree(root / "raw", out)
    for shard in sorted((out / "shards").glob("*.tar")):
        samples = list(iter_shard(shard))
        with wds.TarWriter(str(shard), mtime=0) as sink:
            for s in samples:
                sink.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
                           | {"__key__": rename.get(s["__key__"], s["__key__"])})
    manifest = pl.read_parquet(out / "manifest.parquet")
    manifest.with_columns(pl.col("key").replace(rename)).write_parquet(out / "manifest.parquet")
    return out


def members(paths) -> dict[str, bytes]:
    out = {}
    for p in paths:
        with tarfile.open(p) as tar:
            out |= {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return out


def test_unsafe_keys_become_safe_member_names(tiny_run, tmp_path):
    root, params = tiny_run
    flags = pl.read_parquet(root / "flags" / "flags.parquet")
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    unflagged = manifest.filter(pl.col("id").is_in(flags.filter(~pl.col("is_flagged"))["id"].implode()))
    rename = dict(zip(unflagged["key"][:3].to_list(), UNSAFE_KEYS))
    raw = raw_with_keys(root, tmp_path / "raw", rename)
    filter_dataset(raw_dir=raw, scores_dir=root / "scores", flags_dir=root / "flags", out_dir=tmp_path / "clean",
                   settings=params.filter, params=params)
    clean_shards = sorted((tmp_path / "clean" / "shards").glob("*.tar"))
    names = members(clean_shards)
    for name in names:  # every member unpacks inside the folder, as one file
        assert "/" not in name and "\\" not in name and not name.startswith(".") and ".." not in name, name
    written = {"../../evil": "%2E%2E%2F%2E%2E%2Fevil", "/abs/x": "%2Fabs%2Fx", "sub/dir\\y": "sub%2Fdir%5Cy"}
    clean = {s["__key__"]: s for p in clean_shards for s in iter_shard(p)}
    kept = pl.read_parquet(tmp_path / "clean" / "manifest.parquet")
    assert set(clean) == set(kept["key"])  # the kept manifest names the samples as written
    raw_samples = {s["__key__"]: s for p in sorted((raw / "shards").glob("*.tar")) for s in iter_shard(p)}
    for old, new in written.items():
        assert json.loads(clean[new]["json"])["source_key"] == old  # the original key is kept
        assert clean[new]["jpg"] == raw_samples[old]["jpg"]
    # every other sample is copied under its own name, byte for byte
    before = members(sorted((root / "clean" / "shards").glob("*.tar")))
    before = {n: b for n, b in before.items() if n.split(".")[0] not in rename}
    after = {n: b for n, b in names.items() if n.split(".")[0] not in written.values()}
    assert after == before and len(after) == len(names) - 3 * len(written)
