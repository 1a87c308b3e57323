"""Your own DVC project, from an installed wheel in a folder outside the clone: `clipscrub init`
writes params.yaml, dvc.yaml and empty review lists; `dvc repro` regenerates the cleaned version,
and reruns only what changed: a review list (filter onward), a source shard (download onward),
an upgrade of clipscrub (the stages whose code changed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
ALL = ["download", "embed", "index", "score", "threshold", "filter", "evaluate", "report"]


def build_wheel(src: Path, out: Path) -> Path:
    """A wheel of the project at ``src`` (no network: the build runs in this environment)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, capture_output=True, text=True)
    return next(out.glob("clipscrub-*.whl"))


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A new virtual environment with clipscrub installed from a wheel and nothing of the clone:
    its dependencies are this environment's (a path entry, not an install: no editable finder)."""
    root = tmp_path_factory.mktemp("venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # its own pip (ensurepip, offline)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install(venv, build_wheel(REPO, root / "dist"))
    return venv


def install(venv: Path, wheel: Path) -> None:
    """The wheel into ``venv`` by its own pip, so that its ``clipscrub`` script runs ``venv``'s python
    (--ignore-installed: the clone's editable install, visible through deps.pth, is not touched)."""
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--ignore-installed", "--disable-pip-version-check", str(wheel)],
                   check=True, capture_output=True, text=True)


def run(venv: Path, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@localhost", DVC_NO_ANALYTICS="1")
    env.pop("PYTHONPATH", None)
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    if check:
        assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res


def repro(venv: Path, proj: Path) -> list[str]:
    """The stages `dvc repro` ran (the always-run code stage left out)."""
    out = run(venv, str(venv / "bin" / "python"), "-m", "dvc", "repro", cwd=proj)
    return [s for s in re.findall(r"Running stage '([a-z-]+)'", out.stdout + out.stderr) if s != "clipscrub-code"]


def write_shard(path: Path, start: int, n: int, seed: int) -> None:
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(path)) as sink:
        for i in range(start, start + n):
            pixels = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            sink.write({"__key__": f"s{i:05d}", "png": buf.getvalue(), "txt": f"a photo of thing {i % 7}".encode()})


@pytest.fixture(scope="module")
def project(fresh_venv, tmp_path_factory) -> Path:
    """A user's folder with shards, a local checkpoint and `clipscrub init`'s files, committed."""
    import open_clip
    import torch

    proj = tmp_path_factory.mktemp("myproject")
    (proj / "shards").mkdir()
    for k in range(2):
        write_shard(proj / "shards" / f"{k:05d}.tar", 20 * k, 20, seed=k)
    (proj / "weights").mkdir()
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (proj / "weights" / "mini.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(proj / "weights" / "mini.json")
    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model("mini").state_dict()}, proj / "weights" / "mini.pt")
    run(fresh_venv, "git", "init", "-q", cwd=proj)
    run(fresh_venv, "clipscrub", "init", "--source", "shards", "--path", "shards", "--model", "mini",
        "--checkpoint", "weights/mini.pt", "--model-config", "weights/mini.json", cwd=proj)
    params = yaml.safe_load((proj / "params.yaml").read_text())  # sizes for 40 samples
    params["index"].update({"k": 4, "reference": {**params["index"]["reference"], "sizes": [8, 16]}})
    params["score"].update({"k": 4, "lid_k": 4, "iforest": {"n_estimators": 10, "max_samples": 32}})
    params["embed"]["batch_size"] = 8
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(fresh_venv, "clipscrub", "dvc-yaml", cwd=proj)
    run(fresh_venv, str(fresh_venv / "bin" / "python"), "-m", "dvc", "init", "-q", cwd=proj)
    run(fresh_venv, "git", "add", "-A", cwd=proj)
    run(fresh_venv, "git", "commit", "-qm", "my data", cwd=proj)
    return proj


def test_the_wheel_installs_no_top_level_stages_or_flows(fresh_venv, tmp_path):
    python = str(fresh_venv / "bin" / "python")
    for name in ("flows", "stages"):
        assert run(fresh_venv, python, "-c", f"import {name}", cwd=tmp_path, check=False).returncode != 0, name
    where = run(fresh_venv, python, "-c", "import clipscrub.stages.index, clipscrub.flows.cli as c; print(c.__file__)",
                cwd=tmp_path).stdout
    assert str(fresh_venv) in where and str(REPO) not in where
    # the command dvc.yaml runs is the wheel's, on the new environment's python
    assert str(fresh_venv) in (fresh_venv / "bin" / "clipscrub").read_text().splitlines()[0]


def test_init_and_repro_then_rerun_only_what_changed(fresh_venv, project, tmp_path):
    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    # every file a stage reads is its dependency: the shards, the checkpoint and config, the review lists
    assert {"shards", "weights/mini.pt", "weights/mini.json"} <= set(dvc_yaml["download"]["deps"]) | set(
        dvc_yaml["embed"]["deps"])
    assert {"review/keep_ids.txt", "review/remove_ids.txt"} <= set(dvc_yaml["filter"]["deps"])
    assert not any(d.endswith(".py") for s in dvc_yaml.values() for d in s.get("deps", []))  # no source paths
    assert repro(fresh_venv, project) == ALL
    assert (project / "data" / "clean" / "lineage.json").is_file()
    assert repro(fresh_venv, project) == []

    # a review list edited: filter, evaluate and report rerun, nothing before them
    import polars as pl

    first = int(pl.read_parquet(project / "data" / "scores" / "scores.parquet")["id"][0])
    (project / "review" / "remove_ids.txt").write_text(f"{first}\n")
    assert repro(fresh_venv, project) == ["filter", "evaluate", "report"]
    removed = pl.read_parquet(project / "data" / "clean" / "removed.parquet")
    assert first in removed["id"].to_list()

    # a source shard replaced: everything from download on
    write_shard(project / "shards" / "00001.tar", 20, 20, seed=99)
    assert repro(fresh_venv, project) == ALL

    # experiments and metrics in the user's project
    run(fresh_venv, "git", "add", "-A", cwd=project)
    run(fresh_venv, "git", "commit", "-qm", "reviewed", cwd=project)
    python = str(fresh_venv / "bin" / "python")
    run(fresh_venv, python, "-m", "dvc", "exp", "run", "-S", "threshold.tail_fdr=0.3", "--name", "loose", cwd=project)
    assert "threshold" in run(fresh_venv, python, "-m", "dvc", "params", "diff", "HEAD", "loose", cwd=project).stdout
    run(fresh_venv, python, "-m", "dvc", "metrics", "diff", "HEAD", "loose", cwd=project)
    run(fresh_venv, python, "-m", "dvc", "plots", "diff", "HEAD", "loose", "-o", str(tmp_path / "plots"), cwd=project)
    diff = json.loads(run(fresh_venv, "clipscrub", "diff", "HEAD", "loose", "--format", "json",
                          "--ids-out", str(tmp_path / "ids.parquet"), cwd=project).stdout)
    assert "threshold.tail_fdr" in json.dumps(diff)

    # an upgrade that changes the threshold stage's code (and clipscrub's version): threshold
    # reruns, and what reads its flags (they record the new code version); nothing before it
    src = tmp_path / "clipscrub-next"  # what the wheel is built from, nothing else of the clone
    for name in ("clipscrub", "stages", "flows"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    with open(src / "stages" / "threshold.py", "a") as f:
        f.write("\n# the next version\n")
    init = src / "clipscrub" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "([^"]+)"', r'__version__ = "\1.post1"', init.read_text()))
    install(fresh_venv, build_wheel(src, tmp_path / "dist-next"))
    assert repro(fresh_venv, project) == ["threshold", "filter", "evaluate", "report"]


def test_a_path_changed_without_regenerating_dvc_yaml_stops_the_stage(fresh_venv, project):
    """A review list named in params but not in dvc.yaml: DVC could not see it change, so the
    stage refuses, naming the command that fixes dvc.yaml."""
    python = str(fresh_venv / "bin" / "python")
    (project / "review" / "more.txt").write_text("")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["filter"]["keep_ids"] = "review/more.txt"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    res = run(fresh_venv, python, "-m", "dvc", "repro", cwd=project, check=False)
    assert res.returncode != 0
    assert "does not list review/more.txt as a dependency of stage filter" in res.stdout + res.stderr
    assert "clipscrub dvc-yaml" in res.stdout + res.stderr
    run(fresh_venv, "clipscrub", "dvc-yaml", cwd=project)
    assert repro(fresh_venv, project) == ["filter", "evaluate", "report"]
