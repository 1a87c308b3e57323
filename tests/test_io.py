"""Atomic outputs: all or nothing, and no scratch left behind by a killed run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import yaml

from clipscrub.arrays import create_npy
from clipscrub.flows.cli import main
from clipscrub.errors import DataError, ParamError
from clipscrub.io import LINEAGE_FILE, LOCK_FILE, atomic_dir, check_outputs, root_lock, sha256_file, write_json
from tests.conftest import REPO, tiny_params_dict


def test_failed_block_leaves_nothing_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "scores"
    out.mkdir()
    (out / "scores.parquet").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "scores.parquet").write_text("half")
            raise RuntimeError("stage failed")
    assert (out / "scores.parquet").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores"]


def test_scratch_of_a_killed_run_is_removed_by_the_next(tmp_path):
    stale = tmp_path / ".scores.tmp-deadbeef"
    stale.mkdir()
    (stale / "scores.parquet").write_text("half")
    other = tmp_path / ".flags.tmp-cafe0000"  # another stage's scratch is not ours to remove
    other.mkdir()
    with atomic_dir(tmp_path / "scores") as tmp:
        (tmp / "scores.parquet").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".flags.tmp-cafe0000", "scores"]
    assert (tmp_path / "scores" / "scores.parquet").read_text() == "new"


@pytest.mark.parametrize("leftover", [".scores.old-0badf00d", ".scores.tmp-0badf00d"])
@pytest.mark.parametrize("kind", ["dir", "file"])
def test_output_replaced_by_a_crashed_swap_is_removed_by_the_next_run(tmp_path, leftover, kind):
    """A crash between the two renames of the swap leaves the replaced output as .<name>.old-*;
    the next run of the stage sweeps it (and only its own)."""
    stale = tmp_path / leftover
    if kind == "dir":
        stale.mkdir()
        (stale / "scores.parquet").write_text("previous")
    else:
        stale.write_text("previous")
    (tmp_path / ".flags.old-12345678").mkdir()
    with atomic_dir(tmp_path / "scores") as tmp:
        (tmp / "scores.parquet").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".flags.old-12345678", "scores"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_scratch_of_dead_owners_is_swept(tmp_path):
    """Two runs writing the same output: one must not delete the scratch the other is writing."""
    host = socket.gethostname()
    live = tmp_path / f".index.tmp-aaaa0000-{os.getppid()}-{host}"  # our parent: alive
    dead = tmp_path / f".index.tmp-bbbb0000-{_dead_pid()}-{host}"
    elsewhere = tmp_path / f".index.tmp-cccc0000-1-another-host.example"  # cannot tell: keep
    for d in (live, dead, elsewhere):
        d.mkdir()
    with atomic_dir(tmp_path / "index") as tmp:
        assert f"-{os.getpid()}-{host}" in tmp.name
        (tmp / "x").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, elsewhere.name, "index"])


HOLD = """
import sys, time
from clipscrub.io import root_lock
with root_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_process_on_a_root_is_refused_with_the_holders_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ParamError, match=rf"another clipscrub process \(pid {holder.pid} on .+\) is writing to"):
            with root_lock(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel releases the flock with the process
        holder.wait()
    with root_lock(tmp_path):
        with root_lock(tmp_path):  # re-entrant within a process (the flow holds it around its stages)
            pass
    assert (tmp_path / LOCK_FILE).read_text().startswith(f"{os.getpid()} on ")


def test_two_cli_stages_on_one_root_do_not_run_at_once(tiny_run, tmp_path, monkeypatch, capsys):
    """The failure this prevents: a second embed resumed the first one's parts, mixing two models."""
    root = tmp_path / "data"
    shutil.copytree(tiny_run[0] / "embeddings", root / "embeddings")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    monkeypatch.chdir(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, "data"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["index", "--root", "data"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"clipscrub: error: --root: another clipscrub process (pid {holder.pid} on "), err
        assert err.endswith("is writing to data: wait for it to finish, or use another --root"), err
        assert not (root / "index").exists()
    finally:
        holder.kill()
        holder.wait()


def test_sealed_outputs_are_checked_file_by_file(tmp_path):
    out = tmp_path / "scores"
    with atomic_dir(out) as tmp:
        (tmp / "a.bin").write_bytes(b"abc")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"def")
        write_json(tmp / LINEAGE_FILE, {"stages": {}})
    recorded = json.loads((out / LINEAGE_FILE).read_text())["outputs"]
    assert recorded == {"a.bin": sha256_file(out / "a.bin"), "sub/b.bin": sha256_file(out / "sub" / "b.bin")}
    check_outputs(out, stage="score", root=tmp_path)
    (out / "sub" / "b.bin").write_bytes(b"deg")  # same size, other content
    with pytest.raises(DataError, match=r"sub/b.bin is not the file the score stage wrote"):
        check_outputs(out, stage="score", root=tmp_path)
    (out / "sub" / "b.bin").unlink()
    with pytest.raises(DataError, match=r"sub/b.bin is missing, though the score stage wrote it"):
        check_outputs(out, stage="score", root=tmp_path)
    write_json(out / LINEAGE_FILE, {"stages": {}, "outputs": {"../../etc/passwd": "0" * 64}})
    with pytest.raises(DataError, match=r"names a file outside its directory"):
        check_outputs(out, stage="score", root=tmp_path)


def test_a_file_rewritten_in_place_is_hashed_again(tmp_path):
    """The hash memo is keyed by the file's identity and version, never by its path alone."""
    path = tmp_path / "x.bin"
    path.write_bytes(b"one")
    first = sha256_file(path)
    path.write_bytes(b"two")
    assert sha256_file(path) != first


HASH_IN_A_NEW_PROCESS = """
import sys
import clipscrub.io as io
io.DISK_MEMO_MIN_BYTES = 1000
print(io.sha256_file(sys.argv[1]))
"""


def hash_in_a_new_process(path: Path, cache: str) -> str:
    env = {**os.environ, "CLIPSCRUB_HASH_CACHE": cache}
    return subprocess.run([sys.executable, "-c", HASH_IN_A_NEW_PROCESS, str(path)], env=env, cwd=REPO,
                          capture_output=True, text=True, check=True).stdout.strip()


def test_a_large_files_hash_is_shared_with_the_next_process_until_the_file_changes(tmp_path):
    path, cache = tmp_path / "big.npy", tmp_path / "cache"
    path.write_bytes(b"a" * 5000)
    first = hash_in_a_new_process(path, str(cache))
    assert first == sha256_file(path)
    (entry,) = cache.iterdir()
    assert entry.read_text().split() == [first, str(path.resolve())]
    # the next process takes the entry instead of reading the file: shown by a planted digest
    entry.write_text("f" * 64 + "\n")
    assert hash_in_a_new_process(path, str(cache)) == "f" * 64
    path.write_bytes(b"b" * 5000)  # same size, new version: a new key, hashed again
    assert hash_in_a_new_process(path, str(cache)) == sha256_file(path) != first
    entry.write_text("not a digest")  # a damaged entry is ignored, not trusted
    path.write_bytes(b"a" * 5000)
    assert hash_in_a_new_process(path, str(cache)) == first
    small = tmp_path / "small.bin"  # below the size limit: nothing kept
    small.write_bytes(b"x" * 10)
    before = sorted(cache.iterdir())
    hash_in_a_new_process(small, str(cache))
    assert sorted(cache.iterdir()) == before
    hash_in_a_new_process(path, "off")
    assert not (tmp_path / "off").exists()
    # a cache that cannot be written (a file where its folder should be) only costs a re-read
    (tmp_path / "blocked").write_text("")
    assert hash_in_a_new_process(path, str(tmp_path / "blocked" / "cache")) == first


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: a real full disk (ENOSPC from the kernel), not a mocked one. Needs root."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full_in_a_stage_is_one_line_and_leaves_nothing(small_disk):
    out = small_disk / "scores"
    with pytest.raises(DataError) as err:
        with atomic_dir(out) as tmp:
            (tmp / "big.bin").write_bytes(b"\0" * (2 << 20))
    assert str(err.value).startswith(f"--root: no space left on the device writing {out}: ")
    assert "were written before the disk filled" in str(err.value) and "nothing was published" in str(err.value)
    assert list(small_disk.iterdir()) == []


def test_disk_full_in_polars_is_recognised(small_disk):
    frame = pl.DataFrame({"x": np.random.default_rng(0).random(400_000)})
    with pytest.raises(DataError, match="no space left on the device writing"):
        with atomic_dir(small_disk / "scores") as tmp:
            frame.write_parquet(tmp / "scores.parquet", compression="uncompressed")
    assert list(small_disk.iterdir()) == []


def test_a_memory_mapped_array_reserves_its_blocks_first(small_disk):
    """Without the reservation the kernel would SIGBUS the process on writing a page back."""
    with pytest.raises(DataError, match=r"no space left on the device writing .*big.npy: it needs 3.8 MiB, "):
        create_npy(small_disk / "big.npy", dtype=np.float32, shape=(1000, 1000))
    arr = create_npy(small_disk / "ok.npy", dtype=np.float32, shape=(10, 10))
    assert arr.shape == (10, 10) and (small_disk / "ok.npy").stat().st_blocks * 512 >= 400


def test_index_on_a_full_disk_stops_with_the_space_it_needs(tiny_run, small_disk, tmp_path, monkeypatch, capsys):
    root = small_disk / "data"
    shutil.copytree(tiny_run[0] / "embeddings", root / "embeddings")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    monkeypatch.chdir(tmp_path)
    filler = small_disk / "filler"  # leave less room than one neighbour array
    free = shutil.disk_usage(small_disk).free
    filler.write_bytes(b"\0" * max(0, free - 64 * 1024))
    capsys.readouterr()
    assert main(["index", "--root", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"clipscrub: error: --root: no space left on the device writing {root}/.index.work-"), err
    assert "neighbours.npy: it needs " in err and "nothing was published" in err, err
    assert sorted(p.name for p in root.iterdir()) == [".clipscrub", "embeddings"]


@pytest.mark.parametrize("rows", [0, 10, (1 << 17) + 5])
def test_write_table_bytes_depend_on_the_rows_not_on_the_chunks(tmp_path, rows):
    """A frame of many chunks, the same frame rechunked and the same rows streamed from a lazy
    frame write one file (polars' own row groups follow its chunks)."""
    import numpy as np
    import polars as pl

    from clipscrub.io import write_table

    frame = pl.DataFrame({"id": np.arange(rows, dtype=np.int64), "caption": [f"c{i % 7}" for i in range(rows)]})
    pieces = pl.concat([frame.slice(a, 977) for a in range(0, rows, 977)] or [frame], rechunk=False)
    assert rows < 977 * 2 or pieces.n_chunks() > 1
    written = {}
    for name, table in (("chunked", pieces), ("whole", frame.rechunk()), ("lazy", pieces.lazy())):
        write_table(table, tmp_path / f"{name}.parquet")
        written[name] = (tmp_path / f"{name}.parquet").read_bytes()
    assert written["chunked"] == written["whole"] == written["lazy"]
    assert pl.read_parquet(tmp_path / "lazy.parquet").equals(frame)


@given(ids=st.lists(st.integers(-2**62, 2**62), unique=True, max_size=30),
       others=st.lists(st.integers(-2**62, 2**62), max_size=10), seed=st.integers(0, 2**31), ordered=st.booleans())
def test_rows_of_ids_and_take_by_id_find_each_ids_row(ids, others, seed, ordered):
    from clipscrub.io import rows_of_ids, take_by_id

    ids = np.array(sorted(ids) if ordered else ids, dtype=np.int64)
    ids = ids if ordered else np.random.default_rng(seed).permutation(ids)
    wanted = [*ids.tolist(), *others]
    rows = rows_of_ids(ids, wanted)
    expected = [ids.tolist().index(i) if i in ids else -1 for i in wanted]
    assert rows.dtype == np.int64 and rows.tolist() == expected
    assert rows_of_ids(ids, wanted, block=3).tolist() == expected  # searched a few wanted ids at a time
    values = pl.Series("v", [i % 7 == 0 for i in range(len(ids))])
    taken = take_by_id(values, ids=ids, wanted=np.array(wanted, dtype=np.int64))
    assert taken.name == "v" and taken.to_list() == [values[r] if r >= 0 else None for r in expected]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 60), cuts=st.lists(st.integers(0, 60), max_size=6), group=st.sampled_from([1, 7, 64]))
def test_concat_parquet_writes_the_same_bytes_however_the_files_cut_the_rows(tmp_path_factory, rows, cuts, group):
    """A cluster's pieces and one process's single part give the version the same bytes: row
    groups of ROW_GROUP_ROWS whatever the parts' sizes (here a few rows, so that they cross)."""
    import pyarrow.parquet as pq

    import clipscrub.io as io

    tmp = tmp_path_factory.mktemp("concat")
    frame = pl.DataFrame({"id": np.arange(rows, dtype=np.int64), "caption": [f"c{i % 5}" * (i % 3) for i in range(rows)],
                          "ok": [i % 2 == 0 for i in range(rows)]})
    bounds = sorted({0, rows, *(c for c in cuts if c <= rows)})
    parts = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        frame.slice(a, b - a).write_parquet(tmp / f"part{i}.parquet")
        parts.append(tmp / f"part{i}.parquet")
    frame.write_parquet(tmp / "whole.parquet")
    old = io.ROW_GROUP_ROWS
    io.ROW_GROUP_ROWS = group
    try:
        io.concat_parquet(parts or [tmp / "whole.parquet"], tmp / "pieces.parquet")
        io.concat_parquet([tmp / "whole.parquet"], tmp / "one.parquet")
        io.concat_parquet([tmp / "whole.parquet"], tmp / "ids.parquet", columns=["id", "ok"])
    finally:
        io.ROW_GROUP_ROWS = old
    assert (tmp / "pieces.parquet").read_bytes() == (tmp / "one.parquet").read_bytes()
    assert pl.read_parquet(tmp / "pieces.parquet").equals(frame)
    assert pl.read_parquet(tmp / "ids.parquet").equals(frame.select("id", "ok"))
    sizes = [pq.ParquetFile(tmp / "pieces.parquet").metadata.row_group(g).num_rows
             for g in range(pq.ParquetFile(tmp / "pieces.parquet").metadata.num_row_groups)]
    assert all(s == group for s in sizes[:-1]) and sum(sizes) == rows
