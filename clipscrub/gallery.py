"""What the report's review pages show besides the flags: each sample's nearest reference
entries (from the index stage's outputs), the threshold what-if table, and the paging of the
flagged gallery.

The index stage writes, per reference set, ``neighbours.npy`` (draws, N, k): indices into one
draw's entries, laid out as ``clipscrub.neighbours.reference_entries`` does (``image_text``: the
m image entries, then the m caption entries), and ``distances.npy`` (draws, N, k): Euclidean
distances. An entry's owner is ``ref_rows[draw][entry % m]``, an embedding row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipscrub.arrays import take_rows
from clipscrub.errors import DataError
from clipscrub.io import read_json
from clipscrub.params import ThresholdSettings

# the fractions the what-if table always lists (the applied rule's own row is added to them)
WHAT_IF_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


@dataclass(frozen=True)
class NearestReferences:
    """Each asked-for sample's nearest reference entries in one draw of one reference set."""

    set_name: str
    draw: int
    draws: int
    modality: str
    owners: np.ndarray  # (F, k) embedding rows of the entries' samples, -1 where none
    captions: np.ndarray  # (F, k) bool: the entry is the sample's caption embedding, not its image
    distances: np.ndarray  # (F, k) float32


def index_modality(index_dir: Path) -> str:
    """The modality the index was built with, from its lineage's params."""
    lineage = read_json(index_dir / "lineage.json")
    return lineage["stages"]["index"]["params"]["index"]["modality"]


def nearest_references(index_dir: str | Path, rows: np.ndarray, *, samples: int, draw: int = 0) -> NearestReferences:
    """The first reference set's ``draw``-th draw: owners, kinds and distances of the k nearest
    entries of the samples at embedding ``rows`` (F,) of ``samples``. Reads only those rows
    (memory-mapped)."""
    index_dir = Path(index_dir)
    first = read_json(index_dir / "references.json")["sets"][0]
    name = first["name"]
    modality = index_modality(index_dir)
    ref_rows = np.load(index_dir / name / "ref_rows.npy", mmap_mode="r")[draw]
    m = len(ref_rows)
    rows = np.asarray(rows, dtype=np.int64)
    held = np.load(index_dir / name / "neighbours.npy", mmap_mode="r").shape[1]
    if held != samples:
        raise DataError(f"the index holds neighbours of {held} samples, the embeddings {samples}: "
                        "rerun index", param="--index")
    # the rows alone, read (not mapped: a map's readahead would make much of the lists resident)
    entries = take_rows(index_dir / name / "neighbours.npy", rows, block=draw)
    distances = take_rows(index_dir / name / "distances.npy", rows, block=draw)
    valid = (entries >= 0) & np.isfinite(distances)
    safe = np.where(valid, entries, 0)
    owners = np.where(valid, np.asarray(ref_rows)[safe % m], -1)
    captions = valid & ((modality == "text") | ((modality == "image_text") & (safe >= m)))
    return NearestReferences(name, draw, int(first["draws"]), modality, owners, captions, distances)


def what_if_fractions(threshold: ThresholdSettings) -> list[float]:
    """The table's fractions: the fixed ones and the applied rule's (not the fraction filter
    removed: as a top_fraction row it would repeat the applied rule's row)."""
    extra = [threshold.fraction] if threshold.method == "top_fraction" else []
    return sorted({*WHAT_IF_FRACTIONS, *(f for f in extra if 0 < f < 1)})


def page_of(position: int, per_page: int) -> int:
    """1-based page of the 0-based ``position`` in a gallery of ``per_page`` cards a page."""
    return position // per_page + 1


def page_count(n: int, per_page: int) -> int:
    return max(1, math.ceil(n / per_page))


def page_name(page: int) -> str:
    return f"page-{page:04d}.html"
