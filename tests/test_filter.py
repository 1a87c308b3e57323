from __future__ import annotations

import json
import shutil
import tarfile

import polars as pl
import pytest
import webdataset as wds

from clipscrub.errors import DataError, ParamError
from clipscrub.io import sha256_file
from clipscrub.shards import iter_shard
from clipscrub.stages.filter import filter_dataset
from tests.conftest import tiny_params


def test_kept_plus_removed_is_everything(tiny_run):
    root, params = tiny_run
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    kept = pl.read_parquet(root / "clean" / "manifest.parquet")
    removed = pl.read_parquet(root / "clean" / "removed.parquet")
    flags = pl.read_parquet(root / "flags" / "flags.parquet")
    assert kept.height + removed.height == manifest.height
    assert set(kept["id"]) & set(removed["id"]) == set()
    assert set(removed["id"]) == set(flags.filter(pl.col("is_flagged"))["id"])
    assert removed.height == round(params.threshold.fraction * manifest.height)
    assert kept.columns == manifest.columns
    assert {"id", "key", "caption", "reason", "dao_score", "kdist_score", "slof_score"} <= set(removed.columns)
    assert removed["reason"].unique().to_list() == [f"{params.threshold.detector}_score_top_fraction"]


def test_clean_shards_hold_exactly_the_kept_samples(tiny_run):
    root, params = tiny_run
    kept = pl.read_parquet(root / "clean" / "manifest.parquet")
    raw = {r["key"]: r for r in pl.read_parquet(root / "raw" / "manifest.parquet").iter_rows(named=True)}
    seen = []
    import hashlib

    for shard in sorted((root / "clean" / "shards").iterdir()):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            seen.append(sample["__key__"])
            assert hashlib.sha256(sample["jpg"]).hexdigest() == raw[sample["__key__"]]["image_sha256"]
            assert kept.filter(pl.col("key") == sample["__key__"])["shard"].item() == shard.name
    assert seen == kept["key"].to_list()
    assert max(kept["shard"].value_counts()["count"]) <= params.filter.shard_size


def test_lineage_traces_the_version(tiny_run):
    root, params = tiny_run
    lineage = json.loads((root / "clean" / "lineage.json").read_text())
    assert lineage["input_manifest_sha256"] == sha256_file(root / "raw" / "manifest.parquet")
    assert lineage["model"]["checkpoint_sha256"] == sha256_file(root / "model" / "checkpoint.pt")
    assert lineage["params"]["threshold"] == params.section("threshold")
    assert lineage["params"]["index"]["reference"]["sizes"] == [120]
    assert set(lineage["stages"]) == {"download", "train", "embed", "index", "score", "threshold", "filter"}
    assert lineage["counts"]["kept"] + lineage["counts"]["removed"] == lineage["counts"]["input"]
    assert lineage["code_version"].startswith("0.1.0+")


def test_filter_refuses_artifacts_from_other_params(tiny_run, tmp_path):
    root, _ = tiny_run
    other = tiny_params(extra=["threshold.fraction=0.2"])
    with pytest.raises(DataError) as info:
        filter_dataset(raw_dir=root / "raw", scores_dir=root / "scores", flags_dir=root / "flags",
                       out_dir=tmp_path / "clean", settings=other.filter, params=other)
    assert info.value.param == "threshold"
    assert not (tmp_path / "clean").exists()


UNSAFE_KEYS = ["../../evil", "/abs/x", "sub/dir\\y"]  # as webdataset reads them from a tar


def raw_with_keys(root, out, rename: dict[str, str]):
    """A copy of ``root/raw`` with some samples' keys renamed, in its shards and manifest."""
    shutil.copytree(root / "raw", out)
    for shard in sorted((out / "shards").glob("*.tar")):
        samples = list(iter_shard(shard))
        with wds.TarWriter(str(shard), mtime=0) as sink:
            for s in samples:
                sink.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
                           | {"__key__": rename.get(s["__key__"], s["__key__"])})
    manifest = pl.read_parquet(out / "manifest.parquet")
    manifest.with_columns(pl.col("key").replace(rename)).write_parquet(out / "manifest.parquet")
    return out


def members(paths) -> dict[str, bytes]:
    out = {}
    for p in paths:
        with tarfile.open(p) as tar:
            out |= {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return out


def test_unsafe_keys_become_safe_member_names(tiny_run, tmp_path):
    root, params = tiny_run
    flags = pl.read_parquet(root / "flags" / "flags.parquet")
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    unflagged = manifest.filter(pl.col("id").is_in(flags.filter(~pl.col("is_flagged"))["id"].implode()))
    rename = dict(zip(unflagged["key"][:3].to_list(), UNSAFE_KEYS))
    raw = raw_with_keys(root, tmp_path / "raw", rename)
    filter_dataset(raw_dir=raw, scores_dir=root / "scores", flags_dir=root / "flags", out_dir=tmp_path / "clean",
                   settings=params.filter, params=params)
    clean_shards = sorted((tmp_path / "clean" / "shards").glob("*.tar"))
    names = members(clean_shards)
    for name in names:  # every member unpacks inside the folder, as one file
        assert "/" not in name and "\\" not in name and not name.startswith(".") and ".." not in name, name
    written = {"../../evil": "%2E%2E%2F%2E%2E%2Fevil", "/abs/x": "%2Fabs%2Fx", "sub/dir\\y": "sub%2Fdir%5Cy"}
    clean = {s["__key__"]: s for p in clean_shards for s in iter_shard(p)}
    kept = pl.read_parquet(tmp_path / "clean" / "manifest.parquet")
    assert set(clean) == set(kept["key"])  # the kept manifest names the samples as written
    raw_samples = {s["__key__"]: s for p in sorted((raw / "shards").glob("*.tar")) for s in iter_shard(p)}
    for old, new in written.items():
        assert json.loads(clean[new]["json"])["source_key"] == old  # the original key is kept
        assert clean[new]["jpg"] == raw_samples[old]["jpg"]
    # every other sample is copied under its own name, byte for byte
    before = members(sorted((root / "clean" / "shards").glob("*.tar")))
    before = {n: b for n, b in before.items() if n.split(".")[0] not in rename}
    after = {n: b for n, b in names.items() if n.split(".")[0] not in written.values()}
    assert after == before and len(after) == len(names) - 3 * len(written)


def review_lists(root, tmp_path, *, keep: list[int], remove: list[int]):
    """A keep list as text (one id per line) and a remove list as a table with an 'id' column
    (rows from the raw manifest, as a reviewer might export them)."""
    keep_path, remove_path = tmp_path / "keep.txt", tmp_path / "remove.parquet"
    keep_path.write_text("".join(f"{i}\n" for i in keep))
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    manifest.filter(pl.col("id").is_in(remove)).write_parquet(remove_path)
    return keep_path, remove_path


def reviewed(root, out, keep_path, remove_path, extra=()):
    params = tiny_params([f"filter.keep_ids={keep_path}", f"filter.remove_ids={remove_path}", *extra])
    filter_dataset(raw_dir=root / "raw", scores_dir=root / "scores", flags_dir=root / "flags", out_dir=out,
                   settings=params.filter, params=params)
    return params


def test_review_lists_overrule_and_add_to_the_flags(tiny_run, tmp_path):
    """removed = (flagged or in remove_ids) and not in keep_ids; the review is recorded."""
    from clipscrub.flows.pipeline import Layout, stage_inputs

    root, _ = tiny_run
    flags = pl.read_parquet(root / "flags" / "flags.parquet").sort("id")
    flagged = flags.filter(pl.col("is_flagged"))
    spared, unflagged = flagged["id"][0], flags.filter(~pl.col("is_flagged"))["id"][0]
    keep_path, remove_path = review_lists(root, tmp_path, keep=[spared], remove=[unflagged, flagged["id"][1]])
    params = reviewed(root, tmp_path / "clean", keep_path, remove_path)
    clean = tmp_path / "clean"
    kept = pl.read_parquet(clean / "manifest.parquet")
    removed = pl.read_parquet(clean / "removed.parquet")
    assert set(removed["id"]) == set(flagged["id"]) - {spared} | {unflagged}
    assert spared in kept["id"].to_list() and unflagged not in kept["id"].to_list()
    reasons = dict(removed.select("id", "reason").iter_rows())
    assert reasons[unflagged] == "review"  # removed by the person alone
    assert reasons[flagged["id"][1]] == flagged["reason"][1]  # flagged and confirmed: the flag's reason
    # the overruled flag is listed with the reason it was flagged for, and its sample is in the shards
    overruled = pl.read_parquet(clean / "overruled.parquet")
    assert overruled.select("id", "reason").rows() == [(spared, flagged["reason"][0])]
    assert overruled.columns == removed.columns
    key = kept.filter(pl.col("id") == spared)["key"].item()
    assert key in {s["__key__"] for p in sorted((clean / "shards").glob("*.tar")) for s in iter_shard(p)}
    lineage = json.loads((clean / "lineage.json").read_text())
    assert lineage["counts"] == {"input": 400, "failed": 0, "scored": 400, "kept": 380, "removed": 20,
                                 "flagged": 20, "removed_by_review": 1, "kept_by_review": 1}
    assert lineage["review"] == {
        "keep_ids": {"path": str(keep_path), "sha256": sha256_file(keep_path), "ids": 1},
        "remove_ids": {"path": str(remove_path), "sha256": sha256_file(remove_path), "ids": 2},
        "removed_by_review": 1, "kept_by_review": 1,
    }
    assert lineage["params"]["filter"]["keep_ids"] == str(keep_path)
    record = lineage["stages"]["filter"]["inputs"]
    assert record["keep_ids"] == sha256_file(keep_path) and record["remove_ids"] == sha256_file(remove_path)
    # the flow's cache key covers the lists' content, as the lineage does
    inputs = stage_inputs("filter", params, Layout(root))
    assert (inputs["filter.keep_ids"], inputs["filter.remove_ids"]) == (keep_path, remove_path)
    assert "filter.keep_ids" not in stage_inputs("filter", tiny_params(), Layout(root))


def test_an_id_in_both_review_lists_is_refused(tiny_run, tmp_path):
    root, _ = tiny_run
    keep_path, remove_path = review_lists(root, tmp_path, keep=[3, 7], remove=[7, 9])
    with pytest.raises(ParamError) as info:
        reviewed(root, tmp_path / "clean", keep_path, remove_path)
    assert info.value.param == "filter.keep_ids"
    assert info.value.message == ("1 ids are in both filter.keep_ids and filter.remove_ids, e.g. [7]: "
                                  "a sample is either kept or removed")
    assert not (tmp_path / "clean").exists()


@pytest.mark.parametrize("which", ["keep_ids", "remove_ids"])
def test_unknown_review_ids_are_refused(tiny_run, tmp_path, which):
    root, _ = tiny_run
    path = tmp_path / "ids.txt"
    path.write_text("5\n99999\n123456\n")
    other = tmp_path / "empty.txt"
    other.write_text("")
    keep_path, remove_path = (path, other) if which == "keep_ids" else (other, path)
    with pytest.raises(DataError) as info:
        reviewed(root, tmp_path / "clean", keep_path, remove_path)
    assert info.value.param == f"filter.{which}"
    assert info.value.message == ("2 ids are not scored samples of this dataset (unknown, or failed to download), "
                                  "e.g. [99999, 123456]")
    assert not (tmp_path / "clean").exists()


def test_unreadable_review_lists_are_refused(tiny_run, tmp_path):
    root, _ = tiny_run
    bad, empty = tmp_path / "bad.txt", tmp_path / "empty.txt"
    bad.write_text("5\nseven\n")
    empty.write_text("")
    with pytest.raises(DataError) as info:
        reviewed(root, tmp_path / "clean", bad, empty)
    assert info.value.param == "filter.keep_ids" and info.value.message == (
        "1 entries name no scored sample of this dataset (unknown, or failed to download), e.g. ['seven']")
    table = tmp_path / "ids.csv"
    table.write_text("uid\n5\n")
    with pytest.raises(DataError) as info:
        reviewed(root, tmp_path / "clean", empty, table)
    assert info.value.param == "filter.remove_ids"
    assert info.value.message == f"{table} has no id, key, file or url column (columns: uid)"
    binary = tmp_path / "ids.bin"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(DataError) as info:
        reviewed(root, tmp_path / "clean", binary, empty)
    assert info.value.message == f"cannot read {binary}: not a text file (one entry per line), a .parquet, .csv or .tsv"
    with pytest.raises(DataError) as info:
        reviewed(root, tmp_path / "clean", tmp_path / "missing.txt", empty)
    assert info.value.message == f"review list not found: {tmp_path / 'missing.txt'}"


def test_ids_output_writes_the_kept_ids_and_no_shards(tiny_run, tmp_path):
    """filter.output: ids: the same version as resharding, as ids that select the samples where they are."""
    import numpy as np

    root, _ = tiny_run
    params = tiny_params(["filter.output=ids"])
    out = tmp_path / "clean"
    counts = filter_dataset(raw_dir=root / "raw", scores_dir=root / "scores", flags_dir=root / "flags", out_dir=out,
                            settings=params.filter, params=params)
    assert not (out / "shards").exists()
    assert {p.name for p in out.iterdir()} == {"manifest.parquet", "removed.parquet", "overruled.parquet",
                                               "kept_ids.npy", "kept.parquet", "lineage.json"}
    ids = np.load(out / "kept_ids.npy")
    assert ids.dtype == np.int64 and (np.diff(ids) > 0).all()
    resharded = pl.read_parquet(root / "clean" / "manifest.parquet")
    assert ids.tolist() == resharded["id"].to_list() and len(ids) == counts["kept"]
    # kept.parquet and the kept manifest name each sample where the raw manifest has it
    raw = pl.read_parquet(root / "raw" / "manifest.parquet")
    kept = pl.read_parquet(out / "kept.parquet")
    assert kept.columns == ["id", "key", "shard"] and kept["id"].to_list() == ids.tolist()
    assert kept.rows() == raw.filter(pl.col("id").is_in(ids.tolist())).select("id", "key", "shard").sort("id").rows()
    assert pl.read_parquet(out / "manifest.parquet").equals(raw.filter(pl.col("id").is_in(ids.tolist())).sort("id"))
    assert pl.read_parquet(out / "removed.parquet").equals(pl.read_parquet(root / "clean" / "removed.parquet"))
    assert pl.read_parquet(out / "overruled.parquet").height == 0
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["params"]["filter"]["output"] == "ids" and "review" not in lineage
    assert set(lineage["outputs"]) == {"manifest.parquet", "removed.parquet", "overruled.parquet",
                                       "kept_ids.npy", "kept.parquet"}


@pytest.mark.parametrize("output", ["ids", "reshard"])
def test_a_manifest_in_any_row_order_gives_the_same_version(tiny_run, tmp_path, output):
    """The kept manifest is streamed in the manifest's order when its ids are in order, sorted
    otherwise: the version's files are the same bytes either way."""
    root, _ = tiny_run
    params = tiny_params([f"filter.output={output}"])
    shuffled = tmp_path / "raw"
    shutil.copytree(root / "raw", shuffled)
    manifest = pl.read_parquet(shuffled / "manifest.parquet")
    assert manifest["id"].is_sorted()  # download writes ids in order
    manifest.sample(fraction=1.0, shuffle=True, seed=3).write_parquet(shuffled / "manifest.parquet")
    outs = {}
    for name, raw in (("ordered", root / "raw"), ("shuffled", shuffled)):
        outs[name] = tmp_path / name
        filter_dataset(raw_dir=raw, scores_dir=root / "scores", flags_dir=root / "flags", out_dir=outs[name],
                       settings=params.filter, params=params)
    tables = sorted(p.name for p in outs["ordered"].iterdir() if p.suffix in (".parquet", ".npy"))
    assert "manifest.parquet" in tables
    assert {t: sha256_file(outs["ordered"] / t) for t in tables} == {t: sha256_file(outs["shuffled"] / t) for t in tables}


def raw_with_sample(root, out, key: str, **members: bytes):
    """A copy of ``root/raw`` whose shards hold other bytes for one sample's members (the
    manifest unchanged: the shard rewritten in place after download)."""
    shutil.copytree(root / "raw", out)
    for shard in sorted((out / "shards").glob("*.tar")):
        samples = list(iter_shard(shard))
        with wds.TarWriter(str(shard), mtime=0) as sink:
            for s in samples:
                s = {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
                sink.write(s | members if s["__key__"] == key else s)
    return out


def checkerboard_jpeg() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    board = (np.indices((32, 32)).sum(axis=0) // 4 % 2 * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([board] * 3, axis=-1)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("change", ["image and caption", "caption"])
def test_a_shard_rewritten_after_download_publishes_nothing(tiny_run, tmp_path, change):
    """Filter copies only the bytes download recorded: a kept sample whose image or caption
    changed in its shard stops it with one line naming the sample, its shard and what to rerun."""
    root, params = tiny_run
    flags = pl.read_parquet(root / "flags" / "flags.parquet")
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    row = manifest.filter(pl.col("id").is_in(flags.filter(~pl.col("is_flagged"))["id"].implode())).row(5, named=True)
    members = {"txt": b"a photo of a banana"} | ({"jpg": checkerboard_jpeg()} if change != "caption" else {})
    raw = raw_with_sample(root, tmp_path / "raw", row["key"], **members)
    with pytest.raises(DataError) as info:
        filter_dataset(raw_dir=raw, scores_dir=root / "scores", flags_dir=root / "flags", out_dir=tmp_path / "clean",
                       settings=params.filter, params=params)
    message = str(info.value)
    assert "\n" not in message and repr(row["key"]) in message and row["shard"] in message
    assert "rerun the pipeline from download" in message
    assert ("sha256" in message) == (change != "caption") and ("banana" in message) == (change == "caption")
    assert not (tmp_path / "clean").exists() and not list(tmp_path.glob(".clean*"))  # nothing published


@pytest.mark.parametrize("output", ["ids", "reshard"])
def test_pieces_give_the_version_one_piece_gives(tiny_run, tmp_path, output):
    """filter.piece_size rows at a time, the pieces in any order and one run twice: the same
    tables as one piece, byte for byte (a re-shard is one piece whatever the size); a piece not
    run stops the reduce, naming it."""
    from clipscrub.stages.filter import filter_piece, prepare_filter, reduce_filter

    root, _ = tiny_run
    whole, small = (tiny_params([f"filter.output={output}", f"filter.piece_size={size}"]) for size in (10**6, 7))
    args = dict(raw_dir=root / "raw", scores_dir=root / "scores", flags_dir=root / "flags")
    filter_dataset(**args, out_dir=tmp_path / "whole", settings=whole.filter, params=whole)
    common = dict(**args, work_dir=tmp_path / "work", settings=small.filter, params=small)
    pieces = prepare_filter(**common)["pieces"]
    rows = pl.read_parquet(root / "raw" / "manifest.parquet").height
    assert len(pieces) == (1 if output == "reshard" else -(-rows // 7)) and pieces[-1][1] == rows
    for start, stop in pieces[::-1] + pieces[:1]:
        filter_piece(**common, start=start, stop=stop)
    reduce_filter(**common, out_dir=tmp_path / "pieces")
    tables = sorted(p.name for p in (tmp_path / "whole").iterdir() if p.suffix in (".parquet", ".npy"))
    assert {t: sha256_file(tmp_path / "whole" / t) for t in tables} == \
        {t: sha256_file(tmp_path / "pieces" / t) for t in tables}
    if output == "reshard":
        written = {name: {p.name: sha256_file(p) for p in (tmp_path / name / "shards").iterdir()}
                   for name in ("whole", "pieces")}
        assert written["whole"] == written["pieces"] and written["whole"]
        return
    (tmp_path / "work" / "parts" / f"{pieces[1][0]:015d}.parquet").unlink()
    with pytest.raises(DataError, match=rf"chunk \[{pieces[1][0]}, {pieces[1][1]}\) has not been computed"):
        reduce_filter(**common, out_dir=tmp_path / "again")
    with pytest.raises(ParamError, match="is not a piece of the plan"):
        filter_piece(**common, start=1, stop=5)
