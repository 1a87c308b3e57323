"""An independent, loop-based implementation of METHOD.md's definitions, for parity tests.

Deliberately naive: per query, every distance in float64 with np.linalg.norm, own entries
removed, neighbours ordered by (distance, entry index). Same epsilon guards as documented in
clipscrub.detectors (they are part of the definition).
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-12


def entries_for(image, text, rows, modality):
    """List of (vector, owner) reference entries, images first then captions."""
    out = []
    if modality in ("image", "image_text"):
        out += [(np.asarray(image[r], dtype=np.float64), int(r)) for r in rows]
    if modality in ("text", "image_text"):
        out += [(np.asarray(text[r], dtype=np.float64), int(r)) for r in rows]
    return out


def knn(vec, owner, entries, k):
    cands = []
    for j, (e, o) in enumerate(entries):
        if o == owner:
            continue
        cands.append((float(np.linalg.norm(vec - e)), j))
    cands.sort()
    return cands[:k]


def lid(dists, k):
    d = [x + EPS for x in dists[:k]]
    s = sum(math.log(x / d[k - 1]) for x in d)
    return -k / min(s, -EPS)


def scores(image, text, ref_rows, modality, k, lid_k):
    """{'kdist','slof','dao','lid'} -> (N,) arrays for one reference draw."""
    entries = entries_for(image, text, ref_rows, modality)
    kk = max(k, lid_k)
    ref_nn = [knn(e, o, entries, kk) for e, o in entries]
    kd_ref = [nn[k - 1][0] for nn in ref_nn]
    lid_ref = [lid([d for d, _ in nn], k) for nn in ref_nn]
    queries = text if modality == "text" else image
    out = {"kdist": [], "slof": [], "dao": [], "lid": []}
    for i in range(len(queries)):
        nn = knn(np.asarray(queries[i], dtype=np.float64), i, entries, kk)
        kd = nn[k - 1][0]
        out["kdist"].append(kd)
        out["slof"].append(np.mean([(kd + EPS) / (kd_ref[j] + EPS) for _, j in nn[:k]]))
        out["dao"].append(np.mean([lid_ref[j] * math.log((kd + EPS) / (kd_ref[j] + EPS)) for _, j in nn[:k]]))
        out["lid"].append(lid([d for d, _ in nn], lid_k))
    return {name: np.array(v) for name, v in out.items()}
