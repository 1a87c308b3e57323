from __future__ import annotations

import json

import torch

from clipscrub.model import load_model
from stages.train import train_model
from tests.conftest import tiny_params


def test_training_writes_an_open_clip_checkpoint(tiny_run):
    root, params = tiny_run
    metrics = json.loads((root / "metrics" / "train.json").read_text())
    assert metrics["trained"] is True
    assert 0.0 <= metrics["zero_shot_accuracy"] <= 1.0
    assert 0.0 <= metrics["attack_success_rate"] <= 1.0
    assert metrics["train_samples"] == params.download.synthetic.num_samples
    ckpt = torch.load(root / "model" / "checkpoint.pt", weights_only=True)
    assert set(ckpt) == {"epoch", "name", "state_dict"}
    loaded = load_model(
        model_name="clipscrub-tiny", pretrained=None, checkpoint=str(root / "model" / "checkpoint.pt"),
        model_config=str(root / "model" / "model_config.json"), device="cpu",
    )
    assert loaded.info["checkpoint_sha256"]


def test_disabled_training_writes_only_a_record(tiny_run, tmp_path):
    root, _ = tiny_run
    params = tiny_params(extra=["train.enabled=false"])
    summary = train_model(
        raw_dir=root / "raw", out_dir=tmp_path / "model", metrics_path=tmp_path / "train.json",
        settings=params.train, download=params.download, base=params.base,
    )
    assert summary == {"trained": False}
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["lineage.json"]
    assert json.loads((tmp_path / "train.json").read_text()) == {"trained": False}
