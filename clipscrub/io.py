"""File helpers: atomic outputs, content hashes, per-stage lineage records."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl

from clipscrub.errors import ClipscrubError, DataError, ParamError

LINEAGE_FILE = "lineage.json"
_CODE_PACKAGES = ("clipscrub", "clipscrub.stages", "clipscrub.flows")


# A stage checks its inputs against their lineage and then records their hashes in its own:
# keyed by the file's identity and version, the second hash of a multi-GB array is free.
_HASHES: dict[tuple[int, ...], str] = {}


# Files this large have their hash kept on disk too, so the next process (a cluster worker, the
# next stage's CLI call) does not read gigabytes again: the same key, one small file per entry.
DISK_MEMO_MIN_BYTES = 64 << 20


def hash_cache_dir() -> Path | None:
    """Where hashes of large files are kept across processes: ``$CLIPSCRUB_HASH_CACHE``
    (``off`` disables it), else ``$XDG_CACHE_HOME/clipscrub/sha256`` (``~/.cache/...``). Anyone
    who can write there can vouch for a file, like anyone who can rewrite a lineage.json."""
    configured = os.environ.get("CLIPSCRUB_HASH_CACHE")
    if configured is not None:
        return None if configured.strip().lower() in ("", "off", "0", "false") else Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipscrub" / "sha256"


def _disk_memo(key: tuple[int, ...]) -> Path | None:
    where = hash_cache_dir()
    return where / "-".join(map(str, key)) if where is not None else None


def _read_disk_memo(entry: Path | None) -> str | None:
    try:
        digest = entry.read_text().split()[0] if entry is not None else None
    except (OSError, IndexError, UnicodeDecodeError):
        return None
    return digest if digest and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest) else None


def _write_disk_memo(entry: Path | None, digest: str, path: str | Path) -> None:
    if entry is None:
        return
    tmp = entry.with_name(f".{entry.name}.{uuid.uuid4().hex[:8]}")
    try:  # a cache: a read-only or full home only costs the next process a re-read
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(f"{digest} {Path(path).resolve()}\n")
        os.replace(tmp, entry)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def sha256_file(path: str | Path, *, chunk: int = 1 << 20) -> str:
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)  # ctime: a write forging mtime moves it
    if key in _HASHES:
        return _HASHES[key]
    entry = _disk_memo(key) if st.st_size >= DISK_MEMO_MIN_BYTES else None
    if (known := _read_disk_memo(entry)) is not None:
        _HASHES[key] = known
        return known
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    _HASHES[key] = h.hexdigest()
    _write_disk_memo(entry, _HASHES[key], path)
    return _HASHES[key]


def sha256_path(path: str | Path) -> str:
    """Content hash of a file, or of a directory as sorted (relative path, file hash) pairs."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise DataError(f"input not found: {path}", param=str(path))
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(p.relative_to(path).as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def code_version(module: str | None = None) -> str:
    """``<version>+<hash>`` of the code: of ``module`` and the package modules it imports (a
    stage's code, ``clipscrub.dag.code_version``), or without ``module`` of every module of the
    package (what made a cleaned version). Modules are named, not located, so a clone and an
    installed wheel of the same code agree."""
    if module is not None:
        from clipscrub.dag import code_version as imported_code_version

        return imported_code_version(module)
    import importlib.util

    from clipscrub import __version__

    h = hashlib.sha256()
    for package in _CODE_PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in spec.submodule_search_locations or []:
            for p in sorted(Path(folder).glob("*.py")):
                h.update(f"{package}.{p.stem}".encode() + b"\0" + p.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


def _check_writable(parent: Path, param: str) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ParamError(f"cannot create output directory {parent}: {exc.strerror}", param=param) from None
    if not os.access(parent, os.W_OK):
        raise ParamError(f"output directory {parent} is not writable", param=param)


def check_writable_dir(path: str | Path, *, param: str) -> None:
    """Prove that ``path`` (or its nearest existing parent) takes new files, creating nothing."""
    target = Path(path)
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ParamError(f"{path} is not writable ({existing} does not accept new files)", param=param)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ParamError(f"{path} is not writable ({existing} does not accept new files: {exc.strerror})",
                         param=param) from None


def _scratch_suffix() -> str:
    # the owner's pid and host in the name: a run sweeps only scratch whose owner is gone
    return f"{uuid.uuid4().hex[:8]}-{os.getpid()}-{socket.gethostname()}"


def _owner_alive(suffix: str) -> bool:
    """Whether the process named in a scratch suffix (``<hex>-<pid>-<host>``) still runs."""
    parts = suffix.split("-", 2)
    if len(parts) < 3 or not parts[1].isdigit():
        return False  # no owner recorded: left by an older clipscrub
    pid, host = int(parts[1]), parts[2]
    if host != socket.gethostname():
        return True  # another machine's process (a shared filesystem): we cannot tell, so keep it
    if pid == os.getpid():
        return False  # our own scratch from an earlier block would have been removed by it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_dead_scratch(parent: Path, name: str) -> None:
    # scratch left by a killed run (SIGKILL skips the cleanup) would pile up otherwise, and so
    # would a replaced output a crash between the swap's two renames left behind; a live run's
    # scratch (another process writing the same output) is not ours to remove
    for prefix in (f".{name}.tmp-", f".{name}.old-"):
        for stale in parent.glob(glob.escape(prefix) + "*"):
            if not _owner_alive(stale.name[len(prefix):]):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _is_disk_full(exc: BaseException | None) -> bool:
    if isinstance(exc, ClipscrubError):
        return False  # already says what to do (create_npy names the space it needs)
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        # polars and pyarrow report the OS error inside their own exception's text
        if "No space left on device" in str(exc) or "os error 28" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(out: Path, *, needed: str, param: str = "--root") -> DataError:
    free = shutil.disk_usage(out.parent).free
    return DataError(f"no space left on the device writing {out}: {needed}, {fmt_bytes(free)} free; free some "
                     f"space or write to another {param} (nothing was published)", param=param)


def fmt_bytes(n: float) -> str:
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def seal_outputs(out_dir: Path) -> None:
    """Record the sha256 of every file of a stage's output in its lineage.json (``outputs``), so a
    downstream stage can check that it reads what this stage wrote (``check_outputs``)."""
    path = out_dir / LINEAGE_FILE
    lineage = read_json(path)
    lineage["outputs"] = {
        p.relative_to(out_dir).as_posix(): sha256_file(p)
        for p in sorted(out_dir.rglob("*")) if p.is_file() and p != path
    }
    write_json(path, lineage)


def check_outputs(out_dir: str | Path, *, stage: str, root: str | Path) -> None:
    """Raise unless every file ``stage`` recorded in ``out_dir``'s lineage.json is there with the
    recorded content: a truncated, edited or swapped intermediate is never used. A missing
    ``out_dir`` names the command that writes it.
    """
    out_dir = Path(out_dir)
    rerun = f"rerun the {stage} stage (clipscrub {stage} --root {root}, or dvc repro)"
    if not out_dir.exists():
        raise DataError(f"{out_dir} not found: run the {stage} stage first (clipscrub {stage} --root {root}, "
                        "or dvc repro)", param=stage)
    path = out_dir / LINEAGE_FILE
    try:
        outputs = read_json(path)["outputs"]
        if not isinstance(outputs, dict):
            raise TypeError
    except FileNotFoundError:
        raise DataError(f"{out_dir} has no {LINEAGE_FILE}, so nothing says the {stage} stage wrote it: {rerun}",
                        param=stage) from None
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{path} is unreadable or records no output hashes (written by an older clipscrub?): "
                        f"{rerun}", param=stage) from None
    for rel, want in sorted(outputs.items()):
        p = out_dir / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise DataError(f"{path} names a file outside its directory ({rel!r}): {rerun}", param=stage)
        if not p.is_file():
            raise DataError(f"{p} is missing, though the {stage} stage wrote it: {rerun}", param=stage)
        if sha256_file(p) != want:
            raise DataError(f"{p} is not the file the {stage} stage wrote (its sha256 differs from the one in "
                            f"{path}; truncated or edited?): {rerun}", param=stage)


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, *, param: str = "--root") -> Iterator[Path]:
    """Yield a scratch directory that replaces ``out_dir`` only if the block succeeds.

    A failed or killed stage leaves no output that looks complete: the scratch directory is a
    hidden sibling, removed on error, and the swap is a rename on the same filesystem. A
    lineage.json in the scratch is sealed with the hash of every other file before the swap.
    """
    out_dir = Path(out_dir)
    _check_writable(out_dir.parent, param)
    _sweep_dead_scratch(out_dir.parent, out_dir.name)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{_scratch_suffix()}"
    tmp.mkdir()
    try:
        yield tmp
        if (tmp / LINEAGE_FILE).is_file():
            seal_outputs(tmp)
    except BaseException as exc:
        written = _tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(exc):
            raise disk_full_error(out_dir, needed=f"{fmt_bytes(written)} were written before the disk filled",
                                  param=param) from None
        raise
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{_scratch_suffix()}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_file(path: str | Path, *, param: str = "--root") -> Iterator[Path]:
    """Yield a scratch file path that is renamed onto ``path`` only if the block succeeds."""
    path = Path(path)
    _check_writable(path.parent, param)
    tmp = path.parent / f".{path.name}.tmp-{_scratch_suffix()}"
    try:
        yield tmp
    except BaseException as exc:
        written = tmp.stat().st_size if tmp.is_file() else 0
        tmp.unlink(missing_ok=True)
        if _is_disk_full(exc):
            raise disk_full_error(path, needed=f"{fmt_bytes(written)} were written before the disk filled",
                                  param=param) from None
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def scratch_work_dir(out_dir: str | Path, *, param: str = "--root") -> Iterator[Path]:
    """A work directory beside ``out_dir`` (hidden, owner in its name) for a stage run in one
    process, removed afterwards; a killed run's is swept by the next."""
    out_dir = Path(out_dir)
    _check_writable(out_dir.parent, param)
    prefix = f".{out_dir.name}.work-"
    for stale in out_dir.parent.glob(glob.escape(prefix) + "*"):
        if not _owner_alive(stale.name[len(prefix):]):
            shutil.rmtree(stale, ignore_errors=True)
    work = out_dir.parent / f"{prefix}{_scratch_suffix()}"
    try:
        yield work
    except BaseException as exc:
        if _is_disk_full(exc):
            raise disk_full_error(out_dir, needed="the work files of its chunks need about as much again as the "
                                  "outputs", param=param) from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


_LOCKS: dict[str, list[int]] = {}  # resolved root -> [fd, depth]
_LOCKS_GUARD = threading.Lock()
LOCK_FILE = Path(".clipscrub") / "lock"


@contextlib.contextmanager
def root_lock(root: str | Path, *, param: str = "--root") -> Iterator[None]:
    """Hold ``root`` for this process: a second clipscrub process on the same data root stops with
    the holder's pid instead of mixing its outputs (or its scratch) with ours.

    An flock, so a killed holder releases it with its last file descriptor; re-entrant within a
    process (the flow holds the root and runs each stage, which takes it again).
    """
    root = Path(root)
    _check_writable(root, param)
    key = str(root.resolve())
    with _LOCKS_GUARD:
        if key in _LOCKS:
            _LOCKS[key][1] += 1
            fd = None
        else:
            path = root / LOCK_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ParamError(f"another clipscrub process (pid {holder}) is writing to {root}: wait for it to "
                                 f"finish, or use another {param}", param=param) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            _LOCKS[key] = [fd, 1]
    try:
        yield
    finally:
        with _LOCKS_GUARD:
            _LOCKS[key][1] -= 1
            if _LOCKS[key][1] == 0:
                os.close(_LOCKS.pop(key)[0])  # closing the last descriptor releases the flock


def describe_model(info: dict[str, Any]) -> str:
    """What ``load_model`` loaded, in a few words: ``model 'ViT-B-32' from checkpoint ckpt.pt
    (sha256 1a2b3c4d)``, ``model 'ViT-B-32' pretrained 'laion2b_s34b_b79k'``, or random weights."""
    head = f"model {info['model_name']!r}"
    if info.get("precomputed"):
        return f"{head} (precomputed embeddings from {info['precomputed']})"
    if info.get("model_config"):  # the name alone would pass for open_clip's architecture of that name
        head += f" (architecture from {info['model_config']}, sha256 {str(info.get('model_config_sha256'))[:8]})"
    if info.get("checkpoint"):
        return f"{head} from checkpoint {info['checkpoint']} (sha256 {str(info['checkpoint_sha256'])[:8]})"
    if info.get("pretrained"):
        return f"{head} pretrained {info['pretrained']!r}"
    return f"{head} with random weights (no embed.checkpoint, no embed.pretrained)"


def write_json(path: str | Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def require_file(path: str | Path, *, param: str, what: str = "input") -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} not found: {path} (run the upstream stage first)", param=param)
    return path


def read_id_list(path: str | Path, *, param: str, what: str) -> np.ndarray:
    """The sorted, distinct sample ids (n,) int64 a file names: a parquet or csv table with an
    ``id`` column (e.g. a manifest, or an edited removed.parquet; rows whose ``status`` is not ok
    are skipped), else a text file with one id per line (``#`` starts a comment). ``what`` names
    the file in errors."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(f"{what} {p} is a directory, not a file of ids", param=param)
    if not p.is_file():
        raise DataError(f"{what} not found: {p}", param=param)
    try:
        if p.suffix in (".parquet", ".csv"):
            table = pl.read_parquet(p) if p.suffix == ".parquet" else pl.read_csv(p)
            if "id" not in table.columns:
                raise DataError(f"{p} has no 'id' column (columns: {', '.join(table.columns)})", param=param)
            if "status" in table.columns:
                table = table.filter(pl.col("status") == "ok")
            ids = table["id"].cast(pl.Int64).to_numpy()
        else:
            ids = np.array([int(line) for line in (raw.split("#", 1)[0].strip() for raw in p.read_text().splitlines())
                            if line], dtype=np.int64)
    except OverflowError:
        raise DataError(f"cannot read ids from {p}: an id is out of range (ids are 64-bit integers)",
                        param=param) from None
    except UnicodeDecodeError:
        raise DataError(f"cannot read ids from {p}: not a text file (one id per line), a .parquet or a .csv",
                        param=param) from None
    except (ValueError, pl.exceptions.PolarsError) as exc:
        raise DataError(f"cannot read ids from {p}: {str(exc).splitlines()[0]}", param=param) from None
    return np.unique(ids)


def read_manifest(raw_dir: str | Path) -> pl.DataFrame:
    path = require_file(Path(raw_dir) / "manifest.parquet", param="--raw", what="manifest")
    try:
        manifest = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise DataError(f"cannot read the manifest {path}: {str(exc).splitlines()[0]}", param="--raw") from None
    if manifest.height == 0:
        raise DataError(f"the dataset is empty: {path} has no rows", param="--raw")
    return manifest


def scan_manifest(raw_dir: str | Path) -> pl.LazyFrame:
    """The manifest as a lazy frame, for stages that stream it rather than hold every caption;
    checked readable and non-empty as ``read_manifest`` checks it (its rows are read as the
    queries on it run)."""
    path = require_file(Path(raw_dir) / "manifest.parquet", param="--raw", what="manifest")
    try:
        rows = pl.scan_parquet(path).select(pl.len()).collect().item()
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise DataError(f"cannot read the manifest {path}: {str(exc).splitlines()[0]}", param="--raw") from None
    if rows == 0:
        raise DataError(f"the dataset is empty: {path} has no rows", param="--raw")
    return pl.scan_parquet(path)


def same_ids(a: pl.Series, b: pl.Series) -> bool:
    """Whether two id columns hold the same ids: compared as they are where both ascend (as the
    stages write them), else sorted (not as Python sets of N ints, about 100 bytes a sample)."""
    if len(a) != len(b):
        return False
    x, y = a.to_numpy(), b.to_numpy()
    if ascending(x) and ascending(y):
        return bool(np.array_equal(x, y))
    return a.sort().equals(b.sort(), check_names=False, check_dtypes=False)


def ascending(ids: np.ndarray) -> bool:
    """Whether ids (N,) strictly ascend (as the stages write them): unique, and searchable as they are."""
    return bool(np.all(ids[1:] > ids[:-1]))


ROWS_BLOCK = 1 << 20  # wanted ids searched at a time: the temporaries of a block, not of N


def rows_of_ids(ids: np.ndarray, wanted: Any, *, block: int = ROWS_BLOCK) -> np.ndarray:
    """The row in ``ids`` (N,) (unique) of each wanted id, (W,) int64, -1 where it has none:
    ``ids`` searched where they ascend (as the stages write them), a sorted copy otherwise; not a
    dict or a hash join of N ids (about 100 bytes a sample). ``block`` wanted ids at a time:
    the result is the only W-long array made."""
    wanted = np.asarray(wanted, dtype=np.int64)
    ids = np.asarray(ids)
    out = np.full(len(wanted), -1, dtype=np.int64)
    if not len(ids):
        return out
    order = None if ascending(ids) else np.argsort(ids, kind="stable")
    ordered = ids if order is None else ids[order]
    for a, b in blocks(len(wanted), block):
        part = wanted[a:b]
        at = np.minimum(np.searchsorted(ordered, part), len(ordered) - 1)
        hit = ordered[at] == part
        out[a:b][hit] = at[hit] if order is None else order[at[hit]]
    return out


def take_by_id(column: pl.Series, *, ids: np.ndarray, wanted: np.ndarray) -> pl.Series:
    """``column``'s values (rows matching ``ids``) for the ``wanted`` ids, in their order; null
    where an id is not among ``ids`` (a left join by id, by search: ``rows_of_ids``)."""
    at = rows_of_ids(ids, wanted)
    if not len(column):
        return pl.Series(column.name, [None] * len(at), dtype=column.dtype)
    found = at >= 0
    if found.all():
        return column.gather(at)
    at[~found] = 0  # gathered, then nulled
    return pl.select(pl.when(pl.Series(found)).then(column.gather(at))).to_series().alias(column.name)


# rows per parquet row group, fixed: a table's bytes then depend on its rows alone, not on how
# polars happened to chunk them in memory (a streamed and a collected frame write one file)
ROW_GROUP_ROWS = 1 << 17


def write_table(table: pl.DataFrame | pl.LazyFrame, path: str | Path) -> None:
    """Write a frame, or stream a lazy one without collecting it, as parquet (no statistics)."""
    if isinstance(table, pl.LazyFrame):
        table.sink_parquet(path, statistics=False, row_group_size=ROW_GROUP_ROWS)
    else:
        table.write_parquet(path, statistics=False, row_group_size=ROW_GROUP_ROWS)


def blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """[start, stop) of consecutive blocks of ``size`` rows covering ``n`` rows; one empty block
    for n = 0 (so that a table written a block at a time still has its schema)."""
    return ((a, min(a + size, n)) for a in range(0, max(n, 1), size))


def write_blocks(frames: Iterator[pl.DataFrame], path: str | Path) -> None:
    """Frames of one schema, in order, as one parquet file (no statistics; a row group per frame),
    a frame at a time: the caller makes each block as it is written, never the whole table. An
    empty iterator writes nothing."""
    arrow()
    import pyarrow.parquet as pq

    writer = None
    try:
        for frame in frames:
            table = frame.to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, write_statistics=False)
            writer.write_table(table, row_group_size=max(frame.height, 1))
    finally:
        if writer is not None:
            writer.close()


@functools.cache
def arrow():
    """pyarrow, its default memory pool the system's (set once per process): what clipscrub reads
    and writes through it comes in row groups, and the default pool (jemalloc or mimalloc) keeps
    freed pages mapped, which the operating system counts against the process as in use."""
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())
    return pa


def read_column(path: str | Path, column: str) -> np.ndarray:
    """One column of a parquet file as a contiguous numpy array (N,), filled a row group at a
    time: the column once in memory, not a reader's chunks plus the copy that concatenates them
    (what polars' and pyarrow's whole-column reads make of a file of several row groups). A
    column with nulls is read as polars reads it."""
    arrow()
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    if column not in file.schema_arrow.names:
        raise DataError(f"{Path(path).name} has no column {column!r}", param=str(path))
    out, start = None, 0
    for group in range(file.metadata.num_row_groups):
        chunk = file.read_row_group(group, columns=[column], use_threads=False).column(0)
        if chunk.null_count:
            return pl.read_parquet(path, columns=[column]).to_series().to_numpy()
        values = chunk.to_numpy()
        if out is None:
            out = np.empty(file.metadata.num_rows, dtype=values.dtype)
        out[start:start + len(values)] = values
        start += len(values)
    if out is None:  # no row groups: an empty column of the file's type
        return pl.read_parquet(path, columns=[column]).to_series().to_numpy()
    return out


def read_frame(path: str | Path, columns: list[str]) -> pl.DataFrame:
    """Columns of a parquet file as one contiguous frame, each read by ``read_column`` (numbers
    kept in the numpy array read, not copied)."""
    return pl.DataFrame({c: pl.Series(c, read_column(path, c)) for c in columns})


def concat_parquet(paths: list[str | Path], out: str | Path, *, columns: list[str] | None = None) -> None:
    """The rows of parquet files of one schema (their ``columns``, default all), in order, as one
    parquet file of row groups of ``ROW_GROUP_ROWS`` rows (no statistics), a batch at a time:
    memory holds a row group whatever the files' total (polars' streaming sink grows with the
    rows). The bytes depend on the rows alone, not on how the files cut them (a cluster's pieces
    write what one process writes)."""
    pa = arrow()
    import pyarrow.parquet as pq

    schema = pq.read_schema(paths[0])
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)
    pending: list[Any] = []
    held = 0
    with pq.ParquetWriter(out, schema, write_statistics=False) as writer:
        def flush(rows: int) -> None:
            nonlocal pending, held
            table = pa.Table.from_batches(pending, schema=schema)
            # one contiguous chunk per column: the writer's pages then do not depend on the batches
            writer.write_table(table.slice(0, rows).combine_chunks(), row_group_size=ROW_GROUP_ROWS)
            rest = table.slice(rows)
            pending, held = rest.to_batches(), rest.num_rows

        for path in paths:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=ROW_GROUP_ROWS, columns=columns):
                pending.append(batch)
                held += batch.num_rows
                while held >= ROW_GROUP_ROWS:
                    flush(ROW_GROUP_ROWS)
        if held:
            flush(held)


def read_lineage(*dirs: str | Path) -> dict[str, Any]:
    """Merge the lineage records of upstream stage directories (each maps stage -> record)."""
    merged: dict[str, Any] = {}
    for d in dirs:
        p = Path(d) / LINEAGE_FILE
        if p.is_file():
            merged.update(read_json(p)["stages"])
    return merged


def write_lineage(
    out_dir: Path,
    *,
    stage: str,
    params: dict[str, Any],
    inputs: dict[str, str | Path],
    upstream: list[str | Path],
    summary: dict[str, Any],
    extra: dict[str, Any] | None = None,
    module: str | None = None,
) -> dict[str, Any]:
    """Write ``lineage.json``: this stage's record added to those of its upstream stages, with
    the code version of ``module`` (the stage's, with what it imports).

    No timestamps, so two runs with the same inputs and params write identical bytes.
    """
    stages = read_lineage(*upstream)
    record = {
        "params": params,
        "code_version": code_version(module),
        "inputs": {name: sha256_path(p) for name, p in sorted(inputs.items())},
        "summary": summary,
    }
    if extra:
        record.update(extra)
    stages[stage] = record
    lineage = {"stages": stages}
    write_json(out_dir / LINEAGE_FILE, lineage)
    return lineage
