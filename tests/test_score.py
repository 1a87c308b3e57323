"""Scores agree with an independent brute-force implementation of METHOD.md's formulas."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipscrub.params import parse_params
from clipscrub.neighbours import read_reference_sets
from clipscrub.stages.index import build_index
from clipscrub.stages.score import score_samples
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


def only_set(index_dir) -> Path:
    """The directory of an index stage output's single reference set."""
    sets = read_reference_sets(Path(index_dir))
    assert len(sets) == 1
    return Path(index_dir) / sets[0]["name"]


def run_stages(tmp_path, image, text, *, modality, mode, size, draws, k, lid_k, seed, ids=None, reference=None, search=None,
               dtype="float32", sizes=None, fusion="max_z", normalize=False):
    """index + score on the given embeddings; (scores, ref_rows (r, m) of the first reference set, index summary)."""
    params = parse_params(
        {
            "base": {"seed": seed},
            "index": {
                "k": max(k, lid_k), "modality": modality, "chunk_size": 7, "normalize": normalize,
                "reference": {"mode": mode, "sizes": sizes or [size], "draws": draws, **(reference or {})},
                "search": search or {},
            },
            "score": {"detectors": ["kdist", "slof", "lid", "dao"], "k": k, "lid_k": lid_k, "fusion": fusion},
            "threshold": {"detector": "dao"},
        }
    )
    emb = write_embeddings(tmp_path / "emb", image, text, ids, dtype=dtype)
    summary = build_index(embeddings_dir=emb, out_dir=tmp_path / "index", settings=params.index, base=params.base)
    score_samples(
        embeddings_dir=emb, index_dir=tmp_path / "index", out_dir=tmp_path / "scores",
        settings=params.score, index=params.index, base=params.base,
    )
    first = read_reference_sets(tmp_path / "index")[0]["name"]
    return pl.read_parquet(tmp_path / "scores" / "scores.parquet"), np.load(tmp_path / "index" / first / "ref_rows.npy"), summary


def _entries(image, text, rows, modality) -> tuple[np.ndarray, np.ndarray]:
    """Reference entry vectors (R, d) float64 and their owners (R,), as bruteforce lays them out."""
    pairs = bruteforce.entries_for(image, text, rows, modality)
    return np.array([v for v, _ in pairs]), np.array([o for _, o in pairs])


def _true_distances(queries, owners_q, entries, owners_e) -> np.ndarray:
    """(Q, R) float64 distances, inf where an entry belongs to the query's own sample."""
    d = np.sqrt(((np.asarray(queries, np.float64)[:, None, :] - entries[None, :, :]) ** 2).sum(-1))
    d[owners_q[:, None] == owners_e[None, :]] = np.inf
    return d


# Per-value tolerances: stored distances are float32 (relative error ~6e-8), so each log ratio of
# two distances is off by up to ~1.2e-7 absolute; RTOL covers relative error, DELTA that absolute one.
RTOL, DELTA = 1e-5, 1e-6
LID_FLOOR = 1 / bruteforce.EPS  # x k: bruteforce.lid's value when all k distances tie


def _dao_tolerance(image, text, rows, modality, k) -> np.ndarray:
    """Per query (N,): the tolerance of its DAO, mean lid(o) ln(kd(x)/kd(o)) over its k neighbours o,
    from the size of each term before they cancel (vectorised float64; sets only the tolerance).
    A term is off by |lid(o)| x its log ratio's error, plus its own size x lid(o)'s relative error,
    DELTA x |lid(o)| (ill-conditioned when o's distances nearly tie); a floored lid(o) is exact."""
    e, owners = _entries(image, text, rows, modality)
    ref_d = np.sort(_true_distances(e, owners, e, owners), axis=1)[:, :k] + bruteforce.EPS
    kd_ref = ref_d[:, k - 1]
    lid_ref = -k / np.minimum(np.log(ref_d / ref_d[:, k - 1 : k]).sum(1), -bruteforce.EPS)
    lid_rel = np.where(lid_ref == LID_FLOOR * k, 0.0, DELTA * np.abs(lid_ref))
    queries = text if modality == "text" else image
    d = _true_distances(queries, np.arange(len(queries)), e, owners)
    nn = np.argsort(d, axis=1, kind="stable")[:, :k]
    kd = np.take_along_axis(d, nn, 1)[:, k - 1] + bruteforce.EPS
    terms = np.abs(lid_ref[nn] * np.log(kd[:, None] / kd_ref[nn]))
    return (terms * (RTOL + lid_rel[nn]) + DELTA * np.abs(lid_ref[nn])).mean(1)


def expected_scores(image, text, ref_rows, modality, k, lid_k) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (value, tolerance) per sample (N,), the brute force averaged over the draws.

    Each value gets its own tolerance. A LID floored at ``EPS`` (all its distances tie) is
    lid_k / EPS, ~1e13: its tolerance is a few ulps, so it must be exact, and it widens no other
    value's. DAO's tolerance follows the LIDs of the sample's own neighbours (a floored one makes
    the float32 error of its log ratio ~1e6)."""
    expected = [bruteforce.scores(image, text, rows, modality, k, lid_k) for rows in ref_rows]
    out = {}
    for name in ("kdist", "slof", "lid", "dao"):
        values = np.array([e[name] for e in expected])  # (draws, N)
        if name == "lid":
            floored = values == LID_FLOOR * lid_k
            tol = np.where(floored, 8 * np.spacing(values), RTOL * np.abs(values) + DELTA * values**2)
        elif name == "dao":
            tol = np.array([_dao_tolerance(image, text, rows, modality, k) for rows in ref_rows])
        else:
            tol = RTOL * np.abs(values)
        out[name] = values.mean(0), tol.mean(0) + 1e-12
    return out


def assert_close(have: np.ndarray, want: np.ndarray, tol: np.ndarray, what: str) -> None:
    bad = ~(np.abs(have - want) <= tol)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {len(want)} rows off, e.g. {have[bad][:3]} "
                           f"vs {want[bad][:3]} (tolerances {tol[bad][:3]})")


def assert_parity(got: pl.DataFrame, image, text, ref_rows, modality, k, lid_k):
    for name, (want, tol) in expected_scores(image, text, ref_rows, modality, k, lid_k).items():
        assert_close(got[f"{name}_score"].to_numpy(), want, tol, name)


def assert_neighbours_exact(set_dir: Path, image, text, modality, k):
    """The index's neighbour lists are true k-nearest lists: each reported distance is the entry's
    real distance, none is the query's own sample, and the k distances are the k smallest."""
    ref_rows = np.load(set_dir / "ref_rows.npy")
    for r, rows in enumerate(ref_rows):
        e, owners = _entries(image, text, rows, modality)
        queries = text if modality == "text" else image
        for prefix, q, q_owners in (("", queries, np.arange(len(queries))), ("ref_", e, owners)):
            true = _true_distances(q, q_owners, e, owners)
            found = np.load(set_dir / f"{prefix}neighbours.npy")[r]
            dist = np.load(set_dir / f"{prefix}distances.npy")[r].astype(np.float64)
            assert (owners[found] != q_owners[:, None]).all(), f"{prefix}draw {r}: a query's own entry"
            np.testing.assert_allclose(np.take_along_axis(true, found, 1), dist, rtol=1e-6, atol=1e-6,
                                       err_msg=f"{prefix}draw {r}: reported distances")
            np.testing.assert_allclose(dist, np.sort(true, axis=1)[:, :k], rtol=1e-6, atol=1e-6,
                                       err_msg=f"{prefix}draw {r}: not the k nearest")


@pytest.mark.parametrize("modality", ["image_text", "image", "text"])
@pytest.mark.parametrize("mode", ["random", "trusted", "all"])
@pytest.mark.parametrize("kind", ["lattice", "gauss"])
def test_scores_match_bruteforce(tmp_path, modality, mode, kind):
    image, text = make_data(3, 60, 4 if kind == "lattice" else 8, kind)
    ids = 1000 + 7 * np.arange(60)  # sample ids are not row numbers
    trusted = np.sort(np.random.default_rng(5).choice(60, size=23, replace=False))
    (tmp_path / "trusted.txt").write_text("\n".join(str(i) for i in ids[trusted][::-1]) + "\n")
    reference = {"path": str(tmp_path / "trusted.txt")} if mode == "trusted" else None
    draws = 2 if mode == "random" else 1
    got, ref_rows, summary = run_stages(
        tmp_path, image, text, ids=ids, reference=reference,
        modality=modality, mode=mode, size=25, draws=draws, k=5, lid_k=9, seed=1,
    )
    assert ref_rows.shape == {"random": (2, 25), "trusted": (1, 23), "all": (1, 60)}[mode]
    if mode == "trusted":
        assert ref_rows[0].tolist() == trusted.tolist()
    assert summary["search"] == ["exact"] and summary["recall_at_k"] == 1.0
    assert_neighbours_exact(only_set(tmp_path / "index"), image, text, modality, 9)
    assert got["id"].to_list() == ids.tolist()
    assert_parity(got, image, text, ref_rows, modality, 5, 9)


@pytest.mark.parametrize("modality", ["image_text", "image"])
@pytest.mark.parametrize("search", [
    {"method": "hnsw", "hnsw_m": 8, "ef_construction": 200, "ef_search": 400},
    {"method": "ivf", "nlist": 8, "nprobe": 8},  # probing every list: exhaustive
    {"method": "auto", "exact_max_entries": 100, "nlist": 4, "nprobe": 4},  # auto picks hnsw here
])
def test_approximate_search_matches_bruteforce_when_exhaustive(tmp_path, modality, search):
    # no duplicates here: among equidistant entries an approximate index may return any one
    rng = np.random.default_rng(4)
    image = rng.normal(size=(300, 8)).astype(np.float32)
    text = (image + 0.5 * rng.normal(size=image.shape)).astype(np.float32)
    got, ref_rows, summary = run_stages(
        tmp_path, image, text, modality=modality, mode="all", size=2, draws=1, k=5, lid_k=9, seed=2, search=search,
    )
    assert summary["search"] == [search["method"] if search["method"] != "auto" else "hnsw"]
    assert summary["recall_at_k"] == 1.0
    assert_neighbours_exact(only_set(tmp_path / "index"), image, text, modality, 9)
    assert_parity(got, image, text, ref_rows, modality, 5, 9)


def test_approximate_recall_is_measured_against_exact(tmp_path):
    """A deliberately weak IVF (1 of 32 lists probed) reports the recall it really reaches."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2000, 16)).astype(np.float32)
    params = parse_params({
        "index": {"k": 10, "modality": "image", "reference": {"mode": "all"},
                  "search": {"method": "ivf", "nlist": 32, "nprobe": 1, "recall_sample": 200}},
        "score": {"k": 10, "lid_k": 10},
    })
    emb = write_embeddings(tmp_path / "emb", image, image)
    summary = build_index(embeddings_dir=emb, out_dir=tmp_path / "index", settings=params.index, base=params.base)
    found = np.load(only_set(tmp_path / "index") / "neighbours.npy")[0]
    d = ((image[:, None, :].astype(np.float64) - image[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    exact = np.argsort(d, axis=1, kind="stable")[:, :10]
    rows = np.sort(np.random.default_rng(0).choice(2000, size=200, replace=False))
    true_recall = (found[rows][:, :, None] == exact[rows][:, None, :]).any(2).mean()
    assert summary["search"] == ["ivf"]
    assert 0.05 < summary["recall_at_k"] < 0.95
    assert summary["recall_at_k"] == pytest.approx(true_recall, abs=1e-9)


@pytest.mark.parametrize("mode, entries, gpus, expected", [
    ("random", 10_000_000, 0, "exact"),
    ("trusted", 10_000_000, 1, "exact"),
    ("all", 200_000, 0, "exact"),
    ("all", 200_001, 0, "hnsw"),
    ("all", 200_001, 1, "ivf"),
    ("all", 4_000_001, 0, "ivf"),
])
def test_search_method_is_chosen_by_size(mode, entries, gpus, expected):
    from clipscrub.neighbours import choose_method
    from clipscrub.params import SearchSettings

    assert choose_method(mode=mode, entries=entries, search=SearchSettings(), gpus=gpus) == expected


def test_float16_storage_scores_its_own_values_exactly(tmp_path):
    image, text = make_data(6, 80, 8, "gauss")
    image, text = image / np.linalg.norm(image, axis=1, keepdims=True), text / np.linalg.norm(text, axis=1, keepdims=True)
    got16, ref_rows, _ = run_stages(tmp_path / "16", image, text, modality="image_text", mode="random", size=30, draws=2,
                                    k=5, lid_k=9, seed=3, dtype="float16")
    assert np.load(tmp_path / "16" / "emb" / "image.npy").dtype == np.float16
    half = lambda a: a.astype(np.float16).astype(np.float32)
    assert_parity(got16, half(image), half(text), ref_rows, "image_text", 5, 9)
    got32, _, _ = run_stages(tmp_path / "32", image, text, modality="image_text", mode="random", size=30, draws=2,
                             k=5, lid_k=9, seed=3)
    for name in ("kdist", "slof"):  # float16 keeps ~3 significant digits
        a, b = got16[f"{name}_score"].to_numpy(), got32[f"{name}_score"].to_numpy()
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=5e-3 * np.abs(b).max(), err_msg=name)
    # DAO crosses zero and weighs each neighbour's LID: rounding that swaps two near-tied
    # neighbours moves one sample's DAO by more than its digits (1 of 80 here), never the ranking
    a, b = got16["dao_score"].to_numpy(), got32["dao_score"].to_numpy()
    off = ~np.isclose(a, b, rtol=2e-2, atol=5e-3 * np.abs(b).max())
    assert off.sum() <= 1
    assert np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1] > 0.99


@pytest.mark.parametrize("content, expected", [
    ("ids.txt:1000\n1007\n99999\n", "1 trusted ids are not embedded samples of this dataset, e.g. [99999]"),
    ("ids.csv:name\na\n", "has no 'id' column"),
    ("ids.txt:1000\nbanana\n", "cannot read ids"),
    ("", "trusted reference file not found"),
])
def test_bad_trusted_reference_is_a_clear_error(tmp_path, content, expected):
    from clipscrub.errors import DataError

    path = tmp_path / "missing.txt"
    if content:
        name, body = content.split(":", 1)
        path = tmp_path / name
        path.write_text(body)
    image, text = make_data(1, 30, 4, "gauss")
    with pytest.raises(DataError, match=re.escape(expected)) as err:
        run_stages(tmp_path, image, text, ids=1000 + 7 * np.arange(30), reference={"path": str(path)},
                   modality="image_text", mode="trusted", size=2, draws=1, k=3, lid_k=3, seed=0)
    assert err.value.param == "index.reference.path"
    assert not (tmp_path / "index").exists()


def test_trusted_manifest_uses_only_ok_rows(tmp_path):
    image, text = make_data(2, 40, 6, "gauss")
    ids = np.arange(40) * 2
    pl.DataFrame({"id": ids[:20], "status": ["ok", "failed"] * 10}).write_parquet(tmp_path / "clean.parquet")
    _, ref_rows, _ = run_stages(tmp_path, image, text, ids=ids, reference={"path": str(tmp_path / "clean.parquet")},
                                modality="image_text", mode="trusted", size=2, draws=1, k=3, lid_k=3, seed=0)
    assert ref_rows[0].tolist() == list(range(0, 20, 2))


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
    got, ref_rows, _ = run_stages(tmp, image, text, modality=modality, mode="random", size=12, draws=1, k=k, lid_k=lid_k, seed=seed)
    assert_parity(got, image, text, ref_rows, modality, k, lid_k)


def test_isolated_point_scores_highest(tmp_path):
    """A planted far point outranks every inlier on the density-ratio scores."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(200, 8)).astype(np.float32)
    image[17] += 12.0
    text = image + 0.01 * rng.normal(size=image.shape).astype(np.float32)
    got, _, _ = run_stages(tmp_path, image, text, modality="image_text", mode="random", size=80, draws=1, k=5, lid_k=9, seed=0)
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
    dist = np.load(only_set(tmp_path / "index") / "distances.npy")[0]
    nbrs = np.load(only_set(tmp_path / "index") / "neighbours.npy")[0]
    ref_rows = np.load(only_set(tmp_path / "index") / "ref_rows.npy")[0]
    owners = np.concatenate([ref_rows, ref_rows])[nbrs]
    assert (owners != np.arange(50)[:, None]).all()
    assert (dist > 0).all()
    assert (np.diff(dist, axis=1) >= 0).all()


def test_scores_cover_every_detector_and_sample(tiny_run):
    root, params = tiny_run
    scores = pl.read_parquet(root / "scores" / "scores.parquet")
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    assert scores["id"].to_list() == manifest["id"].to_list()
    assert scores.columns == ["id"] + [f"{d}_score" for d in params.score.detectors] + ["non_finite_scores"]
    for d in params.score.detectors:
        assert scores[f"{d}_score"].is_finite().all(), d
    assert scores["non_finite_scores"].null_count() == scores.height
    clip = scores["clip_score"].to_numpy()
    assert (clip >= -1 - 1e-6).all() and (clip <= 1 + 1e-6).all()


def test_hnsw_build_is_reproducible(tmp_path):
    """Two builds of the same approximate index write identical neighbour bytes."""
    from clipscrub.io import sha256_file

    rng = np.random.default_rng(5)
    image = rng.normal(size=(4000, 16)).astype(np.float32)
    emb = write_embeddings(tmp_path / "emb", image, image)
    params = parse_params({
        "index": {"k": 10, "modality": "image", "reference": {"mode": "all"},
                  "search": {"method": "hnsw", "hnsw_m": 8, "ef_construction": 16, "ef_search": 16, "recall_sample": 200}},
        "score": {"k": 10, "lid_k": 10},
    })
    runs = [build_index(embeddings_dir=emb, out_dir=tmp_path / f"index{i}", settings=params.index, base=params.base)
            for i in range(2)]
    assert runs[0]["recall_at_k"] < 1.0  # a weak index: its results depend on the graph it built
    assert runs[0] == runs[1]
    for name in ("neighbours.npy", "distances.npy", "ref_neighbours.npy"):
        assert sha256_file(tmp_path / "index0" / "all" / name) == sha256_file(tmp_path / "index1" / "all" / name)


@pytest.mark.parametrize("fusion", ["max_z", "max_abs_z", "mean_z"])
@pytest.mark.parametrize("modality", ["image_text", "image"])
def test_several_reference_sizes_fuse_per_set_bruteforce(tmp_path, fusion, modality):
    """Each size's scores match the brute force on its own draws; the fused column is the
    fusion rule applied to them; sizes above the dataset are capped at it."""
    from clipscrub.detectors import fuse_scores, join_caption_view, robust_z, vet_copies

    image, text = make_data(7, 70, 6, "gauss")
    got, _, summary = run_stages(tmp_path, image, text, modality=modality, mode="random", size=None, sizes=[12, 30, 500],
                                 draws=2, k=4, lid_k=6, seed=2, fusion=fusion)
    # image_text adds the caption set: the smallest size's draws, caption against caption
    captions = modality == "image_text"
    assert summary["reference_sets"] == ["m12", "m30", "m70"] + (["t12"] if captions else [])
    by_set = pl.read_parquet(tmp_path / "scores" / "by_reference.parquet")
    for name in ("m12", "m30", "m70") + (("t12",) if captions else ()):
        rows = np.load(tmp_path / "index" / name / "ref_rows.npy")
        assert rows.shape == ((1, 70) if name == "m70" else (2, int(name[1:])))
        view = "text" if name.startswith("t") else modality
        for det, (want, tol) in expected_scores(image, text, rows, view, 4, 6).items():
            assert_close(by_set[f"{det}_{name}"].to_numpy(), want, tol, f"{det} {name}")
    if captions:
        np.testing.assert_array_equal(np.load(tmp_path / "index" / "t12" / "ref_rows.npy"),
                                      np.load(tmp_path / "index" / "m12" / "ref_rows.npy"))
    is_copy, mismatch = got["is_copy"].to_numpy(), got["caption_mismatch"].to_numpy()
    assert is_copy.any() and not is_copy.all()  # make_data's duplicated rows
    for det in ("kdist", "slof", "lid", "dao"):
        fused = fuse_scores([by_set[f"{det}_{n}"].to_numpy() for n in ("m12", "m30", "m70")], fusion)
        vetted = vet_copies(fused, is_copy=is_copy, mismatch=mismatch)
        judged = is_copy & np.isfinite(mismatch)
        assert judged.any()
        np.testing.assert_array_equal(vetted[judged], robust_z(mismatch)[judged])
        want = join_caption_view(vetted, by_set[f"{det}_t12"].to_numpy()) if captions else vetted
        np.testing.assert_array_equal(got[f"{det}_score"].to_numpy(), want)
        if not captions:
            np.testing.assert_array_equal(got[f"{det}_score"].to_numpy()[~is_copy], fused[~is_copy])


def bruteforce_copies(image, text, rows, modality, K, copy_distance):
    """is_copy and caption_mismatch by their definitions, one query and one draw at a time: the
    K nearest entries (own excluded, ties by entry index), image entries under copy_distance are
    copies (the query and the reference sample both), the first 16 image entries at or beyond it
    are the look-alikes."""
    entries = np.concatenate([image[rows], text[rows]]) if modality == "image_text" else image[rows]
    unit = text / np.linalg.norm(text, axis=1, keepdims=True)
    n, m = len(image), len(rows)
    is_copy = np.zeros(n, dtype=bool)
    per_draw = np.full(n, np.nan)
    for q in range(n):
        d = np.sqrt(((entries.astype(np.float64) - image[q]) ** 2).sum(1))
        owners = np.concatenate([rows, rows]) if modality == "image_text" else rows
        order = [e for e in np.lexsort((np.arange(len(d)), d)) if owners[e] != q][:K]
        hits = [e for e in order if e < m and d[e] < copy_distance]
        is_copy[q] = bool(hits)
        is_copy[rows[hits]] = True  # the reference sample it copies is a copy too
        look = [e for e in order if e < m and d[e] >= copy_distance][:16]
        if look:
            per_draw[q] = min(np.linalg.norm(unit[rows[e]] - unit[q]) for e in look)
    return is_copy, per_draw


@pytest.mark.parametrize("modality", ["image_text", "image"])
def test_copies_and_caption_mismatch_match_bruteforce(tmp_path, modality):
    """The vetting set (the largest) and the copy distance the index recorded, recomputed by the
    definition on data with exact duplicates."""
    image, text = make_data(11, 80, 6, "gauss")
    got, _, summary = run_stages(tmp_path, image, text, modality=modality, mode="random", size=None, sizes=[10, 40],
                                 draws=2, k=4, lid_k=6, seed=3)
    largest = {r["name"]: r for r in read_reference_sets(tmp_path / "index")}["m40"]
    assert largest["copy_distance"] > 0
    rows = np.load(tmp_path / "index" / "m40" / "ref_rows.npy")
    per = [bruteforce_copies(image, text, r, modality, 6, largest["copy_distance"]) for r in rows]
    want_copy = np.any([c for c, _ in per], axis=0)
    mism = np.stack([m for _, m in per])  # (draws, N); the mean over the draws that found look-alikes
    found = np.isfinite(mism)
    want_mismatch = np.where(found.any(0), np.where(found, mism, 0).sum(0) / np.maximum(found.sum(0), 1), np.nan)
    np.testing.assert_array_equal(got["is_copy"].to_numpy(), want_copy)
    assert want_copy.any() and not want_copy.all()
    np.testing.assert_allclose(got["caption_mismatch"].to_numpy(), want_mismatch, rtol=1e-6, equal_nan=True)
    assert summary["copy_distance"] == largest["copy_distance"]


def test_draws_of_a_size_do_not_depend_on_the_other_sizes(tmp_path):
    image, text = make_data(8, 60, 5, "gauss")
    run_stages(tmp_path / "a", image, text, modality="image", mode="random", size=None, sizes=[20], draws=2, k=3,
               lid_k=3, seed=4)
    run_stages(tmp_path / "b", image, text, modality="image", mode="random", size=None, sizes=[10, 20], draws=2, k=3,
               lid_k=3, seed=4)
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "index" / "m20" / "ref_rows.npy"),
                                  np.load(tmp_path / "b" / "index" / "m20" / "ref_rows.npy"))


@pytest.mark.parametrize("modality", ["image_text", "text"])
def test_normalised_distances_match_bruteforce_on_unit_vectors(tmp_path, modality):
    image, text = make_data(9, 50, 6, "gauss")
    image[::3] *= 3.0  # raw norms differ: normalising changes the neighbourhoods
    got, ref_rows, _ = run_stages(tmp_path, image, text, modality=modality, mode="random", size=20, draws=2, k=4,
                                  lid_k=6, seed=1, normalize=True)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    assert_parity(got, unit(image), unit(text), ref_rows, modality, 4, 6)
    raw, _, _ = run_stages(tmp_path / "raw", image, text, modality=modality, mode="random", size=20, draws=2, k=4,
                           lid_k=6, seed=1)
    assert not np.allclose(raw["kdist_score"].to_numpy(), got["kdist_score"].to_numpy())


@pytest.mark.parametrize("spread", [1.4e-4, 1e-6])
def test_exact_search_is_exact_inside_a_tight_cluster(spread):
    """faiss's flat index uses the BLAS formula for large query batches, whose float32 squared
    distances round together below ~1e-7 relative: with more than k + margin cluster members in
    that band, a fixed candidate list misses the true neighbours. The search widens such lists
    until they reach past the band, so every k-distance equals the float64 brute force."""
    from clipscrub.neighbours import build_search_index, find_neighbours
    from clipscrub.params import SearchSettings

    rng = np.random.default_rng(0)
    n, d, k = 3000, 64, 64
    x = (3 * rng.normal(size=(n, d))).astype(np.float32)
    x[:200] = 3 * rng.normal(size=d).astype(np.float32) + spread * rng.normal(size=(200, d)).astype(np.float32)
    index = build_search_index(x, method="exact", search=SearchSettings(), seed=0)
    owners = np.arange(n)
    found = find_neighbours(queries=x, query_owners=owners, index=index, ref_owners=owners, k=k, max_self=1)
    x64 = x.astype(np.float64)
    for i in range(0, 400, 7):  # cluster members and others
        dist = np.sqrt(((x64 - x64[i]) ** 2).sum(axis=1))
        dist[i] = np.inf
        np.testing.assert_allclose(found.distances[i], np.sort(dist)[:k], rtol=1e-5, atol=1e-9, err_msg=str(i))


def test_widening_stops_at_exact_duplicates_and_batches_its_rows(monkeypatch):
    """500 copies of one image (a placeholder): k copies at distance 0 end the search, however
    many more there are; a near-duplicate cluster widened in small batches (a tiny memory budget)
    gets the same neighbours as in one batch."""
    import clipscrub.neighbours as nbr
    from clipscrub.params import SearchSettings

    rng = np.random.default_rng(1)
    x = (3 * rng.normal(size=(2000, 32))).astype(np.float32)
    x[:500] = x[0]
    x[500:800] = x[500] + 1e-5 * rng.normal(size=(300, 32)).astype(np.float32)
    index = nbr.build_search_index(x, method="exact", search=SearchSettings(), seed=0)
    owners = np.arange(2000)
    run = lambda: nbr.find_neighbours(queries=x, query_owners=owners, index=index, ref_owners=owners, k=40, max_self=1)
    whole = run()
    assert (whole.distances[:500] == 0).all()
    monkeypatch.setattr(nbr, "WIDEN_BUDGET", 1000)
    batched = run()
    np.testing.assert_array_equal(batched.distances, whole.distances)
    np.testing.assert_array_equal(batched.entries, whole.entries)
    x64 = x.astype(np.float64)
    for i in (500, 650, 799):
        dist = np.sqrt(((x64 - x64[i]) ** 2).sum(axis=1))
        dist[i] = np.inf
        np.testing.assert_allclose(whole.distances[i], np.sort(dist)[:40], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(("sizes", "reference", "modality", "sets"), [
    ([10, 30], {}, "image_text", ["m10", "m30", "t10"]),
    ([10, 30], {"caption_set": False}, "image_text", ["m10", "m30"]),
    ([10, 30], {}, "image", ["m10", "m30"]),
    ([30], {}, "image_text", ["m30"]),  # one size: the scores stay in the detector's units
])
def test_a_caption_set_only_beside_several_image_sets(tmp_path, sizes, reference, modality, sets):
    image, text = make_data(12, 60, 5, "gauss")
    got, _, summary = run_stages(tmp_path, image, text, modality=modality, mode="random", size=None, sizes=sizes,
                                 draws=2, k=3, lid_k=4, seed=1, reference=reference)
    assert summary["reference_sets"] == sets
    assert ("is_copy" in got.columns) == (len(sizes) > 1)
