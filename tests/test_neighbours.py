"""Reference draws: copies enter a reference set once (``index.reference.duplicate_radius``)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipscrub.neighbours import draw_distinct, duplicate_distance, reference_sets


def with_copies(*, n: int, copies: int, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian rows (n, d) float32 whose first ``copies`` rows are one image repeated with a
    tiny jitter; (embeddings, is_copy)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:copies] = x[0] + 1e-3 * rng.normal(size=(copies, d)).astype(np.float32)
    return x, np.arange(n) < copies


@pytest.mark.parametrize("size", [100, 400])
def test_a_group_of_copies_enters_a_draw_once(size):
    x, is_copy = with_copies(n=2000, copies=300)
    radius = duplicate_distance(x, n=len(x), fraction=0.5, seed=0)
    rows = draw_distinct(image=x, n=len(x), size=size, rng=np.random.default_rng(1), radius=radius)
    assert len(rows) == size and len(np.unique(rows)) == size and (np.diff(rows) > 0).all()
    assert is_copy[rows].sum() <= 1
    # a plain draw of the same size holds the group in proportion
    plain = np.random.default_rng(1).choice(len(x), size=size, replace=False)
    assert is_copy[plain].sum() >= 0.1 * size


def greedy_oracle(x: np.ndarray, *, size: int, seed: int, radius: float) -> np.ndarray:
    """draw_distinct by its definition, with exact float64 distances, one candidate at a time."""
    pool = np.random.default_rng(seed).choice(len(x), size=min(len(x), 4 * size), replace=False)
    kept: list[int] = []
    rejected: list[int] = []
    for i, row in enumerate(pool):
        near = any(((x[row].astype(np.float64) - x[pool[j]]) ** 2).sum() < radius**2 for j in kept)
        (rejected if near else kept).append(i)
        if len(kept) == size:
            break
    def gap(i: int) -> float:  # squared distance to the nearest kept candidate
        return min(((x[pool[i]].astype(np.float64) - x[pool[j]]) ** 2).sum() for j in kept)

    chosen = kept + sorted(rejected, key=lambda i: (-gap(i), i))[: size - len(kept)]
    return np.sort(pool[chosen])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(10, 300), size=st.integers(2, 60), r2=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_draw_distinct_matches_its_definition(n, size, r2, seed):
    """Against a one-by-one greedy oracle, on lattice points (integer squared distances, and a
    radius between two of them, so no distance sits on the boundary); a third of the rows are
    one point, so draws often run out of distinct candidates and fill up, farthest first."""
    size = min(size, n)
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(n, 4)).astype(np.float32)
    x[: n // 3] = x[0]
    radius = float(np.sqrt(r2 + 0.5))
    rows = draw_distinct(image=x, n=n, size=size, rng=np.random.default_rng(seed), radius=radius)
    assert np.array_equal(rows, greedy_oracle(x, size=size, seed=seed, radius=radius))


def test_draws_are_seeded_and_scale_free():
    x, _ = with_copies(n=1000, copies=100)
    kwargs = dict(n=1000, mode="random", sizes=[64, 256], draws=2, seed=3)
    radius = duplicate_distance(x, n=1000, fraction=0.5, seed=3)
    a = reference_sets(image=x, copy_distance=radius, **kwargs)
    b = reference_sets(image=10 * x, copy_distance=10 * radius, **kwargs)  # the same draws at another scale
    assert [s.name for s in a] == ["m64", "m256"]
    for sa, sb in zip(a, b):
        assert sa.rows.shape == (2, int(sa.name[1:])) and np.array_equal(sa.rows, sb.rows)
        assert not np.array_equal(sa.rows[0], sa.rows[1])
    assert duplicate_distance(10 * x, n=1000, fraction=0.5, seed=3) == pytest.approx(10 * radius, rel=1e-5)


def test_radius_zero_is_the_plain_draw():
    x, _ = with_copies(n=500, copies=100)
    plain = reference_sets(n=500, mode="random", sizes=[50], draws=2, seed=0)
    off = reference_sets(n=500, mode="random", sizes=[50], draws=2, seed=0, image=x, copy_distance=0.0)
    assert np.array_equal(plain[0].rows, off[0].rows)


def test_a_dataset_of_one_image_still_fills_the_draw():
    x = np.ones((40, 8), dtype=np.float32)
    x[0] += 1  # the scale: one other point
    rows = draw_distinct(image=x, n=40, size=10, rng=np.random.default_rng(0), radius=0.5)
    assert len(np.unique(rows)) == 10


def test_copy_distance_is_half_the_typical_nearest_neighbour_distance():
    """Against a brute-force median of nearest-neighbour distances: on a lattice of spacing 1 every
    point's nearest neighbour is at 1; copies of one point (a fifth of the data) leave the median
    where it was, and it does not depend on N beyond the scale pool."""
    grid = np.stack(np.meshgrid(*[np.arange(10)] * 3), -1).reshape(-1, 3).astype(np.float32)  # 1,000 points
    assert duplicate_distance(grid, n=len(grid), fraction=0.5, seed=0) == pytest.approx(0.5)
    copies = np.concatenate([grid, np.repeat(grid[:1], 250, axis=0)])
    assert duplicate_distance(copies, n=len(copies), fraction=0.5, seed=0) == pytest.approx(0.5)
    assert duplicate_distance(grid, n=len(grid), fraction=0.0, seed=0) == 0.0


def test_the_caption_set_is_the_smallest_sets_draws_searched_by_caption():
    from clipscrub.neighbours import caption_set

    x, _ = with_copies(n=600, copies=10)
    sets = reference_sets(n=600, mode="random", sizes=[256, 64], draws=2, seed=1, image=x, copy_distance=0.0)
    cap = caption_set(sets)
    assert (cap.name, cap.modality) == ("t64", "text")
    assert np.array_equal(cap.rows, sets[0].rows) and sets[0].name == "m64" and sets[0].modality is None
