"""Stage 4, index: reference sets and each sample's k nearest reference entries (faiss).

``index.reference`` names one or more reference sets (``clipscrub.neighbours.reference_sets``:
one per size m in random mode, each drawn r times; or the trusted samples; or the whole
dataset). For each set, ``<out>/<set>/`` (``m256``, ``m4096``, ``trusted``, ``all``) holds, for its
r draws, R reference entries per draw and K = ``index.k`` neighbours:
- ``ref_rows.npy`` (r, m) int64: embedding rows of the reference samples;
- ``neighbours.npy`` (r, N, K) int64 and ``distances.npy`` (r, N, K) float32: each sample's
  nearest entries (indices into the draw's entries, laid out as ``reference_entries`` does);
- ``ref_neighbours.npy`` / ``ref_distances.npy`` (r, R, K): the same for the entries themselves,
  within the reference set, from which kd(o) and lid(o) are computed.
``<out>/references.json`` lists the sets in order (name, draws, samples, entries, search).

Memory is bounded by one chunk of queries, the reference entries with their faiss index, and
the (N, K) results: embeddings are read chunk by chunk, never mapped whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clipscrub.arrays import RowReader, create_npy
from clipscrub.errors import DataError
from clipscrub.io import atomic_dir, read_json, require_file, write_json, write_lineage
from clipscrub.neighbours import entry_owners, read_trusted_rows, reference_sets, search_draw, self_entries_per_query
from clipscrub.params import BaseSettings, IndexSettings
from clipscrub.validation import docs_dir_for, neighbour_tables, validate


def load_embeddings(emb_dir: Path, *, chunk_size: int = 65536, normalize: bool = False
                    ) -> tuple[RowReader, RowReader, np.ndarray]:
    """(image (N, d), text (N, d), ids (N,)) of the embed stage's output, checked chunk by chunk:
    equal shapes, finite values. With ``normalize`` the readers return unit rows."""
    image, text = (
        RowReader(require_file(emb_dir / f"{name}.npy", param="--embeddings", what="embeddings"), normalize=normalize)
        for name in ("image", "text")
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


REFERENCES_FILE = "references.json"
ARRAYS = ("ref_rows", "neighbours", "distances", "ref_neighbours", "ref_distances")


def read_reference_sets(index_dir: Path) -> list[dict[str, Any]]:
    """The index stage's reference sets, in order: name, draws, samples, entries, search."""
    return read_json(require_file(index_dir / REFERENCES_FILE, param="--index", what="index"))["sets"]


def load_reference_set(index_dir: Path, name: str) -> dict[str, np.ndarray]:
    """One set's arrays (``ARRAYS``), memory-mapped."""
    return {a: np.load(require_file(index_dir / name / f"{a}.npy", param="--index", what="index"), mmap_mode="r")
            for a in ARRAYS}


def build_index(
    *, embeddings_dir: str | Path, out_dir: str | Path, settings: IndexSettings, base: BaseSettings
) -> dict[str, Any]:
    """Draw the reference sets and find every sample's neighbours in each of their draws."""
    emb_dir = Path(embeddings_dir)
    image, text, ids = load_embeddings(emb_dir, chunk_size=settings.chunk_size, normalize=settings.normalize)
    n = len(ids)
    ref = settings.reference
    trusted = read_trusted_rows(ref.path, ids) if ref.mode == "trusted" else None
    sets = reference_sets(n=n, mode=ref.mode, sizes=ref.sizes, draws=ref.draws, seed=base.seed, trusted_rows=trusted)
    max_self = self_entries_per_query(settings.modality)
    for rs in sets:
        if settings.k + max_self > rs.rows.shape[1] * max_self:
            raise DataError(f"k ({settings.k}) needs more reference entries than {rs.rows.shape[1] * max_self} "
                            f"(reference set {rs.name})", param="index.k")
    records: list[dict[str, Any]] = []
    tables = []
    with atomic_dir(out_dir) as tmp:
        for rs in sets:
            draws, m = rs.rows.shape
            entries_n = m * max_self
            (tmp / rs.name).mkdir()
            np.save(tmp / rs.name / "ref_rows.npy", rs.rows)
            out = {
                name: create_npy(tmp / rs.name / f"{name}.npy", dtype=dtype, shape=shape)
                for name, dtype, shape in (
                    ("neighbours", np.int64, (draws, n, settings.k)),
                    ("distances", np.float32, (draws, n, settings.k)),
                    ("ref_neighbours", np.int64, (draws, entries_n, settings.k)),
                    ("ref_distances", np.float32, (draws, entries_n, settings.k)),
                )
            }
            recalls: list[float] = []
            for r, rows in enumerate(rs.rows):
                found = search_draw(image=image, text=text, rows=rows, modality=settings.modality, mode=ref.mode,
                                    k=settings.k, search=settings.search, seed=base.seed + r,
                                    chunk_size=settings.chunk_size)
                out["neighbours"][r], out["distances"][r] = found.queries.entries, found.queries.distances
                out["ref_neighbours"][r], out["ref_distances"][r] = found.references.entries, found.references.distances
                recalls.append(found.recall)
                method = found.method
                del found
            for arr in out.values():
                arr.flush()
            del out
            records.append({"name": rs.name, "draws": int(draws), "samples": int(m), "entries": int(entries_n),
                            "search": method, "recall_at_k": round(float(np.mean(recalls)), 4)})
            tables += neighbour_tables(
                ids=ids, neighbours=np.load(tmp / rs.name / "neighbours.npy", mmap_mode="r"),
                distances=np.load(tmp / rs.name / "distances.npy", mmap_mode="r"),
                owners=[entry_owners(rows, settings.modality) for rows in rs.rows], entries=entries_n,
                chunk_size=settings.chunk_size, name=f"neighbours_{rs.name}",
            )
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
        }
        write_lineage(
            tmp,
            stage="index",
            params={"base": base.model_dump(mode="json"), "index": settings.model_dump(mode="json")},
            inputs={"embeddings": emb_dir, **({"trusted": Path(ref.path)} if trusted is not None else {})},
            upstream=[emb_dir],
            summary=summary,
            extra={"validation": validated, "reference_sets": records},
        )
    return summary
