"""Stage 4, index: reference sets and each sample's k nearest reference entries (faiss).

``index.reference`` names one or more reference sets (``clipscrub.neighbours.reference_sets``:
one per size m in random mode, each drawn r times; or the trusted samples; or the whole
dataset). For each set, ``<out>/<set>/`` (``m256``, ``m4096``, ``trusted``, ``all``) holds, for its
r draws, R reference entries per draw and K = ``index.k`` neighbours:
- ``ref_rows.npy`` (r, m) int64: embedding rows of the reference samples;
- ``neighbours.npy`` (r, N, K) int32 (int64 for a draw of 2^31 entries or more,
  ``clipscrub.neighbours.entry_dtype``) and ``distances.npy`` (r, N, K) float32: each sample's
  nearest entries (indices into the draw's entries, laid out as ``reference_entries`` does);
- ``ref_neighbours.npy`` / ``ref_distances.npy`` (r, R, K): the same for the entries themselves,
  within the reference set, from which kd(o) and lid(o) are computed.
``<out>/references.json`` lists the sets in order (name, draws, samples, entries, search,
copy_distance: images closer than it are copies, drawn once into a random set).

Memory is bounded by one chunk of queries, the reference entries with their faiss index, and
the (N, K) results: embeddings are read chunk by chunk, never mapped whole.

The work is three pieces that pass only files, so a cluster can run the chunks in separate
processes on a shared filesystem (``build_index`` runs them in turn, the same code):
``prepare_index`` (the reference sets, their stored indexes, the entries' own neighbours, the
plan of query chunks, and the output arrays, allocated whole), ``search_index_chunk`` per chunk
(in any order, any number of times: it writes its own rows of those arrays), ``reduce_index``
(the arrays linked, not copied, into the outputs, validated, in one atomic swap).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from clipscrub.arrays import ChunkRows, create_npy, load_embeddings, require_finite, write_rows
from clipscrub.errors import DataError, ParamError
from clipscrub.io import atomic_dir, read_json, require_file, scratch_work_dir, write_json, write_lineage
from clipscrub.neighbours import (
    REFERENCES_FILE, STORED_METHODS, Neighbours, build_search_index, caption_set, choose_method, draw_index,
    duplicate_distance, entry_dtype, find_neighbours, gpu_count, measure_recall, query_embeddings, read_trusted_rows,
    reference_sets, self_entries_per_query, write_search_index,
)
from clipscrub.params import BaseSettings, IndexSettings
from clipscrub.pieces import (
    PLAN_FILE, check_chunk, chunk_file, chunk_mark, chunk_plan, fresh_work_dir, link_or_copy, load_chunk, read_plan,
    require_chunk, save_npy,
)
from clipscrub.progress import track
from clipscrub.saved import BUNDLE_FILE, IFOREST_TRAIN, PARAM, SAVED_DIR, VET_CAPTIONS, check_bundle, read_bundle, saved_rows
from clipscrub.validation import check_neighbours, docs_dir_for, neighbour_check_tables, validate


# queries searched and re-ranked per faiss call: faiss tiles its own work in 4,096-query blocks, so
# larger calls gain nothing, while their (Q, candidates) temporaries cost page faults
SEARCH_BATCH = 16384


# ------------------------------------------------------------------ the index stage's pieces
def uses_caption_set(settings: IndexSettings) -> bool:
    """Whether the index adds a caption set (``index.reference.caption_set``): random sets of image
    queries against image and caption entries, the paper's setting."""
    return settings.reference.caption_set and settings.reference.mode == "random" and settings.modality == "image_text"


def _index_params(settings: IndexSettings, base: BaseSettings) -> dict[str, Any]:
    return {"base": base.model_dump(mode="json"), "index": settings.model_dump(mode="json")}


def _stored(work: Path, name: str, method: str, r: int, mode: str) -> Path | None:
    """Where prepare stores a draw's index for the chunks to read: an hnsw or ivf index (costly to
    build), or a sampled set's exact index (its entries gathered once: a random gather of m rows
    from the embeddings per chunk and draw cost more than the search of small sets). The whole
    dataset's exact index is not stored: each chunk reads it from the embeddings."""
    keep = method in STORED_METHODS or (method == "exact" and mode != "all")
    return work / name / f"draw{r}.faiss" if keep else None


def prepare_index(
    *, embeddings_dir: str | Path, work_dir: str | Path, settings: IndexSettings, base: BaseSettings
) -> dict[str, Any]:
    """Draw the reference sets and write what every chunk of queries shares into ``work_dir``
    (emptied first): per set ``ref_rows.npy``, each draw's hnsw/ivf index (``draw<r>.faiss``),
    and the stage's four output arrays allocated whole (``neighbours``, ``distances``,
    ``ref_neighbours``, ``ref_distances``), the last two filled here unless the references are
    the dataset itself (mode all: those rows are the chunks' too). The chunks fill the rest.

    Returns the plan (also ``plan.json``): ``chunks`` [[start, stop], ...] (multiples of
    ``index.chunk_size``), ``sets`` (name, draws, samples, entries, search), ``samples``, ``params``.
    """
    emb_dir = Path(embeddings_dir)
    if settings.reference.mode == "saved":
        return _prepare_saved(emb_dir, Path(work_dir), settings=settings, base=base)
    image, text, ids = load_embeddings(emb_dir, normalize=settings.normalize)
    n = len(ids)
    ref = settings.reference
    trusted = read_trusted_rows(ref.path, ids) if ref.mode == "trusted" else None
    copy_distance = (duplicate_distance(image, n=n, fraction=ref.duplicate_radius, seed=base.seed)
                     if ref.mode == "random" else 0.0)
    sets = reference_sets(n=n, mode=ref.mode, sizes=ref.sizes, draws=ref.draws, seed=base.seed, trusted_rows=trusted,
                          image=image, copy_distance=copy_distance)
    if uses_caption_set(settings) and len(sets) > 1:
        sets.append(caption_set(sets))
    for rs in sets:
        max_self = self_entries_per_query(rs.modality or settings.modality)
        if settings.k + max_self > rs.rows.shape[1] * max_self:
            raise DataError(f"k ({settings.k}) needs more reference entries than {rs.rows.shape[1] * max_self} "
                            f"(reference set {rs.name})", param="index.k")
    work = fresh_work_dir(work_dir, param="index")
    records: list[dict[str, Any]] = []
    for rs in sets:
        draws, m = rs.rows.shape
        modality = rs.modality or settings.modality
        max_self = self_entries_per_query(modality)
        entries_n = m * max_self
        method = choose_method(mode=ref.mode, entries=entries_n, search=settings.search, gpus=gpu_count())
        (work / rs.name).mkdir()
        np.save(work / rs.name / "ref_rows.npy", rs.rows)
        # every output array reserved now: a full disk stops here, before any chunk has run
        ints = entry_dtype(entries_n)
        for name, dtype, rows_n in (("neighbours", ints, n), ("distances", np.float32, n),
                                    ("ref_neighbours", ints, entries_n), ("ref_distances", np.float32, entries_n)):
            create_npy(work / rs.name / f"{name}.npy", dtype=dtype, shape=(draws, rows_n, settings.k))
        own = ref.mode != "all"
        for r, rows in enumerate(rs.rows):
            stored = _stored(work, rs.name, method, r, ref.mode)
            if stored is None and not own:
                continue  # an exact index over the whole dataset: each chunk builds its own
            index, owners = draw_index(image=image, text=text, rows=rows, modality=modality, method=method,
                                       search=settings.search, seed=base.seed + r)
            if stored is not None:
                write_search_index(index, stored)
            if own:
                found = find_neighbours(queries=index.refs, query_owners=owners, index=index, ref_owners=owners,
                                        k=settings.k, max_self=max_self, chunk_size=settings.chunk_size)
                write_rows(work / rs.name / "ref_neighbours.npy", row=r * entries_n, block=found.entries.astype(ints))
                write_rows(work / rs.name / "ref_distances.npy", row=r * entries_n, block=found.distances)
            del index
        records.append({"name": rs.name, "draws": int(draws), "samples": int(m), "entries": int(entries_n),
                        "search": method, "copy_distance": copy_distance, "modality": modality})
    plan = {"params": _index_params(settings, base), "samples": n, "chunks": chunk_plan(n, settings.chunk_size),
            "sets": records}
    write_json(work / PLAN_FILE, plan)
    return plan


def _prepare_saved(emb_dir: Path, work_dir: Path, *, settings: IndexSettings, base: BaseSettings) -> dict[str, Any]:
    """``prepare_index`` with saved references (``clipscrub.saved``): each draw's search index
    over the bundle's entries, their own neighbours copied from it (kd(o) and lid(o) as the saved
    version had them), ``ref_rows`` that are no row of these embeddings (nothing excluded as a
    sample's own entry), and the bundle's score files under ``saved/`` for the score stage."""
    bundle = Path(settings.reference.path)
    meta = read_bundle(bundle)
    check_bundle(meta, k=settings.k, modality=settings.modality, normalize=settings.normalize,
                 model=read_json(require_file(emb_dir / "model.json", param="--embeddings", what="embed output")))
    if settings.search.method == "ivf":
        raise ParamError("ivf: with saved references a draw is searched exact or with hnsw", param="index.search.method")
    image, _, ids = load_embeddings(emb_dir, normalize=settings.normalize)
    n = len(ids)
    work = fresh_work_dir(work_dir, param="index")
    records: list[dict[str, Any]] = []
    for rec in meta["sets"]:
        name = rec["name"]
        entries = np.load(require_file(bundle / name / "entries.npy", param=PARAM, what="saved references"),
                          mmap_mode="r")
        draws, entries_n, dim = entries.shape
        if dim != image.shape[1]:
            raise DataError(f"the embeddings have {image.shape[1]} dimensions, the saved references {dim}", param=PARAM)
        method = "exact" if settings.search.method == "auto" else settings.search.method
        (work / name).mkdir()
        np.save(work / name / "ref_rows.npy", saved_rows(np.load(bundle / name / "ids.npy")))
        for a in ("ref_neighbours", "ref_distances"):
            shutil.copyfile(bundle / name / f"{a}.npy", work / name / f"{a}.npy")
        ints = entry_dtype(entries_n)
        for a, dtype in (("neighbours", ints), ("distances", np.float32)):
            create_npy(work / name / f"{a}.npy", dtype=dtype, shape=(draws, n, settings.k))
        for r in range(draws):
            index = build_search_index(np.ascontiguousarray(entries[r], dtype=np.float32), method=method,
                                       search=settings.search, seed=base.seed + r)
            write_search_index(index, _stored(work, name, method, r, "saved"))
            del index
        records.append({**rec, "search": method, "saved": True})
    (work / SAVED_DIR).mkdir()
    for file in (BUNDLE_FILE, IFOREST_TRAIN, VET_CAPTIONS):
        if (bundle / file).is_file():
            shutil.copyfile(bundle / file, work / SAVED_DIR / file)
    plan = {"params": _index_params(settings, base), "samples": n, "chunks": chunk_plan(n, settings.chunk_size),
            "sets": records}
    write_json(work / PLAN_FILE, plan)
    return plan


def search_index_chunk(
    *, embeddings_dir: str | Path, work_dir: str | Path, settings: IndexSettings, base: BaseSettings,
    start: int, stop: int, buffers: dict[str, np.ndarray] | None = None,
) -> None:
    """Every reference draw's k nearest entries of queries [start, stop), one of the plan's chunks,
    written as rows [:, start:stop] of the set's ``neighbours.npy`` (r, N, K) (``entry_dtype``) and
    ``distances.npy`` float32 in ``work_dir`` (with mode all, of ``ref_neighbours`` /
    ``ref_distances`` too, and with image_text their caption entries' rows [:, N + start:N + stop]),
    then ``chunks/<start>-<stop>.json`` (the sha256 of what it wrote). Depends on no other chunk;
    a rerun writes the same bytes. ``buffers``: the queries are read into these (a dict the caller
    passes to every chunk it runs), not into fresh memory."""
    work = Path(work_dir)
    plan = read_plan(work, params=_index_params(settings, base), stage="index")
    check_chunk(plan, start, stop, param="index.chunk_size")
    image, text, ids = load_embeddings(Path(embeddings_dir), normalize=settings.normalize)
    n = plan["samples"]
    query_rows = np.arange(n, dtype=np.int64)
    every = settings.reference.mode == "all"
    captions = every and settings.modality == "image_text"
    hashes: dict[str, str] = {}
    # each modality's queries of this chunk, read once for every set and draw (the whole
    # dataset as references keeps reading from the files: its caption entries are queries too)
    rows_of = ChunkRows(start, stop, buffers, on_read=require_finite(ids, start))
    for reader in (image, text):  # every row of both checked finite here, whichever sets read them
        rows_of(reader)
    sq_norms: dict[str, np.ndarray] = {}
    for rec in plan["sets"]:
        modality = rec.get("modality", settings.modality)
        queries = query_embeddings(image, text, modality)
        query_sq = None
        if not every:
            queries = rows_of(queries)
            if modality not in sq_norms:  # the queries' norms, for every draw's rounding bound
                sq_norms[modality] = np.einsum("ij,ij->i", queries, queries)
            query_sq = sq_norms[modality]
        max_self = self_entries_per_query(modality)
        ref_rows = np.load(work / rec["name"] / "ref_rows.npy")
        names = ("neighbours", "distances") + (("captions_neighbours", "captions_distances") if captions else ())
        out = {name: np.empty((len(ref_rows), stop - start, settings.k),
                              entry_dtype(rec["entries"]) if "neighbours" in name else np.float32) for name in names}
        draw_owners = []
        for r, rows in enumerate(ref_rows):
            index, owners = draw_index(image=image, text=text, rows=rows, modality=modality,
                                       method=rec["search"], search=settings.search, seed=base.seed + r,
                                       stored=_stored(work, rec["name"], rec["search"], r, settings.reference.mode))
            draw_owners.append(owners)
            common = dict(index=index, ref_owners=owners, k=settings.k, max_self=max_self,
                          chunk_size=min(settings.chunk_size, SEARCH_BATCH))
            if every:
                found = find_neighbours(queries=queries, query_owners=query_rows, start=start, stop=stop, **common)
            else:
                found = find_neighbours(queries=queries, query_owners=query_rows[start:stop], query_sq=query_sq,
                                        **common)
            out["neighbours"][r], out["distances"][r] = found.entries, found.distances
            if captions:
                # the whole dataset as references: the caption entries' own neighbours are
                # searched with the queries of the same rows
                found = find_neighbours(queries=index.refs[n:], query_owners=owners[n:], start=start, stop=stop,
                                        **common)
                out["captions_neighbours"][r], out["captions_distances"][r] = found.entries, found.distances
            del index, found
        set_dir = work / rec["name"]
        # the validation suite's figures for these rows, from the arrays in hand: the reduce
        # validates without reading every neighbour list back
        save_npy(chunk_file(work, start, stop, f"{rec['name']}.checks"), check_neighbours(
            neighbours=out["neighbours"], distances=out["distances"], owners=draw_owners, entries=rec["entries"],
            rows=np.arange(start, stop)))
        for name, arr in out.items():
            caption = name.startswith("captions_")
            a = name.removeprefix("captions_")
            hashes[f"{rec['name']}.{name}"] = hashlib.sha256(arr).hexdigest()
            for r, block in enumerate(arr):
                if not caption:
                    write_rows(set_dir / f"{a}.npy", row=r * n + start, block=block)
                if every:  # the queries are the entries (image, then text-only caption entries)
                    write_rows(set_dir / f"ref_{a}.npy", row=r * rec["entries"] + (n if caption else 0) + start,
                               block=block)
    chunk_mark(work, start, stop).parent.mkdir(exist_ok=True)
    write_json(chunk_mark(work, start, stop), {"start": start, "stop": stop, "sha256": hashes})


def reduce_index(
    *, embeddings_dir: str | Path, work_dir: str | Path, out_dir: str | Path, settings: IndexSettings,
    base: BaseSettings,
) -> dict[str, Any]:
    """The arrays every chunk filled, as the stage's outputs in ``out_dir`` (see the module
    docstring): checked complete, recall measured, validated, and the lineage written, in one
    atomic swap. The arrays are hard-linked, not copied (copied where links fail)."""
    emb_dir, work = Path(embeddings_dir), Path(work_dir)
    plan = read_plan(work, params=_index_params(settings, base), stage="index")
    image, text, ids = load_embeddings(emb_dir, normalize=settings.normalize)
    n = len(ids)
    if n != plan["samples"]:
        raise DataError(f"the embeddings changed since prepare_index ({plan['samples']} samples, now {n}): "
                        f"prepare again", param="--embeddings")
    ref = settings.reference
    trusted = ref.mode == "trusted"
    query_rows = np.arange(n, dtype=np.int64)
    records: list[dict[str, Any]] = []
    tables = []
    for start, stop in plan["chunks"]:
        require_chunk(chunk_mark(work, start, stop), start, stop, stage="index")
    with atomic_dir(out_dir) as tmp:
        for rec in plan["sets"]:
            name, method, entries_n = rec["name"], rec["search"], rec["entries"]
            modality = rec.get("modality", settings.modality)
            queries = query_embeddings(image, text, modality)
            max_self = self_entries_per_query(modality)
            ref_rows = np.load(work / name / "ref_rows.npy")
            draws = len(ref_rows)
            (tmp / name).mkdir()
            np.save(tmp / name / "ref_rows.npy", ref_rows)
            for a in ("neighbours", "distances", "ref_neighbours", "ref_distances"):
                link_or_copy(work / name / f"{a}.npy", tmp / name / f"{a}.npy")
            out = {a: np.load(tmp / name / f"{a}.npy", mmap_mode="r") for a in ("neighbours", "distances")}
            recalls = [1.0] * draws
            if method != "exact":
                for r, rows in enumerate(ref_rows):
                    index, owners = draw_index(image=image, text=text, rows=rows, modality=modality,
                                               method=method, search=settings.search, seed=base.seed + r,
                                               stored=_stored(work, name, method, r, ref.mode))
                    recalls[r] = measure_recall(
                        queries=queries, query_owners=query_rows,
                        found=Neighbours(out["neighbours"][r], out["distances"][r]), index=index, ref_owners=owners,
                        k=settings.k, max_self=max_self, sample=settings.search.recall_sample, seed=base.seed + r)
                    del index
            del out
            records.append({"name": name, "draws": int(draws), "samples": int(rec["samples"]),
                            "entries": int(entries_n), "search": method,
                            "recall_at_k": round(float(np.mean(recalls)), 4),
                            "copy_distance": float(rec.get("copy_distance", 0.0)), "modality": modality,
                            **({"saved": True} if rec.get("saved") else {})})
            checks = np.concatenate([load_chunk(work, a, b, f"{name}.checks", stage="index") for a, b in plan["chunks"]])
            tables += neighbour_check_tables(ids=ids, checks=checks, entries=entries_n, name=f"neighbours_{name}")
        if ref.mode == "saved":
            shutil.copytree(work / SAVED_DIR, tmp / SAVED_DIR)
        write_json(tmp / REFERENCES_FILE, {"sets": records})
        validated = validate("index", tables, docs_dir=docs_dir_for(out_dir, "index"))
        summary = {
            "samples": n,
            "reference_sets": [r["name"] for r in records],
            "draws": sum(r["draws"] for r in records),
            "reference_entries": sum(r["entries"] * r["draws"] for r in records),
            "k": settings.k,
            "search": sorted({r["search"] for r in records}),
            "recall_at_k": round(min(r["recall_at_k"] for r in records), 4),
            # sizes past the dataset become one set of every sample: said, not silent
            **({"sizes_capped": sorted(s for s in ref.sizes if s >= n)}
               if ref.mode == "random" and any(s >= n for s in ref.sizes) else {}),
            # images closer than this are copies, drawn once into a set (0: every sample drawn as it came)
            "copy_distance": float(plan["sets"][0].get("copy_distance", 0.0)) if plan["sets"] else 0.0,
        }
        write_lineage(
            tmp,
            module=__name__,
            stage="index",
            params=_index_params(settings, base),
            inputs={"embeddings": emb_dir, **({"trusted": Path(ref.path)} if trusted else {}),
                    **({"references": Path(ref.path)} if ref.mode == "saved" else {})},
            upstream=[emb_dir],
            summary=summary,
            extra={"validation": validated, "reference_sets": records,
                   **({"saved_from": read_json(work / SAVED_DIR / BUNDLE_FILE)["source"]} if ref.mode == "saved" else {})},
        )
    return summary


def build_index(
    *, embeddings_dir: str | Path, out_dir: str | Path, settings: IndexSettings, base: BaseSettings
) -> dict[str, Any]:
    """Draw the reference sets and find every sample's neighbours in each of their draws: the
    prepare, chunk and reduce pieces in turn, in a work directory beside ``out_dir``."""
    with scratch_work_dir(out_dir) as work:
        common = dict(embeddings_dir=embeddings_dir, work_dir=work, settings=settings, base=base)
        plan = prepare_index(**common)
        progress = track(plan["chunks"], desc="index", unit="chunks")
        buffers: dict[str, np.ndarray] = {}
        for start, stop in progress:
            search_index_chunk(**common, start=start, stop=stop, buffers=buffers)
            progress.count(stop - start, "queries", tick=False)  # shown with the chunk, as it ends
        return reduce_index(**common, out_dir=out_dir)
