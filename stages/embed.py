"""Stage 3, embed: image and caption embeddings from an open_clip model.

Writes ``<out>/image.npy`` and ``<out>/text.npy`` (N, d) in ``embed.dtype`` (float32, or float16 to halve
storage): the model's raw, unnormalised outputs, as the paper measures L2 on them (``index.normalize``
compares unit vectors instead), and ``<out>/ids.npy`` (N,) int64: row i is the manifest's i-th ``ok``
sample. ``model.json`` records the model name, pretrained tag and checkpoint sha256.

Shard by shard: each finished shard is saved in a hidden ``.embeddings.parts`` directory beside
the output, so a killed run resumes where it stopped; the arrays are assembled, validated (the
embeddings suite of ``clipscrub.validation``) and renamed into place only when every shard is done.
Each part carries the stamp of the run that wrote it (manifest, model, params, code version), checked
when the part is skipped and again when it is merged: a part another run wrote is never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import threading
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import open_clip
import polars as pl
import torch

from clipscrub.arrays import RowReader, create_npy
from clipscrub.detectors import ALIGNED_PERCENTILE, caption_alignment
from clipscrub.errors import ClipscrubError, DataError
from clipscrub.io import (atomic_dir, atomic_file, code_version, describe_model, read_json, read_manifest, scan_manifest,
                          sha256_file, write_json, write_lineage)
from clipscrub.model import LoadedModel, load_model
from clipscrub.params import BaseSettings, EmbedSettings
from clipscrub.progress import Progress, track
from clipscrub.shards import decode_image, image_field, iter_shard, shard_path
from clipscrub.sources import PRECOMPUTED_FILE, failure_text
from clipscrub.validation import docs_dir_for, embedding_tables, validate

log = logging.getLogger("clipscrub.embed")


def iter_shard_samples(raw_dir: Path, shard: str, captions: dict[str, str]) -> Iterator[tuple[str, Any, str]]:
    """(key, RGB PIL image, caption) of the samples of one shard that ``captions`` (key -> caption:
    the shard's ok manifest rows) lists, in shard order.

    Only the listed keys are decoded: shards may hold samples the download stage failed
    (an undecodable image, an empty caption), which never reach the model.
    """
    for key, data, caption in _iter_shard_members(raw_dir, shard, captions):
        yield key, _decode(data, key=key, shard=shard), caption


def _iter_shard_members(raw_dir: Path, shard: str, captions: dict[str, str],
                        shas: dict[str, str | None] | None = None) -> Iterator[tuple[str, bytes, str]]:
    """(key, image bytes, caption) of the samples ``captions`` lists, in shard order, undecoded.
    With ``shas`` (key -> the image sha256 download recorded), an image with another sha256 is a
    DataError: what is embedded is what download recorded, or nothing."""
    wanted = dict(captions)
    for sample in iter_shard(shard_path(raw_dir, shard), keys=wanted):  # others unread (failed, or too large)
        key = sample["__key__"]
        ext = image_field(sample)
        if key not in wanted or ext is None:
            continue
        recorded = (shas or {}).get(key)
        if recorded is not None and (got := hashlib.sha256(sample[ext]).hexdigest()) != recorded:
            raise DataError(f"sample {key!r} in {shard} has an image of sha256 {got[:12]}..., not the "
                            f"{recorded[:12]}... download recorded: the shard changed after download; rerun the "
                            "pipeline from download (dvc repro, or clipscrub run)", param="--raw")
        yield key, sample[ext], wanted.pop(key)  # popped: a later sample reusing the key is not this row


def _decode(data: bytes, *, key: str, shard: str) -> Any:
    try:
        image, _ = decode_image(data)
    except ValueError as exc:
        raise DataError(f"sample {key!r} in {shard}: {exc} (the shard changed since download)", param="--raw") from None
    return image


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
    """Copy clip-retrieval embeddings (the manifest's ok rows) into the embed stage's layout as
    they are (in ``embed.dtype``), part by part so memory stays bounded by one part."""
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
    image_out = create_npy(out_dir / "image.npy", dtype=settings.dtype, shape=(len(ids), image_dim))
    text_out = create_npy(out_dir / "text.npy", dtype=settings.dtype, shape=(len(ids), text_dim))
    start = 0
    progress = track(parts, desc="embed", unit="parts")
    for part in progress:
        stop = start + part["rows"]
        lo, hi = np.searchsorted(ids, [start, stop])
        local = ids[lo:hi] - start
        for src, dst in (("img_emb", image_out), ("text_emb", text_out)):
            # zero and non-finite rows are copied too, for the embeddings suite to reject by id
            dst[lo:hi] = np.asarray(np.load(part[src], mmap_mode="r")[local], dtype=np.float32)
        progress.count(int(hi - lo), "samples", tick=False)  # shown with the part, as it ends
        start = stop
    image_out.flush()
    text_out.flush()
    del image_out, text_out
    np.save(out_dir / "ids.npy", ids)
    return {"samples": int(len(ids)), "dim": int(image_dim), "device": "none"}


def parts_dir_for(out_dir: str | Path) -> Path:
    """Where embed keeps finished shards until the stage completes: a hidden sibling of its output."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.parts"


def run_fingerprint(*, raw_dir: Path, loaded: LoadedModel, settings: EmbedSettings) -> dict[str, Any]:
    """What makes two runs' parts interchangeable: the same manifest, model, params, device and code."""
    return {
        "manifest_sha256": sha256_file(raw_dir / "manifest.parquet"),
        "model": loaded.info,
        "embed": settings.model_dump(mode="json", by_alias=True),
        "device": loaded.device.type,
        "code_version": code_version(__name__),
    }


def part_stamp(fingerprint: dict[str, Any]) -> str:
    """The fingerprint as the short string every part carries."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def _read_part(path: Path, *, stamp: str, rows: np.ndarray,
               names: tuple[str, ...] = ("image", "text")) -> list[np.ndarray] | None:
    """The arrays ``names`` of a part this run could have written (its stamp and its rows match);
    None for anything else: no file, another run's part, a part cut short."""
    try:
        with np.load(path) as part:
            if "stamp" not in part.files or str(part["stamp"]) != stamp or not np.array_equal(part["rows"], rows):
                return None
            return [part[name] for name in names]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _open_parts(parts: Path, fingerprint: dict[str, Any]) -> None:
    """Keep the finished shards of an interrupted run with the same inputs, model and params;
    drop anything else (another run's parts, a part whose write was cut short)."""
    stamp = parts / "fingerprint.json"
    if parts.is_dir() and (not stamp.is_file() or read_json(stamp) != fingerprint):
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    for stray in parts.glob(".*"):
        stray.unlink()
    if not stamp.is_file():
        write_json(stamp, fingerprint)


def _shard_groups(ok: pl.DataFrame) -> list[tuple[str, np.ndarray]]:
    """(shard, its ok rows (n,) in manifest order) in order of first appearance."""
    frame = ok.select("shard").with_row_index("row")
    groups = frame.group_by("shard", maintain_order=True).agg(pl.col("row"))
    return [(shard, np.asarray(rows, dtype=np.int64)) for shard, rows in groups.iter_rows()]


# embed.loader_workers: threads that decode, preprocess and tokenize the next batches while the
# model runs the current one. PIL's decoders and resampling and torch's kernels release the GIL,
# so loading can overlap the forward pass; the output does not depend on it: the same batches
# reach the model in the same order. Threads, not processes: nothing to start per shard or pickle.
# 0 by default, by measurement (benchmarks/embed_floor.py): on a 2-core CPU the forward pass takes
# both cores and 90% of the time, so a loader thread only competes with it; it is for a GPU,
# whose forward leaves the CPU free.


def _prepare_batch(loaded: LoadedModel, members: list[tuple[str, bytes, str]], *, shard: str,
                   tokenizer_lock: threading.Lock) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's inputs for ``members`` (key, image bytes, caption): stacked images and tokens."""
    images = torch.stack([loaded.preprocess(_decode(data, key=key, shard=shard)) for key, data, _ in members])
    with tokenizer_lock:  # a Hugging Face fast tokenizer refuses two calls at once ("Already borrowed")
        tokens = loaded.tokenizer([caption for _, _, caption in members])
    return images, tokens


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def _embed_shard(loaded: LoadedModel, *, raw_dir: Path, shard: str, rows: np.ndarray, ok: pl.DataFrame,
                 batch_size: int, workers: int = 0, progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Image and caption embeddings (n, d) float32 of one shard's ok rows (n,), batched within the
    shard so that a resumed run computes every shard exactly as an uninterrupted one. ``workers``
    loader threads prepare batches ahead, at most ``workers`` + 1 in memory. ``progress`` counts
    the images as each batch is embedded (a shard can take minutes)."""
    sub = ok[rows]
    keys = sub["key"].to_list()
    position = {k: i for i, k in enumerate(keys)}
    image_parts: list[np.ndarray] = []
    text_parts: list[np.ndarray] = []
    order: list[int] = []
    lock = threading.Lock()

    def forward(images: torch.Tensor, tokens: torch.Tensor) -> None:
        image_parts.append(loaded.model.encode_image(images.to(loaded.device), normalize=False).float().cpu().numpy())
        text_parts.append(loaded.model.encode_text(tokens.to(loaded.device), normalize=False).float().cpu().numpy())
        if progress is not None:
            progress.count(len(images), "images")

    batches = _batched(_iter_shard_members(raw_dir, shard, dict(zip(keys, sub["caption"].to_list())),
                                           dict(zip(keys, sub["image_sha256"].to_list()))), batch_size)
    if workers == 0:
        for batch in batches:
            order.extend(position[key] for key, _, _ in batch)
            forward(*_prepare_batch(loaded, batch, shard=shard, tokenizer_lock=lock))
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="embed-loader") as pool:
            pending: deque = deque()
            try:
                for batch in batches:  # the shard is read here; the threads decode
                    order.extend(position[key] for key, _, _ in batch)
                    pending.append(pool.submit(_prepare_batch, loaded, batch, shard=shard, tokenizer_lock=lock))
                    if len(pending) > workers:
                        forward(*pending.popleft().result())
                while pending:
                    forward(*pending.popleft().result())
            finally:  # an error (a bad image, an interrupt) leaves no batch queued behind it
                for future in pending:
                    future.cancel()
    if len(order) != len(keys):
        missing = sorted(set(keys) - {keys[i] for i in order})
        raise DataError(
            f"{len(missing)} manifest samples are missing from shard {shard}, e.g. {missing[:5]} "
            "(the shard changed since download)", param="--raw",
        )
    inverse = np.argsort(np.asarray(order))
    return np.concatenate(image_parts)[inverse], np.concatenate(text_parts)[inverse]


def _model_dim(settings: EmbedSettings, model_dir: Path | None) -> int | None:
    if model_dir is not None:
        cfg = read_json(model_dir / "model_config.json")
        return cfg.get("model_cfg", cfg).get("embed_dim")
    return expected_dim(settings)


def _load_embedder(*, settings: EmbedSettings, base: BaseSettings, model_dir: str | Path | None,
                   model_name: str | None) -> tuple[LoadedModel, str]:
    """The model embed runs (the train stage's in ``model_dir``, else the one ``settings`` name)
    and a few words saying what it is."""
    if model_dir is not None:
        model_dir = Path(model_dir)
        loaded = load_model(
            model_name=model_name or settings.model_name,
            pretrained=None,
            checkpoint=str(model_dir / "checkpoint.pt"),
            model_config=str(model_dir / "model_config.json"),
            device=base.device,
        )
        what = describe_model(loaded.info)
        # the file's hash identifies it; its location (data/ or a run directory) does not
        loaded.info["checkpoint"] = "checkpoint.pt (train stage output)"
        return loaded, what
    loaded = load_model(
        model_name=settings.model_name,
        pretrained=settings.pretrained,
        checkpoint=settings.checkpoint,
        model_config=settings.model_config_path,
        device=base.device,
    )
    return loaded, describe_model(loaded.info)


# a cluster worker embeds many pieces with one model: loaded once per process, per model
_WORKER_MODELS: dict[str, tuple[LoadedModel, str]] = {}


def _worker_embedder(*, settings: EmbedSettings, base: BaseSettings, model_dir: Path | None,
                     model_name: str | None) -> tuple[LoadedModel, str]:
    files = [Path(f) for f in (settings.checkpoint, settings.model_config_path) if f]
    if model_dir is not None:
        files = [model_dir / "checkpoint.pt", model_dir / "model_config.json"]
    key = json.dumps([settings.model_dump(mode="json", by_alias=True), base.device, str(model_dir), model_name,
                      [sha256_file(f) for f in files if f.is_file()]], sort_keys=True)
    if key not in _WORKER_MODELS:
        _WORKER_MODELS.clear()  # one model at a time: a worker's memory is for the current run
        _WORKER_MODELS[key] = _load_embedder(settings=settings, base=base, model_dir=model_dir, model_name=model_name)
    return _WORKER_MODELS[key]


def _on_cluster_worker() -> bool:
    if "distributed" not in sys.modules:  # never imported: not a dask worker
        return False
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


def plan_embed_parts(*, raw_dir: str | Path, out_dir: str | Path, settings: EmbedSettings, base: BaseSettings,
                     model_dir: str | Path | None = None, model_name: str | None = None) -> int:
    """Prepare ``parts_dir_for(out_dir)`` for this run (kept if an earlier run with the same
    inputs, model and params left it) and return the number of shard groups, each a piece
    ``embed_parts`` can embed on any worker; 0 when there is nothing to embed piecewise
    (precomputed embeddings, or no ok sample: the stage itself says why)."""
    raw_dir = Path(raw_dir)
    if (raw_dir / PRECOMPUTED_FILE).is_file():
        return 0
    # the count of shards with ok rows (a group each, as _shard_groups makes them), from a scan of
    # two columns: the flow's process plans, it does not hold the manifest's captions
    groups = scan_manifest(raw_dir).filter(pl.col("status") == "ok").select(pl.col("shard").n_unique(),
                                                                            pl.len()).collect()
    if groups["len"][0] == 0:
        return 0
    model_dir = Path(model_dir) if model_dir is not None else None
    loaded, _ = _worker_embedder(settings=settings, base=base, model_dir=model_dir, model_name=model_name)
    _open_parts(parts_dir_for(out_dir), run_fingerprint(raw_dir=raw_dir, loaded=loaded, settings=settings))
    return int(groups["shard"][0])


@torch.no_grad()
def embed_parts(*, raw_dir: str | Path, out_dir: str | Path, settings: EmbedSettings, base: BaseSettings,
                groups: list[int], model_dir: str | Path | None = None, model_name: str | None = None) -> dict[str, Any]:
    """Embed shard groups ``groups`` (indices into the plan of ``plan_embed_parts``) into their
    parts, skipping parts already finished: a cluster worker's piece of the embed stage, whose
    own run then only assembles the parts. The same bytes as the stage's own loop."""
    raw_dir = Path(raw_dir)
    ok = read_manifest(raw_dir).filter(pl.col("status") == "ok")
    model_dir = Path(model_dir) if model_dir is not None else None
    loaded, _ = _worker_embedder(settings=settings, base=base, model_dir=model_dir, model_name=model_name)
    stamp = part_stamp(run_fingerprint(raw_dir=raw_dir, loaded=loaded, settings=settings))
    parts = parts_dir_for(out_dir)
    plan = _shard_groups(ok)
    done = 0
    progress = track(groups, desc="embed", unit="shards")
    for i in progress:
        shard, rows = plan[i]
        done += _write_part(loaded, parts / f"part-{i:06d}.npz", raw_dir=raw_dir, shard=shard, rows=rows, ok=ok,
                            settings=settings, stamp=stamp, progress=progress)
    return {"groups": len(groups), "embedded": done, "resumed": len(groups) - done}


def _write_part(loaded: LoadedModel, part: Path, *, raw_dir: Path, shard: str, rows: np.ndarray, ok: pl.DataFrame,
                settings: EmbedSettings, stamp: str, progress: Progress | None = None) -> bool:
    """Embed one shard group into ``part`` unless this run's part is there; whether it embedded."""
    if _read_part(part, stamp=stamp, rows=rows, names=()) is not None:
        return False
    image, text = _embed_shard(loaded, raw_dir=raw_dir, shard=shard, rows=rows, ok=ok, batch_size=settings.batch_size,
                               workers=settings.loader_workers, progress=progress)
    with atomic_file(part) as tmp_part:
        with open(tmp_part, "wb") as f:
            np.savez(f, rows=rows, image=image, text=text, stamp=np.array(stamp))
    return True


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
    """Embed every ok sample of ``raw_dir``, shard by shard; return counts and the dimension.

    With ``model_dir`` (the train stage's output) the model is that directory's checkpoint and
    config, registered as ``model_name``; otherwise the model the ``embed`` settings name.
    Finished shards are kept in ``parts_dir_for(out_dir)`` until the stage completes, so a run
    that was killed resumes with the shards it had not finished (``shards_resumed`` counts the
    others) and writes the same bytes as an uninterrupted run. The summary's ``model`` says what
    was loaded (also printed to stderr as the stage starts).
    """
    raw_dir = Path(raw_dir)
    manifest = read_manifest(raw_dir)
    ok = manifest.filter(pl.col("status") == "ok")
    if ok.height == 0:
        raise DataError(f"all {manifest.height:,} samples failed to download ({failure_text(manifest)}): nothing to embed",
                        param="--raw")
    if (raw_dir / PRECOMPUTED_FILE).is_file():
        return _write_precomputed(raw_dir=raw_dir, ok=ok, out_dir=out_dir, settings=settings, base=base)
    model_dir = Path(model_dir) if model_dir is not None else None
    # on a cluster worker, the model its embed pieces loaded (the assembly only merges their parts)
    load = _worker_embedder if _on_cluster_worker() else _load_embedder
    loaded, what = load(settings=settings, base=base, model_dir=model_dir, model_name=model_name)
    print(f"embed: {what}", file=sys.stderr)  # what was loaded, where progress goes
    groups = _shard_groups(ok)
    parts = parts_dir_for(out_dir)
    fingerprint = run_fingerprint(raw_dir=raw_dir, loaded=loaded, settings=settings)
    _open_parts(parts, fingerprint)
    try:
        summary = _embed_shards(loaded, raw_dir=raw_dir, ok=ok, groups=groups, parts=parts, out_dir=out_dir,
                                settings=settings, base=base, model_dir=model_dir, stamp=part_stamp(fingerprint))
        summary["model"] = what
    except ClipscrubError:
        # parts outlive an interruption, not a run that failed on its data
        shutil.rmtree(parts, ignore_errors=True)
        raise
    shutil.rmtree(parts, ignore_errors=True)
    return summary


def _embed_shards(loaded: LoadedModel, *, raw_dir: Path, ok: pl.DataFrame, groups: list[tuple[str, np.ndarray]],
                  parts: Path, out_dir: str | Path, settings: EmbedSettings, base: BaseSettings,
                  model_dir: Path | None, stamp: str) -> dict[str, Any]:
    """Embed the shards without a finished part of this run's ``stamp``, then assemble, validate
    and publish the arrays."""
    resumed = 0

    def embed(shard: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _embed_shard(loaded, raw_dir=raw_dir, shard=shard, rows=rows, ok=ok, batch_size=settings.batch_size,
                            workers=settings.loader_workers)

    # images are counted as they are embedded: a resumed shard adds none, so the rate is the model's
    progress = track(groups, desc="embed", unit="shards")
    for i, (shard, rows) in enumerate(progress):
        resumed += not _write_part(loaded, parts / f"part-{i:06d}.npz", raw_dir=raw_dir, shard=shard, rows=rows,
                                   ok=ok, settings=settings, stamp=stamp, progress=progress)

    with atomic_dir(out_dir) as tmp:
        arrays: dict[str, np.memmap] = {}
        for i, (shard, rows) in enumerate(groups):
            # checked again as it is used: a part replaced since (another run on this root) is not
            # merged; the shard is embedded again instead, to the same bytes
            got = _read_part(parts / f"part-{i:06d}.npz", stamp=stamp, rows=rows)
            for name, block in zip(("image", "text"), got if got is not None else embed(shard, rows)):
                if name not in arrays:
                    arrays[name] = create_npy(tmp / f"{name}.npy", dtype=settings.dtype, shape=(ok.height, block.shape[1]))
                arrays[name][rows] = block
        dim = int(arrays["image"].shape[1])
        for arr in arrays.values():
            arr.flush()
        del arrays
        ids = ok["id"].to_numpy().astype(np.int64)
        np.save(tmp / "ids.npy", ids)
        summary = {"samples": int(ok.height), "dim": dim, "device": loaded.device.type,
                   "shards": len(groups), "shards_resumed": resumed}
        validated = _validate(tmp, ids=ids, dim=_model_dim(settings, model_dir), out_dir=out_dir)
        _record_model(tmp, info=loaded.info, summary=summary, raw_dir=raw_dir, validated=validated,
                      upstream=[raw_dir] + ([model_dir] if model_dir is not None else []), settings=settings, base=base)
    return summary


def _validate(tmp: Path, *, ids: np.ndarray, dim: int | None, out_dir: str | Path) -> dict[str, Any]:
    """The embeddings suite on the arrays in ``tmp``: one finite, non-zero vector of the model's
    dimension per ok manifest row."""
    tables = embedding_tables(ids=np.load(tmp / "ids.npy"), image=RowReader(tmp / "image.npy"),
                              text=RowReader(tmp / "text.npy"), dim=dim, ok_ids=ids)
    return validate("embed", tables, docs_dir=docs_dir_for(out_dir, "embed"))


def check_alignment(tmp: Path, *, seed: int) -> dict[str, Any]:
    """``alignment`` (``caption_alignment`` of the arrays in ``tmp``) and, where a sample's own
    caption barely outranks the others, a ``warning``: the model does not look trained on this data."""
    alignment = caption_alignment(np.load(tmp / "image.npy", mmap_mode="r"), np.load(tmp / "text.npy", mmap_mode="r"),
                                  seed=seed)
    out: dict[str, Any] = {"alignment": alignment}
    if alignment["samples"] >= 20 and alignment["percentile"] < ALIGNED_PERCENTILE:
        out["warning"] = (f"the model pairs this data's images and captions barely better than chance (a sample's "
                          f"own caption outranks {alignment['percentile']:.0%} of {alignment['samples']:,} others' on "
                          f"average, chance 50%): it does not look trained on this data, and the method needs the "
                          "model trained on it (only that model has learnt the poison's trigger): embed with that "
                          "model's weights (embed.checkpoint); see the README's 'Your data'")
        log.warning("embed: %s", out["warning"])
    return out


def _record_model(tmp: Path, *, info: dict[str, Any], summary: dict[str, Any], raw_dir: Path, upstream: list[Path],
                  settings: EmbedSettings, base: BaseSettings, validated: dict[str, Any]) -> None:
    """model.json and the embed lineage, beside the arrays in ``tmp``; adds ``check_alignment``'s
    figures (and warning) to ``summary``."""
    summary.update(check_alignment(tmp, seed=base.seed))
    write_json(tmp / "model.json", info)
    write_lineage(
        tmp,
        module=__name__,
        stage="embed",
        params={"base": base.model_dump(mode="json"), "embed": settings.model_dump(mode="json", by_alias=True)},
        inputs=dict(zip(("raw", "model"), upstream)),  # the train stage's model dir, when it made the model
        upstream=upstream,
        # where it ran and what a resume skipped do not change the bytes
        summary={k: v for k, v in summary.items() if k not in ("device", "shards_resumed")},
        extra={"model": info, "validation": validated},
    )


def _write_precomputed(*, raw_dir: Path, ok: pl.DataFrame, out_dir, settings: EmbedSettings, base: BaseSettings) -> dict[str, Any]:
    info = {"model_name": settings.model_name, "pretrained": None, "checkpoint": None, "checkpoint_sha256": None,
            "precomputed": read_json(raw_dir / PRECOMPUTED_FILE)["root"]}
    with atomic_dir(out_dir) as tmp:
        summary = convert_precomputed(raw_dir=raw_dir, ok=ok, out_dir=tmp, settings=settings)
        validated = _validate(tmp, ids=ok["id"].to_numpy().astype(np.int64), dim=expected_dim(settings), out_dir=out_dir)
        _record_model(tmp, info=info, summary=summary, raw_dir=raw_dir, upstream=[raw_dir], settings=settings, base=base,
                      validated=validated)
    return summary
