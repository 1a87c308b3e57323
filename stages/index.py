"""Stage 4, index: reference sets and each sample's k nearest reference entries (faiss).

Writes, for r reference draws, R reference entries per draw and K = ``index.k`` neighbours:
- ``ref_rows.npy`` (r, m) int64: embedding rows of the reference samples;
- ``neighbours.npy`` (r, N, K) int64 and ``distances.npy`` (r, N, K) float32: each sample's
  nearest entries (indices into the draw's entries, laid out as ``reference_entries`` does);
- ``ref_neighbours.npy`` / ``ref_distances.npy`` (r, R, K): the same for the entries themselves,
  within the reference set, from which kd(o) and lid(o) are computed.

Memory is bounded by one chunk of queries, the reference entries with their faiss index, and
the (N, K) results: embeddings are read chunk by chunk, never mapped whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clipscrub.arrays import RowReader
from clipscrub.errors import DataError
from clipscrub.io import atomic_dir, require_file, write_lineage
from clipscrub.neighbours import (
    Neighbours,
    build_search_index,
    choose_method,
    draw_references,
    entry_owners,
    find_neighbours,
    gpu_count,
    measure_recall,
    query_embeddings,
    read_trusted_rows,
    reference_entries,
    self_entries_per_query,
)
from clipscrub.params import BaseSettings, IndexSettings
from clipscrub.validation import docs_dir_for, neighbour_tables, validate


def load_embeddings(emb_dir: Path, *, chunk_size: int = 65536) -> tuple[RowReader, RowReader, np.ndarray]:
    """(image (N, d), text (N, d), ids (N,)) of the embed stage's output, checked chunk by chunk:
    equal shapes, finite values."""
    image, text = (
        RowReader(require_file(emb_dir / f"{name}.npy", param="--embeddings", what="embeddings")) for name in ("image", "text")
    )
    ids = np.load(require_file(emb_dir / "ids.npy", param="--embeddings", what="embeddings"))
    if len(ids) == 0:
        raise DataError("the embeddings are empty", param="--embeddings")
    if image.shape != text.shape or len(image) != len(ids):
        raise DataError(
            f"image {image.shape}, text {text.shape} and ids ({len(ids)},) embeddings disagree", param="--embeddings"
        )
    for name, reader in (("image", image), ("text", text)):
        bad = np.concatenate([~np.isfinite(rows).all(axis=1) for _, rows in reader.chunks(chunk_size)])
        if bad.any():
            raise DataError(
                f"{int(bad.sum())} {name} embeddings are not finite, e.g. ids {ids[bad][:5].tolist()}",
                param="--embeddings",
            )
    return image, text, ids


def build_index(
    *, embeddings_dir: str | Path, out_dir: str | Path, settings: IndexSettings, base: BaseSettings
) -> dict[str, Any]:
    """Draw the reference sets and find every sample's neighbours in them."""
    emb_dir = Path(embeddings_dir)
    image, text, ids = load_embeddings(emb_dir, chunk_size=settings.chunk_size)
    n = len(ids)
    ref = settings.reference
    trusted = read_trusted_rows(ref.path, ids) if ref.mode == "trusted" else None
    ref_rows = draw_references(n=n, mode=ref.mode, size=ref.size, draws=ref.draws, seed=base.seed, trusted_rows=trusted)
    queries = query_embeddings(image, text, settings.modality)
    max_self = self_entries_per_query(settings.modality)
    entries_n = ref_rows.shape[1] * max_self
    if settings.k + max_self > entries_n:
        raise DataError(f"k ({settings.k}) needs more reference entries than {entries_n}", param="index.k")
    method = choose_method(mode=ref.mode, entries=entries_n, search=settings.search, gpus=gpu_count())
    all_rows = np.arange(n, dtype=np.int64)
    draws, m = ref_rows.shape
    recalls: list[float] = []
    with atomic_dir(out_dir) as tmp:
        np.save(tmp / "ref_rows.npy", ref_rows)
        out = {
            name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
            for name, dtype, shape in (
                ("neighbours", np.int64, (draws, n, settings.k)),
                ("distances", np.float32, (draws, n, settings.k)),
                ("ref_neighbours", np.int64, (draws, entries_n, settings.k)),
                ("ref_distances", np.float32, (draws, entries_n, settings.k)),
            )
        }
        for r, rows in enumerate(ref_rows):
            refs, owners = reference_entries(image, text, rows, settings.modality)
            index = build_search_index(refs, method=method, search=settings.search, seed=base.seed + r)
            del refs  # the index holds the entries
            search = dict(index=index, ref_owners=owners, k=settings.k, max_self=max_self, chunk_size=settings.chunk_size)
            q = find_neighbours(queries=queries, query_owners=all_rows, **search)
            out["neighbours"][r], out["distances"][r] = q.entries, q.distances
            recalls.append(measure_recall(
                queries=queries, query_owners=all_rows, found=q, index=index, ref_owners=owners,
                k=settings.k, max_self=max_self, sample=settings.search.recall_sample, seed=base.seed + r,
            ))
            ref_nb = _reference_neighbours(q, index=index, owners=owners, modality=settings.modality, mode=ref.mode,
                                           search=search, n=n)
            out["ref_neighbours"][r], out["ref_distances"][r] = ref_nb.entries, ref_nb.distances
            del index, q, ref_nb
        for arr in out.values():
            arr.flush()
        del out
        validated = validate("index", neighbour_tables(
            ids=ids, neighbours=np.load(tmp / "neighbours.npy", mmap_mode="r"),
            distances=np.load(tmp / "distances.npy", mmap_mode="r"),
            owners=[entry_owners(rows, settings.modality) for rows in ref_rows], entries=entries_n,
            chunk_size=settings.chunk_size,
        ), docs_dir=docs_dir_for(out_dir, "index"))
        summary = {
            "samples": n,
            "draws": int(draws),
            "reference_samples": int(m),
            "reference_entries": int(entries_n),
            "k": settings.k,
            "search": method,
            "recall_at_k": round(float(np.mean(recalls)), 4),
        }
        write_lineage(
            tmp,
            stage="index",
            params={"base": base.model_dump(mode="json"), "index": settings.model_dump(mode="json")},
            inputs={"embeddings": emb_dir, **({"trusted": Path(ref.path)} if trusted is not None else {})},
            upstream=[emb_dir],
            summary=summary,
            extra={"validation": validated},
        )
    return summary


def _reference_neighbours(q: Neighbours, *, index, owners: np.ndarray, modality: str, mode: str, search: dict, n: int) -> Neighbours:
    """Neighbours of the reference entries within the reference set.

    With the whole dataset as references, the image entries (or, text-only, the caption entries)
    are the queries themselves, with the same owners: their search is not repeated.
    """
    if mode != "all":
        return find_neighbours(queries=index.refs, query_owners=owners, **search)
    if modality != "image_text":
        return q
    captions = find_neighbours(queries=index.refs[n:], query_owners=owners[n:], **search)
    return Neighbours(np.concatenate([q.entries, captions.entries]), np.concatenate([q.distances, captions.distances]))
