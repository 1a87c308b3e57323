from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipscrub.detectors import robust_scales
from clipscrub.order import SortedRuns, float_key, key_float, sorted_finite

floats = st.floats(allow_nan=False, allow_infinity=False, width=64)


@given(st.lists(st.floats(allow_nan=False, width=64), min_size=2, max_size=2))
def test_keys_order_as_floats(pair):
    a, b = pair
    assert key_float(float_key(a)) == a
    if a < b:
        assert float_key(a) < float_key(b)


@st.composite
def pieces(draw):
    """A column (few distinct values, so ties are common, or any floats) cut into runs."""
    values = draw(st.one_of(
        st.lists(st.sampled_from([-3.0, -0.0, 0.0, 0.5, 1.0, 1.0 + 2**-52, 7.0, 1e300]), min_size=1, max_size=40),
        st.lists(floats, min_size=1, max_size=40)))
    column = np.array(values)
    cuts = sorted(draw(st.lists(st.integers(0, len(column)), max_size=5)))
    return column, [column[a:b] for a, b in zip([0, *cuts], [*cuts, len(column)])]


@settings(max_examples=300, deadline=None)
@given(pieces())
def test_order_statistics_of_pieces_equal_the_whole_columns(case):
    column, parts = case
    runs = SortedRuns([sorted_finite(p) for p in parts])
    whole = np.sort(column)
    assert runs.size == len(column)
    for k in {0, len(column) // 2, len(column) - 1}:
        assert runs.kth(k) == whole[k]
    # the very floats the in-memory fusion uses: the same z-scores, whatever the pieces
    assert runs.robust_scales() == robust_scales(column)


def test_non_finite_values_are_left_out_of_runs():
    run = sorted_finite(np.array([np.nan, 2.0, -np.inf, 1.0, np.inf]))
    assert run.tolist() == [1.0, 2.0]


def test_runs_from_files_are_mapped(tmp_path):
    rng = np.random.default_rng(0)
    column = rng.normal(size=10_001)
    paths = []
    for i, part in enumerate(np.array_split(column, 7)):
        np.save(tmp_path / f"{i}.npy", sorted_finite(part))
        paths.append(tmp_path / f"{i}.npy")
    runs = SortedRuns(paths)
    assert isinstance(runs.runs[0], np.memmap)
    assert runs.median() == np.median(column)
    assert runs.robust_scales() == robust_scales(column)


def test_rank_out_of_range():
    with pytest.raises(IndexError):
        SortedRuns([np.array([1.0])]).kth(1)
