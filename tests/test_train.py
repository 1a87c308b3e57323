from __future__ import annotations

import hashlib
import json

import numpy as np
import open_clip
import pytest
import torch

from clipscrub.model import load_model
from clipscrub.synthetic import SHAPES, as_stored, make_clean_sample
from clipscrub.stages.train import HELDOUT_SEED_OFFSET, ZERO_SHOT_TEMPLATES, load_shards, train_model
from tests.conftest import tiny_params


def test_training_writes_an_open_clip_checkpoint(tiny_run):
    """The checkpoint loads with open_clip; its recorded sha256 is the file's; it is the trained
    model (its loss on the training data is below the same seed's untrained model's), and the
    zero-shot accuracy in train.json is what this saved model scores on the held-out images."""
    root, params = tiny_run
    metrics = json.loads((root / "metrics" / "train.json").read_text())
    assert metrics["train_samples"] == params.download.synthetic.num_samples
    assert metrics["attack_success_rate"] == pytest.approx(np.mean(list(metrics["attack_success_rates"].values())), abs=1e-4)
    path = root / "model" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"epoch", "name", "state_dict"}
    loaded = load_model(
        model_name="clipscrub-tiny", pretrained=None, checkpoint=str(path),
        model_config=str(root / "model" / "model_config.json"), device="cpu",
    )
    assert loaded.info["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    model = loaded.model.eval()

    # loss on the training data, in batches of train.batch_size: 4.83 untrained, 4.21 trained
    images, tokens = load_shards(root / "raw", loaded.preprocess, loaded.tokenizer)
    torch.manual_seed(params.base.seed)  # the initial weights train_model started from
    untrained = open_clip.create_model_and_transforms("clipscrub-tiny", pretrained=None)[0].eval()
    loss_fn, bs = open_clip.ClipLoss(), params.train.batch_size

    @torch.no_grad()
    def loss(m) -> float:
        return float(np.mean([loss_fn(*m(images[i:i + bs], tokens[i:i + bs])).item()
                              for i in range(0, len(images) - bs + 1, bs)]))

    assert loss(model) < loss(untrained) - 0.2

    # zero-shot accuracy, computed here: the held-out draw as documented, cosine to the
    # template-averaged class texts over the shapes plus the attack targets
    syn = params.download.synthetic
    rng = np.random.default_rng(params.base.seed + HELDOUT_SEED_OFFSET)
    heldout = [make_clean_sample(rng=rng, image_size=syn.image_size) for _ in range(params.train.heldout_samples)]
    classes = list(SHAPES) + sorted({a.target for a in syn.attacks} - set(SHAPES))
    with torch.no_grad():
        text = torch.stack([torch.nn.functional.normalize(
            model.encode_text(loaded.tokenizer([t.format(c) for t in ZERO_SHOT_TEMPLATES]), normalize=True).mean(0), dim=-1)
            for c in classes])
        img = model.encode_image(torch.stack([loaded.preprocess(as_stored(s.image)) for s in heldout]), normalize=True)
    predicted = [classes[i] for i in (img @ text.T).argmax(-1).tolist()]
    accuracy = np.mean([p == s.label for p, s in zip(predicted, heldout)])
    assert metrics["zero_shot_accuracy"] == round(float(accuracy), 4)


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
