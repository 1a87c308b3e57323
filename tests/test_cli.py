"""The `clipscrub` command: one-line errors naming the parameter, and no partial output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from tests.conftest import tiny_params_dict
from tests.test_sources import tiny_model  # noqa: F401 (fixture)

CLI = [sys.executable, "-m", "clipscrub.flows.cli"]


def clipscrub(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".*tmp-*"))


@pytest.fixture
def project(tmp_path, tiny_run):
    """A params file plus a data root holding only the downloaded dataset and the model."""
    root, _ = tiny_run
    data = tmp_path / "data"
    shutil.copytree(root / "raw", data / "raw")
    shutil.copytree(root / "model", data / "model")
    params = tiny_params_dict()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


@pytest.mark.parametrize(
    ("stage", "override", "expected"),
    [
        ("index", "index.k=500", "index.k: 500 must be smaller than the smallest index.reference.sizes (120)"),
        ("threshold", "threshold.fraction=1.5", "threshold.fraction: Input should be less than 1"),
        ("threshold", "threshold.fraction=0", "threshold.fraction: Input should be greater than 0"),
        ("score", "score.detectors=[dao, lof]", "score.detectors: unknown detector 'lof'"),
        ("embed", "train.enabled=false,embed.checkpoint=missing.pt", "embed.checkpoint: checkpoint file not found: missing.pt"),
        ("embed", "train.enabled=false,embed.model_name=ViT-Nope", "embed.model_name: unknown model 'ViT-Nope' (open_clip.list_models() lists them"),
        ("download", "download.synthetic.num_samples=0", "download.synthetic.num_samples: Input should be greater than or equal to 1"),
        ("index", "index.reference.sizes=[200, 200]", "index.reference.sizes: sizes repeat: [200, 200]"),
        ("threshold", "threshold.fractoin=0.1", "-S: ") ,
        ("threshold", "threshold.fraction=[0.1,", "threshold.fraction: cannot read the value '[0.1,': while parsing"),
        ("threshold", "threshold.fraction=!!python/object/apply:os.system [echo]",
         "threshold.fraction: cannot read the value '!!python/object/apply:os.system [echo]': could not determine a constructor"),
    ],
)
def test_bad_parameters_stop_with_one_line(project, stage, override, expected):
    if stage in ("index",):
        clipscrub("embed", cwd=project)  # index needs embeddings to find the dataset size
    before = tree(project / "data")
    sets = [a for o in override.split(",") for a in ("-S", o)] if "[" not in override else ["-S", override]
    res = clipscrub(stage, *sets, cwd=project)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("clipscrub: error: ")
    if expected == "-S: ":
        assert "threshold.fractoin: unknown key" in lines[0]
    else:
        assert expected in lines[0]
    assert tree(project / "data") == before  # nothing written, nothing half-written
    assert leftovers(project / "data") == []


def tree(data):
    """Every path under ``data`` but the root's lock (a lock file stays, as it must: clipscrub.io.root_lock)."""
    return sorted(p.relative_to(data.parent).as_posix() for p in data.rglob("*") if ".clipscrub" not in p.parts)


def test_empty_manifest_is_an_error(project):
    import polars as pl

    from clipscrub.io import seal_outputs

    manifest = pl.read_parquet(project / "data" / "raw" / "manifest.parquet")
    manifest.head(0).write_parquet(project / "data" / "raw" / "manifest.parquet")
    seal_outputs(project / "data" / "raw")  # an upstream that wrote it so, not an edit after the fact
    res = clipscrub("embed", cwd=project)
    assert res.returncode == 2
    assert "the dataset is empty" in res.stderr
    assert not (project / "data" / "embeddings").exists()


@pytest.mark.parametrize("stage", ["download", "train", "embed", "index", "score", "threshold", "filter",
                                   "evaluate", "report"])
def test_stage_help_states_inputs_outputs_params_and_a_working_example(stage, capsys):
    import shlex

    import yaml

    from clipscrub.params import apply_overrides, parse_params
    from clipscrub.flows.cli import main
    from clipscrub.flows.pipeline import STAGES
    from tests.conftest import REPO

    with pytest.raises(SystemExit):
        main([stage, "--help"])
    text = capsys.readouterr().out
    spec = STAGES[stage]
    reads = next(line for line in text.splitlines() if line.startswith("reads:"))
    assert all(f"ROOT/{name}/" in reads for name in spec.inputs if name not in ("train_metrics",)), reads
    assert f"params:  {', '.join(spec.params)} " in text
    example = next(line.strip() for line in text.splitlines() if line.strip().startswith(f"clipscrub {stage} "))
    args = shlex.split(example)
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "-S"]
    assert overrides  # the example's override is a real key with a valid value
    parse_params(apply_overrides(yaml.safe_load((REPO / "params.yaml").read_text()), overrides))


def test_version(capsys):
    from clipscrub import __version__
    from clipscrub.flows.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"clipscrub {__version__}\n"


def test_stage_prints_a_json_summary(project):
    import json

    res = clipscrub("embed", "--json", cwd=project)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)  # the whole of stdout: one object
    assert summary["stage"] == "embed" and summary["samples"] == 400


def test_every_stage_prints_words_or_one_json_object(tmp_path, monkeypatch, capsys):
    """By default a few lines for a person, opening with the stage's name and ending with what it
    wrote; with --json exactly one JSON object on stdout and nothing else."""
    import json

    from clipscrub.flows.cli import main
    from clipscrub.flows.pipeline import STAGES

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    monkeypatch.chdir(tmp_path)
    for stage in STAGES:
        assert main([stage, "--root", "data"]) == 0
        words = capsys.readouterr().out.splitlines()
        assert words[0].startswith(f"{stage}: ") and words[-1].startswith("  wrote data/"), words
        assert all(line.startswith("  ") for line in words[1:]) and not any("{" in line for line in words), words
        assert main([stage, "--root", "data", "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["stage"] == stage
        if stage == "index":
            assert words[0] == (f"index: 400 samples, 1 reference set (m120), 2 draws in all (480 entries), k=20, "
                                f"exact search, recall@k 1.000")


def _words(stage, summary, wrote):
    from clipscrub.flows.cli import summary_text

    return summary_text(stage, summary, wrote=[Path(p) for p in wrote])


@pytest.mark.parametrize(("stage", "summary", "wrote", "expected"), [
    ("download", {"source": "urls", "samples": 2000, "ok": 1990, "failed": 10, "errors": {"timeout": 7, "http 404": 3},
                  "shards": 2},
     ["data/raw"], "download: 2,000 samples from source urls: 1,990 ok, 10 failed, 2 shards\n"
                   "  failures: timeout x7, http 404 x3\n  wrote data/raw/"),
    ("train", {"trained": False}, ["data/model", "data/metrics/train.json"],
     "train: skipped (train.enabled is false): embed uses the model its own section names\n"
     "  wrote data/model/, data/metrics/train.json"),
    ("embed", {"samples": 2000, "dim": 512, "device": "cuda", "shards": 2, "shards_resumed": 1,
               "model": "model 'ViT-B-32' pretrained 'laion2b_s34b_b79k'"}, ["data/embeddings"],
     "embed: 2,000 samples, dimension 512, on cuda, 2 shards (1 resumed from an interrupted run)\n"
     "  model 'ViT-B-32' pretrained 'laion2b_s34b_b79k'\n  wrote data/embeddings/"),
    ("index", {"samples": 2000, "reference_sets": ["m256", "m1024", "m2000"], "draws": 3, "reference_entries": 6512,
               "k": 16, "search": ["exact"], "recall_at_k": 1.0}, ["data/index"],
     "index: 2,000 samples, 3 reference sets (m256, m1024, m2000), 3 draws in all (6,512 entries), k=16, exact "
     "search, recall@k 1.000\n  wrote data/index/"),
    ("score", {"samples": 2000, "detectors": ["kdist", "dao"], "non_finite": {"kdist": 0, "dao": 2},
               "reference_sets": ["m256", "m1024"], "fusion": "max_abs_z"}, ["data/scores"],
     "score: 2,000 samples scored by kdist, dao against reference sets m256, m1024, fused by max_abs_z\n"
     "  non-finite scores (flagged by threshold): dao 2\n  wrote data/scores/"),
    ("score", {"samples": 2000, "detectors": ["kdist"], "non_finite": {"kdist": 0}, "copies": 31,
               "reference_sets": ["m256", "m1024", "t256"], "fusion": "max_z"}, ["data/scores"],
     "score: 2,000 samples scored by kdist against reference sets m256, m1024, t256, fused by max_z\n"
     "  31 samples in groups of copies, judged by caption\n  wrote data/scores/"),
    ("threshold", {"samples": 2000, "detector": "kdist", "method": "top_fraction", "cut": 3.51234, "direction": "above",
                   "flagged": 20, "non_finite": 0}, ["data/flags"],
     "threshold: flagged 20 of 2,000 samples by kdist, top_fraction: kdist score above 3.512\n  wrote data/flags/"),
    ("filter", {"input": 2000, "failed": 0, "scored": 2000, "kept": 1975, "removed": 25, "flagged": 20,
                "removed_by_review": 5, "kept_by_review": 0}, ["data/clean"],
     "filter: kept 1,975 of 2,000 input samples: 25 removed, 0 failed at download\n"
     "  removed: 20 flagged by the detectors, 0 of them kept by review, 5 others removed by review\n"
     "  wrote data/clean/"),
    ("evaluate", {"ground_truth": False, "samples": 2000}, ["data/metrics/detection.json"],
     "evaluate: 2,000 samples, no ground truth (no is_poison in the manifest, no evaluate.truth): no detection "
     "metrics\n  wrote data/metrics/detection.json"),
    ("report", {"flagged": 20, "gallery": 20, "clusters": 2, "clustered_samples": 9}, ["data/report/index.html"],
     "report: 20 flagged, the top 20 shown; 2 clusters of flagged samples sharing a caption or an image (9 samples)\n"
     "  wrote data/report/index.html (open it in a browser)"),
    ("report", {"flagged": 160000, "gallery": 48, "clusters": 3, "clustered_samples": 40,
                "limit": "the gallery pages and clusters cover the top 10,000 of 160,000 flagged (report.flagged_limit)"},
     ["data/report/index.html"],
     "report: 160,000 flagged, the top 48 shown; 3 clusters of flagged samples sharing a caption or an image (40 samples)\n"
     "  the gallery pages and clusters cover the top 10,000 of 160,000 flagged (report.flagged_limit)\n"
     "  wrote data/report/index.html (open it in a browser)"),
    ("poison", {"samples": 400, "ok": 400, "failed": 0, "poisoned": 12, "attacks": {"sig:apple": 8, "targeted:car": 4},
                "shards": 4}, ["poisoned"],
     "poison: 12 of 400 samples now poisoned, 12 by these attacks (sig:apple 8, targeted:car 4), 4 shards\n"
     "  wrote poisoned/"),
    # a summary of a shape the words do not know (a stage changed since): every key, not a traceback
    ("index", {"samples": 3, "new_key": 1}, ["data/index"], "index: new_key=1, samples=3\n  wrote data/index/"),
])
def test_summary_words(stage, summary, wrote, expected):
    assert _words(stage, summary, wrote) == expected


def test_run_words(tmp_path):
    from clipscrub.flows.cli import run_text

    states = {s: "Cached" for s in ("download", "embed", "index")} | {"score": "Completed"}
    text = run_text({"states": states, "pieces": {"score": 4}}, str(tmp_path))
    assert text == (f"run: 4 stages completed into {tmp_path.resolve()} (download, embed, index from cache)\n"
                    "  cluster pieces: score 4")
    assert run_text({"states": {"download": "Cached"}}, str(tmp_path)).endswith("(all from cache: nothing changed)")


@pytest.mark.parametrize("command", ["show", "diff", "init", "save-references"])
def test_every_argument_of_show_diff_and_init_is_documented(command, capsys):
    from clipscrub.flows.cli import build_parser

    sub = next(a for a in build_parser()._subparsers._group_actions if a.dest == "command").choices[command]
    undocumented = [a.dest for a in sub._actions if a.dest != "help" and not a.help]
    assert undocumented == []
    with pytest.raises(SystemExit):
        sub.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "examples:" in text
    if command == "diff":
        assert "A the first version: a directory (a data root such as data/, a `clipscrub run` OUTDIR" in text


def test_a_params_file_elsewhere_reads_its_relative_paths_from_its_folder(tmp_path, monkeypatch, capsys):
    """A folder source named relative to the params file, run from another working directory."""
    import io

    from PIL import Image

    from clipscrub.flows.cli import main

    proj = tmp_path / "proj"
    (proj / "images").mkdir(parents=True)
    for i in range(3):
        buf = io.BytesIO()
        Image.new("RGB", (24, 24), (80 * i, 40, 200)).save(buf, format="PNG")
        (proj / "images" / f"{i}.png").write_bytes(buf.getvalue())
    (proj / "conf").mkdir()
    (proj / "conf" / "captions.csv").write_text("file,caption\n0.png,a red square\n1.png,a blue one\n2.png,green\n")
    data = tiny_params_dict(["train.enabled=false", "download.source=folder", "download.folder.path=../images",
                             "download.folder.captions=captions.csv"])
    (proj / "conf" / "params.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["download", "-p", "../proj/conf/params.yaml", "--root", "data"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.splitlines()[0] == "download: 3 samples from source folder: 3 ok, 0 failed, 1 shard"


def test_hub_weights_offline_stop_at_once_in_one_line(project, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(project / "empty-hub-cache"))
    res = clipscrub("embed", "-S", "train.enabled=false", cwd=project)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "clipscrub: error: embed.pretrained: could not fetch pretrained weights 'laion2b_s34b_b79k' for 'ViT-B-32': "
        "HF_HUB_OFFLINE is set and they are not in the local cache; download https://huggingface.co/laion/"
        "CLIP-ViT-B-32-laion2B-s34B-b79K/resolve/main/open_clip_pytorch_model.bin where there is internet, then set "
        "embed.checkpoint to that file (with embed.model_name 'ViT-B-32')"]


def _keys(node, prefix=""):
    if not isinstance(node, dict):
        return {prefix}
    return set().union(*(_keys(v, f"{prefix}{k}.") for k, v in node.items())) if node else {prefix}


@pytest.mark.parametrize(("source", "path", "extra"), [
    ("shards", "shards/{00000..00003}.tar", []),
    ("urls", "urls.parquet", []),
    ("folder", "images", ["--captions", "captions.csv"]),
    ("embeddings", "/data/clip-retrieval", ["--model", "ViT-L-14", "--pretrained", "openai"]),
    ("shards", "shards", ["--checkpoint", "weights/open_clip_model.safetensors"]),
])
def test_init_writes_a_params_file_that_loads(tmp_path, monkeypatch, capsys, source, path, extra):
    from clipscrub.params import load_params
    from clipscrub.flows.cli import main
    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    assert main(["init", "--source", source, "--path", path, *extra, "-o", "conf/params.yaml"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"init: wrote conf/params.yaml: source {source} at "), out
    text = (tmp_path / "conf" / "params.yaml").read_text()
    assert _keys(yaml.safe_load(text)) == _keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    raw = yaml.safe_load(text)
    written = raw["download"][source]["path"]
    # typed relative to the working directory, written relative to the file: the same place
    assert written == path if path.startswith("/") else (tmp_path / "conf" / written).resolve() == (tmp_path / path).resolve()
    p = load_params("conf/params.yaml")
    assert p.download.source == source and not p.train.enabled
    loaded = getattr(p.download, source).path
    assert loaded == path if path.startswith("/") else (tmp_path / loaded).resolve() == (tmp_path / path).resolve()
    if source == "folder":
        assert raw["download"]["folder"]["captions"] == "../captions.csv"
    if "--checkpoint" in extra:
        assert p.embed.pretrained is None and raw["embed"]["checkpoint"] == "../weights/open_clip_model.safetensors"
    elif "--model" not in extra:
        assert (p.embed.model_name, p.embed.pretrained) == ("ViT-B-32", "laion2b_s34b_b79k")
    # from the file's own folder: the values as written
    monkeypatch.chdir(tmp_path / "conf")
    assert getattr(load_params("params.yaml").download, source).path == written


def test_init_refuses_to_overwrite_and_checks_what_it_writes(tmp_path, monkeypatch, capsys):
    from clipscrub.flows.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("# mine\n")
    assert main(["init", "--source", "shards", "--path", "shards"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "clipscrub: error: --out: params.yaml exists: pass --force to overwrite it"]
    assert (tmp_path / "params.yaml").read_text() == "# mine\n"
    assert main(["init", "--source", "shards", "--path", "shards", "--model", "ViT-B32", "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "clipscrub: error: embed.model_name: unknown model 'ViT-B32'; did you mean 'ViT-B-32'?"), err
    assert (tmp_path / "params.yaml").read_text() == "# mine\n" and leftovers(tmp_path) == []
    assert main(["init", "--source", "folder", "--path", "images", "--force"]) == 2
    assert "--captions: the folder source needs a captions file" in capsys.readouterr().err
    assert main(["init", "--source", "urls", "--path", "urls.parquet", "--model", "ViT-L-14", "--force"]) == 2
    assert capsys.readouterr().err.strip() == (
        "clipscrub: error: --model: name the weights of 'ViT-L-14': --pretrained TAG "
        "(open_clip.list_pretrained_tags_by_model('ViT-L-14')) or --checkpoint FILE")
    assert main(["init", "--source", "shards", "--path", "shards", "--force"]) == 0
    assert "source: shards" in (tmp_path / "params.yaml").read_text()


def test_init_writes_a_dvc_project_and_overwrites_nothing(tmp_path, monkeypatch, capsys):
    """params.yaml, dvc.yaml and the empty review lists, or (an existing dvc.yaml) nothing at all."""
    from clipscrub.flows.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    assert main(["init", "--source", "shards", "--path", "shards", "--checkpoint", "w.pt"]) == 2
    assert "--out: dvc.yaml exists: pass --force to overwrite it" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dvc.yaml"]
    (tmp_path / "dvc.yaml").unlink()
    assert main(["init", "--source", "shards", "--path", "shards", "--checkpoint", "w.pt"]) == 0
    # in the project's own folder the next step starts at git init; elsewhere with a cd there
    assert "  next: git init && dvc init && dvc repro" in capsys.readouterr().out
    assert main(["init", "--source", "shards", "--path", "shards", "--checkpoint", "w.pt", "-o", "proj/params.yaml"]) == 0
    assert "  next: cd proj && git init && dvc init && dvc repro" in capsys.readouterr().out
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert "shards" in stages["download"]["deps"] and "w.pt" in stages["embed"]["deps"]
    assert {"review/keep_ids.txt", "review/remove_ids.txt"} <= set(stages["filter"]["deps"])
    assert (tmp_path / "review" / "keep_ids.txt").read_text().startswith("# Samples to keep")


def test_init_checks_a_checkpoint_against_its_model(tmp_path, monkeypatch, capsys, tiny_model):  # noqa: F811
    """A small model's weights named as ViT-B-32's: init refuses them on one line (embed used to end
    in 228 lines and `AssertionError: text pos_embed width changed!`), writing nothing; the
    weights with their own model are accepted."""
    from clipscrub.flows.cli import main

    monkeypatch.chdir(tmp_path)
    ckpt = str(tiny_model / "tiny.pt")
    assert main(["init", "--source", "shards", "--path", "shards", "--model", "ViT-B-32", "--checkpoint", ckpt]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"clipscrub: error: embed.checkpoint: checkpoint {ckpt} does not fit model 'ViT-B-32': "
                   "text pos_embed width changed!"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert main(["init", "--source", "shards", "--path", "shards", "--model", "tiny", "--checkpoint", ckpt,
                 "--model-config", str(tiny_model / "tiny.json")]) == 0


def test_the_review_is_never_credited_to_the_detectors(tiny_run, tmp_path):
    """4 flagged samples kept and 2 others removed by review: show, the filter's words and the
    applied sentence say flagged, kept by review, removed by review and removed in total; show
    warns once clean/ and metrics/applied.json come from different runs."""
    from clipscrub.flows.cli import show_run, summary_text
    from clipscrub.metrics import applied_sentence
    from clipscrub.stages.evaluate import evaluate_detectors
    from tests.test_evaluate import reviewed_clean

    root, params = tiny_run
    data = tmp_path / "data"
    for name in ("raw", "scores", "flags"):
        shutil.copytree(root / name, data / name)
    flags = pl.read_parquet(root / "flags" / "flags.parquet").sort("rank")
    keep = flags.filter(pl.col("is_flagged"))["id"].head(4).to_list()
    remove = flags.filter(~pl.col("is_flagged"))["id"].head(2).to_list()
    run = reviewed_clean(data, data / "clean", keep=keep, remove=remove)
    evaluate_detectors(raw_dir=data / "raw", scores_dir=data / "scores", metrics_path=data / "metrics" / "detection.json",
                       plots_dir=data / "plots", settings=run.evaluate, threshold=run.threshold, base=run.base,
                       flags_dir=data / "flags", applied_path=data / "metrics" / "applied.json", clean_dir=data / "clean")
    words = "18 removed: 20 flagged by the detectors, 4 of them kept by review, 2 others removed by review"
    shown = show_run(str(data))
    assert f"cleaned: kept 382 of 400 input samples; 0 failed at download; {words}" in shown
    applied = json.loads((data / "metrics" / "applied.json").read_text())
    assert (applied["flagged"], applied["kept_by_review"], applied["removed_by_review"], applied["removed"]) == (20, 4, 2, 18)
    assert applied_sentence(applied).startswith(
        "kdist, top_fraction 0.05: removed 18 of 400 (4.50%); 20 flagged by the detectors, 4 of them kept by review, "
        "2 others removed by review.")
    counts = json.loads((data / "clean" / "lineage.json").read_text())["counts"]
    assert "removed: 20 flagged by the detectors, 4 of them kept by review" in summary_text("filter", counts, wrote=[])
    assert "warning" not in shown
    reviewed_clean(data, data / "clean", keep=[], remove=[])  # filter again, evaluate not rerun
    assert (f"warning: {data / 'metrics' / 'applied.json'} does not describe {data / 'clean'} (removed 18 there, 20 in "
            "the cleaned version): they come from different runs; rerun evaluate") in show_run(str(data))


def test_index_words_say_when_reference_sizes_were_capped(tiny_run, tmp_path):
    """The default sizes on a 400-sample set: 1024 and 4096 become one set of all 400, and the
    summary says so (it was silent)."""
    from clipscrub.flows.cli import summary_text
    from clipscrub.stages.index import build_index
    from tests.conftest import tiny_params

    root, _ = tiny_run
    params = tiny_params(["index.reference.sizes=[256, 1024, 4096]"])
    summary = build_index(embeddings_dir=root / "embeddings", out_dir=tmp_path / "index", settings=params.index,
                          base=params.base)
    assert summary["reference_sets"][:2] == ["m256", "m400"] and summary["sizes_capped"] == [1024, 4096]
    assert ("index.reference.sizes 1024, 4096 exceed the 400 samples: capped to all of them (m400, one draw)"
            in summary_text("index", summary, wrote=[]))


def test_a_temporary_server_run_says_where_its_runs_stay():
    import prefect.settings as ps

    from clipscrub.flows.cli import temporary_server_home

    with ps.temporary_settings(updates={ps.PREFECT_API_URL: None}):
        assert temporary_server_home() == Path(ps.PREFECT_HOME.value())
    with ps.temporary_settings(updates={ps.PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert temporary_server_home() is None
