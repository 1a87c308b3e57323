"""Stage 5, score: one row per sample with a ``<detector>_score`` column per detector.

Density-ratio scores (k-distance, SLOF, DAO) and LID come from the index stage's neighbour
lists: per reference set, averaged over its draws; several sets (``index.reference.sizes``) are
fused into one score by ``score.fusion`` (``clipscrub.detectors.fuse_scores``), and each set's
own scores are kept in ``by_reference.parquet`` (``<detector>_<set>`` columns). The isolation
forest and the CLIP score come from the embeddings. Non-finite scores are kept as they are and
counted, never dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from clipscrub.detectors import clip_score, density_scores, fit_iforest, fuse_scores, iforest_score
from clipscrub.errors import DataError
from clipscrub.io import atomic_dir, write_lineage
from clipscrub.neighbours import query_embeddings
from clipscrub.params import BaseSettings, IndexSettings, ScoreSettings
from clipscrub.validation import docs_dir_for, score_tables, validate
from stages.index import load_embeddings, load_reference_set, read_reference_sets


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
    separated; null when all are finite)."""
    emb_dir, idx_dir = Path(embeddings_dir), Path(index_dir)
    image, text, ids = load_embeddings(emb_dir, chunk_size=index.chunk_size, normalize=index.normalize)
    names = [rs["name"] for rs in read_reference_sets(idx_dir)]
    wanted = set(settings.detectors)
    density = [d for d in settings.detectors if d in ("kdist", "slof", "dao", "lid")]
    per_set: dict[str, dict[str, np.ndarray]] = {}
    ref_rows: list[np.ndarray] = []
    for name in names:
        # one set mapped at a time: a set's (r, N, K) neighbour files are what dominates memory
        arrays = load_reference_set(idx_dir, name)
        if arrays["neighbours"].shape[1] != len(ids):
            raise DataError("index and embeddings disagree on the number of samples: rerun the index stage",
                            param="--index")
        ref_rows.append(np.asarray(arrays["ref_rows"]).reshape(-1))
        if density:
            per_set[name] = set_scores(arrays, k=settings.k, lid_k=settings.lid_k if "lid" in wanted else None)
        del arrays

    columns: dict[str, np.ndarray] = {}
    by_set: dict[str, np.ndarray] = {}
    for d in density:
        columns[d] = fuse_scores([per_set[name][d] for name in names], settings.fusion)
        by_set.update({f"{d}_{name}": per_set[name][d] for name in names})
    if "iforest" in wanted:
        queries = query_embeddings(image, text, index.modality)
        fit_rows = np.unique(np.concatenate(ref_rows))
        forest = fit_iforest(
            queries.take(fit_rows), n_estimators=settings.iforest.n_estimators,
            max_samples=settings.iforest.max_samples, seed=base.seed,
        )
        columns["iforest"] = np.concatenate([iforest_score(forest, rows) for _, rows in queries.chunks(index.chunk_size)])
    if "clip" in wanted:
        columns["clip"] = np.concatenate([
            clip_score(img, txt)
            for (_, img), (_, txt) in zip(image.chunks(index.chunk_size), text.chunks(index.chunk_size))
        ])

    order = [d for d in settings.detectors]
    frame = pl.DataFrame({"id": np.asarray(ids), **{f"{d}_score": columns[d] for d in order}})
    # marked, not dropped: threshold flags them and evaluate ranks them most suspicious
    frame = frame.with_columns(
        pl.concat_str([pl.when(~pl.col(f"{d}_score").is_finite()).then(pl.lit(d)) for d in order],
                      separator=",", ignore_nulls=True).replace("", None).alias("non_finite_scores")
    )
    non_finite = {d: int((~np.isfinite(columns[d])).sum()) for d in order}
    summary = {"samples": frame.height, "detectors": order, "non_finite": non_finite,
               "reference_sets": names, "fusion": settings.fusion if len(names) > 1 else None}
    with atomic_dir(out_dir) as tmp:
        frame.write_parquet(tmp / "scores.parquet", statistics=False)
        pl.DataFrame({"id": np.asarray(ids), **by_set}).write_parquet(tmp / "by_reference.parquet", statistics=False)
        validated = validate("score", score_tables(pl.read_parquet(tmp / "scores.parquet"), ids=np.asarray(ids),
                                                   detectors=order), docs_dir=docs_dir_for(out_dir, "score"))
        write_lineage(
            tmp,
            stage="score",
            params={"base": base.model_dump(mode="json"), "score": settings.model_dump(mode="json")},
            inputs={"embeddings": emb_dir, "index": idx_dir},
            upstream=[idx_dir],
            summary=summary,
            extra={"validation": validated},
        )
    return summary


def set_scores(arrays: dict[str, np.ndarray], *, k: int, lid_k: int | None) -> dict[str, np.ndarray]:
    """kdist, SLOF, DAO (and LID) of every sample (N,) for one reference set, averaged over its
    draws; ``arrays`` as ``load_reference_set`` returns them."""
    per_draw = [
        density_scores(dist=arrays["distances"][r], entries=arrays["neighbours"][r],
                       ref_dist=arrays["ref_distances"][r], k=k, lid_k=lid_k)
        for r in range(arrays["neighbours"].shape[0])
    ]
    return {name: np.mean([d[name] for d in per_draw], axis=0) for name in per_draw[0]}
