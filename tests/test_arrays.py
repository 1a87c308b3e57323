"""RowReader: rows read with pread (float32) or through a map (float16), into fresh memory or
a caller's buffer; ChunkRows reads each file once per chunk."""

from __future__ import annotations

import numpy as np
import pytest

from clipscrub.arrays import ChunkRows, RowReader, chunk_buffer, take_rows
from clipscrub.errors import DataError


@pytest.fixture(params=["float32", "float16", "fortran"])
def stored(request, tmp_path):
    rows = np.random.default_rng(0).normal(size=(37, 5)).astype(np.float32)
    path = tmp_path / "rows.npy"
    if request.param == "fortran":  # read through the map, as float16 is
        np.save(path, np.asfortranarray(rows))
        return path, rows
    np.save(path, rows.astype(request.param))
    return path, rows.astype(request.param).astype(np.float32)


@pytest.mark.parametrize("start,stop", [(0, 37), (0, 10), (30, 37), (30, 50), (5, 5)])
def test_read_gives_the_rows_fresh_or_into_a_buffer(stored, start, stop):
    path, rows = stored
    reader = RowReader(path)
    expected = rows[start:stop]
    fresh = reader.read(start, stop)
    assert fresh.dtype == np.float32 and fresh.flags.c_contiguous
    np.testing.assert_array_equal(fresh, expected)
    buffer = np.full((len(expected), 5), np.nan, dtype=np.float32)
    assert reader.read(start, stop, out=buffer) is buffer
    np.testing.assert_array_equal(buffer, expected)


def test_read_normalises_in_the_buffer(stored):
    path, rows = stored
    buffer = np.empty((10, 5), dtype=np.float32)
    out = RowReader(path, normalize=True).read(3, 13, out=buffer)
    assert out is buffer
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out * np.linalg.norm(rows[3:13], axis=1, keepdims=True), rows[3:13], rtol=1e-5)


def test_read_refuses_a_buffer_of_another_shape_or_type(stored):
    reader = RowReader(stored[0])
    for bad in (np.empty((9, 5), np.float32), np.empty((10, 5), np.float64), np.empty((5, 10), np.float32).T):
        with pytest.raises(ValueError, match="C-contiguous float32"):
            reader.read(0, 10, out=bad)


def test_a_truncated_file_is_a_data_error(tmp_path):
    path = tmp_path / "rows.npy"
    np.save(path, np.ones((100, 8), np.float32))
    reader = RowReader(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 8 * 4 * 10)
    with pytest.raises(DataError, match="truncated"):
        reader.read(80, 100)


def test_chunks_cover_every_row_once_in_one_buffer(stored):
    path, rows = stored
    seen, buffers = [], set()
    for start, chunk in RowReader(path).chunks(10):
        seen.append((start, chunk.copy()))
        buffers.add(chunk.__array_interface__["data"][0])
    assert [s for s, _ in seen] == [0, 10, 20, 30]
    np.testing.assert_array_equal(np.concatenate([c for _, c in seen]), rows)
    assert len(buffers) == 1  # one buffer, reused


def test_chunk_buffer_grows_and_is_reused():
    assert chunk_buffer(None, "x", 4, 3) is None
    held: dict[str, np.ndarray] = {}
    a = chunk_buffer(held, "x", 4, 3)
    b = chunk_buffer(held, "x", 2, 3)  # a last, shorter chunk: a view of the same memory
    assert a.shape == (4, 3) and b.shape == (2, 3) and np.shares_memory(a, b)
    c = chunk_buffer(held, "x", 6, 3)
    assert c.shape == held["x"].shape == (6, 3) and np.shares_memory(c, held["x"]) and not np.shares_memory(a, c)


def test_chunk_rows_reads_each_file_once(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    for name in ("image", "text"):
        np.save(tmp_path / f"{name}.npy", rng.normal(size=(20, 4)).astype(np.float32))
    image, text = RowReader(tmp_path / "image.npy"), RowReader(tmp_path / "text.npy")
    reads = []
    original = RowReader.read

    def counted(self, start, stop, *, out=None):
        reads.append(self.path.name)
        return original(self, start, stop, out=out)

    monkeypatch.setattr(RowReader, "read", counted)
    buffers: dict[str, np.ndarray] = {}
    rows = ChunkRows(16, 24, buffers)
    first = rows(image)
    assert rows(image) is first and rows(RowReader(tmp_path / "image.npy")) is first
    np.testing.assert_array_equal(rows(text), np.load(tmp_path / "text.npy")[16:])
    assert reads == ["image.npy", "text.npy"]
    assert set(buffers) == {str(tmp_path / "image.npy"), str(tmp_path / "text.npy")}


@pytest.mark.parametrize("dtype", ["float16", "float32", "int32"])
@pytest.mark.parametrize("block", [None, 0, 2])
def test_take_rows_reads_the_rows_of_a_block(tmp_path, dtype, block):
    rng = np.random.default_rng(0)
    whole = rng.normal(size=(3, 50, 4)).astype(dtype) if block is not None else rng.normal(size=(50, 4)).astype(dtype)
    np.save(tmp_path / "a.npy", whole)
    rows = np.array([49, 0, 7, 7, 8, 9, 23, 24])  # scattered, repeated and runs of consecutive rows
    want = whole[rows] if block is None else whole[block][rows]
    got = take_rows(tmp_path / "a.npy", rows, block=block)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert take_rows(tmp_path / "a.npy", np.array([], dtype=np.int64), block=block).shape == (0, 4)
    with pytest.raises(IndexError):
        take_rows(tmp_path / "a.npy", np.array([50]), block=block)


def test_take_rows_of_a_fortran_order_file(tmp_path):
    whole = np.asfortranarray(np.arange(40, dtype=np.float32).reshape(10, 4))
    np.save(tmp_path / "f.npy", whole)
    assert np.array_equal(take_rows(tmp_path / "f.npy", np.array([3, 1])), whole[[3, 1]])


def test_row_reader_take_reads_scattered_rows(stored):
    path, rows = stored
    wanted = np.array([5, 0, 5, 36])
    got = RowReader(path).take(wanted)
    assert got.dtype == np.float32 and got.flags.c_contiguous and np.array_equal(got, rows[wanted])


def test_take_rows_reads_every_row_in_order_and_finds_a_truncated_file(tmp_path):
    whole = np.arange(3000, dtype=np.float32).reshape(1000, 3)
    np.save(tmp_path / "a.npy", whole)
    assert np.array_equal(take_rows(tmp_path / "a.npy", np.arange(1000)), whole)
    with open(tmp_path / "a.npy", "r+b") as f:
        f.truncate(f.seek(0, 2) - 12 * 10)
    with pytest.raises(DataError, match="ends before row 999: the file is truncated"):
        take_rows(tmp_path / "a.npy", np.arange(900, 1000))
