"""The download stage's sources. Each writes what it must under a scratch directory and returns
the manifest: one row per input row (or per sample found), with a stable ``id`` and every bad
sample recorded as ``status == "failed"`` with its ``error`` rather than stopping the run.

- ``urls``: a parquet/csv/tsv url list fetched with img2dataset into webdataset shards; its
  per-shard status parquet gives every row's outcome.
- ``shards``: existing webdataset shards, read in place (the manifest holds their absolute paths).
- ``folder``: a folder of images plus a csv/jsonl captions file, written as shards.
- ``embeddings``: clip-retrieval's ``img_emb/ text_emb/ metadata/`` layout; no images, the run
  starts at index (the embed stage converts the arrays).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from clipscrub.errors import DataError
from clipscrub.io import fmt_bytes, read_frame, take_by_id
from clipscrub.params import FolderSettings, PrecomputedSettings, ShardsSettings, UrlsSettings
from clipscrub.progress import track
from clipscrub.shards import (
    ADDRESS_PATTERN, MAX_ASPECT_RATIO, caption_of, caption_problem, decode_image, expand_shards, image_field, iter_shard, shard_name,
    shard_writer, stable_message,
)

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
    "attack": pl.String,  # the attack that poisoned the sample (kind:target), when known
}
ROW_COL = "clipscrub_row"
PRECOMPUTED_FILE = "precomputed.json"


def finish_manifest(frame: pl.DataFrame) -> pl.DataFrame:
    """The manifest schema's columns in order (missing ones null), then the source's extra
    columns; captions that are empty or blank mark an otherwise good sample as failed."""
    cols = []
    for name, dtype in MANIFEST_SCHEMA.items():
        cols.append(pl.col(name).cast(dtype) if name in frame.columns else pl.lit(None, dtype=dtype).alias(name))
    extras = [c for c in frame.columns if c not in MANIFEST_SCHEMA]
    out = frame.select(cols + extras)
    blank = (pl.col("status") == "ok") & (pl.col("caption").is_null() | (pl.col("caption").str.strip_chars() == ""))
    return out.with_columns(
        pl.when(blank).then(pl.lit("failed")).otherwise(pl.col("status")).alias("status"),
        pl.when(blank).then(pl.lit("empty caption")).otherwise(pl.col("error")).alias("error"),
    ).sort("id")


LONG_CAPTION = "caption of {} bytes, over the limit of {} (download.max_caption_bytes)"
LONG_CAPTION_KEPT = 1000  # characters of a too-long caption its failed row keeps


def fail_long_captions(frame: pl.DataFrame, *, max_bytes: int) -> pl.DataFrame:
    """Mark ok rows whose caption is longer than ``max_bytes`` (UTF-8) failed, keeping only the
    caption's first ``LONG_CAPTION_KEPT`` characters in the row: one 10 MB caption otherwise
    rides through every later table and every page that shows it."""
    size = pl.col("caption").str.len_bytes()
    long = (pl.col("status") == "ok") & (size > max_bytes)
    return frame.with_columns(
        pl.when(long).then(pl.lit("failed")).otherwise(pl.col("status")).alias("status"),
        pl.when(long).then(pl.format(LONG_CAPTION, size, pl.lit(max_bytes))).otherwise(pl.col("error")).alias("error"),
        pl.when(long).then(pl.col("caption").str.slice(0, LONG_CAPTION_KEPT)).otherwise(pl.col("caption")).alias("caption"),
    )


def failure_counts(manifest: pl.DataFrame, *, top: int = 10) -> list[tuple[str, int, str]]:
    """The commonest failure reasons of a manifest: (reason, count, an example sample: its file
    where the source names files, else its key), most frequent first."""
    failed = manifest.filter(pl.col("status") == "failed")
    if failed.height == 0:
        return []
    example = "file" if "file" in failed.columns else "key"
    counts = failed.group_by(pl.col("error").fill_null("unknown").alias("reason"), maintain_order=True).agg(
        pl.len().alias("n"), pl.col(example).cast(pl.String).drop_nulls().first().alias("example"))
    counts = counts.sort(["n", "reason"], descending=[True, False]).head(top)
    return [(r, n, e or "") for r, n, e in counts.iter_rows()]


def failure_text(manifest: pl.DataFrame, *, top: int = 3) -> str:
    """The ``top`` commonest failure reasons on one line: ``file not found x401 (e.g. a.jpg), ...``."""
    counts = failure_counts(manifest, top=top + 1)
    text = ", ".join(f"{reason} x{n:,}" + (f" (e.g. {example})" if example else "") for reason, n, example in counts[:top])
    return text + (", and other reasons" if len(counts) > top else "")


def _read_table(path: Path, fmt: str, *, param: str) -> pl.DataFrame:
    if not path.is_file():
        raise DataError(f"file not found: {path}", param=param)
    if fmt == "auto":
        suffix = path.suffix.lower()
        fmt = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}.get(suffix)
        if fmt is None:
            raise DataError(f"cannot tell the format of {path.name}: use .parquet, .csv, .tsv or .jsonl", param=param)
    try:
        if fmt == "parquet":
            return pl.read_parquet(path)
        if fmt == "jsonl":
            return pl.read_ndjson(path)
        # strings throughout: a caption column of digits must stay text
        return pl.read_csv(path, separator="\t" if fmt == "tsv" else ",", infer_schema=False, quote_char='"')
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(f"cannot read {path}: {str(exc).splitlines()[0][:200]}", param=param) from None


def _require_columns(table: pl.DataFrame, names: dict[str, str], path: Path) -> None:
    for param, col in names.items():
        if col not in table.columns:
            raise DataError(f"{path.name} has no column {col!r} (columns: {', '.join(table.columns)})", param=param)


# --- ground truth from outside: an is_poison (and attack) column or json field, or a table ----

TRUTH_COLUMNS = ("is_poison", "attack")
_TRUTH_TEXT = {"true": True, "1": True, "false": False, "0": False}


def as_truth(value: Any) -> bool | None:
    """One ground-truth value: a boolean, 0/1 or true/false text (any case); null or blank is
    unknown (None). Raises ValueError for anything else."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, float) and value != value:  # NaN: pandas' missing value
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if not text:
            return None
        if text in _TRUTH_TEXT:
            return _TRUTH_TEXT[text]
    raise ValueError(f"{value!r} is not a boolean")


def _truth_series(col: pl.Series, *, where: str, param: str) -> pl.Series:
    """``col`` as Boolean (null = unknown); a value that is not a boolean is a DataError."""
    if col.dtype == pl.Boolean:
        return col
    if col.dtype == pl.Null:
        return col.cast(pl.Boolean)
    if col.dtype.is_numeric():
        f = col.cast(pl.Float64).fill_nan(None)
        values, bad = f.cast(pl.Boolean), f.is_not_null() & ~f.is_in([0.0, 1.0])
    elif col.dtype == pl.String:
        text = col.str.strip_chars().str.to_lowercase()
        values = text.replace_strict(_TRUTH_TEXT, default=None, return_dtype=pl.Boolean)
        bad = text.is_not_null() & (text != "") & values.is_null()
    else:
        values, bad = col.cast(pl.Boolean, strict=False), pl.Series([True] * len(col))
    if bad.any():
        i = int(bad.arg_true()[0])
        raise DataError(f"{where}: column {col.name!r} holds {col[i]!r} (row {i}), not a boolean: "
                        "use true/false or 1/0 (blank: unknown)", param=param)
    return values.alias(col.name)


def truth_columns(table: pl.DataFrame, *, where: str, param: str) -> list[pl.Series]:
    """A source table's ground truth, checked: ``is_poison`` as Boolean and ``attack`` as text,
    each where the table has it."""
    out = []
    if "is_poison" in table.columns:
        out.append(_truth_series(table["is_poison"], where=where, param=param))
    if "attack" in table.columns:
        out.append(table["attack"].cast(pl.String))
    return out


def scored_truth(raw_dir: str | Path, *, ids: np.ndarray, truth: str | Path | None = None) -> pl.Series:
    """``is_poison`` of each scored sample, ids (N,) in the scores' order (null where unknown):
    the manifest's, or with ``truth`` a ground-truth table's (``read_truth``). Each manifest
    column read once (``clipscrub.io.read_frame``); joined by search (``take_by_id``), not a
    hash join of N ids, and not at all where the manifest lists the scored ids in their order."""
    path = Path(raw_dir) / "manifest.parquet"
    if truth:
        manifest = read_truth(pl.read_parquet(path, columns=["id", "key", "is_poison"]), truth)
    else:
        manifest = read_frame(path, ["id", "is_poison"])
    if manifest.height == len(ids) and np.array_equal(manifest["id"].to_numpy(), ids):
        return manifest["is_poison"]
    return take_by_id(manifest["is_poison"], ids=manifest["id"].to_numpy(), wanted=ids)


def read_truth(manifest: pl.DataFrame, path: str | Path, *, param: str = "evaluate.truth") -> pl.DataFrame:
    """``manifest`` with its ``is_poison`` (and ``attack``) replaced by a ground-truth table's.

    The table (parquet, csv, tsv or jsonl) has ``is_poison`` and ``id`` (or, without ``id``,
    ``key``); samples it does not list are clean, and ``attack`` is null unless the table has
    it. An id or key that is not a sample of the dataset is an error naming it.
    """
    path = Path(path).expanduser()
    table = _read_table(path, "auto", param=param)
    by = "id" if "id" in table.columns else "key" if "key" in table.columns else None
    if by is None or "is_poison" not in table.columns:
        raise DataError(f"{path.name} needs an 'is_poison' column and an 'id' or 'key' column "
                        f"(columns: {', '.join(table.columns)})", param=param)
    if by == "id":
        ids = table["id"].cast(pl.Int64, strict=False)
        if ids.null_count() > table["id"].null_count():
            i = int((ids.is_null() & table["id"].is_not_null()).arg_true()[0])
            raise DataError(f"{path.name}: column 'id' holds {table['id'][i]!r} (row {i}), not an integer id", param=param)
        table = table.with_columns(ids)
    else:
        table = table.with_columns(pl.col("key").cast(pl.String))
        if not manifest["key"].is_unique().all():
            raise DataError(f"the manifest's keys are not unique: give {path.name} an 'id' column", param=param)
    table = table.select(by, *truth_columns(table, where=path.name, param=param))
    blank = table.filter(pl.col(by).is_null() | pl.col("is_poison").is_null())
    if blank.height:
        raise DataError(f"{path.name}: {blank.height} rows have no {by} or no is_poison, e.g. {blank.head(5)[by].to_list()}",
                        param=param)
    repeated = table.filter(pl.col(by).is_duplicated())[by].unique(maintain_order=True)
    if repeated.len():
        raise DataError(f"{path.name}: {repeated.len()} {by}s are listed more than once, e.g. {repeated.head(5).to_list()}",
                        param=param)
    unknown = table.filter(~pl.col(by).is_in(manifest[by].implode()))[by]
    if unknown.len():
        raise DataError(f"{unknown.len()} {by}s in {path.name} are not samples of this dataset, e.g. {unknown.head(5).to_list()}",
                        param=param)
    if "attack" not in table.columns:
        table = table.with_columns(pl.lit(None, dtype=pl.String).alias("attack"))
    joined = manifest.drop(TRUTH_COLUMNS, strict=False).join(table, on=by, how="left")
    return joined.with_columns(pl.col("is_poison").fill_null(False)).select(manifest.columns)


def fetch_urls(*, settings: UrlsSettings, shard_size: int, out_dir: Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Fetch a url list with img2dataset into ``out_dir/shards``; img2dataset's status parquet and
    stats go to ``out_dir/img2dataset``. Manifest ids are the input's row numbers."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import
    from img2dataset import download as img2dataset_download

    src = Path(settings.path).expanduser()
    table = _read_table(src, settings.input_format, param="download.urls.path")
    _require_columns(table, {"download.urls.url_col": settings.url_col, "download.urls.caption_col": settings.caption_col}, src)
    if table.height == 0:
        raise DataError(f"the url list {src} has no rows", param="download.urls.path")
    truth = truth_columns(table, where=src.name, param="download.urls.path")  # known poison, if the list says
    table = table.with_row_index(ROW_COL).with_columns(pl.col(ROW_COL).cast(pl.Int64))
    url = pl.col(settings.url_col).cast(pl.String)
    has_url = url.is_not_null() & (url.str.strip_chars() != "")
    todo = table.filter(has_url).select(ROW_COL, url.alias("url"), pl.col(settings.caption_col).cast(pl.String).alias("caption"))
    work = out_dir / "img2dataset"
    work.mkdir(parents=True)
    shard_dir = out_dir / "shards"
    if todo.height:
        todo.write_parquet(work / "input.parquet")
        img2dataset_download(
            url_list=str(work / "input.parquet"),
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=[ROW_COL],
            output_folder=str(shard_dir),
            output_format="webdataset",
            processes_count=settings.processes,
            thread_count=settings.threads,
            timeout=settings.timeout,
            retries=settings.retries,
            number_sample_per_shard=shard_size,
            image_size=settings.image_size,
            resize_mode=settings.resize_mode,
            resize_only_if_bigger=settings.resize_only_if_bigger,
            encode_format=settings.encode_format,
            encode_quality=settings.encode_quality,
            min_image_size=settings.min_image_size,
            # embed's resize grows with the aspect ratio (clipscrub.shards.MAX_ASPECT_RATIO), and so
            # does img2dataset's own when resize_only_if_bigger is off
            max_aspect_ratio=min(settings.max_aspect_ratio or float("inf"), MAX_ASPECT_RATIO),
            max_image_area=settings.max_image_area or float("inf"),
            user_agent_token=settings.user_agent_token,
            disallowed_header_directives=list(settings.disallowed_header_directives),
            compute_hash="sha256",  # of the bytes as fetched, as DataComp's verify_hash expects
            enable_wandb=False,
            distributor="multiprocessing",  # the output folder is fresh: incremental mode has nothing to skip
        )
        (work / "input.parquet").unlink()
    else:
        shard_dir.mkdir()
    shutil.rmtree(shard_dir / "_tmp", ignore_errors=True)
    status_files = sorted(shard_dir.glob("*.parquet"))
    status = (
        pl.concat(
            [pl.read_parquet(f).with_columns(pl.lit(f"{f.stem}.tar").alias("shard")) for f in status_files],
            how="diagonal_relaxed",
        )
        if status_files
        else pl.DataFrame(schema={ROW_COL: pl.Int64, "key": pl.String, "status": pl.String, "error_message": pl.String,
                                  "width": pl.Int32, "height": pl.Int32, "sha256": pl.String, "shard": pl.String})
    )
    for f in status_files + sorted(shard_dir.glob("*_stats.json")):
        shutil.move(str(f), work / f.name)
    # img2dataset decodes (OpenCV) and re-encodes every image, whatever resize_mode: a
    # success is a decodable image
    ok = pl.col("status") == "success"
    status = status.select(
        pl.col(ROW_COL).cast(pl.Int64),
        pl.col("key"),
        pl.when(ok).then(pl.col("shard")).alias("shard"),
        pl.when(ok).then(pl.col("sha256")).alias("fetched_sha256"),
        pl.when(ok).then(pl.col("width")).alias("width"),
        pl.when(ok).then(pl.col("height")).alias("height"),
        pl.when(ok).then(pl.lit("ok")).otherwise(pl.lit("failed")).alias("status"),
        pl.when(ok).then(None).otherwise(
            pl.concat_str([pl.col("status"), pl.col("error_message").fill_null("")], separator=": ").str.strip_chars(": ")
            .str.replace_all(ADDRESS_PATTERN, "")  # as decode_image's: the same list, the same manifest
        ).alias("error"),
    )
    lost = status.filter((pl.col("status") == "ok") & pl.col("fetched_sha256").is_null())
    if lost.height:
        raise DataError(f"img2dataset reported {lost.height} successes without a sha256", param="download.urls.path")
    # image_sha256 is of the bytes stored (img2dataset re-encodes what it fetched): what embed
    # embeds and filter copies, checked against it
    stored = _stored_image_hashes(shard_dir, status.filter(pl.col("status") == "ok")["shard"].unique().to_list())
    status = status.join(stored, on=["shard", "key"], how="left")
    lost = status.filter((pl.col("status") == "ok") & pl.col("image_sha256").is_null())
    if lost.height:
        raise DataError(f"{lost.height} samples img2dataset reported as downloaded are not in its shards, e.g. "
                        f"{lost['key'][:3].to_list()}", param="download.urls.path")
    extras = [c for c in table.columns if c not in (ROW_COL, settings.caption_col) and c not in MANIFEST_SCHEMA]
    manifest = (
        table.with_columns(truth)
        .select(pl.col(ROW_COL).alias("id"), pl.col(settings.caption_col).cast(pl.String).alias("caption"), *extras,
                *[t.name for t in truth])
        .join(status.rename({ROW_COL: "id"}), on="id", how="left")
        .with_columns(
            pl.col("status").fill_null("failed"),
            pl.when(pl.col("status").is_null())
            .then(pl.when(has_url.fill_null(False)).then(pl.lit("not processed by img2dataset")).otherwise(pl.lit("missing url")))
            .otherwise(pl.col("error"))
            .alias("error"),
        )
    )
    if settings.url_col != "url" and settings.url_col in manifest.columns:
        manifest = manifest.rename({settings.url_col: "url"})
    # rows img2dataset never saw (no url) still need a unique key
    manifest = manifest.with_columns(pl.col("key").fill_null(pl.format("row{}", pl.col("id"))))
    return finish_manifest(manifest), {"img2dataset_shards": len(status_files)}


def _stored_image_hashes(shard_dir: Path, shards: list[str]) -> pl.DataFrame:
    """shard, key, image_sha256: the sha256 of each sample's image as stored in ``shards``."""
    rows = []
    for shard in sorted(shards):
        for sample in iter_shard(shard_dir / shard):
            ext = image_field(sample)
            if ext is not None:
                rows.append({"shard": shard, "key": sample["__key__"],
                             "image_sha256": hashlib.sha256(sample[ext]).hexdigest()})
    return pl.DataFrame(rows, schema={"shard": pl.String, "key": pl.String, "image_sha256": pl.String}).unique(
        ["shard", "key"], keep="first", maintain_order=True)


def _json_truth(meta: dict[str, Any], key: str) -> dict[str, Any]:
    """A sample json's ``is_poison`` / ``attack`` fields (as ``clipscrub poison`` writes them);
    a bad value goes to ``truth_error`` (raised once every shard is read)."""
    out: dict[str, Any] = {"is_poison": None, "attack": None}
    try:
        out["is_poison"] = as_truth(meta.get("is_poison"))
    except ValueError:
        out["truth_error"] = f"sample {key!r}: json field 'is_poison' is {meta['is_poison']!r}, not a boolean (true/false)"
    attack = meta.get("attack")
    if attack is not None and not isinstance(attack, str):
        out["truth_error"] = f"sample {key!r}: json field 'attack' is {attack!r}, not a string"
    else:
        out["attack"] = attack
    return out


def _check_sample(sample: dict[str, Any]) -> dict[str, Any]:
    if "__error__" in sample:  # a member written twice, or one too large to read
        return {"key": sample["__key__"], "caption": None, "status": "failed", "error": sample["__error__"]}
    url = None
    truth: dict[str, Any] = {"is_poison": None, "attack": None}
    if sample.get("json") is not None:
        try:
            meta = json.loads(sample["json"])
            url = meta.get("url") if isinstance(meta, dict) else None
            truth = _json_truth(meta, sample["__key__"]) if isinstance(meta, dict) else truth
        except ValueError:
            pass
    row: dict[str, Any] = {"key": sample["__key__"], "caption": caption_of(sample), "status": "ok", "error": None,
                           "url": url if isinstance(url, str) else None, **truth}
    if row["caption"] is None and (problem := caption_problem(sample)):
        return {**row, "status": "failed", "error": problem}
    ext = image_field(sample)
    if ext is None:
        return {**row, "status": "failed", "error": "no image in the sample (jpg, jpeg, png or webp)"}
    data = sample[ext]
    try:
        img, _ = decode_image(data)
    except ValueError as exc:
        return {**row, "status": "failed", "error": str(exc)}
    return {**row, "image_sha256": hashlib.sha256(data).hexdigest(), "width": img.width, "height": img.height}


def _scan_shard(path: Path, *, max_member_bytes: int) -> list[dict[str, Any]]:
    rows = []
    try:
        for sample in iter_shard(path, max_member_bytes=max_member_bytes):
            rows.append({**_check_sample(sample), "shard": str(path)})
    except Exception as exc:  # a truncated or non-tar file: its readable samples stay
        rows.append({"key": f"{path.name}:unreadable", "shard": None, "caption": None, "status": "failed",
                     "error": f"unreadable shard {path.name}: {type(exc).__name__}: {stable_message(str(exc))[:120]}"})
    return rows


def read_shards(*, settings: ShardsSettings, max_file_bytes: int) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Index existing shards in place: decode every image once so only decodable ones are ok; a
    member over ``max_file_bytes`` fails its sample unread."""
    paths = expand_shards(settings.path, param="download.shards.path")
    scan = functools.partial(_scan_shard, max_member_bytes=max_file_bytes)
    with ThreadPoolExecutor(max_workers=settings.workers) as pool:  # PIL decodes without the GIL
        per_shard = list(track(pool.map(scan, paths), desc="download", total=len(paths), unit="shards"))
    rows = [r for shard_rows in per_shard for r in shard_rows]
    if not rows:
        raise DataError(f"the shards {settings.path} hold no samples", param="download.shards.path")
    bad = [(r["shard"], r.pop("truth_error")) for r in rows if "truth_error" in r]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"{Path(bad[0][0]).name}: {bad[0][1]}{more}", param="download.shards.path")
    frame = pl.DataFrame(rows, infer_schema_length=None).with_row_index("id").with_columns(pl.col("id").cast(pl.Int64))
    # a key seen before (in this or an earlier shard) is a second sample under the same name
    dup = frame["key"].is_duplicated() & ~frame["key"].is_first_distinct()
    frame = frame.with_columns(
        pl.when(dup).then(pl.lit("failed")).otherwise(pl.col("status")).alias("status"),
        pl.when(dup).then(pl.lit("duplicate key")).otherwise(pl.col("error")).alias("error"),
        pl.when(dup).then(pl.format("{}#{}", pl.col("key"), pl.col("id"))).otherwise(pl.col("key")).alias("key"),
    )
    if "url" in frame.columns and frame["url"].null_count() == frame.height:
        frame = frame.drop("url")
    return finish_manifest(frame), {"source_shards": len(paths)}


def read_folder(*, settings: FolderSettings, shard_size: int, out_dir: Path, max_file_bytes: int,
                max_caption_bytes: int) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Write the captioned images of a folder as shards; ids are the captions file's rows (the
    manifest's ``file`` column names each row's file). A file over ``max_file_bytes`` fails its
    row unread; a caption over ``max_caption_bytes`` is not written."""
    folder = Path(settings.path).expanduser()
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}", param="download.folder.path")
    cap_path = Path(settings.captions).expanduser()
    table = _read_table(cap_path, "auto", param="download.folder.captions")
    _require_columns(table, {"download.folder.file_col": settings.file_col, "download.folder.caption_col": settings.caption_col}, cap_path)
    if table.height == 0:
        raise DataError(f"the captions file {cap_path} has no rows", param="download.folder.captions")
    truth = truth_columns(table, where=cap_path.name, param="download.folder.captions")  # known poison, if given
    root = folder.resolve()
    rows = []
    n_written = 0
    files = table[settings.file_col].cast(pl.String).to_list()
    captions = table[settings.caption_col].cast(pl.String).to_list()
    with shard_writer(out_dir / "shards", shard_size) as sink:
        for i, (name, caption) in enumerate(track(zip(files, captions), desc="download", total=len(files),
                                                  unit="images")):
            key = f"{i:09d}"
            row: dict[str, Any] = {"id": i, "key": key, "caption": caption, "status": "failed"}
            path = folder / name if name else None
            # the file is in the row's `file` column: one reason for many rows groups into one count
            if path is not None and not _inside(path, root):  # "../x.jpg", "/etc/x.jpg", a link out
                rows.append({**row, "error": "path outside the folder"})
                continue
            if path is None or not path.is_file():
                rows.append({**row, "error": "file not found"})
                continue
            if (size := path.stat().st_size) > max_file_bytes:
                rows.append({**row, "error": f"file is {fmt_bytes(size)}, over the {fmt_bytes(max_file_bytes)} limit "
                                             "(download.max_file_bytes)"})
                continue
            if caption is not None and (n := len(caption.encode())) > max_caption_bytes:
                rows.append({**row, "caption": caption[:LONG_CAPTION_KEPT], "error": LONG_CAPTION.format(n, max_caption_bytes)})
                continue
            data = path.read_bytes()
            try:
                img, ext = decode_image(data)
            except ValueError as exc:
                rows.append({**row, "error": str(exc)})
                continue
            given = hashlib.sha256(data).hexdigest()  # of the file as given
            if ext == "other":  # GIF, BMP, TIFF...: stored as PNG so every reader can open it
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                data, ext = buf.getvalue(), "png"
            if caption is None or not caption.strip():
                rows.append({**row, "error": "empty caption"})
                continue
            meta = json.dumps({"key": key, "caption": caption, "file": name}, sort_keys=True)
            sink.write({"__key__": key, ext: data, "txt": caption, "json": meta.encode()})
            # image_sha256: of the image as stored (a converted GIF's PNG), what embed embeds and filter copies
            rows.append({**row, "shard": shard_name(n_written, shard_size), "file_sha256": given,
                         "image_sha256": hashlib.sha256(data).hexdigest(),
                         "width": img.width, "height": img.height, "status": "ok", "error": None})
            n_written += 1
    extras = table.drop(settings.caption_col).rename({settings.file_col: "file"}) if settings.file_col != "file" else table.drop(settings.caption_col)
    extras = extras.select([c for c in extras.columns if c not in MANIFEST_SCHEMA]).with_columns(truth)
    extras = extras.with_row_index("id").with_columns(pl.col("id").cast(pl.Int64))
    frame = pl.DataFrame(rows, infer_schema_length=None).join(extras, on="id", how="left")
    listed = {str(Path(f)) for f in files if f}
    uncaptioned = sum(1 for p in folder.rglob("*") if p.is_file() and str(p.relative_to(folder)) not in listed and p != cap_path)
    return finish_manifest(frame), {"uncaptioned_files": uncaptioned}


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, symlinks resolved, lies under ``root`` (itself resolved)."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, ValueError, RuntimeError):  # a NUL in the name, a symlink loop
        return False


def _numbered(paths: list[Path]) -> list[Path]:
    """clip-retrieval's parts (img_emb_0.npy, ..., img_emb_10.npy) in numeric order."""
    def part(p: Path) -> tuple[int, str]:
        m = re.search(r"(\d+)$", p.stem)
        return (int(m.group(1)) if m else -1, p.name)
    return sorted(paths, key=part)


def precomputed_parts(root: Path) -> list[dict[str, Any]]:
    """The aligned (img_emb, text_emb, metadata) files of a clip-retrieval output, with row
    counts and dims read from the .npy headers (nothing loaded)."""
    parts = {}
    for sub, ext in (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet")):
        files = _numbered(list((root / sub).glob(f"*.{ext}"))) if (root / sub).is_dir() else []
        if not files:
            raise DataError(f"no {sub}/*.{ext} under {root} (expected clip-retrieval's layout)", param="download.embeddings.path")
        parts[sub] = files
    counts = {sub: len(files) for sub, files in parts.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"img_emb, text_emb and metadata hold different numbers of parts: {counts}", param="download.embeddings.path")
    out = []
    for img, txt, meta in zip(parts["img_emb"], parts["text_emb"], parts["metadata"]):
        shapes = {}
        for p in (img, txt):
            try:
                arr = np.load(p, mmap_mode="r")
            except (ValueError, OSError) as exc:
                raise DataError(f"cannot read {p}: {exc}", param="download.embeddings.path") from None
            if arr.ndim != 2:
                raise DataError(f"{p} holds an array of shape {arr.shape}, not (N, d)", param="download.embeddings.path")
            shapes[p] = arr.shape
        rows = pl.scan_parquet(meta).select(pl.len()).collect().item()
        if not shapes[img][0] == shapes[txt][0] == rows:
            raise DataError(
                f"{img.name}, {txt.name} and {meta.name} disagree on the row count "
                f"({shapes[img][0]}, {shapes[txt][0]}, {rows})",
                param="download.embeddings.path",
            )
        out.append({"img_emb": str(img), "text_emb": str(txt), "metadata": str(meta), "rows": rows,
                    "image_dim": shapes[img][1], "text_dim": shapes[txt][1]})
    return out


def read_precomputed(*, settings: PrecomputedSettings, out_dir: Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The manifest of a clip-retrieval output (one row per embedding row, all ok) and
    ``out_dir/precomputed.json`` naming the aligned files for the embed stage."""
    root = Path(settings.path).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"embeddings folder not found: {root}", param="download.embeddings.path")
    parts = precomputed_parts(root)
    meta = pl.concat([pl.read_parquet(p["metadata"]) for p in track(parts, desc="download", unit="parts")],
                     how="diagonal_relaxed")
    if settings.caption_col not in meta.columns:
        raise DataError(f"metadata has no column {settings.caption_col!r} (columns: {', '.join(meta.columns)})",
                        param="download.embeddings.caption_col")
    meta = meta.with_row_index("id").with_columns(pl.col("id").cast(pl.Int64))
    caption = pl.col(settings.caption_col).cast(pl.String).alias("caption")
    key = pl.col("key").cast(pl.String) if "key" in meta.columns and meta["key"].is_unique().all() else pl.format("{}", pl.col("id").cast(pl.String).str.zfill(9))
    meta = meta.with_columns(truth_columns(meta, where="metadata", param="download.embeddings.path"))
    keep = [c for c in meta.columns if c not in MANIFEST_SCHEMA and c not in (settings.caption_col, "id")]
    keep += [c for c in TRUTH_COLUMNS if c in meta.columns]
    sizes = [pl.col(c) for c in ("width", "height") if c in meta.columns]
    sha = [pl.col("sha256").cast(pl.String).alias("image_sha256")] if "sha256" in meta.columns else []
    frame = meta.select("id", key.alias("key"), caption, *sizes, *sha, *[c for c in keep if c != "sha256"]).with_columns(
        pl.lit("ok").alias("status")
    )
    (out_dir / PRECOMPUTED_FILE).write_text(json.dumps({"root": str(root), "parts": parts}, indent=2, sort_keys=True) + "\n")
    return finish_manifest(frame), {"parts": len(parts), "dim": parts[0]["image_dim"]}
