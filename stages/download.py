"""Stage 1, download: materialise the dataset as webdataset shards plus a manifest.

Layout (img2dataset's): ``<out>/shards/00000.tar`` holding ``key.jpg``, ``key.txt``,
``key.json`` per sample, and ``<out>/manifest.parquet`` with one row per input sample and a
stable integer ``id`` that every later artifact refers to. ``download.source`` picks where the
samples come from (clipscrub/sources.py): the synthetic demo, a url list (img2dataset), existing
shards (read in place), a folder of images with captions, or clip-retrieval embeddings.
Samples that cannot be used are rows with ``status == "failed"`` and an ``error``; only ``ok``
rows go on to embed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator

import polars as pl

from clipscrub.errors import DataError
from clipscrub.io import atomic_dir, write_lineage
from clipscrub.params import BaseSettings, DownloadSettings
from clipscrub.progress import track
from clipscrub.shards import shard_name, shard_writer
from clipscrub.sources import (MANIFEST_SCHEMA, fail_long_captions, failure_counts, failure_text, fetch_urls,
                               finish_manifest, read_folder, read_precomputed, read_shards)
from clipscrub.synthetic import encode_jpeg, generate_samples
from clipscrub.validation import docs_dir_for, manifest_tables, validate

__all__ = ["MANIFEST_SCHEMA", "download_dataset", "encode_jpeg"]

log = logging.getLogger("clipscrub.download")
# the params that name each source's input: where a download with no usable sample points
SOURCE_PARAM = {"synthetic": "download.synthetic", "urls": "download.urls.path", "shards": "download.shards.path",
                "folder": "download.folder.captions", "embeddings": "download.embeddings.path"}

def write_shards(
    *, records: Iterable[dict[str, Any]], shard_dir: Path, shard_size: int
) -> list[dict[str, Any]]:
    """Write records (``key``, ``jpg`` bytes, ``txt``, ``json`` dict) as reproducible tar shards.

    Returns the records' manifest rows (without ``id``), in input order.
    """
    rows = []
    with shard_writer(shard_dir, shard_size) as sink:
        for i, rec in enumerate(records):
            meta = dict(rec["json"], key=rec["key"], caption=rec["txt"])
            sink.write({"__key__": rec["key"], "jpg": rec["jpg"], "txt": rec["txt"], "json": json.dumps(meta, sort_keys=True).encode()})
            rows.append(
                {
                    "key": rec["key"],
                    "shard": shard_name(i, shard_size),
                    "caption": rec["txt"],
                    "image_sha256": hashlib.sha256(rec["jpg"]).hexdigest(),
                }
            )
    return rows


def _synthetic_samples(settings: DownloadSettings, seed: int) -> list[Any]:
    syn = settings.synthetic
    try:
        return generate_samples(num_samples=syn.num_samples, image_size=syn.image_size, attacks=syn.attacks,
                                clusters=syn.clusters, seed=seed)
    except ValueError as exc:
        raise DataError(str(exc), param="download.synthetic.attacks") from None


def _synthetic_records(samples: list[Any]) -> Iterator[dict[str, Any]]:
    """The samples as shard records, encoded one at a time as they are written."""
    for i, s in enumerate(samples):
        meta = {"label": s.label} if s.cluster is None else {"label": s.label, "cluster": s.cluster}
        yield {"key": f"{i:09d}", "jpg": encode_jpeg(s.image), "txt": s.caption, "json": meta}


def _synthetic_manifest(settings: DownloadSettings, base: BaseSettings, out_dir: Path) -> pl.DataFrame:
    samples = _synthetic_samples(settings, base.seed)
    if not samples:
        raise DataError("the dataset is empty", param="download.synthetic.num_samples")
    records = track(_synthetic_records(samples), desc="download", total=len(samples), unit="samples")
    rows = write_shards(records=records, shard_dir=out_dir / "shards", shard_size=settings.shard_size)
    size = settings.synthetic.image_size
    frame = pl.DataFrame(rows).with_row_index("id").with_columns(
        pl.lit(size).alias("width"), pl.lit(size).alias("height"), pl.lit("ok").alias("status"),
        pl.Series("is_poison", [s.is_poison for s in samples]),
        pl.Series("attack", [s.attack for s in samples], dtype=pl.String),
    )
    return finish_manifest(frame)


def download_dataset(*, out_dir: str | Path, settings: DownloadSettings, base: BaseSettings) -> dict[str, Any]:
    """Write ``out_dir/manifest.parquet`` (and shards, for the sources that have images); return
    counts: ``samples`` input rows = ``ok`` + ``failed``."""
    extra: dict[str, Any] = {}
    source_inputs: dict[str, Path] = {}
    with atomic_dir(out_dir) as tmp:
        if settings.source == "synthetic":
            manifest = _synthetic_manifest(settings, base, tmp)
        elif settings.source == "urls":
            manifest, extra = fetch_urls(settings=settings.urls, shard_size=settings.shard_size, out_dir=tmp)
            source_inputs["url_list"] = Path(settings.urls.path).expanduser()
        elif settings.source == "shards":
            manifest, extra = read_shards(settings=settings.shards, max_file_bytes=settings.max_file_bytes)
        elif settings.source == "folder":
            manifest, extra = read_folder(settings=settings.folder, shard_size=settings.shard_size, out_dir=tmp,
                                          max_file_bytes=settings.max_file_bytes,
                                          max_caption_bytes=settings.max_caption_bytes)
            source_inputs["captions"] = Path(settings.folder.captions).expanduser()
        else:
            manifest, extra = read_precomputed(settings=settings.embeddings, out_dir=tmp)
        manifest = fail_long_captions(manifest, max_bytes=settings.max_caption_bytes)
        ok = int((manifest["status"] == "ok").sum())
        if ok == 0:  # the manifest would only move the error to embed
            raise DataError(f"all {manifest.height:,} samples failed ({failure_text(manifest)}): nothing to embed",
                            param=SOURCE_PARAM[settings.source])
        manifest.write_parquet(tmp / "manifest.parquet", statistics=False)
        validated = validate("download", manifest_tables(manifest), docs_dir=docs_dir_for(out_dir, "download"))
        summary = {
            "source": settings.source,
            "samples": manifest.height,
            "ok": ok,
            "failed": manifest.height - ok,
            "errors": {reason: n for reason, n, _ in failure_counts(manifest)},
            **extra,
        }
        if summary["failed"] > manifest.height / 2:
            summary["warning"] = (f"{summary['failed']:,} of {manifest.height:,} samples failed "
                                  f"({failure_text(manifest)}): check the source before trusting the rest")
            log.warning("download: %s", summary["warning"])
        if manifest["is_poison"].null_count() == 0:
            summary["poisoned"] = int(manifest["is_poison"].sum())
        shards = manifest["shard"].drop_nulls().n_unique()
        summary["shards"] = int(shards)
        write_lineage(
            tmp,
            module=__name__,
            stage="download",
            # the source in use only: another source's settings are not what made these samples
            params={"base": base.model_dump(mode="json"), "download": settings.in_use()},
            inputs=source_inputs,
            upstream=[],
            summary=summary,
            extra={"validation": validated},
        )
    return summary

