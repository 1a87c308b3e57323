"""Atomic outputs: all or nothing, and no scratch left behind by a killed run."""

from __future__ import annotations

import pytest

from clipscrub.io import atomic_dir


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
