"""Reference sets and k-nearest-reference search with faiss.

A *reference entry* is one embedding of one reference sample: its image embedding, its caption
embedding, or both (modality ``image_text``, the paper's CLIP setting). Every entry has an
``owner``: the dataset row of the sample it came from. A query never counts an entry of its own
sample (its own image or its own caption) among its neighbours.

Search: N queries against m sampled references is one large matrix product, so it is always
exact (``IndexFlatL2``). Against the whole dataset, exact search costs N x N; above
``exact_max_entries`` entries an approximate index is built instead (HNSW on the CPU; IVF on a
GPU, where faiss has no HNSW, or above ``hnsw_max_entries``) and its recall@k against exact
search is measured on a sample of queries. faiss-gpu is used whenever a CUDA GPU is visible.
Every candidate faiss proposes is re-ranked with exactly recomputed distances, so results do
not depend on the index's rounding.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import faiss
import numpy as np

from clipscrub.arrays import RowReader
from clipscrub.errors import DataError, ParamError
from clipscrub.io import read_id_list, read_json, require_file

if TYPE_CHECKING:
    from clipscrub.params import SearchSettings

# extra candidates fetched beyond k + self entries, so that the exact re-ranking below (which
# repairs faiss's ||x||^2 + ||y||^2 - 2xy rounding near zero) sees every contender
RERANK_MARGIN = 4

Rows = Union[np.ndarray, RowReader]


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def read_trusted_rows(path: str | Path, ids: np.ndarray) -> np.ndarray:
    """Embedding rows (m,) of the samples a trusted-reference file names, sorted.

    ``path``: a parquet or csv table with an ``id`` column (e.g. a manifest; rows whose
    ``status`` is not ok are skipped), or a text file with one id per line.
    """
    wanted = read_id_list(path, param="index.reference.path", what="trusted reference file")
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids, wanted, sorter=order)
    pos = np.minimum(pos, len(ids) - 1)
    found = ids[order[pos]] == wanted
    if not found.all():
        missing = wanted[~found][:5].tolist()
        raise DataError(
            f"{int((~found).sum())} trusted ids are not embedded samples of this dataset, e.g. {missing}",
            param="index.reference.path",
        )
    return np.sort(order[pos]).astype(np.int64)


def draw_references(
    *, n: int, mode: str, size: int, draws: int, seed: int, trusted_rows: np.ndarray | None = None
) -> np.ndarray:
    """Dataset rows of the reference samples, (draws, m) int64, each row sorted.

    ``random``: ``draws`` independent seeded samples of ``size`` rows without replacement.
    ``trusted``: the given rows, one draw. ``all``: the whole dataset as one draw.
    """
    if mode == "all":
        return np.arange(n, dtype=np.int64)[None, :]
    if mode == "trusted":
        if trusted_rows is None:
            raise ParamError("the trusted mode needs the rows of the trusted samples", param="index.reference.path")
        return np.asarray(trusted_rows, dtype=np.int64)[None, :]
    if size > n:  # reference_sets caps the sizes it asks for; a direct caller may not
        raise ParamError(f"{size} exceeds the dataset size ({n})", param="index.reference.sizes")
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.choice(n, size=size, replace=False)) for _ in range(draws)]).astype(np.int64)


# seeded rows whose nearest-neighbour distances set the scale of index.reference.duplicate_radius,
# searched among at most SCALE_POOL seeded rows (so the cost does not grow with N)
SCALE_SAMPLE = 1000
SCALE_POOL = 16_384


def duplicate_distance(image: Rows, *, n: int, fraction: float, seed: int) -> float:
    """``fraction`` x the median distance from a sample's image embedding to its nearest other
    one: the distance under which two samples count as copies of one another.

    Measured for ``SCALE_SAMPLE`` seeded rows among ``SCALE_POOL`` seeded rows (the whole data
    below that), so it follows the model's own scale and how tightly it packs ordinary
    neighbours, whatever the reference size; a median, so copies (distance 0) shift it only
    once they are most of the data. 0 when ``fraction`` is 0 or the data has under 2 rows.
    """
    if fraction <= 0 or n < 2:
        return 0.0
    rng = np.random.default_rng([seed, 1])
    pool = np.sort(rng.choice(n, size=min(n, SCALE_POOL), replace=False))
    at = np.sort(rng.choice(len(pool), size=min(len(pool), SCALE_SAMPLE), replace=False))  # probes' pool positions
    x = _take(image, pool)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    _, found = index.search(np.ascontiguousarray(x[at]), 2)
    # exact distances to the two candidates, the probe itself left out by position (not by
    # distance: a copy of it is at 0 too)
    d = np.sqrt(((x[at, None, :].astype(np.float64) - x[found].astype(np.float64)) ** 2).sum(-1))
    d[found == at[:, None]] = np.inf
    return fraction * float(np.median(d.min(axis=1)))


def draw_distinct(*, image: Rows, n: int, size: int, rng: np.random.Generator, radius: float) -> np.ndarray:
    """``size`` seeded rows (sorted), no two of whose image embeddings lie within ``radius``.

    Candidates come in a seeded random order (at most 4 x size of them); each is kept unless an
    earlier kept candidate is within ``radius``. A group of copies (one image re-posted, a
    trigger the model collapsed) thus enters a reference set once, however large it is, so its
    members are measured against the rest of the data, not against each other. Where the
    candidates hold fewer than ``size`` distinct rows, the rejected ones farthest from every kept
    row fill the set (near neighbours before copies; ties in draw order).
    """
    pool = rng.choice(n, size=min(n, 4 * size), replace=False)
    vectors = _take(image, pool)
    kept_index = faiss.IndexFlatL2(vectors.shape[1])
    keep = np.zeros(len(pool), dtype=bool)
    r2 = np.float32(radius) ** 2
    block = 1024
    for start in range(0, len(pool), block):
        x = np.ascontiguousarray(vectors[start : start + block])
        near_kept = np.zeros(len(x), dtype=bool)
        if kept_index.ntotal:
            lims, _, _ = kept_index.range_search(x, r2)
            near_kept = np.diff(lims) > 0
        # within the block, in draw order: a candidate yields to an earlier one that is kept
        within = faiss.IndexFlatL2(x.shape[1])
        within.add(x)
        lims, _, found = within.range_search(x, r2)
        ok = ~near_kept
        for i in np.flatnonzero(ok):
            nb = found[lims[i] : lims[i + 1]]
            if ok[nb[nb < i]].any():
                ok[i] = False
        keep[start : start + len(x)] = ok
        kept_index.add(x[ok])
        if keep.sum() >= size:
            break
    chosen = np.flatnonzero(keep)[:size]
    if len(chosen) < size:
        rejected = np.flatnonzero(~keep)
        gap, _ = kept_index.search(np.ascontiguousarray(vectors[rejected]), 1)
        # exact copies (distance 0, up to rounding) last: the set is filled with what it lacks most
        order = np.lexsort((np.arange(len(rejected)), -np.round(gap[:, 0] / r2, 6)))
        chosen = np.concatenate([chosen, rejected[order[: size - len(chosen)]]])
    return np.sort(pool[chosen]).astype(np.int64)


@dataclass(frozen=True)
class ReferenceSet:
    """One reference setting: ``name`` (``m256``, ``trusted``, ``all``; ``t256`` for a caption
    set), its draws' dataset rows (draws, m), and the modality its queries and entries use where
    it is not ``index.modality``'s (``text`` for a caption set)."""

    name: str
    rows: np.ndarray
    modality: str | None = None


def caption_set(sets: list[ReferenceSet]) -> ReferenceSet:
    """The caption view of random sets: the smallest set's draws, searched caption against caption
    (``t<m>``). The smallest because a target caption stays sparse there at the highest poison
    rate (a set must hold fewer than about k of it)."""
    smallest = min(sets, key=lambda rs: rs.rows.shape[1])
    return ReferenceSet(f"t{smallest.rows.shape[1]}", smallest.rows, "text")


def reference_sets(
    *, n: int, mode: str, sizes: list[int], draws: int, seed: int, trusted_rows: np.ndarray | None = None,
    image: Rows | None = None, copy_distance: float = 0.0,
) -> list[ReferenceSet]:
    """The reference sets to search: in ``random`` mode one per size (capped at ``n``; sizes
    that cap to the same m are one set), each with ``draws`` seeded draws; else one set.

    ``copy_distance`` > 0 (random mode, with the ``image`` embeddings (N, d)): each draw holds
    distinct samples (``draw_distinct``), images closer than that (``duplicate_distance``)
    counted once.
    """
    if mode != "random":
        rows = draw_references(n=n, mode=mode, size=n, draws=1, seed=seed, trusted_rows=trusted_rows)
        return [ReferenceSet(mode, rows)]
    radius = copy_distance if image is not None else 0.0
    out = []
    for m in sorted({min(s, n) for s in sizes}):
        # a size's draws do not depend on which other sizes are listed
        set_seed = int(np.random.SeedSequence([seed, m]).generate_state(1)[0])
        if radius > 0 and m < n:
            rng = np.random.default_rng(set_seed)
            rows = np.stack([draw_distinct(image=image, n=n, size=m, rng=rng, radius=radius) for _ in range(draws)])
        else:
            rows = draw_references(n=n, mode=mode, size=m, draws=draws if m < n else 1, seed=set_seed)
        out.append(ReferenceSet(f"m{m}", rows))
    return out


def forest_rows(ref_rows: list[np.ndarray]) -> np.ndarray:
    """The embedding rows (n,) the isolation forest is fitted on: every reference sample of every
    set's draws (``ref_rows``: per set (draws, m)), once each, ascending."""
    return np.unique(np.concatenate([r.reshape(-1) for r in ref_rows]))


def query_embeddings(image: Rows, text: Rows, modality: str) -> Rows:
    """The query of each sample: its caption embedding for ``text``, else its image embedding."""
    return text if modality == "text" else image


def _take(rows_of: Rows, rows: np.ndarray) -> np.ndarray:
    if isinstance(rows_of, RowReader):
        return rows_of.take(rows)
    return np.ascontiguousarray(rows_of[rows], dtype=np.float32)


def _read(rows_of: Rows, start: int, stop: int) -> np.ndarray:
    if isinstance(rows_of, RowReader):
        return rows_of.read(start, stop)
    return np.ascontiguousarray(rows_of[start:stop], dtype=np.float32)


def reference_entries(image: Rows, text: Rows, rows: np.ndarray, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """Entry vectors (R, d) float32 and owners (R,) for reference rows (m,).

    ``image_text`` lays out the m image entries first, then the m caption entries (R = 2m).
    """
    if modality == "image":
        return _take(image, rows), entry_owners(rows, modality)
    if modality == "text":
        return _take(text, rows), entry_owners(rows, modality)
    return np.concatenate([_take(image, rows), _take(text, rows)]), entry_owners(rows, modality)


def entry_owners(rows: np.ndarray, modality: str) -> np.ndarray:
    """The dataset row (R,) each reference entry belongs to, for reference rows (m,)."""
    return np.concatenate([rows, rows]) if modality == "image_text" else np.asarray(rows)


def entry_dtype(entries: int) -> np.dtype:
    """The dtype of stored neighbour entries for a draw of ``entries`` entries: int32 where it can
    index them all (half the bytes of the (r, N, K) lists to write, hash and read back), else int64."""
    return np.dtype(np.int32) if entries <= np.iinfo(np.int32).max else np.dtype(np.int64)


def self_entries_per_query(modality: str) -> int:
    return 2 if modality == "image_text" else 1


def choose_method(*, mode: str, entries: int, search: "SearchSettings", gpus: int) -> str:
    """``exact``, ``hnsw`` or ``ivf`` for a reference set of ``entries`` entries."""
    if search.method != "auto":
        return search.method
    if mode != "all" or entries <= search.exact_max_entries:
        return "exact"
    return "ivf" if gpus > 0 or entries > search.hnsw_max_entries else "hnsw"


@dataclass
class SearchIndex:
    """A faiss index over the reference entries, and a CPU flat index holding them (R, d).

    ``flat`` recomputes candidate distances exactly (``compute_distance_subset``: direct sums of
    squared differences, so duplicates are at exactly 0); ``refs`` is a view of its vectors.
    """

    index: faiss.Index
    flat: faiss.IndexFlat
    method: str

    @property
    def refs(self) -> np.ndarray:
        return faiss.rev_swig_ptr(self.flat.get_xb(), self.flat.ntotal * self.flat.d).reshape(self.flat.ntotal, self.flat.d)


def _to_gpu(index: faiss.Index) -> faiss.Index:
    """A copy of ``index`` on every visible GPU; ``index`` itself on a machine without one."""
    return faiss.index_cpu_to_all_gpus(index) if gpu_count() > 0 else index


def build_search_index(refs: np.ndarray, *, method: str, search: "SearchSettings", seed: int) -> SearchIndex:
    """Index reference entries (R, d) float32 for k-NN search with ``method``."""
    r_n, dim = refs.shape
    if method == "hnsw":
        # IndexHNSWFlat keeps its vectors in a flat storage index: use it, do not hold them twice
        index = faiss.IndexHNSWFlat(dim, search.hnsw_m)
        index.hnsw.efConstruction = search.ef_construction
        threads = faiss.omp_get_max_threads()
        if search.deterministic_build:
            # a multi-threaded build links entries in a racy order: same recall, different bytes
            faiss.omp_set_num_threads(1)
        try:
            index.add(refs)
        finally:
            faiss.omp_set_num_threads(threads)
        index.hnsw.efSearch = search.ef_search
        return SearchIndex(index, faiss.downcast_index(index.storage), method)
    flat = faiss.IndexFlatL2(dim)
    flat.add(refs)
    if method == "exact":
        return SearchIndex(_to_gpu(flat), flat, method)
    nlist = search.nlist or max(1, min(r_n // 39, int(4 * np.sqrt(r_n))))
    quantizer = faiss.IndexFlatL2(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist)
    index.cp.seed = seed
    # faiss warns below 39 training points per centroid and gains little above 256
    train_n = min(r_n, 256 * nlist)
    train = refs[np.sort(np.random.default_rng(seed).choice(r_n, size=train_n, replace=False))]
    index.train(train)
    index.add(refs)
    index.nprobe = min(search.nprobe, nlist)
    return SearchIndex(_to_gpu(index), flat, method)


# indexes whose build is costly (and, for IVF's multi-threaded k-means, need not repeat bit for
# bit): built once per draw and stored in faiss's own format for every chunk of queries to read
STORED_METHODS = ("hnsw", "ivf")


def write_search_index(index: SearchIndex, path: Path) -> None:
    """Store a draw's index for ``draw_index`` (written under a temporary name, then renamed): an
    exact one as its flat CPU index of the entries."""
    path = Path(path)
    if index.method == "exact":
        cpu = index.flat
    else:
        cpu = index.index if index.method == "hnsw" or gpu_count() == 0 else faiss.index_gpu_to_cpu(index.index)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        faiss.write_index(cpu, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def draw_index(*, image: Rows, text: Rows, rows: np.ndarray, modality: str, method: str, search: "SearchSettings",
               seed: int, stored: Path | None = None) -> tuple[SearchIndex, np.ndarray]:
    """One draw's search index over the entries of reference rows (m,), and the entries' owners (R,).

    The index is read from ``stored`` when given (``write_search_index``), else built from the
    embeddings (an exact one is the same either way).
    """
    if stored is not None and method == "exact":
        flat = faiss.read_index(str(stored))
        return SearchIndex(_to_gpu(flat), flat, method), entry_owners(rows, modality)
    if stored is not None and method == "hnsw":
        index = faiss.read_index(str(stored))
        return SearchIndex(index, faiss.downcast_index(index.storage), method), entry_owners(rows, modality)
    refs, owners = reference_entries(image, text, rows, modality)
    if stored is not None and method == "ivf":
        flat = faiss.IndexFlatL2(refs.shape[1])
        flat.add(refs)
        return SearchIndex(_to_gpu(faiss.read_index(str(stored))), flat, method), owners
    return build_search_index(refs, method=method, search=search, seed=seed), owners


@dataclass
class Neighbours:
    """k nearest reference entries per query: ``entries`` (Q, k) int64, ``distances`` (Q, k) float32.

    Sorted by (distance, entry index); distances are Euclidean.
    """

    entries: np.ndarray
    distances: np.ndarray


def find_neighbours(
    *,
    queries: Rows,
    query_owners: np.ndarray,
    index: SearchIndex,
    ref_owners: np.ndarray,
    k: int,
    max_self: int,
    chunk_size: int = 65536,
    start: int = 0,
    stop: int | None = None,
    query_sq: np.ndarray | None = None,
) -> Neighbours:
    """k nearest reference entries of queries [start, stop) (default: all), excluding entries each owns.

    queries (Q, d) (an array or a RowReader, read ``chunk_size`` rows at a time from ``start``),
    query_owners (Q,), ref_owners (R,); ``query_sq`` (Q,) the queries' squared norms, where the
    caller searches the same queries against several indexes (computed here otherwise). faiss proposes k + max_self + margin candidates; their
    distances are recomputed directly from the differences (duplicates at exactly 0, no
    cancellation) and ties broken by entry index. With an exact or hnsw index a query's result
    depends only on the query and the index, not on which other queries share its call nor on the
    thread count (faiss's BLAS distances do: they only propose candidates, and a list is widened
    until it holds every entry that could rank among the k).
    """
    lo, hi = start, len(queries) if stop is None else stop
    r_n = index.flat.ntotal
    if k + max_self > r_n:
        raise ParamError(f"k ({k}) leaves too few reference entries ({r_n}) to choose from", param="index.k")
    cand = min(r_n, k + max_self + RERANK_MARGIN)
    ef = index.index.hnsw.efSearch if index.method == "hnsw" else None
    # how far faiss's float32 ||x||^2 + ||y||^2 - 2xy can be off: a few ulps of the norms involved
    ref_sq_max = float(np.einsum("ij,ij->i", index.refs, index.refs).max()) if r_n else 0.0
    out_e = np.empty((hi - lo, k), dtype=np.int64)
    out_d = np.empty((hi - lo, k), dtype=np.float32)
    try:
        for first in range(lo, hi, chunk_size):
            q32 = _read(queries, first, min(hi, first + chunk_size))
            owners = query_owners[first : first + len(q32)]
            at = first - lo
            sq_q = np.einsum("ij,ij->i", q32, q32) if query_sq is None else query_sq[first : first + len(q32)]
            slack = BLAS_ULPS * np.finfo(np.float32).eps * (sq_q + ref_sq_max)
            rows = np.arange(len(q32))
            c = cand
            while len(rows):
                again = []
                # a widened search holds (rows, c) results: batch it so memory stays bounded
                step = max(1, WIDEN_BUDGET // c) if c > cand else len(rows)
                for b in range(0, len(rows), step):
                    sub = rows[b : b + step]
                    whole = len(sub) == len(q32)  # the first pass: no copy of the chunk
                    e, d, widen = _search_rerank(index, q32 if whole else q32[sub], c, ref_owners,
                                                 owners if whole else owners[sub], k, slack[sub], ef)
                    out_e[at + sub], out_d[at + sub] = e, d
                    again.append(sub[widen])
                # faiss's list ended inside the rounding band around the k-th distance: entries past
                # it may be nearer than the ones kept (a tight cluster); search those rows wider
                rows = np.concatenate(again) if c < r_n else rows[:0]
                c = min(r_n, 4 * c)
    finally:
        if ef is not None:
            index.index.hnsw.efSearch = ef
    return Neighbours(out_e, out_d)


# faiss's squared distances from the BLAS formula err by about eps x (||x||^2 + ||y||^2); a
# candidate list is trusted only if it reaches this many such errors beyond the k-th distance
BLAS_ULPS = 16
# candidates held at once by a widened search (rows x candidates), about 400 MB of results
WIDEN_BUDGET = 1 << 25


def _search_rerank(index: SearchIndex, q32: np.ndarray, cand: int, ref_owners: np.ndarray, owners: np.ndarray, k: int,
                   slack: np.ndarray, ef: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``cand`` faiss candidates per query (Q, d), re-ranked exactly; returns entries (Q, k),
    distances (Q, k) and whether each query's candidate list may have stopped short (Q,)."""
    q32 = np.ascontiguousarray(q32)
    if ef is not None:
        index.index.hnsw.efSearch = max(ef, cand)
    approx, idx = index.index.search(q32, cand)
    sq = np.empty(idx.shape, dtype=np.float32)
    safe = np.ascontiguousarray(np.maximum(idx, 0))  # faiss pads with -1 when it finds fewer
    index.flat.compute_distance_subset(len(q32), faiss.swig_ptr(q32), cand, faiss.swig_ptr(sq), faiss.swig_ptr(safe))
    e, d = _rerank(idx, safe, sq, ref_owners, owners, k)
    last = approx[:, -1].astype(np.float64)
    kth = d[:, -1].astype(np.float64)
    # k entries at exactly 0 (duplicates, e.g. a placeholder image copied thousands of times):
    # nothing can be nearer, so the list is complete however many more copies there are
    widen = (idx[:, -1] >= 0) & (kth > 0) & (last <= kth**2 + 2 * slack)
    return e, d, widen


def _rerank(idx: np.ndarray, safe: np.ndarray, sq: np.ndarray, ref_owners: np.ndarray, owners: np.ndarray, k: int):
    """Drop own and padding candidates, order by (exact distance, entry index), keep k.

    idx (Q, c) faiss's candidates (-1 = padding), safe (Q, c) the same with padding at 0,
    sq (Q, c) their exact squared distances (float32, >= 0).
    """
    bad = (ref_owners[safe] == owners[:, None]) | (idx < 0)
    if len(ref_owners) < 1 << 32:
        # one sort of (distance bits, entry) packed in a uint64: the bits of a float32 >= 0 order
        # as the floats do, and sqrt is monotonic, so this is the (distance, entry) order
        bits = np.where(bad, INF_BITS, sq.view(np.uint32)).astype(np.uint64)
        key = np.sort((bits << np.uint64(32)) | safe.astype(np.uint64), axis=1)[:, :k]
        sq_k = (key >> np.uint64(32)).astype(np.uint32)
        if (sq_k == INF_BITS).any():
            raise ParamError("fewer than k reference entries remain after excluding the query's own", param="index.k")
        dist_k = np.sqrt(sq_k.view(np.float32).astype(np.float64)).astype(np.float32)
        return (key & np.uint64(0xFFFFFFFF)).astype(np.int64), dist_k
    dist = np.sqrt(sq.astype(np.float64))
    dist[bad] = np.inf
    # sort by (distance, entry index): order by index first, then a stable sort by distance
    by_idx = np.argsort(idx, axis=1, kind="stable")
    idx = np.take_along_axis(idx, by_idx, 1)
    dist = np.take_along_axis(dist, by_idx, 1)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    dist_k = np.take_along_axis(dist, order, 1)
    if not np.isfinite(dist_k).all():
        raise ParamError("fewer than k reference entries remain after excluding the query's own", param="index.k")
    return np.take_along_axis(idx, order, 1), dist_k.astype(np.float32)


INF_BITS = np.float32(np.inf).view(np.uint32)


def measure_recall(
    *,
    queries: Rows,
    query_owners: np.ndarray,
    found: Neighbours,
    index: SearchIndex,
    ref_owners: np.ndarray,
    k: int,
    max_self: int,
    sample: int,
    seed: int,
) -> float:
    """recall@k of ``found`` against exact search, on ``sample`` seeded queries (1.0 if exact)."""
    if index.method == "exact":
        return 1.0
    q_n = len(queries)
    rows = np.sort(np.random.default_rng(seed).choice(q_n, size=min(sample, q_n), replace=False))
    exact = find_neighbours(
        queries=_take(queries, rows), query_owners=query_owners[rows],
        index=SearchIndex(index.flat, index.flat, "exact"),  # brute force over the same vectors
        ref_owners=ref_owners, k=k, max_self=max_self,
    )
    approx = found.entries[rows]
    hits = (approx[:, :, None] == exact.entries[:, None, :]).any(axis=2).sum()
    return float(hits) / approx.size


@dataclass
class DrawNeighbours:
    """One reference draw searched: the queries' neighbours (N, k), the reference entries' own
    neighbours within the draw (R, k), the search method and its measured recall@k."""

    queries: Neighbours
    references: Neighbours
    method: str
    recall: float


def search_draw(
    *,
    image: Rows,
    text: Rows,
    rows: np.ndarray,
    modality: str,
    mode: str,
    k: int,
    search: "SearchSettings",
    seed: int,
    chunk_size: int = 65536,
) -> DrawNeighbours:
    """Every sample's k nearest entries among the reference rows (m,), and the entries' own.

    image, text (N, d); the query of each sample is ``query_embeddings``'s. With the whole dataset
    as references (``mode`` all), the image entries (or, text-only, the caption entries) are the
    queries themselves, with the same owners, so their search is not repeated.
    """
    n = len(image)
    queries = query_embeddings(image, text, modality)
    max_self = self_entries_per_query(modality)
    refs, owners = reference_entries(image, text, rows, modality)
    method = choose_method(mode=mode, entries=len(refs), search=search, gpus=gpu_count())
    index = build_search_index(refs, method=method, search=search, seed=seed)
    del refs  # the index holds the entries
    common = dict(index=index, ref_owners=owners, k=k, max_self=max_self, chunk_size=chunk_size)
    all_rows = np.arange(n, dtype=np.int64)
    q = find_neighbours(queries=queries, query_owners=all_rows, **common)
    recall = measure_recall(queries=queries, query_owners=all_rows, found=q, index=index, ref_owners=owners, k=k,
                            max_self=max_self, sample=search.recall_sample, seed=seed)
    if mode != "all":
        ref = find_neighbours(queries=index.refs, query_owners=owners, **common)
    elif modality != "image_text":
        ref = q
    else:
        captions = find_neighbours(queries=index.refs[n:], query_owners=owners[n:], **common)
        ref = Neighbours(np.concatenate([q.entries, captions.entries]), np.concatenate([q.distances, captions.distances]))
    return DrawNeighbours(q, ref, method, recall)


# ------------------------------------------------------------------ the index stage's output
REFERENCES_FILE = "references.json"
ARRAYS = ("ref_rows", "neighbours", "distances", "ref_neighbours", "ref_distances")


def read_reference_sets(index_dir: Path) -> list[dict[str, Any]]:
    """The index stage's reference sets, in order: name, draws, samples, entries, search."""
    return read_json(require_file(index_dir / REFERENCES_FILE, param="--index", what="index"))["sets"]


def load_reference_set(index_dir: Path, name: str) -> dict[str, np.ndarray]:
    """One set's arrays (``ARRAYS``), memory-mapped."""
    return {a: np.load(require_file(index_dir / name / f"{a}.npy", param="--index", what="index"), mmap_mode="r")
            for a in ARRAYS}
