"""Review lists name samples by id, key, file or url (clipscrub.review)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipscrub.errors import DataError, ParamError
from clipscrub.review import IDENTIFIERS, read_entries, read_review_list, resolve_entries

MANIFEST = pl.DataFrame({
    "id": [0, 1, 2, 3, 4, 5],
    "key": ["0007", "s001", "s002", "12", "s004", "s005"],
    "file": ["a.jpg", "b c.jpg", "dup.jpg", "d.jpg", "dup.jpg", "f.jpg"],
    "url": ["http://x/a.jpg#frag", "http://x/b.jpg", "http://x/c.jpg", "http://x/d.jpg", "http://x/e.jpg", "http://x/f"],
    "status": ["ok", "ok", "ok", "ok", "ok", "failed"],
})


@pytest.mark.parametrize(("text", "ids"), [
    ("1\n2\n", [1, 2]),  # ids, as before
    ("s001\n# a comment\ns004  # why\n", [1, 4]),  # keys, comments
    ("b c.jpg\nd.jpg\n", [1, 3]),  # file names, spaces inside
    ("http://x/a.jpg#frag\n", [0]),  # a url's fragment is no comment
    ("0007\n", [0]),  # a zero-padded number is a key, not id 7
    ("2\ns001\nd.jpg\n", [1, 2, 3]),  # mixed
])
def test_a_text_list_names_samples_by_any_identifier(tmp_path, text, ids):
    (tmp_path / "list.txt").write_text(text)
    assert read_review_list(tmp_path / "list.txt", manifest=MANIFEST, param="filter.keep_ids").tolist() == ids


@pytest.mark.parametrize(("columns", "ids"), [
    ({"key": ["s002", "12"]}, [2, 3]),
    ({"file": ["a.jpg"]}, [0]),
    ({"url": ["http://x/b.jpg"]}, [1]),
    ({"id": [4], "key": ["s001"]}, [4]),  # removed.parquet holds both: the id wins
    ({"key": ["s001", "s002"], "status": ["ok", "failed"]}, [1]),  # a manifest: failed rows skipped
])
@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv"])
def test_a_table_names_samples_by_its_first_identifier_column(tmp_path, columns, ids, suffix):
    table = pl.DataFrame(columns)
    path = tmp_path / f"list{suffix}"
    {".parquet": table.write_parquet, ".csv": table.write_csv,
     ".tsv": lambda p: table.write_csv(p, separator="\t")}[suffix](path)
    assert read_review_list(path, manifest=MANIFEST, param="filter.keep_ids").tolist() == ids


@pytest.mark.parametrize(("text", "error", "message"), [
    ("s999\nzzz.jpg\n", DataError,
     "2 entries name no scored sample of this dataset (unknown, or failed to download), e.g. ['s999', 'zzz.jpg']"),
    ("s005\n", DataError, "1 entries name no scored sample of this dataset (unknown, or failed to download), e.g. ['s005']"),
    ("99\n", DataError, "1 ids are not scored samples of this dataset (unknown, or failed to download), e.g. [99]"),
    ("12\n", ParamError, "1 entries name more than one sample, e.g. '12' (ids 3, 12)"),  # see below
    ("dup.jpg\n", ParamError, "1 entries name more than one sample, e.g. 'dup.jpg' (ids 2, 4): name those samples by id, "
                              "in a table with an id column"),
])
def test_an_entry_must_name_one_scored_sample(tmp_path, text, error, message):
    manifest = MANIFEST
    if text == "12\n":  # id 12 exists, and "12" is also sample 3's key
        manifest = pl.concat([MANIFEST, MANIFEST.head(1).with_columns(id=pl.lit(12, pl.Int64), key=pl.lit("k12"),
                                                                       file=pl.lit("z.jpg"), url=pl.lit("u"))])
    (tmp_path / "list.txt").write_text(text)
    with pytest.raises(error) as info:
        read_review_list(tmp_path / "list.txt", manifest=manifest, param="filter.remove_ids")
    assert info.value.param == "filter.remove_ids" and info.value.message.startswith(message)


def test_a_table_without_an_identifier_column_is_refused(tmp_path):
    pl.DataFrame({"uid": [1]}).write_csv(tmp_path / "ids.csv")
    with pytest.raises(DataError, match=r"ids.csv has no id, key, file or url column \(columns: uid\)"):
        read_entries(tmp_path / "ids.csv", param="filter.keep_ids")


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_mix_of_identifiers_names_exactly_the_chosen_samples(data):
    """Choose scored samples, name each by a random identifier of its own: the list resolves to them."""
    n = data.draw(st.integers(1, 30))
    manifest = pl.DataFrame({"id": np.arange(n) * 3 + 1000, "key": [f"k{i:05d}" for i in range(n)],
                             "file": [f"img/{i}.jpg" for i in range(n)], "url": [f"https://h/{i}?q=1" for i in range(n)],
                             "status": ["ok"] * n})
    chosen = sorted(data.draw(st.sets(st.integers(0, n - 1))))
    entries = [str(manifest.row(i, named=True)[data.draw(st.sampled_from(IDENTIFIERS))]) for i in chosen]
    ids = resolve_entries(entries, None, manifest=manifest, param="filter.keep_ids")
    assert ids.tolist() == [i * 3 + 1000 for i in chosen]
