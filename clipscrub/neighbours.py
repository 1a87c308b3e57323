"""Reference sets and exact k-nearest-reference search with faiss.

A *reference entry* is one embedding of one reference sample: its image embedding, its caption
embedding, or both (modality ``image_text``, the paper's CLIP setting). Every entry has an
``owner``: the dataset row of the sample it came from. A query never counts an entry of its own
sample (its own image or its own caption) among its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from clipscrub.errors import ParamError

# extra candidates fetched beyond k + self entries, so that the exact float64 re-ranking below
# (which repairs faiss's ||x||^2 + ||y||^2 - 2xy rounding near zero) sees every contender
RERANK_MARGIN = 8
RERANK_BLOCK = 2048


def draw_references(*, n: int, mode: str, size: int, draws: int, seed: int) -> np.ndarray:
    """Dataset rows of the reference samples, (draws, m) int64, each row sorted.

    ``random``: ``draws`` independent seeded samples of ``size`` rows without replacement.
    ``all``: the whole dataset as one draw (``size`` and ``draws`` do not apply).
    """
    if mode == "all":
        return np.arange(n, dtype=np.int64)[None, :]
    if size > n:
        raise ParamError(
            f"{size} exceeds the dataset size ({n}); lower it or use index.reference.mode: all",
            param="index.reference.size",
        )
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.choice(n, size=size, replace=False)) for _ in range(draws)]).astype(np.int64)


def query_embeddings(image: np.ndarray, text: np.ndarray, modality: str) -> np.ndarray:
    """The query of each sample: its caption embedding for ``text``, else its image embedding."""
    return text if modality == "text" else image


def reference_entries(
    image: np.ndarray, text: np.ndarray, rows: np.ndarray, modality: str
) -> tuple[np.ndarray, np.ndarray]:
    """Entry vectors (R, d) and owners (R,) for reference rows (m,).

    ``image_text`` lays out the m image entries first, then the m caption entries (R = 2m).
    """
    if modality == "image":
        return image[rows], rows
    if modality == "text":
        return text[rows], rows
    return np.concatenate([image[rows], text[rows]]), np.concatenate([rows, rows])


def self_entries_per_query(modality: str) -> int:
    return 2 if modality == "image_text" else 1


def _make_index(d: int) -> faiss.Index:
    index = faiss.IndexFlatL2(d)
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)  # faiss-gpu: used whenever a GPU is present
    return index


@dataclass
class Neighbours:
    """k nearest reference entries per query: ``entries`` (Q, k) int64, ``distances`` (Q, k) float32.

    Sorted by (distance, entry index); distances are Euclidean.
    """

    entries: np.ndarray
    distances: np.ndarray


def find_neighbours(
    *,
    queries: np.ndarray,
    query_owners: np.ndarray,
    refs: np.ndarray,
    ref_owners: np.ndarray,
    k: int,
    max_self: int,
    chunk_size: int = 65536,
) -> Neighbours:
    """Exact k nearest reference entries of each query, excluding entries it owns.

    queries (Q, d), query_owners (Q,), refs (R, d), ref_owners (R,). faiss's exact L2 search
    proposes k + max_self + margin candidates; their distances are recomputed exactly (float64
    accumulation of differences, so duplicates are at exactly 0) and ties broken by entry index.
    """
    q_n, dim = queries.shape
    r_n = refs.shape[0]
    if k + max_self > r_n:
        raise ParamError(f"k ({k}) leaves too few reference entries ({r_n}) to choose from", param="index.k")
    refs32 = np.ascontiguousarray(refs, dtype=np.float32)
    index = _make_index(dim)
    index.add(refs32)
    cand = min(r_n, k + max_self + RERANK_MARGIN)
    out_e = np.empty((q_n, k), dtype=np.int64)
    out_d = np.empty((q_n, k), dtype=np.float32)
    for start in range(0, q_n, chunk_size):
        stop = min(q_n, start + chunk_size)
        q32 = np.ascontiguousarray(queries[start:stop], dtype=np.float32)
        _, idx = index.search(q32, cand)
        for b in range(0, stop - start, RERANK_BLOCK):
            sl = slice(b, min(stop - start, b + RERANK_BLOCK))
            e, d = _rerank(q32[sl], idx[sl], refs32, ref_owners, query_owners[start:stop][sl], k)
            out_e[start + sl.start : start + sl.stop] = e
            out_d[start + sl.start : start + sl.stop] = d
    return Neighbours(out_e, out_d)


def _rerank(q: np.ndarray, idx: np.ndarray, refs: np.ndarray, ref_owners: np.ndarray, owners: np.ndarray, k: int):
    diff = q[:, None, :].astype(np.float64) - refs[idx]  # (b, c, d) float64: exact zero for duplicates
    dist = np.sqrt(np.einsum("bcd,bcd->bc", diff, diff))
    dist[ref_owners[idx] == owners[:, None]] = np.inf
    dist[idx < 0] = np.inf
    # sort by (distance, entry index): order by index first, then a stable sort by distance
    by_idx = np.argsort(idx, axis=1, kind="stable")
    idx = np.take_along_axis(idx, by_idx, 1)
    dist = np.take_along_axis(dist, by_idx, 1)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    dist_k = np.take_along_axis(dist, order, 1)
    if not np.isfinite(dist_k).all():
        raise ParamError("fewer than k reference entries remain after excluding the query's own", param="index.k")
    return np.take_along_axis(idx, order, 1), dist_k.astype(np.float32)
