"""Stage 4, index: reference sets and each sample's k nearest reference entries (faiss).

Writes, for r reference draws, R reference entries per draw and K = ``index.k`` neighbours:
- ``ref_rows.npy`` (r, m) int64: embedding rows of the reference samples;
- ``neighbours.npy`` (r, N, K) int64 and ``distances.npy`` (r, N, K) float32: each sample's
  nearest entries (indices into the draw's entries, laid out as ``reference_entries`` does);
- ``ref_neighbours.npy`` / ``ref_distances.npy`` (r, R, K): the same for the entries themselves,
  within the reference set, from which kd(o) and lid(o) are computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clipscrub.errors import DataError
from clipscrub.io import atomic_dir, require_file, write_lineage
from clipscrub.neighbours import (
    draw_references,
    find_neighbours,
    query_embeddings,
    reference_entries,
    self_entries_per_query,
)
from clipscrub.params import BaseSettings, IndexSettings


def load_embeddings(emb_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (N, d), text (N, d), ids (N,)) memory-mapped from the embed stage's output."""
    arrays = [
        np.load(require_file(emb_dir / f"{name}.npy", param="--embeddings", what="embeddings"), mmap_mode="r")
        for name in ("image", "text", "ids")
    ]
    image, text, ids = arrays
    if len(ids) == 0:
        raise DataError("the embeddings are empty", param="--embeddings")
    for name, arr in (("image", image), ("text", text)):
        bad = ~np.isfinite(arr).all(axis=1)
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
    image, text, ids = load_embeddings(emb_dir)
    n = len(ids)
    ref = settings.reference
    ref_rows = draw_references(n=n, mode=ref.mode, size=ref.size, draws=ref.draws, seed=base.seed)
    queries = query_embeddings(image, text, settings.modality)
    max_self = self_entries_per_query(settings.modality)
    all_rows = np.arange(n, dtype=np.int64)
    nbrs, dists, ref_nbrs, ref_dists = [], [], [], []
    for rows in ref_rows:
        refs, owners = reference_entries(image, text, rows, settings.modality)
        if settings.k + max_self > len(refs):
            raise DataError(f"k ({settings.k}) needs more reference entries than {len(refs)}", param="index.k")
        q = find_neighbours(
            queries=queries, query_owners=all_rows, refs=refs, ref_owners=owners,
            k=settings.k, max_self=max_self, chunk_size=settings.chunk_size,
        )
        r = find_neighbours(
            queries=refs, query_owners=owners, refs=refs, ref_owners=owners,
            k=settings.k, max_self=max_self, chunk_size=settings.chunk_size,
        )
        nbrs.append(q.entries), dists.append(q.distances), ref_nbrs.append(r.entries), ref_dists.append(r.distances)

    summary = {
        "samples": n,
        "draws": int(ref_rows.shape[0]),
        "reference_samples": int(ref_rows.shape[1]),
        "reference_entries": int(ref_nbrs[0].shape[0]),
        "k": settings.k,
    }
    with atomic_dir(out_dir) as tmp:
        np.save(tmp / "ref_rows.npy", ref_rows)
        np.save(tmp / "neighbours.npy", np.stack(nbrs))
        np.save(tmp / "distances.npy", np.stack(dists))
        np.save(tmp / "ref_neighbours.npy", np.stack(ref_nbrs))
        np.save(tmp / "ref_distances.npy", np.stack(ref_dists))
        write_lineage(
            tmp,
            stage="index",
            params={"base": base.model_dump(mode="json"), "index": settings.model_dump(mode="json")},
            inputs={"embeddings": emb_dir},
            upstream=[emb_dir],
            summary=summary,
        )
    return summary
