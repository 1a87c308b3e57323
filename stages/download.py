"""Stage 1, download: materialise the dataset as webdataset shards plus a manifest.

Layout (img2dataset's): ``<out>/shards/00000.tar`` holding ``key.jpg``, ``key.txt``,
``key.json`` per sample, and ``<out>/manifest.parquet`` with one row per sample and a stable
integer ``id`` that every later artifact refers to.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import polars as pl
import webdataset as wds

from clipscrub.errors import DataError
from clipscrub.io import atomic_dir, write_lineage
from clipscrub.params import BaseSettings, DownloadSettings
from clipscrub.synthetic import generate_samples

MANIFEST_SCHEMA = {
    "id": pl.Int64,
    "key": pl.String,
    "shard": pl.String,
    "caption": pl.String,
    "image_sha256": pl.String,
    "width": pl.Int32,
    "height": pl.Int32,
    "status": pl.String,
    "error": pl.String,
    "is_poison": pl.Boolean,
}
JPEG_QUALITY = 95


def encode_jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def write_shards(
    *, records: list[dict[str, Any]], shard_dir: Path, shard_size: int
) -> list[dict[str, Any]]:
    """Write records (``key``, ``jpg`` bytes, ``txt``, ``json`` dict) as reproducible tar shards.

    Returns the records' manifest rows (without ``id``), in input order.
    """
    shard_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    # mtime fixed so identical content gives byte-identical shards (DVC and Prefect hash them)
    with wds.ShardWriter(str(shard_dir / "%05d.tar"), maxcount=shard_size, mtime=0, verbose=0) as sink:
        for i, rec in enumerate(records):
            meta = dict(rec["json"], key=rec["key"], caption=rec["txt"])
            sink.write({"__key__": rec["key"], "jpg": rec["jpg"], "txt": rec["txt"], "json": json.dumps(meta, sort_keys=True).encode()})
            rows.append(
                {
                    "key": rec["key"],
                    "shard": f"{i // shard_size:05d}.tar",
                    "caption": rec["txt"],
                    "image_sha256": hashlib.sha256(rec["jpg"]).hexdigest(),
                }
            )
    return rows


def _synthetic_records(settings: DownloadSettings, seed: int) -> tuple[list[dict[str, Any]], list[bool]]:
    syn = settings.synthetic
    samples = generate_samples(
        num_samples=syn.num_samples,
        poison_rate=syn.poison_rate,
        image_size=syn.image_size,
        patch_size=syn.patch_size,
        target=syn.target,
        seed=seed,
    )
    records = [
        {"key": f"{i:09d}", "jpg": encode_jpeg(s.image), "txt": s.caption, "json": {"label": s.label}}
        for i, s in enumerate(samples)
    ]
    return records, [s.is_poison for s in samples]


def download_dataset(*, out_dir: str | Path, settings: DownloadSettings, base: BaseSettings) -> dict[str, Any]:
    """Write ``out_dir/shards/*.tar`` and ``out_dir/manifest.parquet``; return counts."""
    if settings.synthetic.patch_size >= settings.synthetic.image_size:
        raise DataError(
            f"{settings.synthetic.patch_size} must be smaller than download.synthetic.image_size",
            param="download.synthetic.patch_size",
        )
    records, is_poison = _synthetic_records(settings, base.seed)
    if not records:
        raise DataError("the dataset is empty", param="download.synthetic.num_samples")
    with atomic_dir(out_dir) as tmp:
        rows = write_shards(records=records, shard_dir=tmp / "shards", shard_size=settings.shard_size)
        size = settings.synthetic.image_size
        manifest = pl.DataFrame(
            {
                "id": list(range(len(rows))),
                "key": [r["key"] for r in rows],
                "shard": [r["shard"] for r in rows],
                "caption": [r["caption"] for r in rows],
                "image_sha256": [r["image_sha256"] for r in rows],
                "width": [size] * len(rows),
                "height": [size] * len(rows),
                "status": ["ok"] * len(rows),
                "error": [None] * len(rows),
                "is_poison": is_poison,
            },
            schema=MANIFEST_SCHEMA,
        )
        manifest.write_parquet(tmp / "manifest.parquet", statistics=False)
        summary = {
            "samples": manifest.height,
            "ok": manifest.height,
            "failed": 0,
            "poisoned": int(sum(is_poison)),
            "shards": len({r["shard"] for r in rows}),
        }
        write_lineage(
            tmp,
            stage="download",
            params={"base": base.model_dump(mode="json"), "download": settings.model_dump(mode="json")},
            inputs={},
            upstream=[],
            summary=summary,
        )
    return summary
