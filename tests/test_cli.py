"""The `clipscrub` command: one-line errors naming the parameter, and no partial output."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_params_dict

CLI = [sys.executable, "-m", "flows.cli"]


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
        ("embed", "train.enabled=false,embed.model_name=ViT-Nope", "embed.model_name: unknown open_clip model 'ViT-Nope'"),
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
    from flows.cli import main
    from flows.pipeline import SPECS
    from tests.conftest import REPO

    with pytest.raises(SystemExit):
        main([stage, "--help"])
    text = capsys.readouterr().out
    spec = SPECS[stage]
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
    from flows.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"clipscrub {__version__}\n"


def test_stage_prints_a_json_summary(project):
    import json

    res = clipscrub("embed", cwd=project)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["stage"] == "embed" and summary["samples"] == 400


@pytest.mark.parametrize("api_url, shadowed, expected", [
    ("", True, "pip uninstall -y dataclasses"),
    ("", False, None),
    ("http://127.0.0.1:4200/api", True, None),
])
def test_run_refuses_a_shadowed_dataclasses(tmp_path, monkeypatch, api_url, shadowed, expected):
    import prefect

    from flows.cli import check_prefect_server_imports
    from clipscrub.errors import ClipscrubError

    site = tmp_path / "site-packages"
    (site / "prefect").mkdir(parents=True)
    (site / "prefect" / "__init__.py").write_text("")
    if shadowed:
        (site / "dataclasses.py").write_text("# the Python 3.6 backport\n")
    monkeypatch.setattr(prefect, "__file__", str(site / "prefect" / "__init__.py"))
    monkeypatch.setenv("PREFECT_API_URL", api_url)
    if expected is None:
        check_prefect_server_imports()
    else:
        with pytest.raises(ClipscrubError, match=expected):
            check_prefect_server_imports()
