"""Work directories shared by a stage's pieces: a prepare step writes the plan and what every
chunk shares, chunks (in any order, in any process on a shared filesystem) write their own
files, and a reduce step assembles them. Index and score are built this way."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from clipscrub.errors import DataError, ParamError
from clipscrub.io import read_json

PLAN_FILE = "plan.json"
WORK_MARK = ".clipscrub-work"  # a directory a prepare step may empty: never a user's own folder


def fresh_work_dir(work_dir: str | Path, *, param: str) -> Path:
    """``work_dir`` emptied (a stale chunk of another run must never reach a reduce) and marked.
    Refuses a non-empty directory that no prepare step made."""
    work = Path(work_dir)
    if work.is_dir() and any(work.iterdir()) and not (work / WORK_MARK).is_file():
        raise ParamError(f"work directory {work} is not empty and was not made by clipscrub: give an empty or new one",
                         param=param)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / WORK_MARK).touch()
    return work


def read_plan(work_dir: str | Path, *, params: dict[str, Any], stage: str) -> dict[str, Any]:
    """The plan a prepare step wrote, checked to be for these params."""
    path = Path(work_dir) / PLAN_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: run prepare_{stage} first", param=stage)
    plan = read_json(path)
    if plan["params"] != params:
        raise ParamError(f"the plan in {work_dir} was prepared with other params: rerun prepare_{stage}", param=stage)
    return plan


def chunk_plan(n: int, chunk_size: int) -> list[list[int]]:
    """[start, stop) of each chunk of queries: the chunks a single search of all n would use."""
    return [[start, min(n, start + chunk_size)] for start in range(0, n, chunk_size)]


def check_chunk(plan: dict[str, Any], start: int, stop: int, *, param: str) -> None:
    if [start, stop] not in plan["chunks"]:
        raise ParamError(f"[{start}, {stop}) is not one of the plan's chunks (each starts at a multiple of "
                         f"{param}, {plan['chunks'][0][1]})", param=param)


def chunk_file(work: Path, start: int, stop: int, name: str) -> Path:
    return work / "chunks" / f"{start}-{stop}" / f"{name}.npy"


def chunk_mark(work: Path, start: int, stop: int) -> Path:
    """Written last by an index chunk: its rows of the shared arrays are complete."""
    return work / "chunks" / f"{start}-{stop}.json"


def save_npy(path: Path, arr: np.ndarray) -> None:
    """np.save under a temporary name, then renamed: a reader sees the whole file or none, and a
    chunk run twice replaces its files with the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def require_chunk(path: Path, start: int, stop: int, *, stage: str) -> Path:
    """``path``, a file chunk [start, stop) writes, or the error naming the chunk to run."""
    if not path.is_file():
        raise DataError(f"chunk [{start}, {stop}) has not been computed ({path} is missing): run its "
                        f"{stage} chunk, then reduce again", param=stage)
    return path


def load_chunk(work: Path, start: int, stop: int, name: str, *, stage: str) -> np.ndarray:
    return np.load(require_chunk(chunk_file(work, start, stop, name), start, stop, stage=stage))


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` with ``src``'s bytes: a hard link (no copy of gigabytes) where the filesystem has
    them, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
