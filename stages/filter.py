"""Stage 7, filter: the cleaned dataset version.

Removed: the samples the detector flagged or a person's ``filter.remove_ids`` names, less those
``filter.keep_ids`` names (the review, applied after the flags). Writes
``<out>/manifest.parquet`` (kept samples, the input manifest's schema, keys as written),
``<out>/removed.parquet`` (id, key, caption, every ``<detector>_score``, reason: the flag's, or
``review`` for a sample only the remove list names), ``<out>/overruled.parquet`` (the same
columns, for flagged samples the keep list kept; reason: the flag's) and ``<out>/lineage.json``:
the input manifest's hash, the model and its checkpoint hash, every stage's params and code
version, counts, and the review lists' hashes. ``filter.output``: ``reshard`` also writes
``<out>/shards/*.tar`` (kept samples, re-sharded as webdataset, keys unchanged but for those
unsafe as tar member names, see ``_reshard``); ``ids`` writes no shards but ``kept_ids.npy``
(the kept ids, int64, sorted) and ``kept.parquet`` (id, key, shard: where each kept sample is).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Container

import numpy as np
import polars as pl

from clipscrub.errors import DataError, ParamError
from clipscrub.flagging import REVIEW_REASON
from clipscrub.io import (ascending, atomic_dir, atomic_file, code_version, concat_parquet, read_column, read_frame,
                          read_lineage, require_file, same_ids, scan_manifest, scratch_work_dir, sha256_file, sha256_path,
                          write_json, write_table)
from clipscrub.params import FilterSettings, Params, params_hash
from clipscrub.pieces import PLAN_FILE, fresh_work_dir, read_plan, require_chunk
from clipscrub.review import read_review_list
from clipscrub.shards import caption_of, image_field, iter_shard, safe_key, shard_name, shard_path, shard_writer
from clipscrub.validation import docs_dir_for, filter_tables, validate


def _iter_raw(raw_dir: Path, shards: list[str], keys: Container[str]):
    for shard in shards:
        yield from iter_shard(shard_path(raw_dir, shard), keys=keys)


def _with_source_key(meta: bytes | None, key: str) -> bytes | None:
    """A sample's json with its original key added as ``source_key`` (a new json if it had none;
    json that is not an object stays as it is: the raw manifest still has the key, by id)."""
    try:
        fields = json.loads(meta) if meta is not None else {}
    except ValueError:
        return meta
    if not isinstance(fields, dict):
        return meta
    return json.dumps({**fields, "source_key": key}, sort_keys=True).encode()


def _reshard(raw_dir: Path, shards: list[str], kept: pl.DataFrame, shard_dir: Path, shard_size: int) -> dict[str, tuple[str, str]]:
    """Copy the kept samples, byte for byte, into new shards; return key -> (key as written, new
    shard name). A key that would name a tar member outside the folder it unpacks into (``../x``,
    ``/abs/x``, ``a/b``: existing shards may hold any) is written as ``safe_key(key)``, its json
    recording the original as ``source_key``."""
    recorded = {row["key"]: row for row in kept.select("key", "shard", "caption", "image_sha256").iter_rows(named=True)}
    written: dict[str, tuple[str, str]] = {}
    with shard_writer(shard_dir, shard_size) as sink:
        n = 0
        for sample in _iter_raw(raw_dir, shards, recorded):
            key = sample["__key__"]
            if key not in recorded or key in written:
                continue
            check_recorded(sample, recorded[key])
            out = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
            name = safe_key(key)
            if name != key:
                out["__key__"] = name
                meta = _with_source_key(out.get("json"), key)
                if meta is not None:
                    out["json"] = meta
            sink.write(out)
            written[key] = (name, shard_name(n, shard_size))
            n += 1
    if n != len(recorded):
        raise DataError(f"{len(recorded) - n} kept samples are missing from the raw shards", param="--raw")
    return written


def check_recorded(sample: dict[str, Any], row: dict[str, Any]) -> None:
    """A shard sample is the one download recorded (``row``: the manifest's key, shard, caption,
    image_sha256): its image bytes have the recorded sha256 and its caption is the recorded one
    (the caption embed embedded). Raises DataError naming the sample, its shard and what to rerun."""
    ext = image_field(sample)
    got = hashlib.sha256(sample[ext]).hexdigest() if ext else None
    if row.get("image_sha256") is not None and got != row["image_sha256"]:
        what = ("has no image" if got is None else
                f"has an image of sha256 {got[:12]}..., not the {row['image_sha256'][:12]}... download recorded")
    elif (caption := caption_of(sample)) is not None and caption != row["caption"]:
        what = f"is captioned {caption[:60]!r}, not {row['caption'][:60]!r} as download recorded"
    else:
        return
    raise DataError(f"sample {row['key']!r} in {row['shard']} {what}: the shard changed after download; rerun the "
                    "pipeline from download (dvc repro, or clipscrub run)", param="--raw")


# removed.parquet's reason for a sample removed by the remove list alone (not flagged)


def _review(settings: FilterSettings, manifest: pl.LazyFrame) -> tuple[np.ndarray, np.ndarray]:
    """The ids the keep and remove lists name (by id, key, file or url: ``clipscrub.review``),
    checked: each entry one scored sample, no sample in both."""
    if settings.keep_ids or settings.remove_ids:  # the identifiers only, not the captions
        columns = manifest.collect_schema().names()
        manifest = manifest.select(c for c in ("id", "key", "file", "url", "status") if c in columns).collect()
    keep, remove = (read_review_list(path, manifest=manifest, param=f"filter.{name}") if path
                    else np.array([], dtype=np.int64)
                    for name, path in (("keep_ids", settings.keep_ids), ("remove_ids", settings.remove_ids)))
    both = np.intersect1d(keep, remove)
    if len(both):
        raise ParamError(f"{len(both)} ids are in both filter.keep_ids and filter.remove_ids, e.g. "
                         f"{both[:5].tolist()}: a sample is either kept or removed", param="filter.keep_ids")
    return keep, remove


def _check_upstream_params(stages: dict[str, Any], params: Params) -> None:
    """The artifacts must come from the params being recorded, or the lineage would lie."""
    for stage, record in stages.items():
        for section, recorded in record.get("params", {}).items():
            if section in type(params).model_fields and recorded != params.section_in_use(section):
                raise DataError(
                    f"the {stage} stage's output was made with other {section!r} params than the ones "
                    "given: rerun the pipeline from that stage",
                    param=section,
                )


def filter_dataset(
    *,
    raw_dir: str | Path,
    scores_dir: str | Path,
    flags_dir: str | Path,
    out_dir: str | Path,
    settings: FilterSettings,
    params: Params,
) -> dict[str, Any]:
    """Write the kept samples (new shards, or their ids) and record what was removed and why.

    The manifest is streamed, not held: what is read whole is ids and flags, a few bytes a
    sample (the removed and overruled rows are few); the kept manifest is written as it is read.
    The pieces a cluster runs apart (``prepare_filter``, ``filter_piece`` per range of manifest
    rows, ``reduce_filter``), in turn."""
    with scratch_work_dir(out_dir) as work:
        common = dict(raw_dir=raw_dir, scores_dir=scores_dir, flags_dir=flags_dir, work_dir=work, settings=settings,
                      params=params)
        for start, stop in prepare_filter(**common)["pieces"]:
            filter_piece(**common, start=start, stop=stop)
        return reduce_filter(**common, out_dir=out_dir)


def _filter_params(settings: FilterSettings, params: Params) -> dict[str, Any]:
    return {"filter": settings.model_dump(mode="json"), "params_hash": params_hash(params.model_dump(mode="json"))}


def prepare_filter(*, raw_dir: str | Path, scores_dir: str | Path, flags_dir: str | Path, work_dir: str | Path,
                   settings: FilterSettings, params: Params) -> dict[str, Any]:
    """Check the flags against the manifest, apply the review lists, and write into ``work_dir``
    (emptied first) what every piece shares: ``gone.parquet`` (id, reason: the samples the version
    removes) and ``overruled.parquet`` (id, reason: flagged, kept by the keep list), both a few
    rows; and the plan (``plan.json``): ``pieces`` [[start, stop], ...], ranges of the manifest's
    rows of ``filter.piece_size`` each (one, where the kept samples are re-sharded: their new shards
    are numbered across the whole version, or where the manifest's ids do not ascend: the kept
    manifest is written in id order), and the counts."""
    raw_dir, flags_dir = Path(raw_dir), Path(flags_dir)
    work = fresh_work_dir(work_dir, param="filter")
    manifest = scan_manifest(raw_dir)
    flags_path = require_file(flags_dir / "flags.parquet", param="--flags", what="flags")
    flags = read_frame(flags_path, ["id", "is_flagged"])  # each column once in memory
    require_file(Path(scores_dir) / "scores.parquet", param="--scores", what="scores")
    ok_ids = scored_ids(raw_dir)
    if not same_ids(flags["id"], pl.Series("id", ok_ids)):
        raise DataError("flags and manifest disagree on the sample ids: rerun score and threshold", param="--flags")
    keep, remove = _review(settings, manifest)
    verdicts = flags.select(
        "id", "is_flagged",
        pl.col("id").is_in(pl.Series(keep.tolist(), dtype=flags.schema["id"]).implode()).alias("in_keep"),
        pl.col("id").is_in(pl.Series(remove.tolist(), dtype=flags.schema["id"]).implode()).alias("in_remove"),
    )
    del flags
    # the flagged samples' reasons: a few rows (a string column of N would take 16 bytes a row)
    reasons = pl.scan_parquet(flags_path).filter(pl.col("is_flagged")).select("id", "reason").collect()
    # a person's verdict wins over the detector's: keep overrules a flag, remove adds to them
    verdicts.filter((pl.col("is_flagged") | pl.col("in_remove")) & ~pl.col("in_keep")).join(
        reasons, on="id", how="left", maintain_order="left").select(
        "id", pl.when(pl.col("is_flagged")).then(pl.col("reason")).otherwise(pl.lit(REVIEW_REASON)).alias("reason")
    ).write_parquet(work / "gone.parquet")
    verdicts.filter(pl.col("is_flagged") & pl.col("in_keep")).join(
        reasons, on="id", how="left", maintain_order="left").select("id", "reason").write_parquet(work / "overruled.parquet")
    rows = manifest.select(pl.len()).collect().item()
    reshard, ordered = _reshards(settings, manifest), ascending(ok_ids)
    size = max(rows, 1) if reshard or not ordered else settings.piece_size
    plan = {
        "params": _filter_params(settings, params), "rows": rows, "reshard": reshard, "sorted": ordered,
        "pieces": [[a, min(a + size, rows)] for a in range(0, rows, size)] or [[0, 0]],
        "counts": {"input": rows, "failed": rows - len(ok_ids), "scored": len(ok_ids),
                   "flagged": int(verdicts["is_flagged"].sum()),
                   "removed_by_review": int((verdicts["in_remove"] & ~verdicts["is_flagged"]).sum()),
                   "review_ids": {"keep_ids": len(keep), "remove_ids": len(remove)}},
    }
    write_json(work / PLAN_FILE, plan)
    return plan


def scored_ids(raw_dir: Path) -> np.ndarray:
    """The ids of the manifest's ok rows (S,), the samples embed and score kept: the id column
    read once, and a copy of it only where some rows failed."""
    ids = read_column(raw_dir / "manifest.parquet", "id")
    ok = scan_manifest(raw_dir).select(pl.col("status") == "ok").collect().to_series().to_numpy()
    return ids if ok.all() else ids[ok]


def _reshards(settings: FilterSettings, manifest: pl.LazyFrame) -> bool:
    """Whether the kept samples are copied into new shards: ``filter.output: reshard`` and samples
    that have shards (precomputed embeddings have no images to copy)."""
    return settings.output == "reshard" and bool(
        manifest.filter(pl.col("status") == "ok").select(pl.col("shard").is_not_null().any()).collect().item())


def filter_piece(*, raw_dir: str | Path, scores_dir: str | Path, flags_dir: str | Path, work_dir: str | Path,
                 settings: FilterSettings, params: Params, start: int, stop: int) -> dict[str, Any]:
    """The kept samples among the manifest's rows [start, stop) (a piece of the plan): their
    manifest rows, in id order, as ``parts/<start>.parquet``, and with a re-shard (the whole
    manifest, one piece) their new shards in ``shards/``. Depends on no other piece; a rerun
    writes the same bytes."""
    raw_dir, work = Path(raw_dir), Path(work_dir)
    plan = read_plan(work, params=_filter_params(settings, params), stage="filter")
    if [start, stop] not in plan["pieces"]:
        raise ParamError(f"[{start}, {stop}) is not a piece of the plan in {work}", param="filter.piece_size")
    ok = scan_manifest(raw_dir).slice(start, stop - start).filter(pl.col("status") == "ok")
    gone = pl.read_parquet(work / "gone.parquet")["id"]
    kept_rows = ok.filter(~pl.col("id").is_in(gone.implode()))
    (work / "parts").mkdir(exist_ok=True)
    # written under another name, then renamed: the reduce never reads a part a killed worker left half written
    with atomic_file(work / "parts" / f"{start:015d}.parquet", param="--root") as part:
        if not plan["reshard"]:
            # the samples stay where they are (ids), or have no images (precomputed embeddings): the
            # kept manifest (keys and shards as the raw one names them), streamed in id order
            # (download writes ids in order: no sort to hold)
            write_table(kept_rows if plan["sorted"] else kept_rows.sort("id"), part)
            return {"rows": stop - start}
        kept = kept_rows.collect()  # with their keys, shards and hashes, to copy them
        # in the order of their samples' ids, whatever the manifest's row order
        shards = ok.group_by("shard").agg(pl.col("id").min()).sort("id").collect()["shard"].to_list()
        shutil.rmtree(work / "shards", ignore_errors=True)
        written = _reshard(raw_dir, shards, kept, work / "shards", settings.shard_size)
        # last: the part marks the piece's shards done
        write_table(kept.with_columns(
            pl.col("key").replace_strict({k: s for k, (_, s) in written.items()}).alias("shard"),
            pl.col("key").replace_strict({k: w for k, (w, _) in written.items()}).alias("key"),
        ).sort("id"), part)
    return {"rows": stop - start}


def reduce_filter(*, raw_dir: str | Path, scores_dir: str | Path, flags_dir: str | Path, work_dir: str | Path,
                  out_dir: str | Path, settings: FilterSettings, params: Params) -> dict[str, Any]:
    """The version from its pieces' parts: the kept manifest (the parts in row order, streamed),
    the removed and overruled rows described, the shards, lineage and validation, in one atomic
    swap."""
    raw_dir, scores_dir, flags_dir, work = Path(raw_dir), Path(scores_dir), Path(flags_dir), Path(work_dir)
    plan = read_plan(work, params=_filter_params(settings, params), stage="filter")
    parts = [require_chunk(work / "parts" / f"{start:015d}.parquet", start, stop, stage="filter")
             for start, stop in plan["pieces"]]
    manifest = scan_manifest(raw_dir)
    columns = manifest.collect_schema().names()
    scores = pl.scan_parquet(require_file(scores_dir / "scores.parquet", param="--scores", what="scores"))
    # the source's own names beside clipscrub's id: what a person reviews by
    names = ["id", "key", *(c for c in ("file", "url") if c in columns)]

    def described(frame: pl.DataFrame) -> pl.DataFrame:
        # the few rows' manifest and scores rows picked out as they are read, then joined
        wanted = pl.col("id").is_in(frame["id"].implode())
        return (manifest.filter(wanted).select(*names, "caption").collect().join(frame, on="id", how="inner")
                .join(scores.filter(wanted).collect(), on="id", how="left").sort("id"))

    removed = described(pl.read_parquet(work / "gone.parquet"))
    overruled = described(pl.read_parquet(work / "overruled.parquet"))
    counts = {key: plan["counts"][key] for key in ("input", "failed", "scored")}
    counts |= {"kept": counts["scored"] - removed.height, "removed": removed.height}
    lists = {name: path for name, path in (("keep_ids", settings.keep_ids), ("remove_ids", settings.remove_ids)) if path}
    # removed = flagged - kept_by_review + removed_by_review: the review is never the detectors' credit
    counts |= {"flagged": plan["counts"]["flagged"], "removed_by_review": plan["counts"]["removed_by_review"],
               "kept_by_review": overruled.height}
    review = None
    if lists:
        review = {
            **{name: {"path": path, "sha256": sha256_file(Path(path).expanduser()),
                      "ids": plan["counts"]["review_ids"][name]}
               for name in ("keep_ids", "remove_ids") if (path := lists.get(name))},
            "removed_by_review": counts["removed_by_review"],
            "kept_by_review": counts["kept_by_review"],
        }
    stages = read_lineage(raw_dir, scores_dir, flags_dir)
    _check_upstream_params(stages, params)
    model = stages.get("embed", {}).get("model", {})
    required = ["manifest.parquet", "removed.parquet", "overruled.parquet", "lineage.json"]
    with atomic_dir(out_dir) as tmp:
        concat_parquet(parts, tmp / "manifest.parquet")
        if plan["reshard"]:
            shutil.move(work / "shards", tmp / "shards")
        write_table(removed, tmp / "removed.parquet")
        write_table(overruled, tmp / "overruled.parquet")
        if settings.output == "ids":
            # the subset as a sorted id array (as DataComp's resharder takes a subset), and the
            # map back from id to key and shard
            kept = pl.scan_parquet(tmp / "manifest.parquet")
            np.save(tmp / "kept_ids.npy", kept.select(pl.col("id").cast(pl.Int64)).collect()["id"].to_numpy())
            concat_parquet([tmp / "manifest.parquet"], tmp / "kept.parquet", columns=[*names, "shard"])
            required += ["kept_ids.npy", "kept.parquet"]
        inputs = {name: d for name, d in (("flags", flags_dir), ("raw", raw_dir), ("scores", scores_dir))}
        inputs |= {name: Path(path).expanduser() for name, path in lists.items()}
        # the params this version was made with: what each stage recorded (and _check_upstream_params
        # checked against these params), so exactly what its DVC params deps and cache keys cover
        made_with = {name: section for record in stages.values() for name, section in record.get("params", {}).items()}
        made_with = {name: made_with[name] for name in type(params).model_fields if name in made_with}
        made_with["filter"] = settings.model_dump(mode="json")
        stages["filter"] = {"params": {"filter": settings.model_dump(mode="json")}, "code_version": code_version(__name__),
                            "inputs": {name: sha256_path(d) for name, d in sorted(inputs.items())},
                            "summary": counts}
        lineage = {
            "dataset": params.base.name,
            "input_manifest_sha256": sha256_file(raw_dir / "manifest.parquet"),
            "model": model,
            "params": made_with,
            "params_hash": params_hash(made_with),
            "code_version": code_version(),
            "counts": counts,
            **({"review": review} if review else {}),
            "stages": stages,
        }
        write_json(tmp / "lineage.json", lineage)
        ok_ids = pl.Series("id", scored_ids(raw_dir))
        validate("filter", filter_tables(
            kept=read_frame(tmp / "manifest.parquet", ["id"]),
            removed=pl.read_parquet(tmp / "removed.parquet", columns=["id", "reason"]),
            scored_ids=ok_ids, out_dir=tmp, required=required,
        ), docs_dir=docs_dir_for(out_dir, "filter"))
    return counts
