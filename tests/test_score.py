"""Scores agree with an independent brute-force implementation of METHOD.md's formulas."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipscrub.params import parse_params
from stages.index import build_index
from stages.score import score_samples
from tests import bruteforce
from tests.conftest import write_embeddings


def make_data(seed: int, n: int, d: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings with exact duplicates and distance ties.

    ``lattice``: small-integer coordinates, so many distances tie exactly (and sums of squares
    are exact in float32 and float64 alike); ``gauss``: continuous data with duplicated rows and
    some captions identical to their own image.
    """
    rng = np.random.default_rng(seed)
    if kind == "lattice":
        image = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
        text = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    else:
        image = rng.normal(size=(n, d)).astype(np.float32)
        text = (image + 0.5 * rng.normal(size=(n, d))).astype(np.float32)
        text[: n // 10] = image[: n // 10]
    dup = rng.choice(n, size=n // 5, replace=False)
    image[dup[: len(dup) // 2]] = image[dup[len(dup) // 2 : 2 * (len(dup) // 2)]]
    text[dup[: len(dup) // 2]] = text[dup[len(dup) // 2 : 2 * (len(dup) // 2)]]
    return image, text


def run_stages(tmp_path, image, text, *, modality, mode, size, draws, k, lid_k, seed):
    params = parse_params(
        {
            "base": {"seed": seed},
            "index": {"k": max(k, lid_k), "modality": modality, "reference": {"mode": mode, "size": size, "draws": draws}, "chunk_size": 7},
            "score": {"detectors": ["kdist", "slof", "lid", "dao"], "k": k, "lid_k": lid_k},
            "threshold": {"detector": "dao"},
        }
    )
    emb = write_embeddings(tmp_path / "emb", image, text)
    build_index(embeddings_dir=emb, out_dir=tmp_path / "index", settings=params.index, base=params.base)
    score_samples(
        embeddings_dir=emb, index_dir=tmp_path / "index", out_dir=tmp_path / "scores",
        settings=params.score, index=params.index, base=params.base,
    )
    return pl.read_parquet(tmp_path / "scores" / "scores.parquet"), np.load(tmp_path / "index" / "ref_rows.npy")


def assert_parity(got: pl.DataFrame, image, text, ref_rows, modality, k, lid_k):
    expected = [bruteforce.scores(image, text, rows, modality, k, lid_k) for rows in ref_rows]
    for name in ("kdist", "slof", "lid", "dao"):
        want = np.mean([e[name] for e in expected], axis=0)
        have = got[f"{name}_score"].to_numpy()
        scale = np.abs(want).max() + 1e-12
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-6 * scale, err_msg=name)


@pytest.mark.parametrize("modality", ["image_text", "image", "text"])
@pytest.mark.parametrize("mode", ["random", "all"])
@pytest.mark.parametrize("kind", ["lattice", "gauss"])
def test_scores_match_bruteforce(tmp_path, modality, mode, kind):
    image, text = make_data(3, 60, 4 if kind == "lattice" else 8, kind)
    draws = 2 if mode == "random" else 1
    got, ref_rows = run_stages(tmp_path, image, text, modality=modality, mode=mode, size=25, draws=draws, k=5, lid_k=9, seed=1)
    assert ref_rows.shape == ((2, 25) if mode == "random" else (1, 60))
    assert_parity(got, image, text, ref_rows, modality, 5, 9)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(20, 50),
    k=st.integers(1, 6),
    kind=st.sampled_from(["lattice", "gauss"]),
    modality=st.sampled_from(["image_text", "image", "text"]),
)
def test_scores_match_bruteforce_property(tmp_path_factory, seed, n, k, kind, modality):
    tmp = tmp_path_factory.mktemp("prop")
    image, text = make_data(seed, n, 3, kind)
    lid_k = k + 2
    got, ref_rows = run_stages(tmp, image, text, modality=modality, mode="random", size=12, draws=1, k=k, lid_k=lid_k, seed=seed)
    assert_parity(got, image, text, ref_rows, modality, k, lid_k)


def test_isolated_point_scores_highest(tmp_path):
    """A planted far point outranks every inlier on the density-ratio scores."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(200, 8)).astype(np.float32)
    image[17] += 12.0
    text = image + 0.01 * rng.normal(size=image.shape).astype(np.float32)
    got, _ = run_stages(tmp_path, image, text, modality="image_text", mode="random", size=80, draws=1, k=5, lid_k=9, seed=0)
    for name in ("kdist", "slof", "dao"):
        assert int(np.argmax(got[f"{name}_score"].to_numpy())) == 17, name


def test_own_caption_is_never_a_neighbour(tmp_path):
    """A sample whose caption equals its image does not get distance 0 from its own caption."""
    rng = np.random.default_rng(1)
    image = rng.normal(size=(50, 6)).astype(np.float32)
    text = image.copy()
    emb = write_embeddings(tmp_path / "emb", image, text)
    params = parse_params({"index": {"k": 4, "reference": {"mode": "all"}}, "score": {"k": 4, "lid_k": 4}})
    build_index(embeddings_dir=emb, out_dir=tmp_path / "index", settings=params.index, base=params.base)
    dist = np.load(tmp_path / "index" / "distances.npy")[0]
    nbrs = np.load(tmp_path / "index" / "neighbours.npy")[0]
    ref_rows = np.load(tmp_path / "index" / "ref_rows.npy")[0]
    owners = np.concatenate([ref_rows, ref_rows])[nbrs]
    assert (owners != np.arange(50)[:, None]).all()
    assert (dist > 0).all()
    assert (np.diff(dist, axis=1) >= 0).all()


def test_scores_cover_every_detector_and_sample(tiny_run):
    root, params = tiny_run
    scores = pl.read_parquet(root / "scores" / "scores.parquet")
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    assert scores["id"].to_list() == manifest["id"].to_list()
    assert scores.columns == ["id"] + [f"{d}_score" for d in params.score.detectors]
    for d in params.score.detectors:
        assert scores[f"{d}_score"].is_finite().all(), d
    clip = scores["clip_score"].to_numpy()
    assert (clip >= -1 - 1e-6).all() and (clip <= 1 + 1e-6).all()
