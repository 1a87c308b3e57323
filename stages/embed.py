"""Stage 3, embed: image and caption embeddings from an open_clip model.

Writes ``<out>/image.npy`` and ``<out>/text.npy`` (N, d) in ``embed.dtype`` (float32, or float16 to halve storage), L2-normalised as CLIP compares
them, and ``<out>/ids.npy`` (N,) int64: row i is the manifest's i-th ``ok`` sample. ``model.json``
records the model name, pretrained tag and checkpoint sha256.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import open_clip
import polars as pl
import torch
from tqdm import tqdm

from clipscrub.errors import DataError
from clipscrub.io import atomic_dir, read_json, read_manifest, write_json, write_lineage
from clipscrub.model import load_model
from clipscrub.params import BaseSettings, EmbedSettings
from clipscrub.shards import decode_image, image_field, iter_shard, shard_path
from clipscrub.sources import PRECOMPUTED_FILE


def iter_samples(raw_dir: Path, manifest: pl.DataFrame) -> Iterator[tuple[str, Any, str]]:
    """(key, RGB PIL image, caption) for the given manifest rows (its ok rows), shard by shard.

    Only the listed keys are decoded: shards may hold samples the download stage failed
    (an undecodable image, an empty caption), which never reach the model.
    """
    wanted = dict(zip(manifest["key"].to_list(), manifest["caption"].to_list()))
    for shard in manifest["shard"].unique(maintain_order=True).to_list():
        for sample in iter_shard(shard_path(raw_dir, shard)):
            key = sample["__key__"]
            ext = image_field(sample)
            if key not in wanted or ext is None:
                continue
            caption = wanted.pop(key)  # a later sample reusing the key is not this row
            try:
                image, _ = decode_image(sample[ext])
            except ValueError as exc:
                raise DataError(f"sample {key!r} in {shard}: {exc} (the shard changed since download)", param="--raw") from None
            yield key, image, caption


def expected_dim(settings: EmbedSettings) -> int | None:
    """The embedding dimension of the model ``embed`` names (its open_clip config), if known."""
    if settings.model_config_path:
        path = Path(settings.model_config_path)
        if not path.is_file():
            raise DataError(f"model config file not found: {path}", param="embed.model_config")
        cfg = json.loads(path.read_text())
        return cfg.get("model_cfg", cfg).get("embed_dim")
    cfg = open_clip.get_model_config(settings.model_name)
    return cfg.get("embed_dim") if cfg else None


def convert_precomputed(*, raw_dir: Path, ok: pl.DataFrame, out_dir: Path, settings: EmbedSettings) -> dict[str, Any]:
    """Copy clip-retrieval embeddings (the manifest's ok rows) into the embed stage's layout,
    L2-normalised (in ``embed.dtype``), part by part so memory stays bounded by one part."""
    spec = read_json(raw_dir / PRECOMPUTED_FILE)
    parts = spec["parts"]
    dims = {(p["image_dim"], p["text_dim"]) for p in parts}
    if len(dims) != 1:
        raise DataError(f"precomputed parts have different dimensions: {sorted(dims)}", param="download.embeddings.path")
    image_dim, text_dim = dims.pop()
    want = expected_dim(settings)
    if image_dim != text_dim:
        raise DataError(f"image embeddings have dimension {image_dim} but text embeddings {text_dim}", param="download.embeddings.path")
    if want is not None and image_dim != want:
        raise DataError(
            f"the precomputed embeddings have dimension {image_dim} but model {settings.model_name!r} embeds "
            f"in {want}: name the model that produced them in embed.model_name",
            param="embed.model_name",
        )
    ids = ok["id"].to_numpy().astype(np.int64)
    image_out = np.lib.format.open_memmap(out_dir / "image.npy", mode="w+", dtype=settings.dtype, shape=(len(ids), image_dim))
    text_out = np.lib.format.open_memmap(out_dir / "text.npy", mode="w+", dtype=settings.dtype, shape=(len(ids), text_dim))
    start = 0
    for part in tqdm(parts, desc="embeddings", unit="part"):
        stop = start + part["rows"]
        lo, hi = np.searchsorted(ids, [start, stop])
        local = ids[lo:hi] - start
        for src, dst in (("img_emb", image_out), ("text_emb", text_out)):
            block = np.asarray(np.load(part[src], mmap_mode="r")[local], dtype=np.float32)
            norms = np.linalg.norm(block, axis=1, keepdims=True)
            # zero rows stay zero (and non-finite ones non-finite) for index to reject by name
            dst[lo:hi] = block / np.where(norms > 0, norms, 1.0)
        start = stop
    image_out.flush()
    text_out.flush()
    del image_out, text_out
    np.save(out_dir / "ids.npy", ids)
    return {"samples": int(len(ids)), "dim": int(image_dim), "device": "none"}


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
    if (raw_dir / PRECOMPUTED_FILE).is_file():
        return _write_precomputed(raw_dir=raw_dir, ok=ok, out_dir=out_dir, settings=settings, base=base)
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
        imgs = torch.stack([loaded.preprocess(b[1]) for b in batch]).to(dev)
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
        np.save(tmp / "image.npy", image_emb.astype(settings.dtype, copy=False))
        np.save(tmp / "text.npy", text_emb.astype(settings.dtype, copy=False))
        np.save(tmp / "ids.npy", ok["id"].to_numpy().astype(np.int64))
        _record_model(tmp, info=loaded.info, summary=summary, raw_dir=raw_dir,
                      upstream=[raw_dir] + ([model_dir] if model_dir is not None else []), settings=settings, base=base)
    return summary


def _record_model(tmp: Path, *, info: dict[str, Any], summary: dict[str, Any], raw_dir: Path, upstream: list[Path],
                  settings: EmbedSettings, base: BaseSettings) -> None:
    """model.json and the embed lineage, beside the arrays in ``tmp``."""
    write_json(tmp / "model.json", info)
    write_lineage(
        tmp,
        stage="embed",
        params={"base": base.model_dump(mode="json"), "embed": settings.model_dump(mode="json", by_alias=True)},
        inputs={"raw": raw_dir},
        upstream=upstream,
        summary={k: v for k, v in summary.items() if k != "device"},
        extra={"model": info},
    )


def _write_precomputed(*, raw_dir: Path, ok: pl.DataFrame, out_dir, settings: EmbedSettings, base: BaseSettings) -> dict[str, Any]:
    info = {"model_name": settings.model_name, "pretrained": None, "checkpoint": None, "checkpoint_sha256": None,
            "precomputed": read_json(raw_dir / PRECOMPUTED_FILE)["root"]}
    with atomic_dir(out_dir) as tmp:
        summary = convert_precomputed(raw_dir=raw_dir, ok=ok, out_dir=tmp, settings=settings)
        _record_model(tmp, info=info, summary=summary, raw_dir=raw_dir, upstream=[raw_dir], settings=settings, base=base)
    return summary
