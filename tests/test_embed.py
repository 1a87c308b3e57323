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
from stages.embed import embed_dataset


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

    from clipscrub.pipeline import run_stage
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

    from clipscrub.pipeline import run_stage
    from stages.embed import parts_dir_for

    proj, params = many_shards
    reference = tmp_path / "reference"
    shutil.copytree(proj / "data", reference / "data")
    whole = run_stage("embed", params, reference / "data")
    assert whole["shards"] == 60 and whole["shards_resumed"] == 0

    work = tmp_path / "work"
    shutil.copytree(proj, work)
    parts = parts_dir_for(work / "data" / "embeddings")
    cmd = [sys.executable, "-m", "clipscrub.cli", "embed", "-p", "params.yaml", "--root", "data"]
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

    res = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["shards_resumed"] == done and summary["shards"] == 60
    assert _embedding_hashes(work / "data" / "embeddings") == _embedding_hashes(reference / "data" / "embeddings")
    assert not parts.exists()
    assert not list((work / "data").glob(".embeddings.tmp-*"))
