"""Great Expectations suites: each passes on the tiny run's real outputs and names the
expectation and the offending ids when one fact is broken."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipscrub.arrays import RowReader
from clipscrub.neighbours import entry_owners
from clipscrub.validation import (
    ValidationError,
    block_view,
    embedding_tables,
    filter_tables,
    manifest_tables,
    neighbour_tables,
    score_tables,
    validate,
)


def _manifest(root):
    return pl.read_parquet(root / "raw" / "manifest.parquet")


def _set(frame: pl.DataFrame, column: str, row_id: int, value) -> pl.DataFrame:
    return frame.with_columns(pl.when(pl.col("id") == row_id).then(pl.lit(value)).otherwise(pl.col(column)).alias(column))


MANIFEST_BREAKS = {
    "none": (lambda m: m, None),
    "repeated id": (lambda m: _set(m, "id", 9, 8), "manifest.manifest: expect_column_values_to_be_unique(id): 2 of 400 rows, e.g. ids [8, 8]"),
    "unknown status": (lambda m: _set(m, "status", 4, "maybe"), "expect_column_values_to_be_in_set(status)"),
    "blank caption": (lambda m: _set(m, "caption", 11, "   "), "expect_column_values_to_be_between(caption_chars) min_value=1: 1 of 400 rows, e.g. ids [11]"),
    "no image hash": (lambda m: _set(m, "image_sha256", 12, None), "expect_column_values_to_not_be_null(image_sha256): 1 of 400 rows, e.g. ids [12]"),
    "short image hash": (lambda m: _set(m, "image_sha256", 13, "abc"), "expect_column_value_lengths_to_equal(image_sha256) value=64: 1 of 400 rows, e.g. ids [13]"),
}


@pytest.mark.parametrize("case", MANIFEST_BREAKS)
def test_manifest_suite(tiny_run, tmp_path, case):
    root, _ = tiny_run
    breaks, expected = MANIFEST_BREAKS[case]
    tables = manifest_tables(breaks(_manifest(root)))
    docs = tmp_path / "validation" / "download"
    if expected is None:
        assert validate("manifest", tables, docs_dir=docs)["expectations"] == 7
    else:
        with pytest.raises(ValidationError) as info:
            validate("manifest", tables, docs_dir=docs)
        assert expected in str(info.value)
        assert f"data docs: {docs / 'index.html'}" in str(info.value)
    # data docs either way: the suite, and the validation result with its unexpected values
    assert (docs / "index.html").is_file()
    assert list((docs / "validations").rglob("*.html"))


def test_failed_rows_need_no_caption_or_hash(tiny_run, tmp_path):
    m = _set(_set(_set(_manifest(tiny_run[0]), "status", 3, "failed"), "caption", 3, ""), "image_sha256", 3, None)
    validate("manifest", manifest_tables(m), docs_dir=tmp_path)


def _embedding_tables(root, tmp_path, image=None, dim=None, ok_ids=None):
    emb = root / "embeddings"
    ids = np.load(emb / "ids.npy")
    img_path = emb / "image.npy"
    if image is not None:
        img_path = tmp_path / "image.npy"
        np.save(img_path, image)
    return embedding_tables(ids=ids, image=RowReader(img_path), text=RowReader(emb / "text.npy"),
                            dim=dim if dim is not None else np.load(emb / "image.npy").shape[1],
                            ok_ids=ids if ok_ids is None else ok_ids)


@pytest.mark.parametrize(("case", "expected"), [
    ("none", None),
    ("nan", "expect_column_values_to_not_be_null(image_norm): 1 of 400 rows, e.g. ids [17]"),
    ("zero", "expect_column_values_to_be_between(image_norm) min_value=1e-06: 1 of 400 rows, e.g. ids [18] (values [0.0])"),
    ("dimension", "expect_column_values_to_be_in_set(image_dim) value_set=[32]: 400 of 400 rows"),
    ("row count", "expect_table_row_count_to_equal value=399: observed 400"),
])
def test_embedding_suite(tiny_run, tmp_path, case, expected):
    root, _ = tiny_run
    image = np.load(root / "embeddings" / "image.npy")
    kwargs = {}
    if case == "nan":
        image[17, 0] = np.nan
        kwargs["image"] = image
    elif case == "zero":
        image[18] = 0
        kwargs["image"] = image
    elif case == "dimension":
        kwargs["dim"] = 32
    elif case == "row count":
        kwargs["ok_ids"] = np.load(root / "embeddings" / "ids.npy")[:-1]
    tables = _embedding_tables(root, tmp_path, **kwargs)
    if expected is None:
        validate("embed", tables, docs_dir=tmp_path / "docs")
        return
    with pytest.raises(ValidationError, match=r"^embed: validation failed: embed\.embeddings: ") as info:
        validate("embed", tables, docs_dir=tmp_path / "docs")
    assert expected in str(info.value)


@pytest.mark.parametrize(("case", "expected"), [
    ("none", None),
    ("self", "expect_column_values_to_be_in_set(self_hits) value_set=[0]: 1 of 1 blocks, e.g. ids [5]"),
    ("unsorted", "expect_column_values_to_be_in_set(unsorted) value_set=[0]: 1 of 1 blocks, e.g. ids [6]"),
    ("out of range", "expect_column_values_to_be_between(max_entry)"),
    ("negative", "expect_column_values_to_be_between(min_distance) min_value=0: 1 of 1 blocks, e.g. ids [8]"),
])
def test_neighbour_suite(tiny_run, tmp_path, case, expected):
    root, params = tiny_run
    idx = root / "index" / "m120"
    nb, dist = np.load(idx / "neighbours.npy"), np.load(idx / "distances.npy")
    ref_rows = np.load(idx / "ref_rows.npy")
    owners = [entry_owners(rows, params.index.modality) for rows in ref_rows]
    entries = len(owners[0])
    if case == "self":
        own = int(np.flatnonzero(owners[0] == 5)[0]) if (owners[0] == 5).any() else None
        row = 5
        if own is None:  # sample 5 is not a reference: pick the first one that is
            row = int(owners[0][0])
            own = 0
        nb[0, row, 0] = own
        expected = expected.replace("ids [5]", f"ids [{row}]")
    elif case == "unsorted":
        dist[0, 6, 0] = dist[0, 6, 1] + 0.1
    elif case == "out of range":
        nb[0, 7, -1] = entries
    elif case == "negative":
        dist[0, 8, 0] = -0.5
    tables = neighbour_tables(ids=np.load(root / "embeddings" / "ids.npy"), neighbours=nb, distances=dist,
                              owners=owners, entries=entries)
    if expected is None:
        validate("index", tables, docs_dir=tmp_path)
        return
    with pytest.raises(ValidationError) as info:
        validate("index", tables, docs_dir=tmp_path)
    assert expected in str(info.value)


def test_score_suite_accepts_marked_and_rejects_unmarked_non_finite(tiny_run, tmp_path):
    root, params = tiny_run
    scores = pl.read_parquet(root / "scores" / "scores.parquet")
    ids = np.load(root / "embeddings" / "ids.npy")
    detectors = params.score.detectors
    nan_dao = _set(scores, "dao_score", 21, float("nan"))
    validate("score", score_tables(_set(nan_dao, "non_finite_scores", 21, "dao"), ids=ids, detectors=detectors),
             docs_dir=tmp_path)
    inf_kdist = _set(scores, "kdist_score", 22, float("inf"))
    with pytest.raises(ValidationError) as info:
        validate("score", score_tables(inf_kdist, ids=ids, detectors=detectors), docs_dir=tmp_path)
    assert "expect_column_values_to_be_in_set(unmarked_kdist) value_set=[0]: 1 of 1 blocks, e.g. ids [22]" in str(info.value)
    with pytest.raises(ValidationError, match=r"expect_column_sum_to_be_between\(rows\) max_value=400, min_value=400: observed 399"):
        validate("score", score_tables(scores.head(399), ids=ids, detectors=detectors), docs_dir=tmp_path)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), block=st.integers(1, 12), seed=st.integers(0, 2**31), nans=st.integers(0, 3))
def test_block_view_holds_each_blocks_extremes_and_who_holds_them(n, block, seed, nans):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    low = rng.normal(size=n)
    low[rng.choice(n, size=min(nans, n), replace=False)] = np.nan
    high = rng.integers(-5, 5, size=n)
    count = rng.integers(0, 3, size=n)
    view = block_view(ids=ids, figures={"low": (low, "min"), "high": (high, "max"), "count": (count, "sum")}, block=block)
    assert len(view) == -(-n // block) and view["rows"].sum() == n
    for b, row in view.iterrows():
        part = slice(b * block, (b + 1) * block)
        who = dict(zip(ids[part].tolist(), range(part.start, part.start + block)))
        if np.isnan(low[part]).any():
            assert np.isnan(row["low"]) and np.isnan(low[who[row["low_id"]]])
        else:
            assert row["low"] == low[part].min() == low[who[row["low_id"]]]
        assert row["high"] == high[part].max() == high[who[row["high_id"]]]
        assert row["count"] == count[part].sum() and count[who[row["count_id"]]] == count[part].max()


@pytest.mark.parametrize("block", [1, 7, 400])
def test_block_suites_fail_on_one_sample_in_any_block_and_name_it(tiny_run, tmp_path, monkeypatch, block):
    import clipscrub.validation as validation

    monkeypatch.setattr(validation, "BLOCK_ROWS", block)
    root, params = tiny_run
    scores = pl.read_parquet(root / "scores" / "scores.parquet")
    ids = np.load(root / "embeddings" / "ids.npy")
    blocks = -(-len(ids) // block)
    validate("score", score_tables(scores, ids=ids, detectors=params.score.detectors), docs_dir=tmp_path)
    late = int(ids[-3])  # in the last block whatever the size
    broken = _set(scores, "slof_score", late, float("nan"))
    with pytest.raises(ValidationError) as info:
        validate("score", score_tables(broken, ids=ids, detectors=params.score.detectors), docs_dir=tmp_path)
    assert f"expect_column_values_to_be_in_set(unmarked_slof) value_set=[0]: 1 of {blocks} blocks, e.g. ids [{late}]" in str(info.value)
    swapped = scores.with_columns(pl.Series("id", np.r_[ids[:5], ids[6], ids[5], ids[7:]]))
    with pytest.raises(ValidationError) as info:
        validate("score", score_tables(swapped, ids=ids, detectors=params.score.detectors), docs_dir=tmp_path)
    assert "expect_column_values_to_be_in_set(id_mismatch) value_set=[0]:" in str(info.value)
    assert f"e.g. ids [{ids[6]}" in str(info.value)


def test_filter_suite(tiny_run, tmp_path):
    root, _ = tiny_run
    clean = root / "clean"
    kept, removed = pl.read_parquet(clean / "manifest.parquet"), pl.read_parquet(clean / "removed.parquet")
    scored = _manifest(root).filter(pl.col("status") == "ok")["id"]
    required = ["manifest.parquet", "removed.parquet", "lineage.json"]
    validate("filter", filter_tables(kept=kept, removed=removed, scored_ids=scored, out_dir=clean, required=required),
             docs_dir=tmp_path)
    both = pl.concat([kept, kept.head(2).select(kept.columns)])
    with pytest.raises(ValidationError) as info:
        validate("filter", filter_tables(kept=both, removed=removed, scored_ids=scored, out_dir=clean, required=required),
                 docs_dir=tmp_path)
    first = kept["id"][0]  # its second row is the first repeat
    assert f"filter.samples: expect_column_values_to_be_in_set(repeated_id) value_set=[0]: 1 of 1 blocks, e.g. ids [{first}] (values [2])" in str(info.value)
    assert "expect_column_sum_to_be_between(rows) max_value=400, min_value=400: observed 402" in str(info.value)
    moved = int(kept["id"][-1])  # also removed, without a reason: in both, and unexplained
    no_reason = pl.concat([removed, kept.tail(1).select("id", "key", "caption")], how="diagonal_relaxed")
    stranger = pl.concat([removed, pl.DataFrame({"id": [10**9], "reason": ["kdist_score_tail"]})], how="diagonal_relaxed")
    for frame, expected in ((no_reason, f"no_reason) value_set=[0]: 1 of 1 blocks, e.g. ids [{moved}]"),
                            (no_reason, f"repeated_id) value_set=[0]: 1 of 1 blocks, e.g. ids [{moved}]"),
                            (stranger, "unscored) value_set=[0]: 1 of 1 blocks, e.g. ids [1000000000]")):
        with pytest.raises(ValidationError) as info:
            validate("filter", filter_tables(kept=kept, removed=frame, scored_ids=scored, out_dir=clean,
                                             required=required), docs_dir=tmp_path)
        assert expected in str(info.value)
    (tmp_path / "version").mkdir()
    with pytest.raises(ValidationError, match=r"filter\.files: expect_column_values_to_be_between\(bytes\) min_value=1: 3 of 3 rows, e\.g\. files \['manifest\.parquet'"):
        validate("filter", filter_tables(kept=kept, removed=removed, scored_ids=scored, out_dir=tmp_path / "version",
                                         required=required), docs_dir=tmp_path / "docs")


@settings(max_examples=300, deadline=None)
@given(kept=st.lists(st.integers(0, 40), max_size=30), removed=st.lists(st.integers(0, 40), max_size=12),
       sort_kept=st.booleans(), sort_removed=st.booleans())
def test_repeated_ids_as_a_sort_of_every_id_finds_them(kept, removed, sort_kept, sort_removed):
    """The filter suite's repeats, searched where kept and removed ascend, are the later rows of
    each id that a stable sort of all of them gives (kept rows first)."""
    from clipscrub.validation import _repeated

    ids = np.array((sorted(set(kept)) if sort_kept else kept) + (sorted(removed) if sort_removed else removed),
                   dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    expected = np.zeros(len(ids), dtype=np.uint8)
    expected[order[1:]] = ids[order[1:]] == ids[order[:-1]]
    n_kept = len(set(kept)) if sort_kept else len(kept)
    np.testing.assert_array_equal(_repeated(ids, n_kept), expected)
