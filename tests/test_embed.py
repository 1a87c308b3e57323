from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from clipscrub.errors import DataError, ParamError
from clipscrub.io import sha256_file
from clipscrub.model import load_model
from clipscrub.params import parse_params
from clipscrub.stages.embed import embed_dataset
from tests.test_sources import tiny_model  # noqa: F401 (fixture)


def test_embeddings_follow_manifest_order(tiny_run):
    root, params = tiny_run
    image = np.load(root / "embeddings" / "image.npy")
    text = np.load(root / "embeddings" / "text.npy")
    ids = np.load(root / "embeddings" / "ids.npy")
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    dim = params.train.architecture.embed_dim
    assert image.shape == text.shape == (manifest.height, dim)
    assert image.dtype == np.float32
    assert ids.tolist() == manifest["id"].to_list()
    # the model's raw outputs: norms vary (and carry signal), so they are not all 1
    norms = np.linalg.norm(image, axis=1)
    assert (norms > 0).all() and norms.std() > 1e-3
    assert not np.allclose(np.linalg.norm(text, axis=1), 1.0, rtol=1e-3)
    info = json.loads((root / "embeddings" / "model.json").read_text())
    assert info["checkpoint_sha256"] == sha256_file(root / "model" / "checkpoint.pt")


def _victim(root):
    return load_model(model_name="clipscrub-tiny", pretrained=None, checkpoint=str(root / "model" / "checkpoint.pt"),
                      model_config=str(root / "model" / "model_config.json"), device="cpu")


def test_embedding_rows_are_the_models_encodings_of_their_samples(tiny_run):
    """A few rows against the victim's own encoding of that row's decoded image and caption:
    rows shuffled between samples, or made by another model, do not match."""
    from clipscrub.shards import decode_image, image_field, iter_shard, shard_path

    root, _ = tiny_run
    image = np.load(root / "embeddings" / "image.npy")
    text = np.load(root / "embeddings" / "text.npy")
    ids = np.load(root / "embeddings" / "ids.npy")
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    loaded = _victim(root)
    picks = [0, 137, len(ids) - 1]
    for row in picks:
        sample = manifest.filter(pl.col("id") == int(ids[row])).row(0, named=True)
        raw = next(s for s in iter_shard(shard_path(root / "raw", sample["shard"])) if s["__key__"] == sample["key"])
        img, _ = decode_image(raw[image_field(raw)])
        with torch.no_grad():
            want_image = loaded.model.encode_image(loaded.preprocess(img)[None], normalize=False).numpy()[0]
            want_text = loaded.model.encode_text(loaded.tokenizer([sample["caption"]]), normalize=False).numpy()[0]
        np.testing.assert_allclose(image[row], want_image, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(text[row], want_text, rtol=1e-4, atol=1e-5)
        for other in set(picks) - {row}:  # the test tells rows apart
            assert not np.allclose(image[other], want_image, rtol=1e-4, atol=1e-5)


def _embed_one(loaded, root):
    x = torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32)
    with torch.no_grad():
        return loaded.model.encode_image(x, normalize=True).numpy(), loaded.model.encode_text(loaded.tokenizer(["a red circle"]), normalize=True).numpy()


@pytest.mark.parametrize("layout", ["open_clip_training", "module_prefix", "plain_state_dict"])
def test_checkpoint_layouts_load_the_same_weights(tiny_run, tmp_path, layout):
    root, params = tiny_run
    ckpt = torch.load(root / "model" / "checkpoint.pt", weights_only=True)
    sd = ckpt["state_dict"]
    if layout == "module_prefix":
        obj = {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}
    elif layout == "plain_state_dict":
        obj = sd
    else:
        obj = ckpt
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    cfg = str(root / "model" / "model_config.json")
    ref = load_model(model_name="clipscrub-tiny", pretrained=None, checkpoint=str(root / "model" / "checkpoint.pt"), model_config=cfg, device="cpu")
    got = load_model(model_name="clipscrub-tiny", pretrained=None, checkpoint=str(path), model_config=cfg, device="cpu")
    # every weight is the checkpoint's tensor, not only equal to another load of a checkpoint
    state = got.model.state_dict()
    assert set(state) == set(sd)
    for name, tensor in sd.items():
        assert torch.equal(state[name].cpu(), tensor), name
    for a, b in zip(_embed_one(ref, root), _embed_one(got, root)):
        np.testing.assert_array_equal(a, b)
    assert got.info["checkpoint_sha256"] == sha256_file(path)


def test_mismatched_checkpoint_is_a_clear_error(tiny_run, tmp_path):
    root, _ = tiny_run
    cfg = json.loads((root / "model" / "model_config.json").read_text())
    cfg["vision_cfg"]["width"] *= 2
    (tmp_path / "other.json").write_text(json.dumps(cfg))
    with pytest.raises(ParamError) as info:
        load_model(model_name="clipscrub-wide", pretrained=None, checkpoint=str(root / "model" / "checkpoint.pt"), model_config=str(tmp_path / "other.json"), device="cpu")
    assert info.value.param == "embed.checkpoint"
    assert "does not fit model 'clipscrub-wide'" in info.value.message


def test_unreadable_checkpoint(tiny_run, tmp_path):
    root, _ = tiny_run
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(DataError) as info:
        load_model(model_name="clipscrub-tiny", pretrained=None, checkpoint=str(tmp_path / "bad.pt"), model_config=str(root / "model" / "model_config.json"), device="cpu")
    assert info.value.param == "embed.checkpoint"
    assert "cannot read checkpoint" in info.value.message


def test_hub_weights_offline_say_how_to_pass_a_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        load_model(model_name="RN50", pretrained="openai", checkpoint=None, model_config=None, device="cpu")
    assert info.value.param == "embed.pretrained"
    assert "could not fetch pretrained weights 'openai' for 'RN50'" in info.value.message
    assert "embed.checkpoint" in info.value.message


def test_unknown_model_name():
    with pytest.raises(ParamError) as info:
        load_model(model_name="ViT-Nope", pretrained=None, checkpoint=None, model_config=None, device="cpu")
    assert info.value.param == "embed.model_name"


def test_embed_rejects_a_dataset_with_no_ok_rows(tiny_run, tmp_path):
    import shutil

    root, params = tiny_run
    shutil.copytree(root / "raw", tmp_path / "raw")
    m = pl.read_parquet(tmp_path / "raw" / "manifest.parquet").with_columns(status=pl.lit("failed"))
    m.write_parquet(tmp_path / "raw" / "manifest.parquet")
    with pytest.raises(DataError, match="all 400 samples failed to download"):
        embed_dataset(raw_dir=tmp_path / "raw", out_dir=tmp_path / "emb", settings=params.embed, base=params.base)
    assert not (tmp_path / "emb").exists()


@pytest.fixture(scope="module")
def many_shards(tiny_run, tmp_path_factory):
    """A project whose 600 samples sit in 60 shards of 10, with the tiny victim: (dir, params)."""
    import shutil

    import yaml

    from clipscrub.flows.pipeline import run_stage
    from tests.conftest import tiny_params_dict

    root, _ = tiny_run
    proj = tmp_path_factory.mktemp("many-shards")
    data = tiny_params_dict(["download.synthetic.num_samples=600", "download.shard_size=10", "embed.batch_size=4"])
    (proj / "params.yaml").write_text(yaml.safe_dump(data))
    params = parse_params(data)
    run_stage("download", params, proj / "data")
    shutil.copytree(root / "model", proj / "data" / "model")
    return proj, params


def _embedding_hashes(directory) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("kill_after_parts", [2, 30])
def test_killed_embed_resumes_with_the_missing_shards(many_shards, tmp_path, kill_after_parts):
    """SIGKILL a real `clipscrub embed` process after some shards; the rerun computes only the
    others, and every output file is byte-identical to an uninterrupted run's."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from clipscrub.flows.pipeline import run_stage
    from clipscrub.stages.embed import parts_dir_for

    proj, params = many_shards
    reference = tmp_path / "reference"
    shutil.copytree(proj / "data", reference / "data")
    whole = run_stage("embed", params, reference / "data")
    assert whole["shards"] == 60 and whole["shards_resumed"] == 0

    work = tmp_path / "work"
    shutil.copytree(proj, work)
    parts = parts_dir_for(work / "data" / "embeddings")
    cmd = [sys.executable, "-m", "clipscrub.flows.cli", "embed", "-p", "params.yaml", "--root", "data"]
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if parts.is_dir() and len(list(parts.glob("part-*.npz"))) >= kill_after_parts:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "embed finished before it could be killed"
    done = len(list(parts.glob("part-*.npz")))
    assert kill_after_parts <= done < 60
    assert not (work / "data" / "embeddings").exists()  # nothing that looks complete

    res = subprocess.run([*cmd, "--json"], cwd=work, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["shards_resumed"] == done and summary["shards"] == 60
    assert _embedding_hashes(work / "data" / "embeddings") == _embedding_hashes(reference / "data" / "embeddings")
    assert not parts.exists()
    assert not list((work / "data").glob(".embeddings.tmp-*"))


def test_a_loaded_checkpoint_is_said_not_random_init(tiny_run, tmp_path, caplog, capsys):
    """open_clip's "No pretrained weights loaded ... initialized randomly" is false when a checkpoint
    follows: it is silenced, and embed says what it loaded instead."""
    import logging
    import shutil

    root, params = tiny_run
    with caplog.at_level(logging.INFO):
        _victim(root)
        assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
    # silenced only while the checkpoint's model is built: the same line elsewhere still shows
    assert [r.getMessage() for r in caplog.records if "initialized randomly" in r.getMessage()] == [
        "No pretrained weights loaded for model 'x'. Model initialized randomly."]
    capsys.readouterr()
    shutil.copytree(root / "raw", tmp_path / "raw")
    settings = params.embed.model_copy(update={"checkpoint": str(root / "model" / "checkpoint.pt"),
                                               "model_config_path": str(root / "model" / "model_config.json"),
                                               "model_name": "clipscrub-tiny", "pretrained": None})
    summary = embed_dataset(raw_dir=tmp_path / "raw", out_dir=tmp_path / "emb", settings=settings, base=params.base)
    want = (f"model 'clipscrub-tiny' (architecture from model_config.json, sha256 "
            f"{sha256_file(root / 'model' / 'model_config.json')[:8]}) from checkpoint {root / 'model' / 'checkpoint.pt'} "
            f"(sha256 {sha256_file(root / 'model' / 'checkpoint.pt')[:8]})")
    assert summary["model"] == want
    assert f"embed: {want}\n" in capsys.readouterr().err


def _seed_parts(parts, fingerprint, stamp, groups, image, text):
    """A parts directory stamped with ``fingerprint`` holding part i of ``groups`` with ``image``/``text``
    rows and part stamp ``stamp``."""
    from clipscrub.io import write_json

    parts.mkdir(parents=True)
    write_json(parts / "fingerprint.json", fingerprint)
    for i, rows in groups:
        np.savez(parts / f"part-{i:06d}.npz", rows=rows, image=image[rows], text=text[rows], stamp=np.array(stamp))


def _arrays(directory):
    return {name: sha256_file(directory / name) for name in ("image.npy", "text.npy", "ids.npy")}


def test_a_part_another_run_stamped_is_not_used(tiny_run, tmp_path):
    """Parts of this run's fingerprint are resumed; a part another model's run wrote into the same
    parts directory (two runs on one root) is embedded again: the output equals an uninterrupted run's."""
    import shutil

    from clipscrub.stages.embed import _shard_groups, part_stamp, parts_dir_for, run_fingerprint

    root, params = tiny_run
    shutil.copytree(root / "raw", tmp_path / "raw")
    ok = pl.read_parquet(tmp_path / "raw" / "manifest.parquet").filter(pl.col("status") == "ok")
    groups = [rows for _, rows in _shard_groups(ok)]
    assert len(groups) >= 3
    image = np.load(root / "embeddings" / "image.npy")
    text = np.load(root / "embeddings" / "text.npy")
    mine = run_fingerprint(raw_dir=tmp_path / "raw", loaded=_victim(root), settings=params.embed)
    mine["model"]["checkpoint"] = "checkpoint.pt (train stage output)"  # as embed records the train stage's
    other = json.loads(json.dumps(mine))
    other["model"]["checkpoint_sha256"] = "0" * 64
    out = tmp_path / "embeddings"
    parts = parts_dir_for(out)
    # part 0: this run's; part 1: another model's (its rows scaled, as a different model's would differ)
    _seed_parts(parts, mine, part_stamp(mine), [(0, groups[0])], image, text)
    np.savez(parts / "part-000001.npz", rows=groups[1], image=2 * image[groups[1]], text=2 * text[groups[1]],
             stamp=np.array(part_stamp(other)))
    summary = embed_dataset(raw_dir=tmp_path / "raw", out_dir=out, settings=params.embed, base=params.base,
                            model_dir=root / "model", model_name=params.train.model_name)
    assert summary["shards_resumed"] == 1
    assert _arrays(out) == _arrays(root / "embeddings")
    assert not parts.exists()


def test_parts_from_another_manifest_are_not_reused(tiny_run, tmp_path):
    import shutil

    from clipscrub.stages.embed import _shard_groups, part_stamp, parts_dir_for, run_fingerprint

    root, params = tiny_run
    shutil.copytree(root / "raw", tmp_path / "raw")
    ok = pl.read_parquet(tmp_path / "raw" / "manifest.parquet").filter(pl.col("status") == "ok")
    groups = list(enumerate(rows for _, rows in _shard_groups(ok)))
    stale = run_fingerprint(raw_dir=tmp_path / "raw", loaded=_victim(root), settings=params.embed)
    stale["model"]["checkpoint"] = "checkpoint.pt (train stage output)"
    stale["manifest_sha256"] = "f" * 64  # the run before the dataset was downloaded again
    noise = np.random.default_rng(0).normal(size=np.load(root / "embeddings" / "image.npy").shape).astype(np.float32)
    out = tmp_path / "embeddings"
    _seed_parts(parts_dir_for(out), stale, part_stamp(stale), groups, noise, noise)
    summary = embed_dataset(raw_dir=tmp_path / "raw", out_dir=out, settings=params.embed, base=params.base,
                            model_dir=root / "model", model_name=params.train.model_name)
    assert summary["shards_resumed"] == 0
    assert _arrays(out) == _arrays(root / "embeddings")


def test_parts_are_deleted_after_a_data_error(tiny_run, tmp_path):
    """Shards finished before a data error are not kept: the next run must not resume them."""
    import shutil

    from clipscrub.stages.embed import parts_dir_for

    root, params = tiny_run
    shutil.copytree(root / "raw", tmp_path / "raw")
    manifest = pl.read_parquet(tmp_path / "raw" / "manifest.parquet")
    last = manifest.filter(pl.col("status") == "ok")["shard"][-1]
    victim = manifest.filter((pl.col("status") == "ok") & (pl.col("shard") == last))["id"][0]
    manifest.with_columns(key=pl.when(pl.col("id") == victim).then(pl.lit("not-in-the-shard")).otherwise(pl.col("key"))) \
        .write_parquet(tmp_path / "raw" / "manifest.parquet")
    out = tmp_path / "embeddings"
    with pytest.raises(DataError, match=f"1 manifest samples are missing from shard {last}"):
        embed_dataset(raw_dir=tmp_path / "raw", out_dir=out, settings=params.embed, base=params.base,
                      model_dir=root / "model", model_name=params.train.model_name)
    assert not parts_dir_for(out).exists()
    assert not out.exists()


def test_loader_threads_write_the_same_bytes(tiny_run, tmp_path):
    """Batches decoded ahead in loader threads (embed.loader_workers) reach the model as the same
    batches in the same order: the arrays are byte-identical to decoding in the calling thread."""
    import shutil

    root, params = tiny_run
    shutil.copytree(root / "raw", tmp_path / "raw")
    hashes = {}
    for workers in (0, 2):
        # 7 batches per shard: several in flight
        settings = params.embed.model_copy(update={"batch_size": 16, "loader_workers": workers})
        out = tmp_path / f"emb-{workers}"
        embed_dataset(raw_dir=tmp_path / "raw", out_dir=out, settings=settings, base=params.base,
                      model_dir=root / "model", model_name=params.train.model_name)
        hashes[workers] = _arrays(out)
    assert hashes[0] == hashes[2]


@pytest.mark.parametrize("recorded", [True, False])
def test_a_bad_image_fails_alike_with_loader_threads(tiny_run, tmp_path, recorded):
    """A sample whose image changed after download stops the shard with the same one-line error
    whether the batches are decoded in loader threads or not, naming the first bad sample in
    shard order: its sha256 is not the recorded one, or, where download recorded none, it no
    longer decodes."""
    import io
    import shutil
    import tarfile

    from clipscrub.stages.embed import _embed_shard, _shard_groups

    root, params = tiny_run
    shutil.copytree(root / "raw", tmp_path / "raw")
    ok = pl.read_parquet(tmp_path / "raw" / "manifest.parquet").filter(pl.col("status") == "ok")
    if not recorded:
        ok = ok.with_columns(pl.lit(None, dtype=pl.String).alias("image_sha256"))
    shard, rows = _shard_groups(ok)[0]
    keys = ok[rows]["key"].to_list()
    bad = {keys[20], keys[70]}  # batches 2 and 5 of 16: the first is named
    path = tmp_path / "raw" / "shards" / shard
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name.partition(".")[0] in bad and m.name.endswith(".jpg"):
                data, m.size = b"not an image", len(b"not an image")
            tar.addfile(m, io.BytesIO(data))
    loaded = _victim(root)
    messages = set()
    for workers in (0, 2):
        with pytest.raises(DataError) as info:
            _embed_shard(loaded, raw_dir=tmp_path / "raw", shard=shard, rows=rows, ok=ok, batch_size=16, workers=workers)
        assert info.value.param == "--raw"
        messages.add(info.value.message)
    if recorded:
        want = ok[rows]["image_sha256"][20]
        got = __import__("hashlib").sha256(b"not an image").hexdigest()
        assert messages == {f"sample {keys[20]!r} in {shard} has an image of sha256 {got[:12]}..., not the "
                            f"{want[:12]}... download recorded: the shard changed after download; rerun the "
                            "pipeline from download (dvc repro, or clipscrub run)"}
    else:
        assert messages == {f"sample {keys[20]!r} in {shard}: cannot decode image: not a recognised image format "
                            "(the shard changed since download)"}


def test_a_model_not_trained_on_the_data_is_warned_of(tiny_model, tmp_path):  # noqa: F811 (fixture)
    """A randomly initialised model pairs images and captions at chance: embed says so where a
    person looks (its words, clipscrub show), with what to do."""
    from clipscrub.flows.cli import show_run, summary_text
    from clipscrub.flows.pipeline import run_stage
    from tests.imageserver import image_bytes
    from tests.test_sources import COLOURS, source_params, write_image_source

    images = [(f"k{i:03d}", image_bytes("PNG", colour=COLOURS[i % len(COLOURS)])) for i in range(40)]
    params = source_params(tiny_model, "folder", write_image_source(tmp_path / "src", "folder", images))
    run_stage("download", params, tmp_path / "data")
    summary = run_stage("embed", params, tmp_path / "data")
    assert summary["alignment"]["samples"] == 40 and summary["alignment"]["percentile"] < 0.75
    assert summary["warning"].startswith("the model pairs this data's images and captions barely better than chance")
    assert "embed with that model's weights (embed.checkpoint)" in summary["warning"]
    assert f"warning: {summary['warning']}" in summary_text("embed", summary, wrote=[])
    assert f"warning (embed): {summary['warning']}" in show_run(str(tmp_path / "data"))
