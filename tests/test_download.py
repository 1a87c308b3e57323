from __future__ import annotations

import hashlib
import io
import threading

import numpy as np
import polars as pl
import pytest
import webdataset as wds
from PIL import Image

from clipscrub.errors import DataError, ParamError
from clipscrub.params import parse_params
from clipscrub.stages.download import MANIFEST_SCHEMA, download_dataset
from tests.imageserver import ImageServer, image_bytes


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


def test_zero_synthetic_samples_is_a_params_error():
    with pytest.raises(ParamError) as info:
        parse_params({"download": {"synthetic": {"num_samples": 0}}})
    assert info.value.param == "download.synthetic.num_samples"
    assert info.value.message == "Input should be greater than or equal to 1 (got 0)"


@pytest.mark.parametrize("source,message", [
    ("shards", "the shards {src}/00000.tar hold no samples"),
    ("folder", "the captions file {src}/captions.csv has no rows"),
    ("urls", "the url list {src}/urls.csv has no rows"),
])
def test_a_source_with_no_samples_is_an_error(tmp_path, source, message):
    """Valid params, so the stage itself runs and finds nothing to download."""
    src = tmp_path / "src"
    src.mkdir()
    with wds.TarWriter(str(src / "00000.tar")):  # a tar with no members
        pass
    (src / "captions.csv").write_text("file,caption\n")
    (src / "urls.csv").write_text("url,caption\n")
    sub = {"shards": {"path": str(src / "00000.tar")}, "folder": {"path": str(src), "captions": str(src / "captions.csv")},
           "urls": {"path": str(src / "urls.csv")}}[source]
    params = parse_params({"train": {"enabled": False}, "download": {"source": source, source: sub}})
    with pytest.raises(DataError) as info:
        download_dataset(out_dir=tmp_path / "raw", settings=params.download, base=params.base)
    assert info.value.param == ("download.folder.captions" if source == "folder" else f"download.{source}.path")
    assert info.value.message == message.format(src=src)
    assert not (tmp_path / "raw").exists()


class FlakyRoutes(dict):
    """ImageServer routes where a path in ``fails`` is missing (a 404) for its first that many requests."""

    def __init__(self, routes, fails: dict[str, int]):
        super().__init__(routes)
        self.fails = fails
        self.requests: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, path, default=None):
        with self._lock:
            self.requests[path] = self.requests.get(path, 0) + 1
            seen = self.requests[path]
        return default if seen <= self.fails.get(path, 0) else super().get(path, default)


def test_a_url_failing_transiently_is_retried(tmp_path):
    """download.urls.retries=1: a url failing once ends ok, one failing twice ends failed."""
    with ImageServer() as server:
        png = ("image/png", image_bytes("PNG"))
        server.routes = FlakyRoutes({"/once.png": png, "/twice.png": png}, fails={"/once.png": 1, "/twice.png": 2})
        urls = tmp_path / "urls.csv"
        pl.DataFrame({"url": [server.url("/once.png"), server.url("/twice.png")], "caption": ["once", "twice"]}).write_csv(urls)
        params = parse_params({"train": {"enabled": False}, "download": {"source": "urls", "urls": {
            "path": str(urls), "processes": 1, "threads": 2, "timeout": 5.0, "retries": 1, "image_size": 32}}})
        download_dataset(out_dir=tmp_path / "raw", settings=params.download, base=params.base)
        assert server.routes.requests == {"/once.png": 2, "/twice.png": 2}
    manifest = pl.read_parquet(tmp_path / "raw" / "manifest.parquet")
    assert manifest["status"].to_list() == ["ok", "failed"]
    assert manifest["error"].to_list() == [None, "failed_to_download: HTTP Error 404: Not Found"]
