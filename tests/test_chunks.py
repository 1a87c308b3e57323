"""The index and score stages as prepare / chunk / reduce pieces (what a cluster runs) write the
same bytes as the stage functions: chunks in any order, a chunk run twice, a chunk computed in
another process on one thread."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipscrub.arrays import create_npy, write_rows
from clipscrub.errors import DataError, ParamError
from clipscrub.params import parse_params
from clipscrub.stages.index import build_index, prepare_index, reduce_index, search_index_chunk
from clipscrub.stages.score import prepare_score, reduce_score, score_chunk, score_samples
from tests.conftest import write_embeddings

REPO = Path(__file__).resolve().parent.parent
# 3,000 samples in chunks of 700: five chunks, the last one short; every faiss call holds more
# than 20 queries, so faiss takes its BLAS path, whose sums depend on the thread count at d = 512
N, D, CHUNK = 3000, 512, 700
PARAMS = {
    "base": {"seed": 5},
    "index": {"k": 16, "chunk_size": CHUNK, "reference": {"sizes": [64, 256], "draws": 2}},
    "score": {"k": 8, "lid_k": 16, "iforest": {"n_estimators": 20}},
}
ALL_HNSW = {
    "base": {"seed": 5},
    "index": {"k": 16, "chunk_size": CHUNK, "reference": {"mode": "all"},
              "search": {"method": "hnsw", "recall_sample": 200}},
    "score": {"k": 8, "lid_k": 16, "iforest": {"n_estimators": 20}},
}


def digest(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def emb(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    image = (rng.normal(size=(N, D)) * rng.uniform(0.5, 2, size=(N, 1))).astype(np.float32)
    text = (image + 0.5 * rng.normal(size=(N, D))).astype(np.float32)
    image[:300] = image[300:600]  # duplicates: distances at exactly 0, ties
    return write_embeddings(tmp_path_factory.mktemp("emb"), image, text, np.arange(N) * 3 + 1)


def stage_run(emb: Path, out: Path, raw: dict) -> tuple[dict[str, str], dict[str, str]]:
    p = parse_params(raw)
    build_index(embeddings_dir=emb, out_dir=out / "index", settings=p.index, base=p.base)
    score_samples(embeddings_dir=emb, index_dir=out / "index", out_dir=out / "scores", settings=p.score,
                  index=p.index, base=p.base)
    return digest(out / "index"), digest(out / "scores")


def piece_run(emb: Path, out: Path, raw: dict, order) -> tuple[dict[str, str], dict[str, str]]:
    """prepare, the chunks at plan positions ``order``, reduce."""
    p = parse_params(raw)
    common = dict(embeddings_dir=emb, work_dir=out / "work-index", settings=p.index, base=p.base)
    plan = prepare_index(**common)
    for i in order(len(plan["chunks"])):
        search_index_chunk(**common, start=plan["chunks"][i][0], stop=plan["chunks"][i][1])
    reduce_index(**common, out_dir=out / "index")
    common = dict(embeddings_dir=emb, index_dir=out / "index", work_dir=out / "work-score", settings=p.score,
                  index=p.index, base=p.base)
    plan = prepare_score(**common)
    for i in order(len(plan["chunks"])):
        score_chunk(**common, start=plan["chunks"][i][0], stop=plan["chunks"][i][1])
    reduce_score(**common, out_dir=out / "scores")
    return digest(out / "index"), digest(out / "scores")


@pytest.fixture(scope="module")
def expected(emb, tmp_path_factory) -> dict[str, tuple[dict[str, str], dict[str, str]]]:
    return {name: stage_run(emb, tmp_path_factory.mktemp(name), raw)
            for name, raw in (("random", PARAMS), ("all_hnsw", ALL_HNSW))}


@pytest.mark.parametrize("name,raw", [("random", PARAMS), ("all_hnsw", ALL_HNSW)])
def test_pieces_in_order_match_stage_functions(emb, expected, tmp_path, name, raw):
    index, scores = piece_run(emb, tmp_path, raw, lambda n: range(n))
    assert index == expected[name][0] and scores == expected[name][1]
    assert "m64/neighbours.npy" in index or "all/neighbours.npy" in index
    assert "scores.parquet" in scores and "lineage.json" in scores


@pytest.mark.parametrize("name,raw", [("random", PARAMS), ("all_hnsw", ALL_HNSW)])
def test_chunks_in_any_order_and_rerun_give_the_same_bytes(emb, expected, tmp_path, name, raw):
    # reversed, the middle chunk once more at the end (it overwrites its own files)
    index, scores = piece_run(emb, tmp_path, raw, lambda n: [*range(n - 1, -1, -1), n // 2])
    assert index == expected[name][0] and scores == expected[name][1]


CHUNKS_IN_SUBPROCESS = """
import json, sys
import faiss
faiss.omp_set_num_threads(1)
from clipscrub.params import parse_params
from clipscrub.stages.index import search_index_chunk
from clipscrub.stages.score import score_chunk
emb, work, raw, start, stop = sys.argv[1:]
p = parse_params(json.loads(raw))
common = dict(embeddings_dir=emb, base=p.base, start=int(start), stop=int(stop))
search_index_chunk(**common, work_dir=work + "/work-index", settings=p.index)
score_chunk(**common, work_dir=work + "/work-score", index_dir=work + "/index", settings=p.score, index=p.index)
assert "torch" not in sys.modules  # the pieces never use torch: its thread count cannot matter
"""


def test_a_chunk_on_one_thread_in_another_process_gives_the_same_bytes(emb, expected, tmp_path):
    """A cluster worker runs one thread; this process runs faiss's default (2 here). faiss's own
    BLAS distances differ with the thread count at d = 512, the exactly re-ranked results must not."""
    p = parse_params(PARAMS)
    idx = dict(embeddings_dir=emb, work_dir=tmp_path / "work-index", settings=p.index, base=p.base)
    sco = dict(embeddings_dir=emb, index_dir=tmp_path / "index", work_dir=tmp_path / "work-score", settings=p.score,
               index=p.index, base=p.base)
    plan = prepare_index(**idx)
    for start, stop in plan["chunks"]:
        search_index_chunk(**idx, start=start, stop=stop)
    reduce_index(**idx, out_dir=tmp_path / "index")
    for start, stop in prepare_score(**sco)["chunks"]:
        score_chunk(**sco, start=start, stop=stop)
    start, stop = plan["chunks"][1]

    def chunk_outputs() -> list[dict[str, str]]:
        # an index chunk writes rows of the shared arrays, and its mark holds their hashes
        mark = json.loads((tmp_path / "work-index" / "chunks" / f"{start}-{stop}.json").read_text())
        return [mark["sha256"], digest(tmp_path / "work-score" / "chunks" / f"{start}-{stop}")]

    here = chunk_outputs()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", CHUNKS_IN_SUBPROCESS, str(emb), str(tmp_path), json.dumps(PARAMS),
                    str(start), str(stop)], env=env, cwd=REPO, check=True)
    there = chunk_outputs()
    # index: 2 image sets + the caption set x (neighbours, distances); score: 4 density detectors x
    # 3 sets, iforest, clip, and the copies vetting's three (copies, copied_refs, caption_mismatch),
    # then for the reduce each set's mean and sorted run (4 x 3 each: both image sets are fused by
    # z-score) and the vetting's mean mismatch and its population's run
    assert there == here and len(here[0]) == 3 * 2 and len(here[1]) == 4 * 3 + 2 + 3 + 2 * 4 * 3 + 2
    reduce_index(**idx, out_dir=tmp_path / "index")  # from the other process's chunk files
    reduce_score(**sco, out_dir=tmp_path / "scores")
    assert (digest(tmp_path / "index"), digest(tmp_path / "scores")) == expected["random"]


def test_reduce_names_a_missing_chunk_and_chunks_must_be_the_plans(emb, tmp_path):
    p = parse_params(PARAMS)
    common = dict(embeddings_dir=emb, work_dir=tmp_path / "work", settings=p.index, base=p.base)
    plan = prepare_index(**common)
    assert plan["chunks"] == [[0, 700], [700, 1400], [1400, 2100], [2100, 2800], [2800, 3000]]
    with pytest.raises(ParamError, match=r"\[100, 800\) is not one of the plan's chunks"):
        search_index_chunk(**common, start=100, stop=800)
    for start, stop in plan["chunks"][1:]:
        search_index_chunk(**common, start=start, stop=stop)
    with pytest.raises(DataError, match=r"chunk \[0, 700\) has not been computed"):
        reduce_index(**common, out_dir=tmp_path / "index")
    assert not (tmp_path / "index").exists()
    other = parse_params({**PARAMS, "index": {**PARAMS["index"], "k": 20}})
    with pytest.raises(ParamError, match="prepared with other params: rerun prepare_index"):
        search_index_chunk(**{**common, "settings": other.index}, start=0, stop=700)


def test_prepare_never_empties_a_folder_it_did_not_make(emb, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    p = parse_params(PARAMS)
    with pytest.raises(ParamError, match="is not empty and was not made by clipscrub"):
        prepare_index(embeddings_dir=emb, work_dir=mine, settings=p.index, base=p.base)
    assert (mine / "notes.txt").read_text() == "keep"


def test_reduce_links_the_arrays_the_chunks_filled(emb, expected, tmp_path):
    """No copy of the (r, N, K) arrays at reduce: the output files are the work files' inodes."""
    p = parse_params(PARAMS)
    common = dict(embeddings_dir=emb, work_dir=tmp_path / "work", settings=p.index, base=p.base)
    for start, stop in prepare_index(**common)["chunks"]:
        search_index_chunk(**common, start=start, stop=stop)
    reduce_index(**common, out_dir=tmp_path / "index")
    for name in ("neighbours", "distances", "ref_neighbours", "ref_distances"):
        assert (tmp_path / "index" / "m64" / f"{name}.npy").stat().st_ino == \
            (tmp_path / "work" / "m64" / f"{name}.npy").stat().st_ino
    assert digest(tmp_path / "index") == expected["random"][0]


def test_write_rows_fills_rows_of_the_last_axes_and_refuses_what_does_not_fit(tmp_path):
    path = tmp_path / "a.npy"
    create_npy(path, dtype=np.int64, shape=(2, 5, 3))
    want = np.arange(30, dtype=np.int64).reshape(2, 5, 3)
    for draw in (1, 0):
        for start, stop in ((3, 5), (0, 3)):  # any order, as chunks land
            write_rows(path, row=draw * 5 + start, block=want[draw, start:stop])
    np.testing.assert_array_equal(np.load(path), want)
    write_rows(path, row=0, block=want.reshape(10, 3))  # rows across the draws: the same flat layout
    np.testing.assert_array_equal(np.load(path), want)
    with pytest.raises(DataError, match=r"rows \[9, 11\) lie outside the 10 rows"):
        write_rows(path, row=9, block=want[0, :2])
    with pytest.raises(DataError, match=r"holds int64 \(2, 5, 3\); cannot write rows of float32 \(2, 3\)"):
        write_rows(path, row=0, block=want[0, :2].astype(np.float32))
    with pytest.raises(DataError, match="cannot write rows of int64 \\(2, 4\\)"):
        write_rows(path, row=0, block=np.zeros((2, 4), np.int64))


@pytest.mark.parametrize("name, row", [("image", 1500), ("text", 2999)])
def test_the_chunk_holding_a_non_finite_embedding_stops_the_stage(emb, tmp_path, name, row):
    """Values are checked by the chunks that read them (no separate pass over N rows): the chunk
    holding the row stops, naming the file, its rows and the id; the others pass."""
    work = write_embeddings(tmp_path / "emb", np.load(emb / "image.npy"), np.load(emb / "text.npy"),
                            np.load(emb / "ids.npy"))
    arr = np.load(work / f"{name}.npy")
    arr[row, 7] = np.inf if name == "image" else np.nan
    np.save(work / f"{name}.npy", arr)
    p = parse_params(PARAMS)
    common = dict(embeddings_dir=work, work_dir=tmp_path / "work", settings=p.index, base=p.base)
    plan = prepare_index(**common)
    bad = next(c for c in plan["chunks"] if c[0] <= row < c[1])
    search_index_chunk(**common, start=0, stop=700)
    with pytest.raises(DataError, match=rf"1 {name} embeddings of rows \[{bad[0]}, {bad[1]}\) are not finite, "
                                        rf"e.g. ids \[{row * 3 + 1}\]"):
        search_index_chunk(**common, start=bad[0], stop=bad[1])
    with pytest.raises(DataError, match=rf"{name} embeddings of rows .* are not finite"):
        build_index(embeddings_dir=work, out_dir=tmp_path / "index", settings=p.index, base=p.base)
    assert not (tmp_path / "index").exists()
    # score checks the rows it reads too (an index made from other embeddings of the same size)
    build_index(embeddings_dir=emb, out_dir=tmp_path / "index", settings=p.index, base=p.base)
    with pytest.raises(DataError, match=rf"{name} embeddings of rows .* are not finite"):
        score_samples(embeddings_dir=work, index_dir=tmp_path / "index", out_dir=tmp_path / "scores",
                      settings=p.score, index=p.index, base=p.base)
    assert not (tmp_path / "scores").exists()
