"""Stage 2 (demo only), train: the demo's victim, a tiny open_clip CLIP trained on the raw shards.

Writes ``<out>/checkpoint.pt`` (open_clip's training-code format: a dict with ``state_dict``),
``<out>/model_config.json`` (an open_clip model config) and a metrics JSON with the victim's
zero-shot accuracy on clean held-out images and, per attack, its attack success rate (ASR): the
fraction of held-out images of classes other than the target that, with the attack's trigger
(the same pattern the dataset was poisoned with), are classified as the target; for a targeted
attack (no trigger), the fraction of its chosen images classified as the target.
``attack_success_rate`` is the mean over attacks.
When ``train.enabled`` is false the stage writes only a record saying so, and embed uses the
model named in the ``embed`` section.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import open_clip
import torch
import webdataset as wds

from clipscrub.io import atomic_dir, atomic_file, read_manifest, write_json, write_lineage
from clipscrub.model import no_random_init_warning, register_model_config, resolve_device, tiny_model_config
from clipscrub.params import BaseSettings, DownloadSettings, TrainSettings
from clipscrub.progress import Progress, track
from clipscrub.attacks import attack_name, attack_seed, make_trigger, plan_poison
from clipscrub.synthetic import SHAPES, as_stored, generate_samples, make_clean_sample

ZERO_SHOT_TEMPLATES = ("a photo of a {}.", "a {} on a plain background", "an image of a {}")
HELDOUT_SEED_OFFSET = 1_000_003


def load_shards(raw_dir: Path, preprocess, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every shard of ``raw_dir`` into (N, 3, H, W) images and (N, L) tokens, in manifest order."""
    manifest = read_manifest(raw_dir)
    ok = manifest.filter(manifest["status"] == "ok")
    urls = [str(raw_dir / "shards" / s) for s in ok["shard"].unique(maintain_order=True).to_list()]
    by_key = {}
    progress = track(urls, desc="train (decoding)", unit="shards")
    for url in progress:
        ds = wds.WebDataset(url, shardshuffle=False, empty_check=False).decode("pil").to_tuple("__key__", "jpg", "txt")
        for key, img, txt in ds:
            by_key[key] = (preprocess(img.convert("RGB")), txt)
            progress.count(1, "images")
    keys = ok["key"].to_list()
    images = torch.stack([by_key[k][0] for k in keys])
    tokens = tokenizer([by_key[k][1] for k in keys])
    return images, tokens


def attack_probes(download: DownloadSettings, base: BaseSettings, n: int, preprocess) -> dict[str, Any]:
    """Clean held-out images with labels (N, 3, H, W), (N,), and per attack the probe images whose
    prediction as the attack's target counts as a success. Every image goes through the JPEG
    round trip the training data went through: a trigger is probed as the victim learned it
    (a targeted attack's chosen image, a colour filter or a faint pattern is not the same after it)."""
    syn = download.synthetic
    rng = np.random.default_rng(base.seed + HELDOUT_SEED_OFFSET)
    heldout = [make_clean_sample(rng=rng, image_size=syn.image_size) for _ in range(n)]
    probes: dict[str, torch.Tensor] = {}
    for j, attack in enumerate(syn.attacks):
        if attack.kind == "targeted":
            # the chosen images themselves (their clean versions), as the dataset was built
            samples = generate_samples(num_samples=syn.num_samples, image_size=syn.image_size, attacks=[], seed=base.seed)
            plan = plan_poison(captions=[s.caption for s in samples], attacks=syn.attacks, seed=base.seed + 1)
            chosen = sorted({a.source for a in plan if a.attack == j})
            images = [samples[i].image for i in chosen]
        else:
            trigger = make_trigger(attack, seed=attack_seed(base.seed, j))
            images = [trigger.apply(s.image, rng) for s in heldout if s.label != attack.target]
        probes[f"{j}:{attack_name(attack)}"] = torch.stack([preprocess(as_stored(im)) for im in images])
    clean = torch.stack([preprocess(as_stored(s.image)) for s in heldout])
    labels = torch.tensor([SHAPES.index(s.label) for s in heldout])
    return {"clean": clean, "labels": labels, "probes": probes}


def measure_victim(model, tokenizer, preprocess, *, download: DownloadSettings, base: BaseSettings, heldout: int,
                   device) -> tuple[float, dict[str, float]]:
    """Zero-shot accuracy on ``heldout`` clean held-out images, and each attack's success rate
    (``attack_probes``), over the shape classes plus the attacks' targets."""
    held = attack_probes(download, base, heldout, preprocess)
    targets = [a.target for a in download.synthetic.attacks]
    classnames = list(SHAPES) + sorted({t for t in targets if t not in SHAPES})
    acc = (zero_shot_predict(model, tokenizer, held["clean"], classnames, device) == held["labels"]).float().mean().item()
    per_attack = {
        name: round((zero_shot_predict(model, tokenizer, images, classnames, device) == classnames.index(target))
                    .float().mean().item(), 4)
        for (name, images), target in zip(held["probes"].items(), targets)
    }
    return round(acc, 4), per_attack


@torch.no_grad()
def zero_shot_predict(model, tokenizer, images: torch.Tensor, classnames: list[str], device) -> torch.Tensor:
    """Predicted class index per image (N,), by cosine to template-averaged class embeddings."""
    weights = []
    for c in classnames:
        t = model.encode_text(tokenizer([tpl.format(c) for tpl in ZERO_SHOT_TEMPLATES]).to(device), normalize=True)
        weights.append(torch.nn.functional.normalize(t.mean(0), dim=-1))
    w = torch.stack(weights)
    preds = []
    for i in range(0, len(images), 512):
        f = model.encode_image(images[i : i + 512].to(device), normalize=True)
        preds.append((f @ w.T).argmax(-1).cpu())
    return torch.cat(preds)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for a block, then restored: training's setting
    must not leak into the stages that run after it in the same process (the flow, the tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_model(
    *,
    raw_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path,
    settings: TrainSettings,
    download: DownloadSettings,
    base: BaseSettings,
) -> dict[str, Any]:
    """Train the demo victim on ``raw_dir``'s shards; write checkpoint, config and metrics."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    params = {"base": base.model_dump(mode="json"), "train": settings.model_dump(mode="json")}
    if not settings.enabled:
        summary = {"trained": False}
        with atomic_dir(out_dir) as tmp:
            write_lineage(tmp, stage="train", params=params, inputs={}, upstream=[], summary=summary, module=__name__)
        with atomic_file(metrics_path) as tmp_metrics:
            write_json(tmp_metrics, summary)
        return summary

    torch.manual_seed(base.seed)
    with torch_threads(settings.threads):  # the process's own setting comes back afterwards
        device = resolve_device(base.device)
        config = tiny_model_config(settings.architecture)
        register_model_config(settings.model_name, config)
        with no_random_init_warning():  # the victim is trained from scratch
            model, _, preprocess = open_clip.create_model_and_transforms(settings.model_name, pretrained=None,
                                                                         device=device)
        tokenizer = open_clip.get_tokenizer(settings.model_name)

        t0 = time.perf_counter()
        images, tokens = load_shards(raw_dir, preprocess, tokenizer)
        n = len(images)
        steps_per_epoch = max(1, n // settings.batch_size)
        total = steps_per_epoch * settings.epochs
        warmup = max(1, total // 20)
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
        )
        loss_fn = open_clip.ClipLoss()
        gen = torch.Generator().manual_seed(base.seed)
        model.train()
        losses = []
        # a line per epoch, whatever CLIPSCRUB_PROGRESS_EVERY says: epochs are few and each is long
        with Progress(desc="train", total=settings.epochs, unit="epochs", every_s=0) as progress:
            for _ in range(settings.epochs):
                perm = torch.randperm(n, generator=gen)
                for s in range(steps_per_epoch):
                    idx = perm[s * settings.batch_size : (s + 1) * settings.batch_size]
                    img_f, txt_f, scale = model(images[idx].to(device), tokens[idx].to(device))
                    loss = loss_fn(img_f, txt_f, scale)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    losses.append(loss.item())
                progress.advance(loss=f"{np.mean(losses[-steps_per_epoch:]):.4f}")
        train_seconds = time.perf_counter() - t0
        model.eval()

        acc, per_attack = measure_victim(model, tokenizer, preprocess, download=download, base=base,
                                         heldout=settings.heldout_samples, device=device)
        asr = float(np.mean(list(per_attack.values()))) if per_attack else None
        metrics = {
            "trained": True,
            "zero_shot_accuracy": round(acc, 4),
            "attack_success_rate": round(asr, 4) if asr is not None else None,
            "attack_success_rates": per_attack,
            "final_loss": round(float(np.mean(losses[-steps_per_epoch:])), 4),
            "train_samples": n,
            "steps": total,
        }
        with atomic_dir(out_dir) as tmp:
            torch.save({"epoch": settings.epochs, "name": settings.model_name, "state_dict": model.state_dict()}, tmp / "checkpoint.pt")
            write_json(tmp / "model_config.json", config)
            write_lineage(
                tmp, stage="train", params=params, inputs={"raw": raw_dir}, upstream=[raw_dir], summary=metrics,
                module=__name__,
            )
        with atomic_file(metrics_path) as tmp_metrics:
            write_json(tmp_metrics, metrics)
        return dict(metrics, train_seconds=round(train_seconds, 1))
