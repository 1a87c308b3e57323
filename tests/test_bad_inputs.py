"""The table of bad inputs (docs/validation.md): for each, the one-line message the user sees, and that the
stage left no output (nor any scratch file) behind. Rows a source marks ``failed`` instead of
stopping (corrupt image, empty caption, duplicate key, ...) are checked in test_sources.py."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import pytest
import yaml

from clipscrub.flows.cli import main
from clipscrub.io import LOCK_FILE, seal_outputs
from clipscrub.params import parse_params
from clipscrub.flows.pipeline import run_stage
from tests.conftest import tiny_params_dict
from tests.test_sources import tiny_model, write_clip_retrieval  # noqa: F401 (fixture)


@dataclass
class Project:
    dir: Path
    tiny_root: Path
    tiny_model: Path

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def copy(self, *stages: str) -> None:
        for name in stages:
            shutil.copytree(self.tiny_root / name, self.data / name)

    def params(self, extra: list[str] | None = None, **sections) -> dict:
        data = tiny_params_dict(extra)
        for section, values in sections.items():
            data[section].update(values)
        (self.dir / "params.yaml").write_text(yaml.safe_dump(data))
        return data

    def external_model(self, **embed) -> dict:
        return {"model_name": "tiny", "pretrained": None, "checkpoint": str(self.tiny_model / "tiny.pt"),
                "model_config": str(self.tiny_model / "tiny.json"), **embed}


def _precomputed(p: Project, *, dim: int = 16, poke=None) -> list[str]:
    src = write_clip_retrieval(p.dir / "src", dim=dim)
    if poke:
        path = src / "img_emb" / "img_emb_0.npy"
        arr = np.load(path)
        poke(arr)
        np.save(path, arr)
    data = p.params(["train.enabled=false", "index.reference.mode=all", "index.k=4", "score.k=2", "score.lid_k=3"],
                    embed=p.external_model())
    data["download"]["source"] = "embeddings"
    data["download"]["embeddings"]["path"] = str(src)
    (p.dir / "params.yaml").write_text(yaml.safe_dump(data))
    run_stage("download", parse_params(data), p.data)
    return ["embed"]


def nan_embedding(p):
    return _precomputed(p, poke=lambda a: a.__setitem__((5, 2), np.nan))


def zero_embedding(p):
    return _precomputed(p, poke=lambda a: a.__setitem__(5, 0))


def wrong_dimension(p):
    return _precomputed(p, dim=24)


def k_not_below_reference_size(p):
    p.copy("embeddings")
    p.params()
    return ["index", "-S", "index.k=500"]


def k_not_below_dataset_size(p):
    p.copy("embeddings")
    p.params(["index.reference.mode=all", "index.reference.sizes=[10]", "index.k=5000", "score.lid_k=20"])
    return ["index"]


def empty_dataset(p):
    (p.dir / "images").mkdir()
    (p.dir / "captions.csv").write_text("file,caption\n")
    data = p.params(["train.enabled=false"])
    data["download"]["source"] = "folder"
    data["download"]["folder"].update({"path": str(p.dir / "images"), "captions": str(p.dir / "captions.csv")})
    (p.dir / "params.yaml").write_text(yaml.safe_dump(data))
    return ["download"]


def all_samples_failed(p):
    (p.dir / "images").mkdir()
    (p.dir / "captions.csv").write_text("file,caption\na.jpg,a cat\nb.jpg,a dog\nc.jpg,a bird\n")
    data = p.params(["train.enabled=false"], embed=p.external_model())
    data["download"]["source"] = "folder"
    data["download"]["folder"].update({"path": str(p.dir / "images"), "captions": str(p.dir / "captions.csv")})
    (p.dir / "params.yaml").write_text(yaml.safe_dump(data))
    return ["download"]


def missing_url_column(p):
    (p.dir / "urls.csv").write_text("link,caption\nhttp://127.0.0.1:9/a.jpg,a cat\n")
    data = p.params(["train.enabled=false"])
    data["download"]["source"] = "urls"
    data["download"]["urls"]["path"] = str(p.dir / "urls.csv")
    (p.dir / "params.yaml").write_text(yaml.safe_dump(data))
    return ["download"]


def unknown_detector(p):
    p.copy("embeddings", "index")
    p.params()
    return ["score", "-S", "score.detectors=[dao, lof]"]


def typo_key(p):
    data = p.params()
    data["threshold"]["fractoin"] = 0.1
    (p.dir / "params.yaml").write_text(yaml.safe_dump(data))
    p.copy("scores")
    return ["threshold"]


def wrong_type(p):
    p.copy("embeddings", "index")
    p.params()
    return ["score", "-S", "score.k=sixteen"]


def missing_params_file(p):
    return ["download", "-p", str(p.dir / "nope.yaml")]


def unreadable_checkpoint(p):
    p.copy("raw")
    (p.dir / "bad.pt").write_bytes(b"not a checkpoint" * 10)
    p.params(["train.enabled=false"], embed=p.external_model(checkpoint=str(p.dir / "bad.pt")))
    return ["embed"]


def checkpoint_of_another_model(p):
    p.copy("raw")
    cfg = json.loads((p.tiny_model / "tiny.json").read_text())
    cfg["vision_cfg"]["width"] *= 2
    (p.dir / "wide.json").write_text(json.dumps(cfg))
    p.params(["train.enabled=false"], embed=p.external_model(model_name="tiny-wide", model_config=str(p.dir / "wide.json")))
    return ["embed"]


def checkpoint_of_a_small_model_for_vit_b_32(p):
    """open_clip asserts before load_state_dict can say 'size mismatch' (228 lines, three times)."""
    p.copy("raw")
    p.params(["train.enabled=false"], embed=p.external_model(model_name="ViT-B-32", model_config=None))
    return ["embed"]


def output_not_writable(p):
    p.params()
    (p.dir / "file").write_text("a file, not a directory")
    return ["download", "--root", str(p.dir / "file" / "data")]


def upstream_output_missing(p):
    p.copy("embeddings")
    p.params()
    return ["score"]


def corrupt_manifest(p):
    p.copy("raw", "model")
    (p.data / "raw" / "manifest.parquet").write_bytes(b"PAR1 but not really")
    p.params()
    return ["embed"]


def _repeat_an_id(p):
    p.copy("raw", "model")
    path = p.data / "raw" / "manifest.parquet"
    m = pl.read_parquet(path)
    m.with_columns(pl.when(pl.col("id") == 7).then(6).otherwise(pl.col("id")).alias("id")).write_parquet(path)
    p.params()


def edited_manifest(p):
    _repeat_an_id(p)
    return ["embed"]


def repeated_id_in_manifest(p):
    """An upstream that really wrote a repeated id (its lineage agrees): embed's suite catches it."""
    _repeat_an_id(p)
    seal_outputs(p.data / "raw")
    return ["embed"]


def _edit_array(p, stage: str, name: str, edit) -> None:
    path = next((p.data / stage).rglob(name))
    arr = np.load(path)
    np.save(path, edit(arr))


def truncated_neighbours(p):
    p.copy("embeddings", "index")
    path = next((p.data / "index").rglob("neighbours.npy"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    p.params()
    return ["score"]


def edited_neighbours(p):
    """Same shape, same dtype, other values: only the content hash can tell."""
    p.copy("embeddings", "index")
    _edit_array(p, "index", "neighbours.npy", lambda a: a[:, ::-1].copy())
    p.params()
    return ["score"]


def edited_scores(p):
    p.copy("scores")
    path = p.data / "scores" / "scores.parquet"
    scores = pl.read_parquet(path)
    scores.with_columns(pl.col("kdist_score").reverse()).write_parquet(path)
    p.params()
    return ["threshold"]


def upstream_without_lineage(p):
    p.copy("raw", "scores", "flags")
    (p.data / "flags" / "lineage.json").unlink()
    p.params()
    return ["filter"]


def trusted_ids_not_in_dataset(p):
    p.copy("embeddings")
    (p.dir / "trusted.txt").write_text("0\n1\n99999\n")
    p.params(["index.reference.mode=trusted", "index.k=2", "score.k=1", "score.lid_k=2"])
    data = yaml.safe_load((p.dir / "params.yaml").read_text())
    data["index"]["reference"]["path"] = str(p.dir / "trusted.txt")
    (p.dir / "params.yaml").write_text(yaml.safe_dump(data))
    return ["index"]


def stale_upstream_params(p):
    p.copy("raw", "scores", "flags")
    p.params()
    return ["filter", "-S", "index.reference.draws=5"]


def nan_score_cut(p):
    p.copy("scores")
    p.params()
    return ["threshold", "-S", "threshold.method=score", "-S", "threshold.score=.nan"]


def negative_seed(p):
    p.params()
    return ["download", "-S", "base.seed=-1"]


def review_id_out_of_range(p):
    p.copy("raw", "scores", "flags")
    (p.dir / "remove.txt").write_text("1180591620717411303424\n")
    p.params(filter={"remove_ids": "remove.txt"})
    return ["filter"]


def review_list_is_a_directory(p):
    p.copy("raw", "scores", "flags")
    (p.dir / "review").mkdir()
    p.params(filter={"keep_ids": "review"})
    return ["filter"]


def binary_params_file(p):
    (p.dir / "params.yaml").write_bytes(bytes(range(128, 256)) * 4)
    return ["download"]


def params_file_is_a_directory(p):
    (p.dir / "conf").mkdir()
    return ["download", "-p", "conf"]


# (case, stage output that must not exist, fragments of the message)
CASES: list[tuple[Callable[[Project], list[str]], str, list[str]]] = [
    (nan_embedding, "embeddings",
     ["embed: validation failed: embed.embeddings: expect_column_values_to_not_be_null(image_norm): 1 of 11 rows, e.g. ids [5]",
      "data docs: ", "validation/embed/index.html"]),
    (zero_embedding, "embeddings",
     ["embed: validation failed: embed.embeddings: expect_column_values_to_be_between(image_norm)", "ids [5]", "(values [0.0])"]),
    (wrong_dimension, "embeddings", ["embed.model_name: the precomputed embeddings have dimension 24 but model 'tiny' embeds in 16"]),
    (k_not_below_reference_size, "index", ["index.k: 500 must be smaller than the smallest index.reference.sizes (120)"]),
    (k_not_below_dataset_size, "index", ["index.k: k (5000) needs more reference entries than 800"]),
    (empty_dataset, "raw", ["download.folder.captions: the captions file", "has no rows"]),
    (all_samples_failed, "raw", ["download.folder.captions: all 3 samples failed (file not found x3 (e.g. a.jpg)): "
                                  "nothing to embed"]),
    (missing_url_column, "raw", ["download.urls.url_col: urls.csv has no column 'url' (columns: link, caption)"]),
    (unknown_detector, "scores", ["score.detectors: unknown detector 'lof'; choose from kdist, slof, lid, dao, iforest, clip"]),
    (typo_key, "flags", ["threshold.fractoin: unknown key"]),
    (wrong_type, "scores", ["score.k: Input should be a valid integer (got 'sixteen')"]),
    (missing_params_file, "raw", ["--params: params file not found:", "nope.yaml"]),
    (unreadable_checkpoint, "embeddings", ["embed.checkpoint: cannot read checkpoint"]),
    (checkpoint_of_another_model, "embeddings", ["embed.checkpoint: checkpoint", "does not fit model 'tiny-wide': Error(s) in loading state_dict for CLIP: size mismatch for"]),
    (checkpoint_of_a_small_model_for_vit_b_32, "embeddings",
     ["embed.checkpoint: checkpoint", "tiny.pt does not fit model 'ViT-B-32': text pos_embed width changed!"]),
    (output_not_writable, "raw", ["--root: cannot create output directory", "file/data: Not a directory"]),
    (upstream_output_missing, "scores", ["index: data/index not found: run the index stage first "
                                         "(clipscrub index --root data, or dvc repro)"]),
    (corrupt_manifest, "embeddings",
     ["download: data/raw/manifest.parquet is not the file the download stage wrote (its sha256 differs from the one "
      "in data/raw/lineage.json; truncated or edited?): rerun the download stage (clipscrub download --root data, "
      "or dvc repro)"]),
    (edited_manifest, "embeddings", ["download: data/raw/manifest.parquet is not the file the download stage wrote"]),
    (truncated_neighbours, "scores", ["index: data/index/", "/neighbours.npy is not the file the index stage wrote",
                                      "rerun the index stage (clipscrub index --root data, or dvc repro)"]),
    (edited_neighbours, "scores", ["index: data/index/", "/neighbours.npy is not the file the index stage wrote"]),
    (edited_scores, "flags", ["score: data/scores/scores.parquet is not the file the score stage wrote"]),
    (upstream_without_lineage, "clean", ["threshold: data/flags has no lineage.json, so nothing says the threshold "
                                         "stage wrote it: rerun the threshold stage"]),
    (repeated_id_in_manifest, "embeddings",
     ["embed: validation failed: embed.embeddings: expect_column_values_to_be_unique(id): 2 of 400 rows, e.g. ids [6, 6]"]),
    (trusted_ids_not_in_dataset, "index", ["index.reference.path: 1 trusted ids are not embedded samples of this dataset, e.g. [99999]"]),
    (stale_upstream_params, "clean", ["index: the index stage's output was made with other 'index' params than the ones given"]),
    (nan_score_cut, "flags", ["threshold.score: Input should be a finite number"]),
    (negative_seed, "raw", ["base.seed: Input should be greater than or equal to 0"]),
    (review_id_out_of_range, "clean", ["filter.remove_ids: cannot read ids from remove.txt: an id is out of range "
                                       "(ids are 64-bit integers)"]),
    (review_list_is_a_directory, "clean", ["filter.keep_ids: review list review is a directory, not a file of ids"]),
    (binary_params_file, "raw", ["--params: params.yaml is not a text file (not UTF-8): a params file is YAML"]),
    (params_file_is_a_directory, "raw", ["--params: conf is a directory, not a params file"]),
]


@pytest.mark.parametrize(("case", "output", "fragments"), CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_stops_with_a_message_and_no_output(tiny_run, tiny_model, tmp_path, capsys, monkeypatch,  # noqa: F811
                                                      case, output, fragments):
    project = Project(tmp_path, tiny_run[0], tiny_model)
    project.data.mkdir()
    monkeypatch.chdir(tmp_path)
    args = case(project)
    argv = [args[0], "-p", "params.yaml", "--root", "data", *args[1:]]
    # the root's lock file is not an output: it stays, as a lock file must (see clipscrub.io.root_lock)
    lock = (project.data / LOCK_FILE).relative_to(tmp_path).as_posix()
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if "validation" not in p.parts)
    capsys.readouterr()
    assert main(argv) == 2
    # progress bars may precede it on stderr; the error is one line, the last
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("clipscrub: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    assert not (project.data / output).exists()
    after = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                   if "validation" not in p.parts and p.relative_to(tmp_path).as_posix() not in (lock, str(Path(lock).parent)))
    before = [b for b in before if b not in (lock, str(Path(lock).parent))]
    # nothing published, nothing half-written: only the data docs a failed validation writes
    assert after == before
    if "validation failed" in err:
        stage = err.split("clipscrub: error: ")[1].split(":")[0]
        assert (project.data / "validation" / stage / "index.html").is_file()
