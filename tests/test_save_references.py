"""Datasets that grow: `clipscrub save-references` keeps a scored version's reference sets, and a run
with `index.reference.mode: saved` scores added shards against them (clipscrub/saved.py,
stages/save_references.py), without touching the old version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from clipscrub.errors import DataError, ParamError
from clipscrub.flows.cli import main
from clipscrub.flows.pipeline import Layout, run_stage
from clipscrub.io import read_json, sha256_path
from clipscrub.saved import BUNDLE_FILE
from clipscrub.stages.save_references import save_references
from tests.conftest import output_hashes, planted_params
from tests.planted import write_planted

UP_TO_SCORE = ("download", "embed", "index", "score")
SUBS = (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet"))


def _source(all_parts: Path, out: Path, parts: list[int]) -> Path:
    """A clip-retrieval source of some of the planted parts (one file each per sub-folder)."""
    for sub, ext in SUBS:
        (out / sub).mkdir(parents=True)
        for i in parts:
            shutil.copy(all_parts / sub / f"{sub}_{i}.{ext}", out / sub / f"{sub}_{i}.{ext}")
    return out


def _run(params, root: Path, stages=UP_TO_SCORE) -> Path:
    for stage in stages:
        run_stage(stage, params, root)
    return root


def _saved(bundle: Path, extra: list[str] | None = None) -> list[str]:
    return ["index.reference.mode=saved", f"index.reference.path={bundle}", *(extra or [])]


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """Planted data in three parts: the old version (parts 0 and 1) run to its cut with the
    default params and its references saved; the new part alone and all three parts as sources."""
    base = tmp_path_factory.mktemp("grown")
    write_planted(base / "all", parts=3)
    old = _run(planted_params(_source(base / "all", base / "old-src", [0, 1])), base / "old",
               UP_TO_SCORE + ("threshold",))
    lay = Layout(old)
    summary = save_references(embeddings_dir=lay.embeddings, index_dir=lay.index, score_dir=lay.scores,
                              threshold_dir=lay.flags, out_dir=base / "bundle")
    return {"base": base, "old": old, "bundle": base / "bundle", "summary": summary,
            "new_src": _source(base / "all", base / "new-src", [2]),
            "full_src": _source(base / "all", base / "full-src", [0, 1, 2])}


def test_added_shards_score_as_in_a_full_run_against_the_same_saved_sets(grown):
    base, bundle = grown["base"], grown["bundle"]
    before = output_hashes(grown["old"])
    new = _run(planted_params(grown["new_src"], _saved(bundle)), base / "new")
    assert output_hashes(grown["old"]) == before  # the old version is read by nobody, rewritten by nothing
    full = _run(planted_params(grown["full_src"], _saved(bundle)), base / "full")

    # the increment embedded and scored the new part only
    new_captions = pl.read_parquet(grown["new_src"] / "metadata" / "metadata_2.parquet")["caption"]
    assert pl.read_parquet(Layout(new).raw / "manifest.parquet")["caption"].to_list() == new_captions.to_list()
    assert len(np.load(Layout(new).embeddings / "ids.npy")) == len(new_captions)

    scores_new = pl.read_parquet(Layout(new).scores / "scores.parquet")
    scores_full = pl.read_parquet(Layout(full).scores / "scores.parquet")
    offset = scores_full.height - scores_new.height  # the new part's ids follow the old parts' in the full run
    tail = scores_full.tail(scores_new.height).with_columns(pl.col("id") - offset)
    assert scores_new.columns == tail.columns and "is_copy" in scores_new.columns
    assert scores_new.equals(tail)  # every detector, the copy vetting and the fusion: the same floats

    # the saved sets, traced: the bundle's hash and the saved version's lineage in the index's lineage
    index = read_json(Layout(new).index / "lineage.json")["stages"]["index"]
    assert index["inputs"]["references"] == sha256_path(bundle)
    assert index["saved_from"]["lineage"]["score"] == read_json(bundle / BUNDLE_FILE)["source"]["lineage"]["score"]
    assert all(rec["saved"] for rec in index["reference_sets"])
    # the scales are the saved version's, so its cut means the same on the added part
    assert read_json(Layout(new).scores / "lineage.json")["stages"]["score"]["scales"] == \
        read_json(Layout(grown["old"]).scores / "lineage.json")["stages"]["score"]["scales"]

    # the rest of the pipeline runs on the increment, cut where the saved version cut
    cut = grown["summary"]["threshold"]["cut"]
    rest = planted_params(grown["new_src"], _saved(bundle, ["threshold.method=score", f"threshold.score={cut!r}"]))
    _run(rest, new, ("threshold", "filter", "evaluate"))
    assert read_json(Layout(new).flags / "threshold.json")["cut"] == cut
    # the report's cards name no neighbour of the saved version, and say why
    summary = run_stage("report", rest, new)
    assert summary["nearest_references"].endswith("saved references of an earlier version, not shown")


def test_the_bundle_holds_the_saved_versions_references(grown):
    old, bundle = Layout(grown["old"]), grown["bundle"]
    meta = read_json(bundle / BUNDLE_FILE)
    sets = read_json(old.index / "references.json")["sets"]
    assert [s["name"] for s in meta["sets"]] == [s["name"] for s in sets] == grown["summary"]["sets"]
    image, text = np.load(old.embeddings / "image.npy"), np.load(old.embeddings / "text.npy")
    ids = np.load(old.embeddings / "ids.npy")
    for rec in sets:
        rows = np.load(old.index / rec["name"] / "ref_rows.npy")
        entries = np.load(bundle / rec["name"] / "entries.npy")
        assert np.array_equal(np.load(bundle / rec["name"] / "ids.npy"), ids[rows])
        m = rows.shape[1]
        first = (text if rec["modality"] == "text" else image)[rows[0]].astype(np.float32)
        assert np.array_equal(entries[0, :m], first)
        if rec["modality"] == "image_text":  # the image entries, then the caption entries
            assert np.array_equal(entries[0, m:], text[rows[0]].astype(np.float32))
        assert np.array_equal(np.load(bundle / rec["name"] / "ref_distances.npy"),
                              np.load(old.index / rec["name"] / "ref_distances.npy"))
    threshold = read_json(old.flags / "threshold.json")
    assert meta["source"]["threshold"]["cut"] == threshold["cut"] == grown["summary"]["threshold"]["cut"]
    assert meta["source"]["samples"] == len(ids)


@pytest.mark.parametrize("extra, error, param", [
    (["index.k=80"], ParamError, "index.k"),
    (["index.normalize=true"], ParamError, "index.normalize"),
    (["score.k=12"], ParamError, "score.k"),
    (["index.search.method=ivf"], ParamError, "index.search.method"),
    (["embed.model_name=another-d32"], DataError, "index.reference.path"),
])
def test_settings_the_saved_references_do_not_hold_for_are_refused(grown, tmp_path, extra, error, param):
    params = planted_params(grown["new_src"], _saved(grown["bundle"], extra))
    with pytest.raises(error) as info:
        _run(params, tmp_path / "data")
    assert info.value.param == param


def test_a_folder_without_saved_references_says_how_to_write_them(grown, tmp_path):
    params = planted_params(grown["new_src"], _saved(tmp_path))
    with pytest.raises(DataError, match="clipscrub save-references"):
        _run(params, tmp_path / "data")


def test_a_saved_mode_without_a_path_is_refused():
    with pytest.raises(ParamError) as info:
        planted_params(Path("src"), ["index.reference.mode=saved"])
    assert info.value.param == "index.reference.path"


@pytest.mark.parametrize("mode", ["all", "saved"])
def test_references_that_are_no_sets_of_their_own_are_not_saved(grown, tmp_path, mode):
    extra = ["index.reference.mode=all"] if mode == "all" else _saved(grown["bundle"])
    root = _run(planted_params(grown["new_src"], extra), tmp_path / "data")
    lay = Layout(root)
    with pytest.raises(DataError, match="whole dataset" if mode == "all" else "saved references already"):
        save_references(embeddings_dir=lay.embeddings, index_dir=lay.index, score_dir=lay.scores,
                        out_dir=tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_the_command_writes_the_bundle_and_prints_the_cut(grown, tmp_path, capsys):
    assert main(["save-references", "--root", str(grown["old"]), "-o", str(tmp_path / "refs")]) == 0
    out = capsys.readouterr().out
    cut = grown["summary"]["threshold"]["cut"]
    assert f"-S threshold.method=score -S threshold.score={cut!r}" in out
    # the same bytes as the function wrote: no timestamps, no paths of its own
    assert sha256_path(tmp_path / "refs") == sha256_path(grown["bundle"])
    assert main(["save-references", "--root", str(grown["old"]), "-o", str(tmp_path / "refs"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sets"] == grown["summary"]["sets"]
    assert main(["save-references", "--root", str(tmp_path / "nothing"), "-o", str(tmp_path / "x")]) == 2
    assert "clipscrub: error:" in capsys.readouterr().err
