"""File helpers: atomic outputs, content hashes, per-stage lineage records."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import polars as pl

from clipscrub.errors import DataError, ParamError

LINEAGE_FILE = "lineage.json"
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_CODE_DIRS = ("clipscrub", "stages", "flows")


def sha256_file(path: str | Path, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


def code_version() -> str:
    """Hash of the package's own source files: what changes when the stage code changes."""
    h = hashlib.sha256()
    for d in _CODE_DIRS:
        for p in sorted((_PACKAGE_ROOT / d).rglob("*.py")):
            h.update(p.relative_to(_PACKAGE_ROOT).as_posix().encode() + b"\0" + p.read_bytes())
    from clipscrub import __version__

    return f"{__version__}+{h.hexdigest()[:12]}"


def _check_writable(parent: Path, param: str) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ParamError(f"cannot create output directory {parent}: {exc.strerror}", param=param) from None
    if not os.access(parent, os.W_OK):
        raise ParamError(f"output directory {parent} is not writable", param=param)


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, *, param: str = "--root") -> Iterator[Path]:
    """Yield a scratch directory that replaces ``out_dir`` only if the block succeeds.

    A failed or killed stage leaves no output that looks complete: the scratch directory is a
    hidden sibling, removed on error, and the swap is a rename on the same filesystem.
    """
    out_dir = Path(out_dir)
    _check_writable(out_dir.parent, param)
    # scratch left by a killed run (SIGKILL skips the cleanup below) would pile up otherwise, and
    # so would a replaced output a crash between the two renames below left behind
    for pattern in (f".{out_dir.name}.tmp-*", f".{out_dir.name}.old-*"):
        for stale in out_dir.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_file(path: str | Path, *, param: str = "--root") -> Iterator[Path]:
    """Yield a scratch file path that is renamed onto ``path`` only if the block succeeds."""
    path = Path(path)
    _check_writable(path.parent, param)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def require_file(path: str | Path, *, param: str, what: str = "input") -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} not found: {path} (run the upstream stage first)", param=param)
    return path


def read_manifest(raw_dir: str | Path) -> pl.DataFrame:
    path = require_file(Path(raw_dir) / "manifest.parquet", param="--raw", what="manifest")
    try:
        manifest = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise DataError(f"cannot read the manifest {path}: {str(exc).splitlines()[0]}", param="--raw") from None
    if manifest.height == 0:
        raise DataError(f"the dataset is empty: {path} has no rows", param="--raw")
    return manifest


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
) -> dict[str, Any]:
    """Write ``lineage.json``: this stage's record added to those of its upstream stages.

    No timestamps, so two runs with the same inputs and params write identical bytes.
    """
    stages = read_lineage(*upstream)
    record = {
        "params": params,
        "code_version": code_version(),
        "inputs": {name: sha256_path(p) for name, p in sorted(inputs.items())},
        "summary": summary,
    }
    if extra:
        record.update(extra)
    stages[stage] = record
    lineage = {"stages": stages}
    write_json(out_dir / LINEAGE_FILE, lineage)
    return lineage
