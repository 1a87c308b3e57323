"""``clipscrub poison``: apply the paper's attacks (``clipscrub.attacks``) to a copy of your own
data, to red-team the detectors on it. Not a pipeline stage.

Reads a data root's ``raw/`` as the download stage wrote it (``manifest.parquet`` plus shards,
whatever the source: the shards may live under ``raw/shards/`` or, for the ``shards`` source,
where the user keeps them) and writes a new raw directory of the same layout: ``shards/``,
``manifest.parquet`` (ids kept, ``is_poison`` and ``attack`` set, failed rows kept as failed,
without a shard) and ``lineage.json``. Each attack poisons round(rate x N) of the N ok samples
not already marked poisoned (``plan_poison`` over their captions; disjoint across attacks);
every other sample is copied byte for byte. Every sample's ``json`` member carries
``is_poison`` and ``attack``, so the ground truth survives ``download.source: shards`` pointed
at ``<out>/shards`` (that source builds a fresh manifest from the shards).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import polars as pl
from PIL import Image

from clipscrub.attacks import attack_name, attack_seed, make_trigger, plan_poison, poison_sample
from clipscrub.errors import DataError, ParamError
from clipscrub.io import atomic_dir, read_manifest, write_lineage
from clipscrub.shards import (IMAGE_EXTS, decode_image, image_field, iter_shard, safe_key, shard_name, shard_path,
                              shard_writer)

if TYPE_CHECKING:
    from clipscrub.params import AttackSettings

JPEG_QUALITY = 95


def encode_like(image: Image.Image, ext: str) -> tuple[bytes, str]:
    """Encode a poisoned image in its original's format family: JPEG (quality 95) for jpg and
    jpeg, lossless PNG or WebP otherwise. Returns (bytes, extension)."""
    buf = io.BytesIO()
    if ext == "png":
        image.save(buf, format="PNG")
    elif ext == "webp":
        image.save(buf, format="WEBP", lossless=True)
    else:
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
        ext = "jpg"
    return buf.getvalue(), ext


def _sample_rng(seed: int, row_id: int) -> np.random.Generator:
    """Per-sample draws (patch spot, caption template), independent of the order shards are read."""
    return np.random.default_rng([seed, 0x706F6973, row_id])


def _read_images(raw_dir: Path, rows: pl.DataFrame) -> dict[int, tuple[Image.Image, str]]:
    """id -> (decoded image, extension) of a few manifest rows (a targeted attack's sources)."""
    want = {(r["shard"], r["key"]): r["id"] for r in rows.iter_rows(named=True)}
    out: dict[int, tuple[Image.Image, str]] = {}
    for shard in rows["shard"].unique(maintain_order=True).to_list():
        for sample in iter_shard(shard_path(raw_dir, shard), keys={key for s, key in want if s == shard}):
            row_id = want.get((shard, sample["__key__"]))
            if row_id is not None and row_id not in out:
                ext = image_field(sample)
                out[row_id] = (decode_image(sample[ext])[0], ext)
    return out


def poison_dataset(
    *,
    raw_dir: str | Path,
    out_dir: str | Path,
    attacks: Sequence["AttackSettings"],
    seed: int,
    shard_size: int = 1000,
) -> dict[str, Any]:
    """Write ``out_dir`` (shards, manifest.parquet, lineage.json): ``raw_dir``'s samples with
    ``attacks`` applied; return counts (``poisoned`` per attack name ``kind:target``)."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not attacks:
        raise ParamError("no attacks to apply: list at least one (see download.synthetic.attacks for the form)",
                         param="poison.attacks")
    if out_dir.resolve() == raw_dir.resolve():
        raise ParamError(f"{out_dir} is the raw directory being poisoned: write the copy elsewhere", param="--out")
    manifest = read_manifest(raw_dir)
    manifest = manifest.with_columns(*[pl.lit(None, dtype=dtype).alias(c) for c, dtype in
                                       (("is_poison", pl.Boolean), ("attack", pl.String)) if c not in manifest.columns])
    ok = manifest.filter(pl.col("status") == "ok")
    if ok.height == 0 or ok["shard"].null_count() == ok.height:
        raise DataError(f"{raw_dir} holds no images to poison (precomputed embeddings, or no ok samples)", param="--root")
    # samples already known to be poisoned keep their attack and are not attacked again
    candidates = ok.filter(~pl.col("is_poison").fill_null(False))
    cand_ids = candidates["id"].to_list()
    try:
        plan = plan_poison(captions=candidates["caption"].to_list(), attacks=attacks, seed=seed)
    except ValueError as exc:
        raise DataError(str(exc), param="poison.attacks") from None
    assigned = {cand_ids[a.row]: (a.attack, cand_ids[a.source]) for a in plan}
    triggers = [make_trigger(a, seed=attack_seed(seed, j)) for j, a in enumerate(attacks)]
    copied = {src for _, src in assigned.values() if src not in assigned}
    sources = _read_images(raw_dir, ok.filter(pl.col("id").is_in(list(copied))))

    row_of = {(r["shard"], r["key"]): r for r in ok.iter_rows(named=True)}
    updates: dict[int, dict[str, Any]] = {}
    counts = {attack_name(a): 0 for a in attacks}
    with atomic_dir(out_dir, param="--out") as tmp:
        with shard_writer(tmp / "shards", shard_size) as sink:
            n = 0
            keys_of = {shard: set(keys) for shard, keys in ok.group_by("shard").agg("key").iter_rows()}
            for shard in ok["shard"].unique(maintain_order=True).to_list():
                for sample in iter_shard(shard_path(raw_dir, shard), keys=keys_of[shard]):
                    row = row_of.get((shard, sample["__key__"]))
                    if row is None or row["id"] in updates:  # a failed sample, or a later one under the same key
                        continue
                    ext = image_field(sample)
                    data, caption = sample[ext], row["caption"]
                    is_poison, attack = bool(row["is_poison"]), row["attack"]
                    update: dict[str, Any] = {}
                    if row["id"] in assigned:
                        j, src = assigned[row["id"]]
                        image, src_ext = sources[src] if src != row["id"] else (decode_image(data)[0], ext)
                        image, caption = poison_sample(image, caption, attack=attacks[j], trigger=triggers[j],
                                                       rng=_sample_rng(seed, row["id"]))
                        data, ext = encode_like(image, src_ext)
                        is_poison, attack = True, attack_name(attacks[j])
                        counts[attack] += 1
                        update = {"caption": caption, "image_sha256": hashlib.sha256(data).hexdigest(),
                                  "width": image.width, "height": image.height}
                    try:
                        meta = json.loads(sample["json"]) if sample.get("json") is not None else {}
                    except ValueError:
                        meta = {}
                    # a key with "../" or "/" would name a member outside the folder a shard unpacks into
                    key = safe_key(sample["__key__"])
                    meta = dict(meta if isinstance(meta, dict) else {}, key=key, caption=caption,
                                is_poison=is_poison, attack=attack)
                    if key != sample["__key__"]:
                        meta["source_key"] = sample["__key__"]
                    out = {k: v for k, v in sample.items() if not k.startswith("__") and k not in (*IMAGE_EXTS, "txt", "json")}
                    out.update({"__key__": key, ext: data, "txt": caption.encode("utf-8"),
                                "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")})
                    sink.write(out)
                    updates[row["id"]] = {**update, "key": key, "shard": shard_name(n, shard_size), "is_poison": is_poison,
                                          "attack": attack}
                    n += 1
        if n != ok.height:
            raise DataError(f"{ok.height - n} ok samples of the manifest are missing from the shards", param="--root")
        changed = pl.DataFrame(
            [{"id": i, **u} for i, u in updates.items()],
            schema={"id": pl.Int64, "key": pl.String, "caption": pl.String, "image_sha256": pl.String, "width": pl.Int32,
                    "height": pl.Int32, "shard": pl.String, "is_poison": pl.Boolean, "attack": pl.String},
        )
        # failed rows stay failed, without a shard (their bytes were never usable); nothing else changes
        poisoned = (
            manifest.join(changed, on="id", how="left", suffix="_new")
            .with_columns(
                *[pl.coalesce(f"{c}_new", c).alias(c) for c in ("key", "caption", "image_sha256", "width", "height")],
                pl.col("shard_new").alias("shard"),
                pl.col("is_poison_new").fill_null(pl.col("is_poison")).fill_null(False).alias("is_poison"),
                pl.when(pl.col("id").is_in(changed["id"].implode())).then(pl.col("attack_new"))
                .otherwise(pl.col("attack")).alias("attack"),
            )
            .select(manifest.columns)
        )
        poisoned.write_parquet(tmp / "manifest.parquet", statistics=False)
        summary = {"samples": manifest.height, "ok": ok.height, "failed": manifest.height - ok.height,
                   "poisoned": int(poisoned["is_poison"].sum()), "attacks": counts,
                   "shards": (n + shard_size - 1) // shard_size}
        write_lineage(
            tmp, stage="poison", module=__name__,
            params={"base": {"seed": seed}, "poison": {"attacks": [a.model_dump(mode="json") for a in attacks]},
                    "download": {"shard_size": shard_size}},
            inputs={"manifest": raw_dir / "manifest.parquet"}, upstream=[raw_dir], summary=summary,
        )
    return summary
