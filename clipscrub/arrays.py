"""Row access to large (N, d) .npy embedding files with memory bounded by what is read.

A numpy memmap keeps every page it has touched mapped (and counted in the process's RSS) for
as long as the map lives. Scanning 1M x 512 float32 embeddings through one memmap therefore
costs 2 GiB of RSS; ``RowReader`` maps the file only for the duration of one read.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from clipscrub.errors import DataError
from clipscrub.io import disk_full_error, fmt_bytes, require_file

EMBEDDING_DTYPES = ("float32", "float16")


def unit_rows(rows: np.ndarray) -> np.ndarray:
    """Rows (n, d) scaled to unit L2 norm in place (zero rows stay zero, non-finite stay non-finite)."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows /= np.where(norms > 0, norms, 1.0)
    return rows


def create_npy(path: str | Path, *, dtype: np.dtype | str | type, shape: tuple[int, ...],
               param: str = "--root") -> np.memmap:
    """A writable .npy memory map of ``shape`` whose disk blocks are reserved before it is used.

    ``open_memmap`` makes a sparse file: on a full disk the kernel finds out only when it writes a
    dirty page back, and the process dies of SIGBUS with no message. Reserving the blocks turns
    that into ENOSPC here, with the size it needs.
    """
    path = Path(path)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            del arr
            raise disk_full_error(path, needed=f"it needs {fmt_bytes(size)}", param=param) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without fallocate: go on sparse
            raise
    finally:
        os.close(fd)
    return arr


def write_rows(path: str | Path, *, row: int, block: np.ndarray, param: str = "--root") -> None:
    """Write ``block`` (b, ...) into the .npy file at ``path`` (a ``create_npy`` file of shape
    (..., n, ...)), viewed as rows of its last axes, starting at flat row ``row``: for a (r, N, K)
    array, ``row = draw * N + start`` writes ``[draw, start:start + b]``.

    Plain positioned writes, no map: processes on a shared filesystem fill disjoint rows of one
    file, and each write is on disk (and visible to other nodes) once this returns.
    """
    path = Path(path)
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    block = np.ascontiguousarray(block)
    if fortran or block.dtype != dtype or block.shape[1:] != shape[len(shape) - block.ndim + 1:]:
        raise DataError(f"{path} holds {dtype} {shape}; cannot write rows of {block.dtype} {block.shape} into it",
                        param=param)
    rows_total = int(np.prod(shape[: len(shape) - block.ndim + 1]))
    if not 0 <= row <= rows_total - len(block):
        raise DataError(f"rows [{row}, {row + len(block)}) lie outside the {rows_total} rows of {path}", param=param)
    row_bytes = block.nbytes // max(len(block), 1)
    data = memoryview(block.reshape(-1).view(np.uint8))
    fd = os.open(path, os.O_WRONLY)
    try:
        pos, done = offset + row * row_bytes, 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], pos + done)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # a file create_npy made is reserved: another filesystem's
            raise disk_full_error(path, needed=f"{fmt_bytes(len(data) - done)} left to write", param=param) from None
        raise
    finally:
        os.close(fd)


class RowReader:
    """Float32 rows of a 2-D .npy file (float32 or float16 on disk), read slice by slice;
    with ``normalize``, each row scaled to unit L2 norm as it is read."""

    def __init__(self, path: str | Path, *, normalize: bool = False):
        self.path = Path(path)
        self.normalize = normalize
        arr = np.load(self.path, mmap_mode="r")
        if arr.ndim != 2:
            raise DataError(f"{self.path} holds a {arr.ndim}-D array, expected (N, d)", param="--embeddings")
        if arr.dtype.name not in EMBEDDING_DTYPES:
            raise DataError(f"{self.path} holds {arr.dtype.name}, expected float32 or float16", param="--embeddings")
        self.shape: tuple[int, int] = (int(arr.shape[0]), int(arr.shape[1]))
        self.dtype = arr.dtype
        # float32 rows in C order are read with pread straight into the caller's buffer
        self._offset = int(arr.offset) if arr.dtype == np.float32 and arr.flags.c_contiguous else None
        del arr

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) as a C-contiguous float32 array (stop - start, d): ``out`` when given
        (float32, C-contiguous, that shape), filled in place. A buffer reused from chunk to chunk
        saves mapping fresh memory for every chunk, which costs more than the read itself on
        virtual machines that hand freed memory back to their host."""
        stop = min(stop, len(self))
        shape = (max(stop - start, 0), self.shape[1])
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}, not {out.dtype} {out.shape}")
        if self._offset is not None and out.size:
            data = memoryview(out.reshape(-1).view(np.uint8))
            fd = os.open(self.path, os.O_RDONLY)
            try:
                pos, done = self._offset + start * self.shape[1] * 4, 0
                while done < len(data):
                    got = os.preadv(fd, [data[done:]], pos + done)
                    if got == 0:
                        raise DataError(f"{self.path} ends before row {stop}: the file is truncated", param="--embeddings")
                    done += got
            finally:
                os.close(fd)
        elif out.size:
            arr = np.load(self.path, mmap_mode="r")
            out[...] = arr[start:stop]
            del arr  # unmaps: the pages leave this process's RSS
        return unit_rows(out) if self.normalize else out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at (sorted or not) indices ``rows`` (m,) as float32 (m, d), read one by one
        (``take_rows``: scattered rows through a memory map would make much of the file resident)."""
        out = np.ascontiguousarray(take_rows(self.path, rows), dtype=np.float32)
        return unit_rows(out) if self.normalize else out

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start, rows) for consecutive chunks of at most ``size`` rows, read into one buffer:
        each chunk's rows are overwritten by the next (copy what you keep)."""
        buffer = np.empty((min(size, len(self)), self.shape[1]), dtype=np.float32)
        for start in range(0, len(self), size):
            stop = min(len(self), start + size)
            yield start, self.read(start, stop, out=buffer[: stop - start])


def take_rows(path: str | Path, rows: np.ndarray, *, block: int | None = None) -> np.ndarray:
    """Rows ``rows`` (F,) of a C-order .npy of shape (N, ...), or with ``block`` of its
    ``block``-th (N, ...) of (B, N, ...): (F, ...), read with one pread per run of consecutive
    rows. A memory map would do, but its readahead brings far more than the rows into the process
    (at 4M samples, reading a few thousand scattered rows of the neighbour lists made 0.36 GiB of
    them resident)."""
    with open(path, "rb") as f:  # the header alone (a map would refuse a truncated file before saying where)
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset, c_order = f.tell(), not fortran or len(shape) < 2
    rows = np.asarray(rows, dtype=np.int64)
    if block is not None:
        offset += block * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        shape = shape[1:]
    out = np.empty((len(rows), *shape[1:]), dtype=dtype)
    if not c_order:  # np.save writes C order; another writer's layout is read through a map
        mapped = np.load(path, mmap_mode="r")
        return np.asarray((mapped if block is None else mapped[block])[rows])
    if len(rows) and (rows.min() < 0 or rows.max() >= shape[0]):
        raise IndexError(f"rows outside 0..{shape[0] - 1} of {path}")
    size = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    data = memoryview(out.reshape(-1).view(np.uint8))
    # runs of consecutive rows (all of them, for a whole-dataset reference set) in one read each
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    runs = zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(rows)].tolist()) if len(rows) else ()
    fd = os.open(path, os.O_RDONLY)
    try:
        for first, last in runs:
            at, stop, pos = first * size, last * size, offset + int(rows[first]) * size
            while at < stop:  # a read may return less than asked (above 2 GiB at once, say)
                got = os.preadv(fd, [data[at:stop]], pos)
                if got == 0:
                    raise DataError(f"{path} ends before row {int(rows[last - 1])}: the file is truncated",
                                    param=str(path))
                at, pos = at + got, pos + got
    finally:
        os.close(fd)
    return out


def chunk_buffer(buffers: dict[str, np.ndarray] | None, name: str, rows: int, dim: int) -> np.ndarray | None:
    """A float32 (rows, dim) buffer named ``name`` from ``buffers``, allocated there on first use
    (a chunk loop in one process passes the same dict to every chunk); None without ``buffers``
    (a chunk run alone reads into fresh memory)."""
    if buffers is None:
        return None
    held = buffers.get(name)
    if held is None or held.shape[0] < rows or held.shape[1] != dim:
        held = buffers[name] = np.empty((rows, dim), dtype=np.float32)
    return held[:rows]


class ChunkRows:
    """Rows [start, stop) of RowReaders, each file read once however often it is asked for: into
    ``buffers``'s buffer for that file (``chunk_buffer``) when given, else into fresh memory.
    ``on_read(reader, rows)`` sees each file's rows once, as they are read (e.g. to check them)."""

    def __init__(self, start: int, stop: int, buffers: dict[str, np.ndarray] | None = None,
                 on_read: Callable[[RowReader, np.ndarray], None] | None = None):
        self.start, self.stop, self.buffers, self.on_read = start, stop, buffers, on_read
        self._read: dict[str, np.ndarray] = {}

    def __call__(self, reader: RowReader) -> np.ndarray:
        key = str(reader.path)
        if key not in self._read:
            rows = min(self.stop, len(reader)) - self.start
            self._read[key] = reader.read(self.start, self.stop,
                                          out=chunk_buffer(self.buffers, key, rows, reader.shape[1]))
            if self.on_read is not None:
                self.on_read(reader, self._read[key])
        return self._read[key]


# ------------------------------------------------------------------ the embed stage's output
def load_embeddings(emb_dir: Path, *, normalize: bool = False) -> tuple[RowReader, RowReader, np.ndarray]:
    """(image (N, d), text (N, d), ids (N,)) of the embed stage's output, with equal shapes. The
    values are checked finite by the chunks that read them (``require_finite``), not here: a
    separate pass over N rows cost as much as reading them for the search. With ``normalize``
    the readers return unit rows."""
    image, text = (
        RowReader(require_file(emb_dir / f"{name}.npy", param="--embeddings", what="embeddings"), normalize=normalize)
        for name in ("image", "text")
    )
    ids = np.load(require_file(emb_dir / "ids.npy", param="--embeddings", what="embeddings"))
    if len(ids) == 0:
        raise DataError("the embeddings are empty", param="--embeddings")
    if image.shape != text.shape or len(image) != len(ids):
        raise DataError(
            f"image {image.shape}, text {text.shape} and ids ({len(ids)},) embeddings disagree", param="--embeddings"
        )
    return image, text, ids


def require_finite(ids: np.ndarray, start: int) -> Callable[[RowReader, np.ndarray], None]:
    """A ``ChunkRows`` ``on_read`` check: raise unless every value of a file's rows (Q, d), rows
    [start, start + Q) of the embeddings whose ids are ``ids``, is finite."""
    def check(reader: RowReader, rows: np.ndarray) -> None:
        # a float64 row sum is finite exactly when every float32 in the row is (it cannot
        # overflow), without a (Q, d) mask
        bad = ~np.isfinite(rows.sum(axis=1, dtype=np.float64))
        if bad.any():
            raise DataError(
                f"{int(bad.sum())} {reader.path.stem} embeddings of rows [{start}, {start + len(rows)}) are not "
                f"finite, e.g. ids {ids[start:start + len(rows)][bad][:5].tolist()}",
                param="--embeddings",
            )
    return check
