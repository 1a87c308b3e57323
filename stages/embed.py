"""Stage 3, embed: image and caption embeddings from an open_clip model.

Writes ``<out>/image.npy`` and ``<out>/text.npy`` (N, d) float32, L2-normalised as CLIP compares
them, and ``<out>/ids.npy`` (N,) int64: row i is the manifest's i-th ``ok`` sample. ``model.json``
records the model name, pretrained tag and checkpoint sha256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl
import torch
import webdataset as wds
from tqdm import tqdm

from clipscrub.errors import DataError
from clipscrub.io import atomic_dir, read_manifest, write_json, write_lineage
from clipscrub.model import load_model
from clipscrub.params import BaseSettings, EmbedSettings


def iter_samples(raw_dir: Path, manifest: pl.DataFrame) -> Iterator[tuple[str, Any, str]]:
    """(key, PIL image, caption) for the manifest's ok rows, shard by shard."""
    for shard in manifest["shard"].unique(maintain_order=True).to_list():
        ds = wds.WebDataset(str(raw_dir / "shards" / shard), shardshuffle=False, empty_check=False)
        yield from ds.decode("pil").to_tuple("__key__", "jpg", "txt")


@torch.no_grad()
def embed_dataset(
    *,
    raw_dir: str | Path,
    out_dir: str | Path,
    settings: EmbedSettings,
    base: BaseSettings,
    model_dir: str | Path | None = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Embed every ok sample of ``raw_dir``; return counts and the embedding dimension.

    With ``model_dir`` (the train stage's output) the model is that directory's checkpoint and
    config, registered as ``model_name``; otherwise the model the ``embed`` settings name.
    """
    raw_dir = Path(raw_dir)
    manifest = read_manifest(raw_dir)
    ok = manifest.filter(pl.col("status") == "ok")
    if ok.height == 0:
        raise DataError("no sample downloaded successfully: nothing to embed", param="--raw")
    if model_dir is not None:
        model_dir = Path(model_dir)
        loaded = load_model(
            model_name=model_name or settings.model_name,
            pretrained=None,
            checkpoint=str(model_dir / "checkpoint.pt"),
            model_config=str(model_dir / "model_config.json"),
            device=base.device,
        )
        # the file's hash identifies it; its location (data/ or a run directory) does not
        loaded.info["checkpoint"] = "checkpoint.pt (train stage output)"
    else:
        loaded = load_model(
            model_name=settings.model_name,
            pretrained=settings.pretrained,
            checkpoint=settings.checkpoint,
            model_config=settings.model_config_path,
            device=base.device,
        )
    model, dev = loaded.model, loaded.device
    key_to_row = {k: i for i, k in enumerate(ok["key"].to_list())}
    image_emb: np.ndarray | None = None
    text_emb: np.ndarray | None = None
    seen = np.zeros(ok.height, dtype=bool)
    batch: list[tuple[int, Any, str]] = []

    def flush() -> None:
        nonlocal image_emb, text_emb
        rows = np.array([b[0] for b in batch])
        imgs = torch.stack([loaded.preprocess(b[1].convert("RGB")) for b in batch]).to(dev)
        toks = loaded.tokenizer([b[2] for b in batch]).to(dev)
        fi = model.encode_image(imgs, normalize=True).float().cpu().numpy()
        ft = model.encode_text(toks, normalize=True).float().cpu().numpy()
        if image_emb is None:
            image_emb = np.zeros((ok.height, fi.shape[1]), dtype=np.float32)
            text_emb = np.zeros((ok.height, ft.shape[1]), dtype=np.float32)
        image_emb[rows], text_emb[rows] = fi, ft
        seen[rows] = True
        batch.clear()

    with tqdm(total=ok.height, desc="embed", unit="sample") as bar:
        for key, img, txt in iter_samples(raw_dir, ok):
            if key not in key_to_row:
                continue
            batch.append((key_to_row[key], img, txt))
            if len(batch) == settings.batch_size:
                bar.update(len(batch))
                flush()
        if batch:
            bar.update(len(batch))
            flush()
    if not seen.all():
        missing = ok.filter(pl.Series(~seen))["key"].head(5).to_list()
        raise DataError(f"{int((~seen).sum())} manifest samples are missing from the shards, e.g. {missing}", param="--raw")

    summary = {"samples": int(ok.height), "dim": int(image_emb.shape[1]), "device": dev.type}
    with atomic_dir(out_dir) as tmp:
        np.save(tmp / "image.npy", image_emb)
        np.save(tmp / "text.npy", text_emb)
        np.save(tmp / "ids.npy", ok["id"].to_numpy().astype(np.int64))
        write_json(tmp / "model.json", loaded.info)
        write_lineage(
            tmp,
            stage="embed",
            params={"base": base.model_dump(mode="json"), "embed": settings.model_dump(mode="json", by_alias=True)},
            inputs={"raw": raw_dir},
            upstream=[raw_dir] + ([model_dir] if model_dir is not None else []),
            summary={k: v for k, v in summary.items() if k != "device"},
            extra={"model": loaded.info},
        )
    return summary
