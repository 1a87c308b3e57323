"""Stage 5, score: one row per sample with a ``<detector>_score`` column per detector.

Density-ratio scores (k-distance, SLOF, DAO) and LID come from the index stage's neighbour
lists: per reference set, averaged over its draws; several sets (``index.reference.sizes``) are
fused into one score by ``score.fusion`` (``clipscrub.detectors.fuse_scores``), and each set's
own scores are kept in ``by_reference.parquet`` (``<detector>_<set>`` columns). With several
sets, a sample in a group of copies (a copy among the largest set's references, or a reference
that another sample copies) is scored by its caption mismatch instead (``score.vet_copies``:
``is_copy`` and ``caption_mismatch`` columns), and a caption set (``t<m>``) is averaged in
(``clipscrub.detectors.join_caption_view``).
The isolation forest and the CLIP score come from the embeddings. Non-finite scores are kept as
they are and counted, never dropped.

Like the index stage, the work is three pieces passing files: ``prepare_score`` (each reference
entry's kd(o) and lid(o), computed once per draw; the isolation forest's training rows),
``score_chunk`` per chunk of samples (raw per-draw scores), ``reduce_score`` (averaging over
draws, fusion over the whole dataset, the parquet outputs); ``score_samples`` runs them in turn.
The reduce works a chunk at a time: the fusion's medians and MADs are exact order statistics of
the chunks' sorted scores (``clipscrub.order``), and the outputs are streamed from per-chunk
parts, so its memory does not grow with the dataset's columns.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from clipscrub.arrays import ChunkRows, load_embeddings, require_finite
from clipscrub.detectors import (
    DENSITY, caption_mismatch, clip_score, copy_vetting, density_scores, fit_iforest, fuse_scores, iforest_score,
    join_caption_view, mismatch_sample, query_scores, reference_density, vet_captions, vet_copies,
)
from clipscrub.errors import DataError
from clipscrub.io import atomic_dir, concat_parquet, read_json, require_file, scratch_work_dir, write_json, write_lineage
from clipscrub.neighbours import forest_rows, load_reference_set, query_embeddings, read_reference_sets
from clipscrub.order import SortedRuns, sorted_finite
from clipscrub.params import BaseSettings, IndexSettings, ScoreSettings
from clipscrub.pieces import (
    PLAN_FILE, check_chunk, chunk_file, chunk_plan, fresh_work_dir, load_chunk, read_plan, require_chunk, save_npy,
)
from clipscrub.progress import track
from clipscrub.saved import BUNDLE_FILE, IFOREST_TRAIN, SAVED_DIR, VET_CAPTIONS, check_score, encode_scales, saved_scales
from clipscrub.validation import docs_dir_for, score_tables, validate


def score_samples(
    *,
    embeddings_dir: str | Path,
    index_dir: str | Path,
    out_dir: str | Path,
    settings: ScoreSettings,
    index: IndexSettings,
    base: BaseSettings,
) -> dict[str, Any]:
    """Write ``<out>/scores.parquet``: id, one ``<detector>_score`` per detector, and
    ``non_finite_scores`` (the detectors whose score is NaN or infinite for that row, comma
    separated; null when all are finite). The prepare, chunk and reduce pieces in turn."""
    with scratch_work_dir(out_dir) as work:
        common = dict(embeddings_dir=embeddings_dir, index_dir=index_dir, work_dir=work, settings=settings,
                      index=index, base=base)
        plan = prepare_score(**common)
        progress = track(plan["chunks"], desc="score", unit="chunks")
        buffers: dict[str, np.ndarray] = {}
        for start, stop in progress:
            score_chunk(**common, start=start, stop=stop, buffers=buffers)
            progress.count(stop - start, "samples", tick=False)  # shown with the chunk, as it ends
        return reduce_score(**common, out_dir=out_dir)


def _score_params(settings: ScoreSettings, index: IndexSettings, base: BaseSettings) -> dict[str, Any]:
    return {"base": base.model_dump(mode="json"), "index": index.model_dump(mode="json"),
            "score": settings.model_dump(mode="json")}


def prepare_score(
    *, embeddings_dir: str | Path, index_dir: str | Path, work_dir: str | Path, settings: ScoreSettings,
    index: IndexSettings, base: BaseSettings,
) -> dict[str, Any]:
    """Check the index against the embeddings, and write what every chunk shares into ``work_dir``
    (emptied first): per reference set, ``kd_ref.npy`` and ``lid_ref.npy`` (r, R) float64, each
    entry's kd(o) and lid(o) within its draw; ``iforest_rows.npy``, the rows the isolation forest
    is fitted on (every chunk fits the same forest: same rows, same seed); with copies vetted,
    ``vet_captions.npy`` (r, m, d), the vetting set's captions at unit length. With saved
    references (``index.reference.mode: saved``) the forest's rows (``iforest_train.npy``, vectors)
    and the captions are the saved version's, and the reduce takes its scales too.

    Returns the plan (also ``plan.json``): ``chunks`` [[start, stop], ...] (multiples of
    ``index.chunk_size``), ``sets``, ``samples``, ``params``.
    """
    emb_dir, idx_dir = Path(embeddings_dir), Path(index_dir)
    _, text, ids = load_embeddings(emb_dir, normalize=index.normalize)
    records = read_reference_sets(idx_dir)
    names = [rs["name"] for rs in records]
    density = any(d in DENSITY for d in settings.detectors)
    work = fresh_work_dir(work_dir, param="score")
    ref_rows: dict[str, np.ndarray] = {}  # per set (draws, m)
    for name in names:
        # one set mapped at a time: a set's (r, N, K) neighbour files are what dominates memory
        arrays = load_reference_set(idx_dir, name)
        if arrays["neighbours"].shape[1] != len(ids):
            raise DataError("index and embeddings disagree on the number of samples: rerun the index stage",
                            param="--index")
        ref_rows[name] = np.asarray(arrays["ref_rows"])
        if density:
            own = [reference_density(arrays["ref_distances"][r], settings.k) for r in range(len(arrays["ref_rows"]))]
            (work / name).mkdir()
            np.save(work / name / "kd_ref.npy", np.stack([kd for kd, _ in own]))
            np.save(work / name / "lid_ref.npy", np.stack([lid for _, lid in own]))
        del arrays
    # the caption sets (t<size>) join the image sets' fused score as the mean of the two z-scores
    caption_sets = [r["name"] for r in records if r.get("modality") == "text" and index.modality == "image_text"]
    vet = copy_vetting(records, vet_copies=settings.vet_copies, detectors=settings.detectors, modality=index.modality)
    if index.reference.mode == "saved":  # the saved version's forest rows and vetting captions, not this one's
        _prepare_saved(idx_dir, work, settings=settings, vet=vet)
    else:
        if "iforest" in settings.detectors:
            np.save(work / FOREST_ROWS, forest_rows(list(ref_rows.values())))
        if vet:  # gathered once, not per chunk
            np.save(work / VET_CAPTIONS, vet_captions(text, ref_rows[vet["set"]]))
    plan = {"params": _score_params(settings, index, base), "samples": len(ids), "sets": names,
            "caption_sets": caption_sets, "chunks": chunk_plan(len(ids), index.chunk_size), "vet": vet}
    write_json(work / PLAN_FILE, plan)
    return plan


def score_chunk(
    *, embeddings_dir: str | Path, index_dir: str | Path, work_dir: str | Path, settings: ScoreSettings,
    index: IndexSettings, base: BaseSettings, start: int, stop: int, buffers: dict[str, np.ndarray] | None = None,
) -> None:
    """Raw scores of samples [start, stop), one of the plan's chunks, in ``work_dir``'s
    ``chunks/<start>-<stop>/``: ``<set>.<detector>.npy`` (r, stop - start) per density detector
    (one row per draw), ``iforest.npy`` and ``clip.npy`` (stop - start,), then what the reduce
    reads of it (``_summarise_chunk``: each set's mean over its draws, and its sorted finite
    values for the fusion's statistics). Depends on no other chunk; a rerun writes the same
    bytes. ``buffers``: the embeddings are read into these (a dict the caller passes to every
    chunk it runs), not into fresh memory."""
    emb_dir, idx_dir, work = Path(embeddings_dir), Path(index_dir), Path(work_dir)
    plan = read_plan(work, params=_score_params(settings, index, base), stage="score")
    check_chunk(plan, start, stop, param="index.chunk_size")
    image, text, ids = load_embeddings(emb_dir, normalize=index.normalize)
    wanted = set(settings.detectors)
    density = [d for d in settings.detectors if d in DENSITY]
    vet = plan.get("vet")
    vet_found: list[tuple[np.ndarray, np.ndarray]] = []  # the vetting set's (entries, distances) per draw
    for name in plan["sets"] if density else ():  # (vetting needs a density detector: copy_vetting)
        arrays = load_reference_set(idx_dir, name)
        kd_ref, lid_ref = np.load(work / name / "kd_ref.npy"), np.load(work / name / "lid_ref.npy")
        found = [(np.asarray(arrays["neighbours"][r, start:stop]), np.asarray(arrays["distances"][r, start:stop]))
                 for r in range(len(kd_ref))]
        per_draw = [query_scores(dist=dist, entries=entries, kd_ref=kd_ref[r], lid_ref=lid_ref[r], k=settings.k,
                                 lid_k=settings.lid_k if "lid" in wanted else None)
                    for r, (entries, dist) in enumerate(found)]
        for d in density:
            save_npy(chunk_file(work, start, stop, f"{name}.{d}"), np.stack([p[d] for p in per_draw]))
        if vet and name == vet["set"]:
            vet_found = found
        del arrays
    # each file's rows of the chunk read once, for all below, and checked finite (as the index's chunks did)
    rows = ChunkRows(start, stop, buffers, on_read=require_finite(ids, start))
    if vet:
        _copies_chunk(idx_dir, work, rows(text), vet_found, vet, start, stop, plan["samples"])
    if "iforest" in wanted:
        queries = query_embeddings(image, text, index.modality)
        forest = _forest(work, queries, settings=settings, seed=base.seed)
        save_npy(chunk_file(work, start, stop, "iforest"), iforest_score(forest, rows(queries)))
    if "clip" in wanted:
        save_npy(chunk_file(work, start, stop, "clip"), clip_score(rows(image), rows(text)))
    # last: its files mark the chunk done for the reduce
    _summarise_chunk(work, start, stop, names=plan["sets"], density=density, runs_of=_ranked_sets(plan),
                     vet=vet, samples=plan["samples"])


FOREST_ROWS = "iforest_rows.npy"


def _prepare_saved(idx_dir: Path, work: Path, *, settings: ScoreSettings, vet: dict[str, Any] | None) -> None:
    """The saved version's isolation-forest rows and vetting captions, from the index's copy of
    the bundle (``clipscrub.saved``), after checking its scales hold for these settings."""
    saved = idx_dir / SAVED_DIR
    meta = read_json(require_file(saved / BUNDLE_FILE, param="--index", what="the index's saved references"))
    check_score(meta, k=settings.k, lid_k=settings.lid_k, detectors=list(settings.detectors))
    for wanted, file, param in (("iforest" in settings.detectors, IFOREST_TRAIN, "score.detectors"),
                                (vet is not None, VET_CAPTIONS, "score.vet_copies")):
        if not wanted:
            continue
        if not (saved / file).is_file():
            raise DataError(f"the saved references hold no {file}: the version they were saved from ran without it "
                            "(turn it off here, or save references from a version that ran it)", param=param)
        shutil.copyfile(saved / file, work / file)
    if vet is not None and meta.get("vet") is None:
        raise DataError("the saved references hold no scales of the copy vetting", param="score.vet_copies")


def _copies_chunk(idx_dir: Path, work: Path, chunk_captions: np.ndarray, found: list[tuple[np.ndarray, np.ndarray]],
                  vet: dict[str, Any], start: int, stop: int, n: int) -> None:
    """``copies.npy`` (stop - start,) bool, ``copied_refs.npy`` (c,) int64 and
    ``caption_mismatch.npy`` (r, stop - start) of a chunk whose caption embeddings are
    ``chunk_captions`` (stop - start, d), from the vetting set's neighbours ``found`` (per draw:
    the chunk's entries and distances, (stop - start, K) each, as the density loop read them;
    ``clipscrub.detectors.caption_mismatch``): which queries have a copy among the references,
    which reference samples are copied by one of the chunk's queries (a drawn copy has no copy
    among the references itself: its copies were passed over), and the mismatch for both, for
    the chunk's reference samples and for the population sample (``mismatch_sample``)."""
    ref_rows = np.asarray(load_reference_set(idx_dir, vet["set"])["ref_rows"])
    ref_captions = np.load(work / VET_CAPTIONS, mmap_mode="r")
    wanted = mismatch_sample(start, stop, n) | np.isin(np.arange(start, stop), ref_rows)
    is_copy = np.zeros(stop - start, dtype=bool)
    mismatch, copied = [], []
    for r, (rows, (entries, distances)) in enumerate(zip(ref_rows, found, strict=True)):
        copy_r, mismatch_r = caption_mismatch(
            captions=chunk_captions, ref_captions=np.asarray(ref_captions[r]),
            entries=entries, distances=distances, image_entries=len(rows), copy_distance=vet["copy_distance"],
            wanted=wanted)
        is_copy |= copy_r
        mismatch.append(mismatch_r)
        copied.append(rows[entries[(entries < len(rows)) & (distances < vet["copy_distance"])]])
    save_npy(chunk_file(work, start, stop, "copies"), is_copy)
    save_npy(chunk_file(work, start, stop, "copied_refs"), np.unique(np.concatenate(copied)).astype(np.int64))
    save_npy(chunk_file(work, start, stop, "caption_mismatch"), np.stack(mismatch))


# the forest a process last fitted: one process running every chunk (score_samples) fits it once
_FOREST: dict[tuple, Any] = {}


def _forest(work: Path, queries, *, settings: ScoreSettings, seed: int):
    """The isolation forest fitted on the prepared rows: sklearn with a fixed seed and one job
    gives the same trees in every process, so a chunk fits it rather than reading a pickle."""
    path = work / IFOREST_TRAIN
    if not path.is_file():
        path = work / FOREST_ROWS
    st = (work / PLAN_FILE).stat()
    key = (str(path.resolve()), st.st_ino, st.st_mtime_ns, str(queries.path), settings.iforest.n_estimators,
           settings.iforest.max_samples, seed)
    if key not in _FOREST:
        _FOREST.clear()
        train = np.load(path) if path.name == IFOREST_TRAIN else queries.take(np.load(path))
        _FOREST[key] = fit_iforest(train, n_estimators=settings.iforest.n_estimators,
                                   max_samples=settings.iforest.max_samples, seed=seed)
    return _FOREST[key]


def reduce_score(
    *, embeddings_dir: str | Path, index_dir: str | Path, work_dir: str | Path, out_dir: str | Path,
    settings: ScoreSettings, index: IndexSettings, base: BaseSettings,
) -> dict[str, Any]:
    """Every chunk's scores: averaged over each set's draws, fused over the sets (robust z-scores
    over the whole dataset), written with validation and lineage in one atomic swap.

    Out of core, a chunk at a time: each chunk's per-set means, with their finite values sorted
    (a run), are the chunk's (``score_chunk``); the fusion's medians and MADs are taken exactly
    from the runs (``clipscrub.order.SortedRuns``); each chunk's final rows are written as a part, and the
    parts streamed into ``scores.parquet`` and ``by_reference.parquet``. Memory holds a chunk,
    the ids and the runs' binary searches, not a column per detector and set."""
    emb_dir, idx_dir, work = Path(embeddings_dir), Path(index_dir), Path(work_dir)
    plan = read_plan(work, params=_score_params(settings, index, base), stage="score")
    _, _, ids = load_embeddings(emb_dir, normalize=index.normalize)
    n = len(ids)
    if n != plan["samples"]:
        raise DataError(f"the embeddings changed since prepare_score ({plan['samples']} samples, now {n}): "
                        f"prepare again", param="--embeddings")
    names, chunks, vet = plan["sets"], plan["chunks"], plan.get("vet")
    density = [d for d in settings.detectors if d in DENSITY]
    caption_sets = plan["caption_sets"]
    if len(caption_sets) > 1:  # the index draws one (clipscrub.neighbours: t<smallest size>)
        raise DataError(f"the index holds {len(caption_sets)} caption sets ({', '.join(caption_sets)}); the score stage "
                        "joins one: rerun the index stage", param="--index")
    image_sets = [name for name in names if name not in caption_sets]
    # a reference sample another sample copies is a copy too (rows of the embeddings, from every chunk)
    copied = (np.unique(np.concatenate([load_chunk(work, a, b, "copied_refs", stage="score") for a, b in chunks]))
              if vet else np.empty(0, np.int64))
    ranked = [(d, name) for d in density for name in _ranked_sets(plan)]
    if index.reference.mode == "saved":  # the saved version's, so that its cut means the same here
        meta = read_json(idx_dir / SAVED_DIR / BUNDLE_FILE)
        scales = saved_scales(meta, ranked)
        population = tuple(meta["population"]) if vet and meta["population"] is not None else None
        # a saved population without a finite mismatch: no z-score, copies keep their fused score
        # as they did there, not a fit on this chunk's own rows (a score would depend on its chunk)
        fit_population = False
    else:
        scales = {key: _scales(work, chunks, f"{key[1]}.{key[0]}") for key in ranked}
        population = _scales(work, chunks, "mismatch_population") if vet else None
        fit_population = True

    order = list(settings.detectors)
    non_finite = dict.fromkeys(order, 0)
    copies = 0
    parts = work / "parts"
    shutil.rmtree(parts, ignore_errors=True)
    (parts / "scores").mkdir(parents=True)
    (parts / "by_reference").mkdir()
    for start, stop in chunks:
        per_set = {(d, name): _mean(work, start, stop, name, d) for d in density for name in names}
        columns: dict[str, np.ndarray] = {}
        extra: dict[str, np.ndarray] = {}
        if vet:
            extra["is_copy"] = load_chunk(work, start, stop, "copies", stage="score").astype(bool)
            extra["is_copy"][copied[(copied >= start) & (copied < stop)] - start] = True
            extra["caption_mismatch"] = load_chunk(work, start, stop, "mismatch_mean", stage="score")
            copies += int(extra["is_copy"].sum())
        for d in density:
            columns[d] = fuse_scores([per_set[(d, name)] for name in image_sets], settings.fusion,
                                     scales=[scales.get((d, name)) for name in image_sets])
            if vet:
                columns[d] = vet_copies(columns[d], is_copy=extra["is_copy"], mismatch=extra["caption_mismatch"],
                                        population=mismatch_sample(start, stop, n) if fit_population
                                        else np.zeros(stop - start, dtype=bool), scales=population)
            for name in caption_sets:
                columns[d] = join_caption_view(columns[d], per_set[(d, name)], scales=scales[(d, name)])
        for d in ("iforest", "clip"):
            if d in settings.detectors:
                columns[d] = load_chunk(work, start, stop, d, stage="score")
        chunk_ids = np.asarray(ids[start:stop])
        frame = pl.DataFrame({"id": chunk_ids, **{f"{d}_score": columns[d] for d in order}, **extra})
        # marked, not dropped: threshold flags them and evaluate ranks them most suspicious
        frame = frame.with_columns(
            pl.concat_str([pl.when(~pl.col(f"{d}_score").is_finite()).then(pl.lit(d)) for d in order],
                          separator=",", ignore_nulls=True).replace("", None).alias("non_finite_scores")
        )
        for d in order:
            non_finite[d] += int((~np.isfinite(columns[d])).sum())
        frame.write_parquet(parts / "scores" / f"{start:015d}.parquet", statistics=False)
        pl.DataFrame({"id": chunk_ids, **{f"{d}_{name}": per_set[(d, name)] for d in density for name in names}}
                     ).write_parquet(parts / "by_reference" / f"{start:015d}.parquet", statistics=False)
    summary = {"samples": n, "detectors": order, "non_finite": non_finite,
               "reference_sets": names, "fusion": settings.fusion if len(image_sets) > 1 else None}
    if vet:
        summary["copies"] = copies
    with atomic_dir(out_dir) as tmp:
        for name in ("scores", "by_reference"):  # the parts in row order, streamed into one file
            concat_parquet([parts / name / f"{start:015d}.parquet" for start, _ in chunks], tmp / f"{name}.parquet")
        validated = validate("score", score_tables(pl.scan_parquet(tmp / "scores.parquet"), ids=ids, detectors=order),
                             docs_dir=docs_dir_for(out_dir, "score"))
        write_lineage(
            tmp,
            module=__name__,
            stage="score",
            params={"base": base.model_dump(mode="json"), "score": settings.model_dump(mode="json")},
            inputs={"embeddings": emb_dir, "index": idx_dir},
            upstream=[idx_dir],
            summary=summary,
            # what a bundle of saved references keeps (clipscrub save-references)
            extra={"validation": validated, "scales": encode_scales(scales),
                   "population_scales": None if population is None else [float(v) for v in population]},
        )
    return summary


def _mean(work: Path, start: int, stop: int, name: str, detector: str) -> np.ndarray:
    return load_chunk(work, start, stop, f"mean.{name}.{detector}", stage="score")


def _ranked_sets(plan: dict[str, Any]) -> list[str]:
    """The sets whose whole-dataset robust scales the fusion takes: the image sets, where several
    are fused by z-score, and the caption set."""
    image_sets = [name for name in plan["sets"] if name not in plan["caption_sets"]]
    return (image_sets if len(image_sets) > 1 else []) + plan["caption_sets"]


def _summarise_chunk(work: Path, start: int, stop: int, *, names: list[str], density: list[str], runs_of: list[str],
                     vet: dict[str, Any] | None, samples: int) -> None:
    """A chunk's ``mean.<set>.<detector>.npy`` (stop - start,): the mean over the set's draws, as
    the whole (r, N) array's mean gives it; ``run.<set>.<detector>.npy``, its finite values sorted,
    for the sets in ``runs_of``; with copies vetted, ``mismatch_mean.npy`` (the mean over the draws
    that found a look-alike, NaN where none did) and the mismatch population's run."""
    for name in names:
        for d in density:
            mean = np.mean(load_chunk(work, start, stop, f"{name}.{d}", stage="score"), axis=0)
            save_npy(chunk_file(work, start, stop, f"mean.{name}.{d}"), mean)
            if name in runs_of:
                save_npy(chunk_file(work, start, stop, f"run.{name}.{d}"), sorted_finite(mean))
    if vet:
        per_draw = load_chunk(work, start, stop, "caption_mismatch", stage="score")  # (r, n), NaN where no look-alike
        found = np.isfinite(per_draw)
        mismatch = np.where(found.any(axis=0), np.where(found, per_draw, 0).sum(axis=0)
                            / np.maximum(found.sum(axis=0), 1), np.nan)
        save_npy(chunk_file(work, start, stop, "mismatch_mean"), mismatch)
        save_npy(chunk_file(work, start, stop, "run.mismatch_population"),
                 sorted_finite(mismatch[mismatch_sample(start, stop, samples)]))


def _scales(work: Path, chunks: list[list[int]], name: str) -> tuple[float, float, float] | None:
    """``robust_scales`` of a column from its chunks' runs (``run.<name>.npy``); None where it has
    no finite value (robust_z then leaves the values as they are, as it does whole)."""
    runs = SortedRuns([require_chunk(chunk_file(work, start, stop, f"run.{name}"), start, stop, stage="score")
                       for start, stop in chunks])
    return runs.robust_scales() if runs.size else None


def set_scores(arrays: dict[str, np.ndarray], *, k: int, lid_k: int | None) -> dict[str, np.ndarray]:
    """kdist, SLOF, DAO (and LID) of every sample (N,) for one reference set, averaged over its
    draws; ``arrays`` as ``load_reference_set`` returns them."""
    per_draw = [
        density_scores(dist=arrays["distances"][r], entries=arrays["neighbours"][r],
                       ref_dist=arrays["ref_distances"][r], k=k, lid_k=lid_k)
        for r in range(arrays["neighbours"].shape[0])
    ]
    return {name: np.mean([d[name] for d in per_draw], axis=0) for name in per_draw[0]}
