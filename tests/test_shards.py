"""Reading shards: clipscrub.shards.iter_shard groups members as webdataset does, and keeps going
past a bad sample."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from clipscrub.shards import iter_shard


def write_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


LAYOUTS = {
    "img2dataset": [("000000000.jpg", b"j0"), ("000000000.txt", b"t0"), ("000000000.json", b"{}"),
                    ("000000001.jpg", b"j1"), ("000000001.txt", b"t1"), ("000000001.json", b"{}")],
    "folders and dotted extensions": [("a/b/x.seg.png", b"p"), ("a/b/x.TXT", b"t"), ("a/c/x.txt", b"u")],
    "metadata members and names without a dot": [("__meta__", b"m"), ("README", b"r"), ("k.jpg", b"j"), ("k.txt", b"t")],
    "a key that comes back later": [("k.jpg", b"1"), ("l.jpg", b"2"), ("k.txt", b"3")],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_samples_are_webdatasets(tmp_path, layout):
    write_members(tmp_path / "s.tar", LAYOUTS[layout])
    theirs = [{k: v for k, v in s.items() if k not in ("__url__", "__local_path__")}
              for s in wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False, empty_check=False)]
    assert list(iter_shard(tmp_path / "s.tar")) == theirs


def test_a_repeated_member_fails_its_sample_only(tmp_path):
    write_members(tmp_path / "s.tar", [("a.jpg", b"1"), ("a.txt", b"x"), ("b.jpg", b"2"), ("b.txt", b"y"),
                                       ("b.txt", b"z"), ("c.jpg", b"3"), ("c.txt", b"w")])
    samples = list(iter_shard(tmp_path / "s.tar"))
    assert [s["__key__"] for s in samples] == ["a", "b", "c"]
    assert samples[1]["__error__"] == "tar member b.txt appears more than once" and samples[1]["txt"] == b"y"
    assert "__error__" not in samples[0] and samples[2] == {"__key__": "c", "jpg": b"3", "txt": b"w"}


def test_a_member_over_the_limit_is_left_unread(tmp_path):
    write_members(tmp_path / "s.tar", [("a.jpg", b"1" * 10), ("a.txt", b"x"), ("b.jpg", b"2" * 2000), ("b.txt", b"y")])
    a, b = iter_shard(tmp_path / "s.tar", max_member_bytes=1000)
    assert a == {"__key__": "a", "jpg": b"1" * 10, "txt": b"x"}
    assert b == {"__key__": "b", "txt": b"y",
                 "__error__": "tar member b.jpg is 2.0 KiB, over the 1000 B limit (download.max_file_bytes)"}


def test_only_the_wanted_keys_are_read(tmp_path):
    write_members(tmp_path / "s.tar", [("a.jpg", b"1"), ("b.jpg", b"2"), ("c.jpg", b"3"), ("a.txt", b"4")])
    assert list(iter_shard(tmp_path / "s.tar", keys={"a", "c"})) == [
        {"__key__": "a", "jpg": b"1"}, {"__key__": "c", "jpg": b"3"}, {"__key__": "a", "txt": b"4"}]


def test_a_shard_cut_short_raises_after_the_samples_before_the_damage(tmp_path):
    write_members(tmp_path / "s.tar", [("a.jpg", b"1" * 600), ("b.jpg", b"2" * 5000)])
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:3000])  # inside b.jpg's bytes
    seen = []
    with pytest.raises((tarfile.TarError, OSError)):
        for sample in iter_shard(tmp_path / "cut.tar"):
            seen.append(sample["__key__"])
    assert seen == ["a"]
