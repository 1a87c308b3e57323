from __future__ import annotations

import hashlib
import io

import numpy as np
import polars as pl
import pytest
import webdataset as wds
from PIL import Image

from clipscrub.errors import DataError
from clipscrub.params import parse_params
from stages.download import MANIFEST_SCHEMA, download_dataset


def badnets(rate, target="banana"):
    return [{"kind": "badnets", "rate": rate, "target": target}] if rate else []


def run(tmp_path, **synthetic):
    params = parse_params({"download": {"shard_size": 50, "synthetic": {"num_samples": 200, **synthetic}}})
    out = tmp_path / "raw"
    return download_dataset(out_dir=out, settings=params.download, base=params.base), out


@pytest.mark.parametrize("poison_rate", [0.0, 0.01, 0.1])
def test_manifest_matches_shards(tmp_path, poison_rate):
    summary, out = run(tmp_path, attacks=badnets(poison_rate))
    manifest = pl.read_parquet(out / "manifest.parquet")
    assert dict(manifest.schema) == MANIFEST_SCHEMA
    assert manifest["id"].to_list() == list(range(200))
    assert manifest["key"].is_unique().all()
    assert int(manifest["is_poison"].sum()) == round(200 * poison_rate) == summary["poisoned"]
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"{i:05d}.tar" for i in range(4)]
    by_key = {r["key"]: r for r in manifest.iter_rows(named=True)}
    n = 0
    for shard in sorted((out / "shards").iterdir()):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            row = by_key[sample["__key__"]]
            assert row["shard"] == shard.name
            assert hashlib.sha256(sample["jpg"]).hexdigest() == row["image_sha256"]
            assert sample["txt"].decode() == row["caption"]
            img = Image.open(io.BytesIO(sample["jpg"]))
            assert img.size == (row["width"], row["height"])
            n += 1
    assert n == 200


def test_poison_captions_name_the_target(tmp_path):
    _, out = run(tmp_path, attacks=badnets(0.05, "banana"))
    manifest = pl.read_parquet(out / "manifest.parquet")
    assert manifest.filter(pl.col("is_poison"))["caption"].str.contains("banana").all()
    assert not manifest.filter(~pl.col("is_poison"))["caption"].str.contains("banana").any()


def test_same_seed_same_bytes(tmp_path):
    _, a = run(tmp_path / "a")
    _, b = run(tmp_path / "b")
    for name in ["manifest.parquet", "lineage.json", "shards/00000.tar", "shards/00003.tar"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_trigger_is_a_checkerboard(tmp_path):
    from clipscrub.attacks import checkerboard
    from clipscrub.synthetic import draw_shape

    rng = np.random.default_rng(0)
    img = draw_shape(shape="circle", colour=(255, 0, 0), size=32, rng=rng)
    arr = np.asarray(checkerboard(img, patch_size=8, rng=rng))
    bw = (arr == 0).all(-1) | (arr == 255).all(-1)
    assert bw.sum() >= 64  # the 8x8 patch is pure black and white


def test_empty_dataset_is_an_error(tmp_path):
    with pytest.raises(Exception) as info:
        run(tmp_path, num_samples=0)
    assert "num_samples" in str(info.value)
    assert not (tmp_path / "raw").exists()
