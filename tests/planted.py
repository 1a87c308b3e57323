"""Planted embeddings where detection works, written as a clip-retrieval source (img_emb/,
text_emb/, metadata/ with is_poison): the tests of evaluate, report and diff need poison the
detectors find, which the tiny demo's 1-epoch victim does not learn.

Clean pairs come from Gaussian concept clusters (caption = image + a modality offset + noise).
Three planted groups, each the kind of sample the default must order:
- ``sparse``: poison whose trigger maps each image far from every concept, alone (spread wide);
- ``dense``: poison collapsed onto one point (a trigger the model learned tightly, or one image
  copied with a target caption), captions near one target caption;
- ``cluster``: clean near-duplicates of one image of a concept sharing its caption (a re-posted
  photo or template): dense, but inside the data, and not poison.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import polars as pl

GROUPS = ("clean", "cluster", "sparse", "dense")


def write_planted(d: Path, *, seed: int = 0, clean: int = 2000, concepts: int = 20, dim: int = 32, sparse: int = 10,
                  dense: int = 30, cluster: int = 60, parts: int = 2) -> np.ndarray:
    """Write the source under ``d``; return each sample's group name (N,) in the order the
    source lists them (the order the pipeline's ids follow)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(concepts, dim))
    concept = rng.integers(concepts, size=clean + cluster)
    image = centres[concept] + 0.3 * rng.normal(size=(clean + cluster, dim))
    gap = 0.5 * rng.normal(size=dim)
    text = image + gap + 0.3 * rng.normal(size=(clean + cluster, dim))
    captions = [f"a photo of concept {c}" for c in concept]
    # the cluster: copies of one clean sample, a little noise apart, one caption
    first = clean
    image[clean:] = image[first] + 0.01 * rng.normal(size=(cluster, dim))
    text[clean:] = text[first] + 0.01 * rng.normal(size=(cluster, dim))
    captions[clean:] = [captions[first]] * cluster
    trigger, target = 3 * rng.normal(size=dim), 3 * rng.normal(size=dim)
    image = np.concatenate([image, trigger + 1.0 * rng.normal(size=(sparse, dim)),
                            -trigger + 0.01 * rng.normal(size=(dense, dim))])
    text = np.concatenate([text, target + 0.3 * rng.normal(size=(sparse, dim)),
                           -target + 0.01 * rng.normal(size=(dense, dim))])
    captions += ["a photo of a banana"] * sparse + ["a photo of a kite"] * dense
    group = np.array(["clean"] * clean + ["cluster"] * cluster + ["sparse"] * sparse + ["dense"] * dense)
    n = len(group)
    order = rng.permutation(n)  # every group scattered through the parts
    for sub in ("img_emb", "text_emb", "metadata"):
        (d / sub).mkdir(parents=True)
    bounds = np.linspace(0, n, parts + 1).astype(int)
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        rows = order[lo:hi]
        np.save(d / "img_emb" / f"img_emb_{i}.npy", image[rows].astype(np.float16))
        np.save(d / "text_emb" / f"text_emb_{i}.npy", text[rows].astype(np.float16))
        pl.DataFrame({"caption": [captions[r] for r in rows],
                      "is_poison": np.isin(group[rows], ["sparse", "dense"])}).write_parquet(
            d / "metadata" / f"metadata_{i}.parquet")
    return group[order]
