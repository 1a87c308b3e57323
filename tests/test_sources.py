"""Every download source, end to end through filter: url lists (img2dataset against a local HTTP
server), existing shards, a folder with a captions file, and clip-retrieval embeddings."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import polars as pl
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image

from clipscrub.errors import ClipscrubError, DataError, ParamError
from clipscrub.params import parse_params
from clipscrub.flows.pipeline import Layout, run_stage
from clipscrub.shards import decode_image, image_field
from clipscrub.sources import MANIFEST_SCHEMA
from clipscrub.stages.filter import filter_dataset
from tests.conftest import tiny_params_dict
from tests.imageserver import ImageServer, image_bytes

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200),
           (120, 60, 20), (20, 60, 120), (90, 90, 90), (250, 140, 0), (0, 140, 250), (140, 0, 250)]
# small enough for a dozen samples: every sample is its own reference set
SMALL = ["train.enabled=false", "index.reference.mode=all", "index.k=4", "score.k=2", "score.lid_k=3",
         "score.iforest.n_estimators=10", "threshold.fraction=0.2", "evaluate.tpr=0.5"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A randomly initialised tiny open_clip model as a checkpoint plus config JSON."""
    d = tmp_path_factory.mktemp("model")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (d / "tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / "tiny.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny")
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, d / "tiny.pt")
    return d


def source_params(tiny_model, source: str, sub: dict, extra: list[str] | None = None):
    data = tiny_params_dict(SMALL + (extra or []))
    data["download"]["source"] = source
    data["download"]["shard_size"] = 4
    data["download"][source].update(sub)
    data["embed"].update({"model_name": "tiny", "pretrained": None, "checkpoint": str(tiny_model / "tiny.pt"),
                          "model_config": str(tiny_model / "tiny.json"), "batch_size": 5})
    return parse_params(data)


def run_through_filter(params, root):
    lay = Layout(root)
    for stage in ("download", "embed", "index", "score", "threshold", "filter"):
        run_stage(stage, params, root)
    return lay


def check_end_to_end(lay: Layout):
    """The invariants every source must keep, from manifest to cleaned version."""
    manifest = pl.read_parquet(lay.raw / "manifest.parquet")
    assert list(manifest.columns[: len(MANIFEST_SCHEMA)]) == list(MANIFEST_SCHEMA)
    assert {n: manifest.schema[n] for n in MANIFEST_SCHEMA} == MANIFEST_SCHEMA
    assert manifest["id"].is_unique().all() and manifest["key"].is_unique().all()
    assert set(manifest["status"].unique()) <= {"ok", "failed"}
    ok = manifest.filter(pl.col("status") == "ok")
    failed = manifest.filter(pl.col("status") == "failed")
    assert failed["error"].null_count() == 0 and ok["error"].null_count() == ok.height
    assert ok["image_sha256"].null_count() == 0 or ok["shard"].null_count() == ok.height
    assert (ok["caption"].str.strip_chars() != "").all()
    # only ok rows are embedded, in manifest order
    assert np.load(lay.embeddings / "ids.npy").tolist() == ok["id"].to_list()
    kept = pl.read_parquet(lay.clean / "manifest.parquet")
    removed = pl.read_parquet(lay.clean / "removed.parquet")
    assert kept.height + removed.height == ok.height
    assert not set(kept["id"]) & set(removed["id"])
    assert kept.columns == manifest.columns  # extra source columns survive cleaning
    lineage = json.loads((lay.clean / "lineage.json").read_text())
    flags = pl.read_parquet(lay.flags / "flags.parquet")
    assert lineage["counts"] == {"input": manifest.height, "failed": failed.height, "scored": ok.height,
                                 "kept": kept.height, "removed": removed.height, "flagged": int(flags["is_flagged"].sum()),
                                 "kept_by_review": 0, "removed_by_review": 0}
    return manifest, kept


def shard_samples(paths) -> dict[str, dict]:
    """key -> sample; the first of a key used twice, as the manifest counts them."""
    out = {}
    for p in paths:
        for s in wds.WebDataset(str(p), shardshuffle=False, empty_check=False):
            out.setdefault(s["__key__"], s)
    return out


def refilter_keeping_all(lay: Layout, params, out) -> dict[str, dict]:
    """The filter stage again with nothing flagged, so every ok sample reaches the cleaned shards
    whatever the detectors think of it; its samples by key."""
    shutil.copytree(lay.flags, out / "flags")
    flags = pl.read_parquet(out / "flags" / "flags.parquet")
    flags.with_columns(pl.lit(False).alias("is_flagged"), pl.lit(None, dtype=flags.schema["reason"]).alias("reason")).write_parquet(
        out / "flags" / "flags.parquet")
    filter_dataset(raw_dir=lay.raw, scores_dir=lay.scores, flags_dir=out / "flags", out_dir=out / "clean",
                   settings=params.filter, params=params)
    return shard_samples(sorted((out / "clean" / "shards").glob("*.tar")))


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def needle_png(length: int = 3_000_000) -> bytes:
    """A 1 x ``length`` PNG: a few KB, within PIL's pixel limit, a bomb for embed's resize."""
    return encode(Image.new("1", (1, length)))


# --- url lists -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    routes = {}
    for i, colour in enumerate(COLOURS[:8]):
        fmt, ext, ctype = [("JPEG", "jpg", "image/jpeg"), ("PNG", "png", "image/png"), ("WEBP", "webp", "image/webp")][i % 3]
        routes[f"/img{i}.{ext}"] = (ctype, image_bytes(fmt, colour=colour))
    routes["/corrupt.jpg"] = ("image/jpeg", b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20)
    routes["/page.jpg"] = ("text/html", b"<html><body>not an image</body></html>")
    routes["/huge.jpg"] = ("image/jpeg", image_bytes("JPEG", size=(6000, 4000), colour=(10, 180, 90)))
    routes["/needle.png"] = ("image/png", needle_png(1000))  # OpenCV refuses widths over 2**20 itself
    with ImageServer(routes, slow_seconds=4.0) as srv:
        yield srv


def url_rows(server) -> list[dict]:
    """(url, caption, expected status, expected error fragment) for every case the issue names."""
    good = [f"/img{i}.{['jpg', 'png', 'webp'][i % 3]}" for i in range(8)]
    return [
        *[{"url": server.url(p), "caption": f"a photo of thing {i}", "expect": "ok"} for i, p in enumerate(good)],
        {"url": server.url("/missing.jpg"), "caption": "not there", "expect": "404"},
        {"url": server.url("/slow/img0.jpg"), "caption": "too slow", "expect": "timed out"},
        {"url": server.url("/corrupt.jpg"), "caption": "corrupt bytes", "expect": "decod"},
        {"url": server.url("/page.jpg"), "caption": "an html page", "expect": "decod"},
        {"url": server.url("/huge.jpg"), "caption": "a huge image", "expect": "ok"},
        {"url": server.url("/needle.png"), "caption": "a 1 x 1000 image", "expect": "aspect ratio too large"},
        {"url": server.url(good[1]), "caption": "the same url again", "expect": "ok"},
        {"url": server.url(good[2]), "caption": "zoë's naïve café 🍌 香蕉 \u200b\U0001f600 ﷺ", "expect": "ok"},
        {"url": server.url(good[3]), "caption": "", "expect": "empty caption"},
        {"url": server.url(good[4]), "caption": "   ", "expect": "empty caption"},
        {"url": None, "caption": "no url at all", "expect": "missing url"},
    ]


def write_url_list(rows, path, fmt):
    table = pl.DataFrame({"url": [r["url"] for r in rows], "caption": [r["caption"] for r in rows],
                          "license": [f"cc-{i}" for i in range(len(rows))]}, schema={"url": pl.String, "caption": pl.String, "license": pl.String})
    if fmt == "parquet":
        table.write_parquet(path)
    else:
        table.write_csv(path, separator="\t" if fmt == "tsv" else ",")
    return path


@pytest.mark.parametrize("fmt,resize_mode", [("parquet", "keep_ratio"), ("csv", "no"), ("tsv", "center_crop")])
def test_url_list_end_to_end(server, tiny_model, tmp_path, fmt, resize_mode):
    rows = url_rows(server)
    path = write_url_list(rows, tmp_path / f"urls.{fmt}", fmt)
    params = source_params(tiny_model, "urls", {"path": str(path), "timeout": 1.0, "processes": 1, "threads": 8,
                                                "image_size": 64, "resize_mode": resize_mode})
    lay = run_through_filter(params, tmp_path / "data")
    manifest, kept = check_end_to_end(lay)
    assert manifest.height == len(rows)  # every input row, in input order
    assert manifest["id"].to_list() == list(range(len(rows)))
    for row, got in zip(rows, manifest.iter_rows(named=True)):
        assert got["caption"] == row["caption"]  # "" and "   " too, in every format
        assert got["license"].startswith("cc-")
        if row["expect"] == "ok":
            assert got["status"] == "ok", (row, got)
            assert got["url"] == row["url"]
        else:
            assert got["status"] == "failed", (row, got)
            assert row["expect"] in got["error"].lower(), (row, got)
    summary = json.loads((lay.raw / "lineage.json").read_text())["stages"]["download"]["summary"]
    assert summary["ok"] + summary["failed"] == summary["samples"] == len(rows)
    assert summary["ok"] == sum(r["expect"] == "ok" for r in rows)
    # fetched_sha256 is of the bytes as served, image_sha256 of the bytes stored (what embed
    # embeds and filter copies); the stored image decodes at the recorded size
    samples = shard_samples(sorted((lay.raw / "shards").glob("*.tar")))
    ok = manifest.filter(pl.col("status") == "ok")
    for r in ok.iter_rows(named=True):
        s = samples[r["key"]]
        served = server.routes[r["url"].removeprefix(server.base_url)][1]
        assert hashlib.sha256(served).hexdigest() == r["fetched_sha256"]
        data = s["jpg"]  # img2dataset re-encodes every image as JPEG
        assert hashlib.sha256(data).hexdigest() == r["image_sha256"] != r["fetched_sha256"]
        assert Image.open(io.BytesIO(data)).size == (r["width"], r["height"])
        assert s["txt"].decode() == r["caption"]
    huge = ok.filter(pl.col("caption") == "a huge image").row(0, named=True)
    assert (huge["width"], huge["height"]) == ((6000, 4000) if resize_mode == "no" else (96, 64) if resize_mode == "keep_ratio" else (64, 64))
    dup = ok.filter(pl.col("url") == server.url("/img1.png"))
    assert dup.height == 2 and dup["image_sha256"].n_unique() == 1 and dup["fetched_sha256"].n_unique() == 1
    assert (lay.raw / "img2dataset").is_dir() and list((lay.raw / "img2dataset").glob("*_stats.json"))
    # the cleaned shards hold exactly the kept samples, byte for byte
    clean = shard_samples(sorted((lay.clean / "shards").glob("*.tar")))
    assert sorted(clean) == sorted(kept["key"].to_list())
    assert all(clean[k]["jpg"] == samples[k]["jpg"] for k in clean)


def test_url_list_missing_columns_is_a_clear_error(tiny_model, tmp_path):
    path = tmp_path / "urls.csv"
    pl.DataFrame({"link": ["http://127.0.0.1:9/a.jpg"], "caption": ["x"]}).write_csv(path)
    params = source_params(tiny_model, "urls", {"path": str(path)})
    with pytest.raises(DataError, match="no column 'url'") as info:
        run_stage("download", params, tmp_path / "data")
    assert info.value.param == "download.urls.url_col"
    assert not (tmp_path / "data" / "raw").exists()


def test_source_path_is_required():
    data = tiny_params_dict(["train.enabled=false", "download.source=urls"])
    with pytest.raises(ParamError) as info:
        parse_params(data)
    assert info.value.param == "download.urls.path"


def test_victim_training_needs_the_synthetic_source():
    data = tiny_params_dict(["download.source=shards", "download.shards.path=/x/{0..1}.tar"])
    with pytest.raises(ParamError) as info:
        parse_params(data)
    assert info.value.param == "train.enabled"


# --- existing shards -------------------------------------------------------------------------

def write_source_shards(d):
    """Two shards in img2dataset / clip-retrieval layouts, with the bad cases mixed in."""
    d.mkdir()
    samples = [
        [("a0", "jpg", image_bytes("JPEG", colour=COLOURS[0]), "a red thing"),
         ("a1", "png", image_bytes("PNG", colour=COLOURS[1]), "a green thing"),
         ("a2", "webp", image_bytes("WEBP", colour=COLOURS[2]), "a blue thing"),
         ("a3", "jpg", b"\xff\xd8\xff garbage", "corrupt"),
         ("a4", None, None, "no image"),
         ("a5", "jpeg", image_bytes("JPEG", colour=COLOURS[3]), ""),
         ("a6", "jpg", image_bytes("JPEG", colour=COLOURS[4]), "ok again")],
        [("b0", "jpg", image_bytes("JPEG", colour=COLOURS[5]), None),  # caption only in json
         ("a0", "jpg", image_bytes("JPEG", colour=COLOURS[6]), "a key used twice"),
         *[(f"b{i}", "jpg", image_bytes("JPEG", colour=COLOURS[i + 6]), f"thing number {i}") for i in range(1, 6)]],
    ]
    for n, shard in enumerate(samples):
        with wds.TarWriter(str(d / f"{n:05d}.tar")) as sink:
            for key, ext, data, caption in shard:
                sample = {"__key__": key, "json": json.dumps({"url": f"http://example.com/{key}", "caption": caption or "from json"}).encode()}
                if ext:
                    sample[ext] = data
                if caption is not None:
                    sample["txt"] = caption.encode()
                sink.write(sample)
    return str(d / "{00000..00001}.tar")


def test_existing_shards_end_to_end(tiny_model, tmp_path):
    pattern = write_source_shards(tmp_path / "src")
    params = source_params(tiny_model, "shards", {"path": pattern})
    lay = run_through_filter(params, tmp_path / "data")
    manifest, kept = check_end_to_end(lay)
    assert manifest.height == 14
    status = dict(zip(manifest["key"], manifest["error"].fill_null("ok")))
    assert status["a0"] == status["a1"] == status["a2"] == status["a6"] == "ok"
    assert "cannot decode" in status["a3"]
    assert "no image" in status["a4"]
    assert status["a5"] == "empty caption"
    assert status["b0"] == "ok" and manifest.filter(pl.col("key") == "b0")["caption"].item() == "from json"
    assert status["a0#8"] == "duplicate key"
    # read in place: the manifest points at the user's shards, nothing is copied into raw/
    assert set(manifest.filter(pl.col("status") == "ok")["shard"]) == {str((tmp_path / "src" / f"{i:05d}.tar").resolve()) for i in range(2)}
    assert not (lay.raw / "shards").exists()
    assert manifest["url"].null_count() == 0
    src = shard_samples(sorted((tmp_path / "src").glob("*.tar")))
    clean = shard_samples(sorted((lay.clean / "shards").glob("*.tar")))
    assert sorted(clean) == sorted(kept["key"].to_list())
    for k in clean:  # the image is copied byte for byte, under its own extension
        ext = image_field(src[k])
        assert image_field(clean[k]) == ext and clean[k][ext] == src[k][ext], k
    # the first sample under a duplicated key is the one kept, by download and by filter
    first = image_bytes("JPEG", colour=COLOURS[0])
    assert manifest.filter(pl.col("key") == "a0")["image_sha256"].item() == hashlib.sha256(first).hexdigest()
    everything = refilter_keeping_all(lay, params, tmp_path / "all")
    assert sorted(everything) == sorted(manifest.filter(pl.col("status") == "ok")["key"].to_list())
    assert everything["a0"]["jpg"] == first


def test_missing_shard_is_a_clear_error(tiny_model, tmp_path):
    params = source_params(tiny_model, "shards", {"path": str(tmp_path / "{00000..00002}.tar")})
    with pytest.raises(DataError, match="shard not found") as info:
        run_stage("download", params, tmp_path / "data")
    assert info.value.param == "download.shards.path"


# --- a folder with captions -----------------------------------------------------------------

@pytest.mark.parametrize("captions_format", ["csv", "jsonl"])
def test_image_folder_end_to_end(tiny_model, tmp_path, captions_format):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    entries = []
    for i, (fmt, ext) in enumerate([("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif"), ("BMP", "bmp"),
                                    ("JPEG", "jpeg"), ("PNG", "png"), ("JPEG", "jpg")]):
        name = f"sub/img.{i}.{ext}" if i % 2 else f"img {i}.{ext}"  # dots and spaces in names
        (folder / name).write_bytes(image_bytes(fmt, colour=COLOURS[i]))
        entries.append({"file": name, "caption": f"picture {i} ✓"})
    (folder / "broken.jpg").write_bytes(b"\x00" * 100)
    (folder / "uncaptioned.png").write_bytes(image_bytes("PNG"))
    entries += [{"file": "broken.jpg", "caption": "broken file"}, {"file": "gone.jpg", "caption": "missing file"},
                {"file": "img 0.jpg", "caption": ""}]
    table = pl.DataFrame(entries).with_columns(pl.lit("photographer").alias("credit"))
    captions = tmp_path / f"captions.{captions_format}"
    table.write_csv(captions) if captions_format == "csv" else table.write_ndjson(captions)
    params = source_params(tiny_model, "folder", {"path": str(folder), "captions": str(captions)})
    lay = run_through_filter(params, tmp_path / "data")
    manifest, kept = check_end_to_end(lay)
    assert manifest["file"].to_list() == table["file"].to_list()
    assert manifest["credit"].to_list() == ["photographer"] * table.height
    errors = manifest["error"].to_list()
    assert errors[:8] == [None] * 8
    assert "cannot decode" in errors[8] and "file not found" in errors[9] and errors[10] == "empty caption"
    summary = json.loads((lay.raw / "lineage.json").read_text())["stages"]["download"]["summary"]
    assert summary["uncaptioned_files"] == 1
    raw = shard_samples(sorted((lay.raw / "shards").glob("*.tar")))
    exts = {k: next(e for e in ("jpg", "png", "webp") if e in s) for k, s in raw.items()}
    assert [exts[k] for k in manifest["key"][:8]] == ["jpg", "png", "webp", "png", "png", "jpg", "png", "jpg"]
    jpg0 = manifest.row(0, named=True)
    assert raw[jpg0["key"]]["jpg"] == (folder / "img 0.jpg").read_bytes()  # stored as given


# --- clip-retrieval embeddings --------------------------------------------------------------

def write_clip_retrieval(d, *, parts=(7, 5), dim=16, seed=0):
    rng = np.random.default_rng(seed)
    for sub in ("img_emb", "text_emb", "metadata"):
        (d / sub).mkdir(parents=True)
    start = 0
    for i, n in enumerate(parts):
        for sub in ("img_emb", "text_emb"):
            x = rng.normal(size=(n, dim))
            np.save(d / sub / f"{sub}_{i}.npy", (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
        pl.DataFrame({"url": [f"http://example.com/{start + j}.jpg" for j in range(n)],
                      "caption": [f"caption {start + j}" if start + j != 3 else "" for j in range(n)],
                      "similarity": rng.uniform(0.2, 0.4, n)}).write_parquet(d / "metadata" / f"metadata_{i}.parquet")
        start += n
    return d


def test_clip_retrieval_embeddings_end_to_end(tiny_model, tmp_path):
    src = write_clip_retrieval(tmp_path / "emb")
    params = source_params(tiny_model, "embeddings", {"path": str(src)})
    lay = run_through_filter(params, tmp_path / "data")
    manifest, kept = check_end_to_end(lay)
    assert manifest.height == 12 and manifest["url"].to_list() == [f"http://example.com/{i}.jpg" for i in range(12)]
    assert manifest.filter(pl.col("status") == "failed")["id"].to_list() == [3]
    ids = np.load(lay.embeddings / "ids.npy")
    image = np.load(lay.embeddings / "image.npy")
    want = np.concatenate([np.load(src / "img_emb" / f"img_emb_{i}.npy") for i in range(2)]).astype(np.float32)[ids]
    np.testing.assert_array_equal(image, want)  # stored as given (index.normalize decides the distance)
    assert not (lay.clean / "shards").exists()
    assert "similarity" in kept.columns


def test_precomputed_dimension_must_match_the_model(tiny_model, tmp_path):
    src = write_clip_retrieval(tmp_path / "emb", dim=24)
    params = source_params(tiny_model, "embeddings", {"path": str(src)})
    run_stage("download", params, tmp_path / "data")
    with pytest.raises(DataError, match="dimension 24 but model 'tiny' embeds in 16") as info:
        run_stage("embed", params, tmp_path / "data")
    assert info.value.param == "embed.model_name"
    assert not (tmp_path / "data" / "embeddings").exists()


def test_precomputed_parts_must_align(tiny_model, tmp_path):
    src = write_clip_retrieval(tmp_path / "emb")
    np.save(src / "text_emb" / "text_emb_1.npy", np.ones((4, 16), dtype=np.float16))
    params = source_params(tiny_model, "embeddings", {"path": str(src)})
    with pytest.raises(ClipscrubError, match="disagree on the row count"):
        run_stage("download", params, tmp_path / "data")
    assert not (tmp_path / "data" / "raw").exists()


# --- ground truth from the source: is_poison / attack columns and json fields -----------------

def manifest_truth(root) -> list[tuple]:
    m = pl.read_parquet(root / "raw" / "manifest.parquet").sort("id")
    assert m.schema["is_poison"] == pl.Boolean and m.schema["attack"] == pl.String
    return list(zip(m["is_poison"].to_list(), m["attack"].to_list()))


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_url_list_is_poison_reaches_the_manifest(server, tiny_model, tmp_path, fmt):
    urls = [server.url(f"/img{i}.{['jpg', 'png', 'webp'][i % 3]}") for i in range(4)] + [server.url("/missing.jpg")]
    table = pl.DataFrame({"url": urls, "caption": [f"photo {i}" for i in range(5)],
                          "is_poison": [True, False, None, True, True],
                          "attack": ["blend:banana", None, None, "sig:car", "sig:car"]})
    path = tmp_path / f"urls.{fmt}"
    table.write_parquet(path) if fmt == "parquet" else table.with_columns(
        pl.col("is_poison").replace_strict({True: "1", False: "False"}, default="", return_dtype=pl.String)).write_csv(path)
    params = source_params(tiny_model, "urls", {"path": str(path), "timeout": 2.0, "processes": 1, "threads": 4, "image_size": 32})
    summary = run_stage("download", params, tmp_path / "data")
    assert manifest_truth(tmp_path / "data") == [(True, "blend:banana"), (False, None), (None, None), (True, "sig:car"),
                                                 (True, "sig:car")]
    m = pl.read_parquet(tmp_path / "data" / "raw" / "manifest.parquet")
    assert m["status"].to_list() == ["ok"] * 4 + ["failed"]  # the truth of a failed row is kept with it
    assert "poisoned" not in summary  # one sample's truth is unknown


@pytest.mark.parametrize("source", ["urls", "folder"])
def test_a_truth_value_that_is_not_a_boolean_is_an_error(tiny_model, tmp_path, source):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(image_bytes("PNG"))
    table = pl.DataFrame({"url": ["http://127.0.0.1:9/a.png"] * 3, "file": ["a.png"] * 3, "caption": ["x", "y", "z"],
                          "is_poison": ["true", "0", "maybe"]})
    path = tmp_path / "table.csv"
    table.write_csv(path)
    sub = {"path": str(path)} if source == "urls" else {"path": str(folder), "captions": str(path)}
    params = source_params(tiny_model, source, sub)
    with pytest.raises(DataError) as info:
        run_stage("download", params, tmp_path / "data")
    assert info.value.param == ("download.urls.path" if source == "urls" else "download.folder.captions")
    assert "column 'is_poison' holds 'maybe' (row 2), not a boolean" in info.value.message
    assert "\n" not in str(info.value)
    assert not (tmp_path / "data" / "raw").exists()


def test_folder_captions_is_poison_reaches_the_manifest(tiny_model, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(image_bytes("PNG", colour=COLOURS[i]))
    table = pl.DataFrame({"file": [f"{i}.png" for i in range(4)] + ["gone.png"], "caption": [f"c {i}" for i in range(5)],
                          "is_poison": [0, 1, 0, 1, 0], "attack": [None, "badnets:banana", None, "wanet:cat", None]})
    captions = tmp_path / "captions.jsonl"
    table.write_ndjson(captions)
    params = source_params(tiny_model, "folder", {"path": str(folder), "captions": str(captions)})
    summary = run_stage("download", params, tmp_path / "data")
    assert manifest_truth(tmp_path / "data") == [(False, None), (True, "badnets:banana"), (False, None), (True, "wanet:cat"),
                                                 (False, None)]
    assert summary["poisoned"] == 2


def write_truth_shards(d, fields: list[dict]) -> str:
    d.mkdir()
    with wds.TarWriter(str(d / "00000.tar")) as sink:
        for i, extra in enumerate(fields):
            meta = {"caption": f"thing {i}", **extra}
            sink.write({"__key__": f"k{i}", "jpg": image_bytes("JPEG", colour=COLOURS[i]), "json": json.dumps(meta).encode()})
    return str(d / "00000.tar")


def test_shards_json_is_poison_reaches_the_manifest(tiny_model, tmp_path):
    path = write_truth_shards(tmp_path / "src", [{"is_poison": True, "attack": "sig:banana"}, {"is_poison": False},
                                                 {}, {"is_poison": None, "attack": None}])
    params = source_params(tiny_model, "shards", {"path": path})
    run_stage("download", params, tmp_path / "data")
    assert manifest_truth(tmp_path / "data") == [(True, "sig:banana"), (False, None), (None, None), (None, None)]


@pytest.mark.parametrize("field,value,fragment", [
    ("is_poison", "yes", "json field 'is_poison' is 'yes', not a boolean"),
    ("is_poison", 2, "json field 'is_poison' is 2, not a boolean"),
    ("attack", 5, "json field 'attack' is 5, not a string"),
])
def test_a_bad_truth_field_in_shards_is_an_error(tiny_model, tmp_path, field, value, fragment):
    path = write_truth_shards(tmp_path / "src", [{"is_poison": True}, {field: value}, {field: value}])
    params = source_params(tiny_model, "shards", {"path": path})
    with pytest.raises(DataError) as info:
        run_stage("download", params, tmp_path / "data")
    assert info.value.param == "download.shards.path"
    assert info.value.message.startswith(f"00000.tar: sample 'k1': {fragment}")
    assert info.value.message.endswith("(and 1 more)") and "\n" not in str(info.value)
    assert not (tmp_path / "data" / "raw").exists()


def test_clip_retrieval_metadata_is_poison_reaches_the_manifest(tiny_model, tmp_path):
    src = write_clip_retrieval(tmp_path / "emb")
    for i, n in enumerate((7, 5)):
        p = src / "metadata" / f"metadata_{i}.parquet"
        pl.read_parquet(p).with_columns(pl.Series("is_poison", [j % 3 == 0 for j in range(n)])).write_parquet(p)
    params = source_params(tiny_model, "embeddings", {"path": str(src)})
    run_stage("download", params, tmp_path / "data")
    truth = manifest_truth(tmp_path / "data")
    assert [t[0] for t in truth] == [j % 3 == 0 for j in range(7)] + [j % 3 == 0 for j in range(5)]


# --- images that would stop a later stage, and names that leave their folder -----------------

NEEDLE_ERROR = "image aspect ratio 3000000:1 exceeds 50:1 (1x3000000 pixels)"


def write_image_source(d, source: str, images: list[tuple[str, bytes]]) -> dict:
    """A folder (with captions.csv) or a shard holding ``images`` (key, PNG bytes) in order; the
    source's settings."""
    d.mkdir()
    if source == "shards":
        with wds.TarWriter(str(d / "00000.tar")) as sink:
            for key, data in images:
                sink.write({"__key__": key, "png": data, "txt": f"picture {key}".encode()})
        return {"path": str(d / "00000.tar")}
    for key, data in images:
        (d / f"{key}.png").write_bytes(data)
    pl.DataFrame({"file": [f"{k}.png" for k, _ in images], "caption": [f"picture {k}" for k, _ in images]}).write_csv(d / "captions.csv")
    return {"path": str(d), "captions": str(d / "captions.csv")}


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_an_extreme_aspect_ratio_is_a_failed_row(tiny_model, tmp_path, source):
    images = [("a", image_bytes("PNG", colour=COLOURS[0])), ("needle", needle_png()), ("b", image_bytes("PNG", colour=COLOURS[1]))]
    params = source_params(tiny_model, source, write_image_source(tmp_path / "src", source, images))
    run_stage("download", params, tmp_path / "data")
    manifest = pl.read_parquet(tmp_path / "data" / "raw" / "manifest.parquet")
    assert manifest["status"].to_list() == ["ok", "failed", "ok"]
    assert manifest["error"][1] == NEEDLE_ERROR
    run_stage("embed", params, tmp_path / "data")  # the needle never reaches embed's resize
    assert np.load(tmp_path / "data" / "embeddings" / "ids.npy").tolist() == [0, 2]


def test_folder_paths_outside_the_folder_are_failed_rows(tiny_model, tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "in.png").write_bytes(image_bytes("PNG", colour=COLOURS[0]))
    (tmp_path / "secret.png").write_bytes(image_bytes("PNG", colour=COLOURS[1]))
    (folder / "link.png").symlink_to(tmp_path / "secret.png")
    (folder / "sub" / "inner_link.png").symlink_to(folder / "in.png")  # a link that stays inside is fine
    files = ["in.png", "../secret.png", str(tmp_path / "secret.png"), "link.png", "sub/../in.png", "sub/inner_link.png",
             "sub/../../secret.png"]
    pl.DataFrame({"file": files, "caption": [f"c {i}" for i in range(len(files))]}).write_csv(tmp_path / "captions.csv")
    params = source_params(tiny_model, "folder", {"path": str(folder), "captions": str(tmp_path / "captions.csv")})
    run_stage("download", params, tmp_path / "data")
    manifest = pl.read_parquet(tmp_path / "data" / "raw" / "manifest.parquet")
    outside = "path outside the folder"  # the file is the row's `file`: one reason, counted once for all
    assert manifest["error"].to_list() == [None, outside, outside, outside, None, None, outside]
    assert manifest["file"].to_list() == files


def test_16_bit_and_float_images_are_scaled_not_clipped(tiny_model, tmp_path):
    grey16 = encode(Image.fromarray(np.full((6, 8), 32768, dtype=np.uint16)))  # mode I;16
    grey16b = encode(Image.new("I;16B", (8, 6), 65535), "TIFF")
    half = encode(Image.fromarray(np.full((6, 8), 0.5, dtype=np.float32)), "TIFF")  # mode F
    wide = encode(Image.fromarray(np.full((6, 8), 200.0, dtype=np.float32)), "TIFF")  # beyond 0..1: 0..255
    int32 = encode(Image.fromarray(np.full((6, 8), 40000, dtype=np.int32)), "TIFF")  # mode I
    for data, want in [(grey16, 128), (grey16b, 255), (half, 128), (wide, 200), (int32, 156)]:
        img, _ = decode_image(data)
        assert img.mode == "RGB" and img.getpixel((0, 0)) == (want, want, want)
    # through the folder source: a float TIFF is stored as the 8-bit PNG the later stages read
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "half.tif").write_bytes(half)
    (folder / "grey16.png").write_bytes(grey16)
    pl.DataFrame({"file": ["half.tif", "grey16.png"], "caption": ["half", "grey"]}).write_csv(tmp_path / "captions.csv")
    params = source_params(tiny_model, "folder", {"path": str(folder), "captions": str(tmp_path / "captions.csv")})
    run_stage("download", params, tmp_path / "data")
    stored = shard_samples(sorted((tmp_path / "data" / "raw" / "shards").glob("*.tar")))
    assert Image.open(io.BytesIO(stored["000000000"]["png"])).getpixel((0, 0)) == (128, 128, 128)
    assert decode_image(stored["000000001"]["png"])[0].getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_an_undecodable_image_gives_the_same_manifest_twice(tiny_model, tmp_path, source):
    images = [("a", b"this is not an image at all"), ("b", image_bytes("PNG"))]
    params = source_params(tiny_model, source, write_image_source(tmp_path / "src", source, images))
    for run in ("one", "two"):
        run_stage("download", params, tmp_path / run)
    manifest = pl.read_parquet(tmp_path / "one" / "raw" / "manifest.parquet")
    # PIL's own message names the BytesIO object at its memory address
    assert manifest["error"].to_list() == ["cannot decode image: not a recognised image format", None]
    assert (tmp_path / "one" / "raw" / "manifest.parquet").read_bytes() == (tmp_path / "two" / "raw" / "manifest.parquet").read_bytes()


def test_a_json_caption_that_is_not_text_says_what_it_is(tiny_model, tmp_path):
    """No txt member and a json caption that is a number, or json that is not JSON: a failed row
    saying so, not 'empty caption'."""
    d = tmp_path / "src"
    d.mkdir()
    with wds.TarWriter(str(d / "00000.tar")) as sink:
        for key, meta in (("n", b'{"caption": 12}'), ("bad", b"{not json"), ("list", b"[1, 2]"), ("ok", b'{"caption": "fine"}')):
            sink.write({"__key__": key, "jpg": image_bytes("JPEG", colour=COLOURS[0]), "json": meta})
    from clipscrub.sources import read_shards

    download = source_params(tiny_model, "shards", {"path": str(d / "00000.tar")}).download
    manifest, _ = read_shards(settings=download.shards, max_file_bytes=download.max_file_bytes)
    errors = dict(zip(manifest["key"], manifest["error"]))
    assert errors["n"] == "the json caption is not text: 12"
    assert errors["bad"] == "no txt caption, and the json member is not valid JSON"
    assert errors["list"] == "no txt caption, and the json member is not an object: [1, 2]"
    assert errors["ok"] is None


def write_members(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> None:
    """A tar of exactly these members, in order (repeats included: TarWriter refuses them)."""
    import io
    import tarfile

    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_tar_member_written_twice_fails_only_its_sample(tiny_model, tmp_path):
    """webdataset stops the whole shard at a repeated member (download kept 3 of 6 and embed died on
    a traceback): only that sample fails, every other one of the shard is ok and embedded."""
    d = tmp_path / "src"
    d.mkdir()
    members = []
    for i in range(6):
        key = f"{i:05d}"
        members += [(f"{key}.png", image_bytes("PNG", colour=COLOURS[i % len(COLOURS)])), (f"{key}.txt", f"picture {i}".encode())]
        if i == 3:
            members.append((f"{key}.txt", b"written again"))
    write_members(d / "00000.tar", members)
    params = source_params(tiny_model, "shards", {"path": str(d / "00000.tar")})
    run_stage("download", params, tmp_path / "data")
    manifest = pl.read_parquet(tmp_path / "data" / "raw" / "manifest.parquet")
    assert manifest["status"].to_list() == ["ok", "ok", "ok", "failed", "ok", "ok"]
    assert manifest["error"][3] == "tar member 00003.txt appears more than once"
    run_stage("embed", params, tmp_path / "data")
    assert np.load(tmp_path / "data" / "embeddings" / "ids.npy").tolist() == [0, 1, 2, 4, 5]


def write_gz_shard(path: Path, big: int) -> None:
    """A .tar.gz of three samples whose second image is ``big`` zero bytes (streamed in, never held)."""
    import tarfile

    class Zeros:
        def __init__(self, n: int):
            self.left = n

        def read(self, n: int = -1) -> bytes:
            n = min(self.left, 1 << 20 if n < 0 else n)
            self.left -= n
            return bytes(n)

    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for i in range(3):
            for ext in ("png", "txt"):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                data = image_bytes("PNG", colour=COLOURS[i]) if ext == "png" else b"a caption"
                info.size = big if (i, ext) == (1, "png") else len(data)
                tar.addfile(info, Zeros(big) if (i, ext) == (1, "png") else io.BytesIO(data))


def download_peak_rss(tiny_model, folder: Path, shard: Path) -> tuple[int, pl.DataFrame]:
    """`clipscrub download` of one shard in a process of its own: (its peak RSS in bytes, manifest)."""
    params = source_params(tiny_model, "shards", {"path": str(shard)})
    (folder / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    proc = subprocess.Popen([str(Path(sys.executable).parent / "clipscrub"), "download", "-p", "params.yaml",
                             "--root", "data"], cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode()[-3000:]
    return usage.ru_maxrss * 1024, pl.read_parquet(folder / "data" / "raw" / "manifest.parquet")


def test_a_huge_member_of_a_compressed_shard_is_a_failed_row_left_unread(tiny_model, tmp_path):
    """1 GiB of zeros gzips to about 1 MB: reading it whole filled memory. The sample fails with its
    size and the download's peak memory is that of the same shard with a 1 KiB member."""
    peaks = {}
    for name, big in (("small", 1024), ("huge", 2**30)):
        (tmp_path / name).mkdir()
        write_gz_shard(tmp_path / name / "00000.tar.gz", big)
        peaks[name], manifest = download_peak_rss(tiny_model, tmp_path / name, tmp_path / name / "00000.tar.gz")
    assert (tmp_path / "huge" / "00000.tar.gz").stat().st_size < 8 * 2**20
    assert peaks["huge"] - peaks["small"] < 256 * 2**20, f"{(peaks['huge'] - peaks['small']) / 2**20:.0f} MiB more"
    assert manifest["status"].to_list() == ["ok", "failed", "ok"]
    assert manifest["error"][1] == "tar member 00001.png is 1.0 GiB, over the 64.0 MiB limit (download.max_file_bytes)"


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_a_caption_over_the_limit_is_a_failed_row_kept_short(tiny_model, tmp_path, source):
    images = [("a", image_bytes("PNG", colour=COLOURS[0])), ("b", image_bytes("PNG", colour=COLOURS[1]))]
    sub = write_image_source(tmp_path / "src", source, images)
    long = "a very long caption " * 60_000  # 1.2 MB
    if source == "folder":
        pl.DataFrame({"file": ["a.png", "b.png"], "caption": ["picture a", long]}).write_csv(tmp_path / "src" / "captions.csv")
    else:
        write_members(tmp_path / "src" / "00000.tar", [("a.png", images[0][1]), ("a.txt", b"picture a"),
                                                        ("b.png", images[1][1]), ("b.txt", long.encode())])
    params = source_params(tiny_model, source, sub)
    run_stage("download", params, tmp_path / "data")
    manifest = pl.read_parquet(tmp_path / "data" / "raw" / "manifest.parquet")
    assert manifest["status"].to_list() == ["ok", "failed"]
    assert manifest["error"][1] == f"caption of {len(long)} bytes, over the limit of 65536 (download.max_caption_bytes)"
    assert manifest["caption"][1] == long[:1000]
    if source == "folder":  # never written into the shards
        assert [s["__key__"] for s in shard_samples(sorted((tmp_path / "data" / "raw" / "shards").glob("*.tar"))).values()] == ["000000000"]


def test_a_folder_file_over_the_limit_is_a_failed_row_left_unread(tiny_model, tmp_path):
    """A 4 GiB file (sparse: no disk used) was a traceback; now a failed row, never read."""
    images = [("a", image_bytes("PNG", colour=COLOURS[0])), ("b", image_bytes("PNG", colour=COLOURS[1]))]
    sub = write_image_source(tmp_path / "src", "folder", images)
    with open(tmp_path / "src" / "b.png", "r+b") as f:
        f.truncate(4 * 2**30)
    params = source_params(tiny_model, "folder", sub)
    run_stage("download", params, tmp_path / "data")
    manifest = pl.read_parquet(tmp_path / "data" / "raw" / "manifest.parquet")
    assert manifest["status"].to_list() == ["ok", "failed"]
    assert manifest["error"][1] == "file is 4.0 GiB, over the 64.0 MiB limit (download.max_file_bytes)"


def test_a_mostly_failed_download_warns_with_grouped_reasons(tiny_model, tmp_path):
    """More than half failed: the run goes on, and says so where a person looks (not ten lines
    naming one missing file each)."""
    from clipscrub.flows.clean import summary_markdown
    from clipscrub.flows.cli import show_run, summary_text

    images = [("a", image_bytes("PNG", colour=COLOURS[0]))]
    sub = write_image_source(tmp_path / "src", "folder", images)
    files = ["a.png"] + [f"gone{i}.png" for i in range(5)] + ["../x.png"]
    pl.DataFrame({"file": files, "caption": [f"c {i}" for i in range(len(files))]}).write_csv(tmp_path / "src" / "captions.csv")
    summary = run_stage("download", source_params(tiny_model, "folder", sub), tmp_path / "data")
    warning = "6 of 7 samples failed (file not found x5 (e.g. gone0.png), path outside the folder x1 (e.g. ../x.png))"
    assert summary["warning"].startswith(warning)
    assert summary["errors"] == {"file not found": 5, "path outside the folder": 1}
    assert f"warning: {warning}" in summary_text("download", summary, wrote=[])
    assert f"warning (download): {warning}" in show_run(str(tmp_path / "data"))
    md = summary_markdown(parse_params({}), tmp_path / "data", {"download": summary}, {"download": "Completed"})
    assert f"**Warning (download):** {warning}" in md


def test_review_lists_name_samples_by_file_and_the_outputs_carry_it(tiny_model, tmp_path):
    """A folder source's user knows file names: the remove list names one, removed.parquet and
    kept.parquet carry each sample's file beside its id and key."""
    images = [(k, image_bytes("PNG", colour=COLOURS[i])) for i, k in enumerate("abcd")]
    sub = write_image_source(tmp_path / "src", "folder", images)
    (tmp_path / "remove.txt").write_text("# the second picture\nb.png   # a comment after a space\n")
    params = source_params(tiny_model, "folder", sub, [f"filter.remove_ids={tmp_path / 'remove.txt'}",
                                                       "threshold.method=score", "threshold.score=1e9",
                                                       "filter.output=ids"])
    lay = run_through_filter(params, tmp_path / "data")
    removed = pl.read_parquet(lay.clean / "removed.parquet")
    assert removed.select("id", "key", "file", "reason").rows() == [(1, "000000001", "b.png", "review")]
    kept = pl.read_parquet(lay.clean / "kept.parquet")
    assert kept.columns == ["id", "key", "file", "shard"] and kept["file"].to_list() == ["a.png", "c.png", "d.png"]
