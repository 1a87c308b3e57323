"""Local outlier scores from neighbour lists (METHOD.md), vectorised over samples.

Notation: for a query x, ``dist`` holds the distances d_1 <= ... <= d_K to its nearest reference
entries and ``entries`` their indices; kd(x) = d_k. kd(o) and lid(o) of a reference entry o are
computed within the reference set (its own neighbours, its own sample excluded).

Guards (the formulas divide by and take logs of distances that can be 0 for duplicates):
every distance used in a ratio or a log is shifted by ``EPS``, and the LID denominator
``-sum ln(d_i / d_k)`` is floored at ``EPS`` (all k distances equal gives a large, finite LID).
Higher score = more likely poisoned, except ``clip`` (cosine of image and caption: lower is
more suspicious).
"""

from __future__ import annotations

import math
import os

import numpy as np

from clipscrub.arrays import unit_rows

EPS = 1e-12
# the detectors computed from the neighbour lists (the rest from the embeddings)
DENSITY = ("kdist", "slof", "dao", "lid")


def k_distance(dist: np.ndarray, k: int) -> np.ndarray:
    """kd(x) = distance to the k-th nearest reference. dist (N, K>=k) -> (N,)."""
    return dist[:, k - 1].astype(np.float64)


def lid_mle(dist: np.ndarray, k: int) -> np.ndarray:
    """Maximum-likelihood LID over the k nearest distances: -k / sum_i ln(d_i / d_k). (N, K) -> (N,)."""
    d = dist[:, :k].astype(np.float64) + EPS
    s = np.log(d / d[:, k - 1 : k]).sum(axis=1)
    return -k / np.minimum(s, -EPS)


def density_ratios(kd_x: np.ndarray, kd_ref: np.ndarray, entries: np.ndarray, k: int) -> np.ndarray:
    """kd(x) / kd(o) for each of the k nearest entries o of each query (EPS-shifted), the ratio
    SLOF averages and DAO takes the log of. kd_x (N,), kd_ref (R,), entries (N, K) -> (N, k)."""
    return (kd_x[:, None] + EPS) / (kd_ref[entries[:, :k]] + EPS)


def slof(kd_x: np.ndarray, kd_ref: np.ndarray, entries: np.ndarray, k: int, *, ratios: np.ndarray | None = None
         ) -> np.ndarray:
    """Simplified LOF: mean over o in N_k(x) of kd(x) / kd(o).

    kd_x (N,), kd_ref (R,), entries (N, K) -> (N,); ``ratios`` (N, k): ``density_ratios``'s, when
    the caller has them.
    """
    return (density_ratios(kd_x, kd_ref, entries, k) if ratios is None else ratios).mean(axis=1)


def dao(kd_x: np.ndarray, kd_ref: np.ndarray, lid_ref: np.ndarray, entries: np.ndarray, k: int, *,
        ratios: np.ndarray | None = None) -> np.ndarray:
    """Dimensionality-aware outlier score: mean over o in N_k(x) of lid(o) * ln(kd(x) / kd(o)).

    kd_x (N,), kd_ref (R,), lid_ref (R,), entries (N, K) -> (N,); ``ratios`` as for ``slof``.
    """
    ratios = density_ratios(kd_x, kd_ref, entries, k) if ratios is None else ratios
    return (lid_ref[entries[:, :k]] * np.log(ratios)).mean(axis=1)


def reference_density(ref_dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """kd(o) and lid(o) of every reference entry, (R,) and (R,), from its own neighbour distances
    (R, K) within the reference set: computed once per draw, shared by every chunk of queries."""
    return k_distance(ref_dist, k), lid_mle(ref_dist, k)


def query_scores(
    *,
    dist: np.ndarray,
    entries: np.ndarray,
    kd_ref: np.ndarray,
    lid_ref: np.ndarray,
    k: int,
    lid_k: int | None = None,
) -> dict[str, np.ndarray]:
    """k-distance, SLOF, DAO (and LID with ``lid_k`` neighbours) of queries (Q,), from their
    neighbours dist, entries (Q, K) and ``reference_density``'s kd_ref, lid_ref (R,). Row by
    row: a query's scores do not depend on the other queries passed with it."""
    kd_x = k_distance(dist, k)
    ratios = density_ratios(kd_x, kd_ref, entries, k)  # one gather of kd(o) for both scores
    out = {
        "kdist": kd_x,
        "slof": slof(kd_x, kd_ref, entries, k, ratios=ratios),
        "dao": dao(kd_x, kd_ref, lid_ref, entries, k, ratios=ratios),
    }
    if lid_k is not None:
        out["lid"] = lid_mle(dist, lid_k)
    return out


def density_scores(
    *,
    dist: np.ndarray,
    entries: np.ndarray,
    ref_dist: np.ndarray,
    k: int,
    lid_k: int | None = None,
) -> dict[str, np.ndarray]:
    """k-distance, SLOF, DAO (and LID with ``lid_k`` neighbours) of every query.

    dist, entries (N, K): the queries' neighbours; ref_dist (R, K): the reference entries'
    neighbour distances within the reference set. Returns arrays of shape (N,).
    """
    kd_ref, lid_ref = reference_density(ref_dist, k)
    return query_scores(dist=dist, entries=entries, kd_ref=kd_ref, lid_ref=lid_ref, k=k, lid_k=lid_k)


def _side_scale(dev: np.ndarray) -> float:
    """1.4826 x the median of one side's absolute deviations; their mean (exactly rounded, as
    ``clipscrub.order.SortedRuns`` takes it from pieces), then 1, when that is 0."""
    if dev.size == 0:
        return 1.0
    scale = 1.4826 * float(np.median(dev))
    return scale if scale > 0 else (math.fsum(dev.tolist()) / dev.size or 1.0)


def robust_scales(finite: np.ndarray) -> tuple[float, float, float]:
    """The median of finite values (M,) >= 1 and the robust scale of each side of it (``_side_scale``):
    (median, lower scale, upper scale)."""
    med = float(np.median(finite))
    return med, _side_scale(med - finite[finite <= med]), _side_scale(finite[finite >= med] - med)


Scales = tuple[float, float, float]  # (median, lower scale, upper scale): robust_scales'


def robust_z(values: np.ndarray, *, fit: np.ndarray | None = None, scales: Scales | None = None) -> np.ndarray:
    """Robust z-scores over the finite values, (N,) -> (N,): (value - median) divided by the
    median absolute deviation (x 1.4826) of the values on the same side of the median.

    Puts scores from reference sets of different sizes on one scale. One scale per side (the
    "double MAD") because distance scores are skewed: bounded below by 0, long-tailed above, so a
    single MAD understates how unusual a value far below the median is, and overstates one above.
    Non-finite values stay non-finite. ``fit`` (M,): the values whose median and scales are used
    (default: ``values`` themselves). ``scales``: those already taken (``robust_scales``, or
    ``clipscrub.order.SortedRuns.robust_scales`` of a whole column held in pieces), for a piece of
    it.
    """
    v = np.asarray(values, dtype=np.float64)
    if scales is None:
        ref = v if fit is None else np.asarray(fit, dtype=np.float64)
        finite = ref[np.isfinite(ref)]
        if finite.size == 0:
            return np.full_like(v, np.nan) if fit is not None else v.copy()
        scales = robust_scales(finite)
    med, lo, hi = scales
    with np.errstate(invalid="ignore"):
        return np.where(v >= med, (v - med) / hi, (v - med) / lo)


def fuse_scores(per_set: list[np.ndarray], rule: str, *, scales: list[Scales] | None = None) -> np.ndarray:
    """One score per sample from the scores of several reference sets, [(N,)] -> (N,).

    ``max_abs_z``: the z-score largest in magnitude: poison is found at whichever size leaves it
    sparse (a set holding more than about k poisoned entries makes it look dense), and poison
    that is abnormally dense at every size (copies of one image, a tightly collapsed trigger)
    is found too. ``max_z``: the largest z-score: sparse only.
    ``mean_z``: the mean z-score. A single set's scores are returned as they are. A non-finite
    score in any set makes the fused score non-finite (NaN), so it is flagged, never dropped.
    ``scales``: each set's ``robust_scales`` over the whole dataset, where ``per_set`` is a piece.
    """
    if len(per_set) == 1:
        return np.asarray(per_set[0], dtype=np.float64)
    z = np.stack([robust_z(v, scales=None if scales is None else sc)
                  for v, sc in zip(per_set, scales or [None] * len(per_set), strict=True)])
    if rule == "max_z":
        return z.max(axis=0)
    if rule == "max_abs_z":
        pick = np.nanargmax(np.where(np.isnan(z), -np.inf, np.abs(z)), axis=0)
        fused = np.take_along_axis(z, pick[None, :], 0)[0]
        return np.where(np.isfinite(z).all(axis=0), np.abs(fused), np.nan)
    if rule == "mean_z":
        return z.mean(axis=0)
    raise ValueError(f"unknown fusion rule {rule!r}")


# look-alikes per sample whose captions are compared with its own
LOOKALIKES = 16
# rows compared at a time: (256, 16, 512) float64 is 16 MB, which malloc reuses; 2,048 rows
# (134 MB temporaries, mapped fresh each time) took 25x as long in page faults
MISMATCH_BATCH = 256


def caption_mismatch(*, captions: np.ndarray, ref_captions: np.ndarray, entries: np.ndarray, distances: np.ndarray,
                     image_entries: int, copy_distance: float, wanted: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Whether each query has a copy among the references, and how unlike its caption is to those
    of its nearest look-alikes that are not copies.

    captions (Q, d): the queries' caption embeddings (any scale: the rows compared are scaled to
    unit length here); ref_captions (m, d): the reference samples' (unit length); entries,
    distances (Q, K): the queries' neighbours, image entries first (indices < ``image_entries``,
    entry i belonging to reference sample i). Returns is_copy (Q,):
    an image entry closer than ``copy_distance``; and mismatch (Q,): the smallest Euclidean
    distance between the query's caption and the captions of its first ``LOOKALIKES`` image
    entries at ``copy_distance`` or beyond (NaN where it has none among its K neighbours, and
    for the rows ``wanted`` (Q,) bool leaves out: copies and a sample of the rest suffice).
    """
    is_image = entries < image_entries
    is_copy = (is_image & (distances < copy_distance)).any(axis=1)
    rows = np.flatnonzero(is_copy | (True if wanted is None else wanted))
    out = np.full(len(entries), np.nan)
    captions = unit_rows(np.asarray(captions[rows], dtype=np.float64))
    entries, distances, is_image = entries[rows], distances[rows], is_image[rows]
    look = is_image & (distances >= copy_distance)
    first = np.argsort(~look, axis=1, kind="stable")[:, :LOOKALIKES]  # positions of the first look-alikes
    valid = np.take_along_axis(look, first, 1)
    owners = np.where(valid, np.take_along_axis(entries, first, 1), 0)
    for lo in range(0, len(rows), MISMATCH_BATCH):
        hi = lo + MISMATCH_BATCH
        gap = np.linalg.norm(ref_captions[owners[lo:hi]] - captions[lo:hi, None, :], axis=2)
        gap[~valid[lo:hi]] = np.inf
        best = gap.min(axis=1)
        out[rows[lo:hi]] = np.where(np.isfinite(best), best, np.nan)
    return is_copy, out


# rows whose caption mismatch is the population a copy's is compared with: every row below this
# many samples, a regular sample of them above it (the cost stays bounded at any N)
MISMATCH_SAMPLE = 16_384


def mismatch_sample(start: int, stop: int, n: int) -> np.ndarray:
    """Which rows [start, stop) of n are in the mismatch population (every ceil(n / MISMATCH_SAMPLE)-th row). (stop - start,) bool."""
    stride = -(-n // MISMATCH_SAMPLE)
    return np.arange(start, stop) % stride == 0


def vet_copies(fused: np.ndarray, *, is_copy: np.ndarray, mismatch: np.ndarray,
               population: np.ndarray | None = None, scales: Scales | None = None) -> np.ndarray:
    """Fused density z-scores (N,) where a sample with copies is judged by its caption instead:
    the robust z-score of its caption mismatch, fitted on the mismatch of the ``population``
    rows (N,) bool (default: every sample that has one).

    A model memorises a pair it sees many times, clean or poisoned, and moves it away from its
    look-alikes, or not, depending on how often it saw it: counted once in the reference sets,
    such a group can look sparse (a clean re-posted photo included) or ordinary (a targeted
    image copied 30 times among 6,000), so its density says little either way. What tells poison
    apart is its caption: a target its images' look-alikes do not carry (a copied image captioned
    "banana"), where a clean re-posted photo's look-alikes are described like it. A sample
    without copies, or without look-alikes to compare with, keeps its fused score. ``scales``:
    the population's ``robust_scales``, where the arrays are a piece of the dataset.
    """
    z = (robust_z(mismatch, scales=scales) if scales is not None
         else robust_z(mismatch, fit=None if population is None else mismatch[population]))
    return np.where(is_copy & np.isfinite(z), z, fused)


def join_caption_view(image_fused: np.ndarray, caption: np.ndarray, *, scales: Scales | None = None) -> np.ndarray:
    """One score (N,) from the image view's fused z-scores and a caption set's scores (N,): the
    mean of the two, the caption scores as robust z-scores.

    The image view finds a trigger the model isolated; the caption view, a caption the data
    does not otherwise carry (a target, where the reference holds few of it). Poison is unusual
    on both sides; a clean image outlier (a rare photo) or a clean caption outlier (a rare
    phrasing) on one only, so the mean ranks poison above both. Non-finite in either: NaN.
    ``scales``: the caption scores' ``robust_scales`` over the whole dataset, for a piece.
    """
    z = robust_z(caption, scales=scales)
    both = np.isfinite(image_fused) & np.isfinite(z)
    return np.where(both, (image_fused + np.where(both, z, 0.0)) / 2, np.nan)


def clip_score(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Cosine of each sample's own image and caption embeddings. (N, d), (N, d) -> (N,)."""
    num = np.einsum("nd,nd->n", image, text, dtype=np.float64)
    den = np.sqrt(np.einsum("nd,nd->n", image, image, dtype=np.float64) * np.einsum("nd,nd->n", text, text, dtype=np.float64))
    return num / np.maximum(den, EPS)


# a sample's own caption outranks this share of the others on average, or the model does not
# look trained on the data (chance: 0.5; the demo's victim: 0.987; its 1-epoch test victim: ~0.5)
ALIGNED_PERCENTILE = 0.75


def caption_alignment(image: np.ndarray, text: np.ndarray, *, seed: int, samples: int = 1000) -> dict[str, float | int]:
    """How well a model's embeddings pair each image with its own caption, on a random subset of
    ``samples`` rows of ``image`` and ``text`` ((N, d), memory-mapped will do): ``percentile``, the
    mean share of the subset's other captions a sample's own caption outranks in cosine (chance
    0.5), and ``top1``, the share whose own caption ranks first (chance 1 / samples)."""
    n = len(image)
    m = min(samples, n)
    rows = np.sort(np.random.default_rng([seed, 0x616C6967]).choice(n, m, replace=False))
    a = unit_rows(np.asarray(image[rows], dtype=np.float64))
    b = unit_rows(np.asarray(text[rows], dtype=np.float64))
    sims = a @ b.T
    own = np.diag(sims)
    outranked = (sims < own[:, None]).sum(axis=1) / max(1, m - 1)
    return {"samples": int(m), "percentile": round(float(outranked.mean()), 4),
            "top1": round(float((sims.argmax(axis=1) == np.arange(m)).mean()), 4)}


def fit_iforest(fit: np.ndarray, *, n_estimators: int, max_samples: int, seed: int):
    """An isolation forest fitted on (M, d) embeddings (the reference samples)."""
    from sklearn.ensemble import IsolationForest

    forest = IsolationForest(
        n_estimators=n_estimators, max_samples=min(max_samples, len(fit)), random_state=seed, n_jobs=1
    )
    return forest.fit(fit)


def iforest_score(forest, rows: np.ndarray, *, threads: int | None = None) -> np.ndarray:
    """Isolation-forest anomaly score (higher = more anomalous). (N, d) -> (N,).

    The rows are split among ``threads`` (default: the CPUs this process may use); a row's score
    depends on that row alone, so the split changes no bit of it (sklearn's own ``n_jobs`` splits
    the trees instead, and sums a row's depths in whichever order the threads finish)."""
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, min(threads or len(os.sched_getaffinity(0)), len(rows) // IFOREST_MIN_ROWS))
    if threads == 1:
        return -forest.score_samples(rows).astype(np.float64)
    parts = np.array_split(np.arange(len(rows)), threads)
    with ThreadPoolExecutor(threads) as pool:  # tree traversal releases the GIL
        scores = pool.map(lambda part: forest.score_samples(rows[part[0] : part[-1] + 1]), parts)
        return -np.concatenate(list(scores)).astype(np.float64)


# below this many rows per thread, a thread costs more than it saves
IFOREST_MIN_ROWS = 4096


LOW_IS_SUSPICIOUS = frozenset({"clip"})


def suspicion(values: np.ndarray, detector: str) -> np.ndarray:
    """Scores oriented so that higher always means more suspicious (for ranking and AUROC)."""
    values = np.asarray(values, dtype=np.float64)
    return -values if detector in LOW_IS_SUSPICIOUS else values


def copy_vetting(records: list[dict], *, vet_copies: bool, detectors: list[str] | tuple[str, ...], modality: str
                 ) -> dict | None:
    """Where copies are judged by their captions, for the index's reference set ``records``: the
    largest random set (its look-alikes are the nearest) and the copy distance the index drew it
    with; None where it does not apply (one set: no z-scores to vet; text queries: no image
    look-alikes; no copy distance: nothing drawn once; no density detector to vet)."""
    sized = [r for r in records if r["name"].startswith("m") and r.get("modality", modality) != "text"]
    if not (vet_copies and len(records) > 1 and sized and modality != "text" and any(d in DENSITY for d in detectors)):
        return None
    largest = max(sized, key=lambda r: r["samples"])
    distance = float(largest.get("copy_distance", 0.0))
    return {"set": largest["name"], "copy_distance": distance} if distance > 0 else None


def vet_captions(text, rows: np.ndarray) -> np.ndarray:
    """The vetting set's captions at unit length (draws, m, d) float64: ``text`` (a row reader of
    the caption embeddings) at the set's reference rows (draws, m)."""
    return np.stack([unit_rows(text.take(r).astype(np.float64)) for r in rows])
