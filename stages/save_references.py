"""``clipscrub save-references``: keep a scored version's reference sets, so that shards added later
are scored against them (``index.reference.mode: saved``) without re-embedding or re-scoring the
old shards. Not a pipeline stage: it reads a data root's embeddings, index and score (and its
threshold, for the cut) and writes the bundle ``clipscrub.saved`` describes.

What the saved sets approximate: an added sample is measured against references drawn from the
saved version only, with that version's fusion scales, so the added shards' own structure (a
new concept, a new poison campaign's copies among themselves) is not among the references.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from clipscrub.arrays import load_embeddings
from clipscrub.errors import DataError
from clipscrub.io import atomic_dir, read_json, require_file, sha256_file, write_json
from clipscrub.detectors import copy_vetting, vet_captions
from clipscrub.neighbours import forest_rows, load_reference_set, query_embeddings, read_reference_sets, reference_entries
from clipscrub.saved import BUNDLE_FILE, FORMAT, IFOREST_TRAIN, VET_CAPTIONS
from clipscrub.params import IndexSettings, ScoreSettings


def _lineage(out: Path, stage: str) -> dict[str, Any]:
    return read_json(require_file(out / "lineage.json", param="--root", what=f"{stage} output"))["stages"]


def save_references(
    *, embeddings_dir: str | Path, index_dir: str | Path, score_dir: str | Path, out_dir: str | Path,
    threshold_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Write the bundle of the reference sets the index at ``index_dir`` drew and the score at
    ``score_dir`` measured (its fusion scales), with their entries' vectors from ``embeddings_dir``,
    into ``out_dir`` (replaced in one atomic swap). The settings are the ones those stages ran
    with (their lineage), not today's params. Returns a summary (sets, entries, the cut)."""
    emb_dir, idx_dir, score_dir = Path(embeddings_dir), Path(index_dir), Path(score_dir)
    index_record, scored = _lineage(idx_dir, "index")["index"], _lineage(score_dir, "score")
    score_record = scored["score"]
    if scored.get("index") != index_record:
        raise DataError("the scores were not computed from this index: rerun score", param="--root")
    index = IndexSettings.model_validate(index_record["params"]["index"])
    score = ScoreSettings.model_validate(score_record["params"]["score"])
    if index.reference.mode == "all":
        raise DataError("this version's references are the whole dataset (index.reference.mode: all): there are no "
                        "reference sets to save; index with mode random or trusted", param="--root")
    if index.reference.mode == "saved":
        raise DataError(f"this version was scored against saved references already ({index.reference.path}): "
                        "use those", param="--root")
    if "scales" not in score_record:
        raise DataError("the score stage's lineage holds no fusion scales (scored by an older clipscrub): rerun score",
                        param="--root")
    image, text, ids = load_embeddings(emb_dir, normalize=index.normalize)
    records = read_reference_sets(idx_dir)
    if len(ids) != score_record["summary"]["samples"]:
        raise DataError("the embeddings changed since they were scored: rerun index and score", param="--root")
    vet = copy_vetting(records, vet_copies=score.vet_copies, detectors=score.detectors, modality=index.modality)
    ref_rows = {rec["name"]: np.asarray(load_reference_set(idx_dir, rec["name"])["ref_rows"]) for rec in records}
    threshold = None
    if threshold_dir is not None and (Path(threshold_dir) / "lineage.json").is_file():
        t = _lineage(Path(threshold_dir), "threshold")["threshold"]
        threshold = {"detector": t["params"]["threshold"]["detector"], "method": t["params"]["threshold"]["method"],
                     "cut": t["summary"].get("cut")}
    ids_arr = np.asarray(ids)
    with atomic_dir(out_dir) as tmp:
        for rec in records:
            name, modality = rec["name"], rec.get("modality", index.modality)
            rows = ref_rows[name]
            (tmp / name).mkdir()
            np.save(tmp / name / "entries.npy",
                    np.stack([reference_entries(image, text, r, modality)[0] for r in rows]))
            np.save(tmp / name / "ids.npy", ids_arr[rows])
            for a in ("ref_neighbours", "ref_distances"):
                shutil.copyfile(idx_dir / name / f"{a}.npy", tmp / name / f"{a}.npy")
        if "iforest" in score.detectors:
            np.save(tmp / IFOREST_TRAIN,
                    query_embeddings(image, text, index.modality).take(forest_rows(list(ref_rows.values()))))
        if vet:
            np.save(tmp / VET_CAPTIONS, vet_captions(text, ref_rows[vet["set"]]))
        source = {"samples": len(ids), "name": index_record["params"]["base"]["name"],
                  "lineage": {stage: sha256_file(d / "lineage.json")
                              for stage, d in (("embed", emb_dir), ("index", idx_dir), ("score", score_dir))},
                  "threshold": threshold}
        meta = {
            "format": FORMAT,
            "sets": [{k: v for k, v in rec.items() if k != "recall_at_k"} for rec in records],
            "index": {"k": index.k, "modality": index.modality, "normalize": index.normalize},
            "score": {"k": score.k, "lid_k": score.lid_k, "detectors": list(score.detectors)},
            "scales": score_record["scales"],
            "population": score_record.get("population_scales"),
            "vet": vet,
            "model": read_json(require_file(emb_dir / "model.json", param="--root", what="embed output")),
            "source": source,
        }
        write_json(tmp / BUNDLE_FILE, meta)
    return {"sets": [rec["name"] for rec in records], "draws": sum(int(rec["draws"]) for rec in records),
            "entries": sum(int(rec["draws"]) * int(rec["entries"]) for rec in records), "samples": len(ids),
            "threshold": threshold}
