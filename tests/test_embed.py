from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from clipscrub.errors import DataError, ParamError
from clipscrub.io import sha256_file
from clipscrub.model import load_model
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
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, rtol=1e-5)
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
    with pytest.raises(DataError, match="no sample downloaded successfully"):
        embed_dataset(raw_dir=tmp_path / "raw", out_dir=tmp_path / "emb", settings=params.embed, base=params.base)
    assert not (tmp_path / "emb").exists()
