"""Saved reference sets: what a cleaned version's index and score stages drew and measured, kept
so that shards added later are scored against the same references (``index.reference.mode:
saved``) without re-embedding or re-scoring the old ones.

A bundle (``clipscrub save-references``) is a folder:
- ``references.json``: ``format``; ``sets`` as the index's references.json lists them; the index
  settings they were searched with (``index``: k, modality, normalize); the score settings the
  scales hold for (``score``: k, lid_k, detectors); ``scales``, the fusion's robust scales
  (median, lower and upper scale) of each detector's score per set, as the saved version's
  score stage took them over its whole dataset; ``population``, the copy vetting's; ``vet``, its
  set and copy distance; the embedding ``model``; ``source``, the saved version's lineage
  (sha256 of each stage's lineage.json, its sample count) and its cut (``threshold``);
- per set ``<set>/entries.npy`` (r, R, d) float32: each draw's entries as the index laid them out
  (the m image entries, then the m caption entries); ``<set>/ids.npy`` (r, m) int64: the sample
  ids of the references; ``<set>/ref_neighbours.npy`` and ``<set>/ref_distances.npy`` (r, R, K):
  the entries' own neighbours within their draw, from which kd(o) and lid(o) come;
- ``iforest_train.npy`` (n, d) float32: the rows the isolation forest was fitted on;
- ``vet_captions.npy`` (r, m, d) float64: the vetting set's captions at unit length.

A run in mode saved writes each set's ``ref_rows.npy`` as ``-1 - id`` of the saved samples (no
row of its own embeddings: no sample is excluded as its own neighbour), and links the bundle's
score files into ``<index>/saved/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clipscrub.errors import DataError, ParamError
from clipscrub.io import read_json

BUNDLE_FILE = "references.json"
FORMAT = 1
SAVED_DIR = "saved"  # in the index's output: the bundle's files the score stage reads
SET_ARRAYS = ("entries", "ids", "ref_neighbours", "ref_distances")
IFOREST_TRAIN = "iforest_train.npy"
VET_CAPTIONS = "vet_captions.npy"
PARAM = "index.reference.path"


def saved_rows(ids: np.ndarray) -> np.ndarray:
    """The ``ref_rows`` of saved references with sample ids ``ids``: ``-1 - id``, negative, so
    never a row of the dataset searched against them."""
    return -1 - np.asarray(ids, dtype=np.int64)


def read_bundle(path: str | Path) -> dict[str, Any]:
    """A bundle's ``references.json``, checked to be one this code reads."""
    path = Path(path)
    file = path / BUNDLE_FILE
    if not file.is_file():
        raise DataError(f"no saved references at {path} (no {BUNDLE_FILE}): write them with "
                        "`clipscrub save-references --root DATA --out DIR` from a scored version", param=PARAM)
    meta = read_json(file)
    if meta.get("format") != FORMAT:
        raise DataError(f"{file}: format {meta.get('format')!r}, this clipscrub reads format {FORMAT}: save the "
                        "references again", param=PARAM)
    return meta


def model_key(info: dict[str, Any]) -> dict[str, Any]:
    """What identifies an embedding model in an embed stage's model.json: its name, pretrained tag
    and checkpoint's sha256 (not where the checkpoint or the precomputed files lay)."""
    return {k: info.get(k) for k in ("model_name", "pretrained", "checkpoint_sha256")}


def check_bundle(meta: dict[str, Any], *, k: int, modality: str, normalize: bool, model: dict[str, Any]) -> None:
    """Refuse saved references that were searched or embedded differently from this run: their
    neighbours, kd(o) and scales would not be comparable with this run's."""
    saved = meta["index"]
    for key, value in (("k", k), ("modality", modality), ("normalize", normalize)):
        if saved[key] != value:
            raise ParamError(f"{value!r}, but the saved references were indexed with {key}: {saved[key]!r} "
                             f"(set it as they were, or save references from a run with it)", param=f"index.{key}")
    if model_key(meta["model"]) != model_key(model):
        raise DataError(f"the embeddings come from {model_key(model)}, the saved references from "
                        f"{model_key(meta['model'])}: distances between two models' embeddings mean nothing "
                        "(embed with the saved version's model, or rescore everything)", param=PARAM)


def check_score(meta: dict[str, Any], *, k: int, lid_k: int, detectors: list[str]) -> None:
    """Refuse score settings the saved scales do not hold for."""
    saved = meta["score"]
    if saved["k"] != k:
        raise ParamError(f"{k}, but the saved references' scales are of scores with k: {saved['k']}", param="score.k")
    if "lid" in detectors and saved["lid_k"] != lid_k:
        raise ParamError(f"{lid_k}, but the saved references' scales are of LID with lid_k: {saved['lid_k']}",
                         param="score.lid_k")


def scale_key(detector: str, name: str) -> str:
    return f"{detector}/{name}"


def encode_scales(scales: dict[tuple[str, str], tuple[float, float, float] | None]) -> dict[str, list[float] | None]:
    """The fusion's scales per (detector, set) as JSON (floats survive JSON's round trip exactly)."""
    return {scale_key(d, name): None if s is None else [float(v) for v in s] for (d, name), s in sorted(scales.items())}


def saved_scales(meta: dict[str, Any], keys: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[float, float, float] | None]:
    """The saved scales of each (detector, set) in ``keys``; a missing one is an error naming it."""
    out = {}
    for d, name in keys:
        key = scale_key(d, name)
        if key not in meta["scales"]:
            raise DataError(f"the saved references hold no scales for {d} on set {name}: save them from a version "
                            f"that scored {d}", param=PARAM)
        value = meta["scales"][key]
        out[(d, name)] = None if value is None else tuple(value)
    return out
