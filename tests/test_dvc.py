"""The DVC pipeline end to end on the tiny demo: repro, no-op repro, partial rerun, experiments, a shared remote."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_dvc_project, tiny_params_dict

BIN = Path(sys.executable).parent


def sh(*args: str, cwd: Path) -> str:
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@localhost",
        DVC_NO_ANALYTICS="1",
    )
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z]+)'", output)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh git + DVC project: this repo's pipeline files and code, tiny params."""
    proj = make_dvc_project(tmp_path_factory.mktemp("dvcproj"), tiny_params_dict())
    sh("git", "add", "-A", cwd=proj)
    sh("git", "commit", "-qm", "init", cwd=proj)
    return proj


def test_repro_runs_every_stage_then_nothing(project):
    out = stages_run(sh("dvc", "repro", cwd=project))
    assert out == ["download", "train", "embed", "index", "score", "threshold", "filter", "evaluate", "report"]
    assert (project / "data" / "clean" / "lineage.json").is_file()
    assert stages_run(sh("dvc", "repro", cwd=project)) == []
    assert "up to date" in sh("dvc", "status", cwd=project)


REPO = Path(__file__).resolve().parent.parent
COMMIT_RESULTS = REPO / "scripts" / "lib" / "commit_results.sh"


def test_demo_commit_makes_head_the_baseline(project):
    """After `dvc repro`, scripts/lib/commit_results.sh (demo.sh's last step) commits dvc.lock, the
    metrics and the plots, and nothing else: `dvc metrics diff` and `dvc exp show` then have a baseline."""
    sh("dvc", "repro", cwd=project)
    # before: HEAD has no metrics, so every figure is "new"
    before = sh("dvc", "metrics", "diff", "--json", cwd=project)
    assert "DVC failed to load some metrics for following revisions: 'HEAD'" in before
    assert json.JSONDecoder().raw_decode(before)[0]["data/metrics/applied.json"]["removed"]["old"] is None
    # a user's unrelated work: one file staged, one untracked
    (project / "notes.txt").write_text("mine\n")
    sh("git", "add", "notes.txt", cwd=project)
    (project / "scratch.txt").write_text("mine too\n")
    # a pipeline edit not committed yet: the lock would not match HEAD, so nothing is committed
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("fraction: 0.05", "fraction: 0.06"))
    head = sh("git", "rev-parse", "HEAD", cwd=project)
    assert "not committing dvc.lock and the metrics: dvc.yaml params.yaml" in sh("bash", str(COMMIT_RESULTS), cwd=project)
    assert sh("git", "rev-parse", "HEAD", cwd=project) == head
    (project / "params.yaml").write_text(params)

    out = sh("bash", str(COMMIT_RESULTS), cwd=project)
    assert "committed" in out and "the baseline for dvc metrics diff" in out
    committed = sh("git", "show", "--name-only", "--format=%s", "HEAD", cwd=project).split()
    assert " ".join(committed[:3]) == "clipscrub demo: dvc.lock,"
    files = [f for f in committed if "/" in f or f == "dvc.lock"]
    assert "dvc.lock" in files and "data/metrics/applied.json" in files and "data/plots/roc/kdist.csv" in files
    assert all(f == "dvc.lock" or f.startswith(("data/metrics/", "data/plots/", "data/.gitignore")) for f in files)
    assert sh("git", "diff", "--cached", "--name-only", cwd=project).split() == ["notes.txt"]  # still only staged
    assert "?? scratch.txt" in sh("git", "status", "--porcelain", cwd=project)
    assert "already committed" in sh("bash", str(COMMIT_RESULTS), cwd=project)
    # after: the workspace equals its baseline; the baseline has its metrics
    after = sh("dvc", "metrics", "diff", "--json", cwd=project)
    assert json.loads(after) == {} and "failed to load" not in after
    baseline = json.loads(sh("dvc", "exp", "show", "--json", cwd=project))
    assert "data/metrics/applied.json" in json.dumps(baseline) and '"removed": 20' in json.dumps(baseline)
    sh("git", "rm", "-q", "--cached", "notes.txt", cwd=project)
    (project / "notes.txt").unlink()
    (project / "scratch.txt").unlink()


def test_plots_pages_load_nothing_from_the_network(project, tmp_path):
    """With the template .dvc/config names, `dvc plots show/diff` inline vega, vega-lite and
    vega-embed: the page renders every plot in Chromium with all network requests refused."""
    import shutil

    from playwright.sync_api import sync_playwright

    sh("dvc", "repro", cwd=project)
    config = project / ".dvc" / "config"
    committed = config.read_text()
    assert "html_template = ../flows/plots/offline.html" in committed  # every clone has it
    # without the template: DVC's own page, which loads vega from a CDN
    sh("dvc", "config", "--unset", "plots.html_template", cwd=project)
    try:
        sh("dvc", "plots", "show", "-o", str(tmp_path / "cdn"), cwd=project)
    finally:
        config.write_text(committed)
    assert 'src="https://cdn.jsdelivr.net/npm/vega@' in (tmp_path / "cdn" / "index.html").read_text()
    pages = {}
    for cmd in ("show", "diff"):
        sh("dvc", "plots", cmd, "-o", str(tmp_path / cmd), cwd=project)
        pages[cmd] = tmp_path / cmd / "index.html"
        html = pages[cmd].read_text()
        assert not re.search(r"<script[^>]+src=", html) and "cdn.jsdelivr" not in html
        assert html.count("vegaEmbed('#") >= 3  # roc, pr, hist (one per detector)

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed: scripts/test.sh installs Debian's package"
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort())
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            page.goto(pages["show"].as_uri())
            plots = page.evaluate("document.querySelectorAll('body > div[id]').length")
            page.wait_for_function(f"document.querySelectorAll('.vega-embed canvas, .vega-embed svg').length >= {plots}")
        finally:
            browser.close()
    assert plots >= 3 and errors == []


def test_threshold_change_reruns_only_downstream(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["threshold"]["fraction"] = 0.1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(sh("dvc", "repro", cwd=project)) == ["threshold", "filter", "evaluate", "report"]
    lineage = json.loads((project / "data" / "clean" / "lineage.json").read_text())
    assert lineage["params"]["threshold"]["fraction"] == 0.1
    assert lineage["counts"]["removed"] == 40
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "fraction 0.1", cwd=project)


def test_experiments_and_metrics_diff(project):
    out = sh("dvc", "exp", "run", "-n", "tight", "-S", "threshold.fraction=0.02", cwd=project)
    assert stages_run(out) == ["threshold", "filter", "evaluate", "report"]
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=project))
    text = json.dumps(shown)
    assert '"tight"' in text and "detection.json" in text
    diff = json.loads(sh("dvc", "metrics", "diff", "--json", cwd=project))
    flagged = diff["data/metrics/detection.json"]["detectors.kdist.flagged"]
    assert flagged == {"old": 40, "new": 8, "diff": -32}
    # the applied threshold's flat block: every key a top-level metric, no --keep needed
    assert "applied.json" in text
    assert diff["data/metrics/applied.json"]["removed"] == {"old": 40, "new": 8, "diff": -32}
    from clipscrub.metrics import APPLIED_KEYS

    block = json.loads((project / "data" / "metrics" / "applied.json").read_text())
    assert set(block) == set(APPLIED_KEYS) and block["rule"] == "top_fraction 0.02" and block["removed"] == 8
    metrics = json.loads(sh("dvc", "metrics", "show", "--json", cwd=project))
    listed = metrics[""]["data"]["data/metrics/applied.json"]["data"]
    assert listed == {k: v for k, v in block.items() if v is not None}  # dvc leaves nulls out
    table = sh("dvc", "metrics", "show", cwd=project)
    assert all(k in table for k in ("detector", "rule", "removed_fraction", "poison_removed", "poison_missed", "recall"))
    lineage = json.loads((project / "data" / "clean" / "lineage.json").read_text())
    assert lineage["counts"]["removed"] == 8
    # the documented view: only the params and metrics that differ between the rows, not every key
    header = sh("dvc", "exp", "show", "--only-changed", "--csv", cwd=project).splitlines()[0].split(",")
    sections = yaml.safe_load((project / "params.yaml").read_text())
    params = [c for c in header if c.split(".")[0] in sections]
    assert params == ["threshold.fraction"]
    assert len(header) < 40, header


def test_diff_between_two_experiments(project, tmp_path):
    """`clipscrub diff` of two `dvc exp run -S threshold...` experiments, read from git and the
    DVC cache, reconciles with each experiment's removed.parquet (applied one after the other)."""
    import polars as pl

    sh("dvc", "exp", "run", "-n", "loose", "-S", "threshold.fraction=0.05", cwd=project)
    out = tmp_path / "ids.parquet"
    result = json.loads(sh(str(BIN / "clipscrub"), "diff", "tight", "loose", "--format", "json",
                           "--ids-out", str(out), cwd=project))
    assert result["params"] == {"threshold.fraction": {"a": 0.02, "b": 0.05}}
    assert (result["counts"]["a"]["removed"], result["counts"]["b"]["removed"]) == (8, 20)
    # each experiment's applied.json, read from git (a DVC metric with cache: false)
    assert result["applied"]["removed"] == {"a": 8, "b": 20, "delta": 12}
    assert result["applied"]["rule"] == {"a": "top_fraction 0.02", "b": "top_fraction 0.05", "delta": None}
    removed = {}
    for name in ("tight", "loose"):
        sh("dvc", "exp", "apply", name, cwd=project)
        removed[name] = set(pl.read_parquet(project / "data" / "clean" / "removed.parquet")["id"].to_list())
    ra, rb = removed["tight"], removed["loose"]
    assert result["removed"]["only_a"] == len(ra - rb) and result["removed"]["only_b"] == len(rb - ra)
    assert result["removed"]["both"] == len(ra & rb) == 8
    assert result["removed"]["jaccard"] == round(len(ra & rb) / len(ra | rb), 6)
    assert set(pl.read_parquet(out)["id"].to_list()) == ra ^ rb
    assert set(result["metrics"]) == {"kdist", "slof", "lid", "dao", "iforest", "clip"}
    plots = json.loads(sh("dvc", "plots", "diff", "tight", "loose", "--json", cwd=project))
    shown = json.dumps(plots)
    assert all(f"data/plots/{kind}/kdist.csv" in shown for kind in ("roc", "pr", "hist"))
    text = sh(str(BIN / "clipscrub"), "diff", "HEAD", "loose", "--ids-out", str(tmp_path / "h.parquet"), cwd=project)
    assert "threshold.fraction" in text and "0.1 -> 0.05" in text  # HEAD: the commit at fraction 0.1


# What `dvc pull` must reproduce byte for byte: every stage's DVC outs (from the remote) and the
# metrics and plots (cache: false, so from git).
SHARED = ("raw", "model", "embeddings", "index", "scores", "flags", "clean", "report", "metrics", "plots")


def data_sha256(proj: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(proj)): hashlib.sha256(p.read_bytes()).hexdigest()
        for d in SHARED for p in sorted((proj / "data" / d).rglob("*")) if p.is_file()
    }


def set_fraction(proj: Path, fraction: float) -> None:
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["threshold"]["fraction"] = fraction
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def removed_ids(proj: Path) -> set[int]:
    import polars as pl

    return set(pl.read_parquet(proj / "data" / "clean" / "removed.parquet")["id"].to_list())


def test_remote_push_pull_then_diff_a_pulled_revision(project, tmp_path):
    """A team shares cleaned versions through a DVC remote (a local directory here): A pushes two
    revisions, a second clone B pulls each one byte for byte and `clipscrub diff`s them."""
    a, b, remote = project, tmp_path / "b", tmp_path / "remote"
    # revision 1: after the tests above these repros are no-ops or run-cache restores
    set_fraction(a, 0.05)
    sh("dvc", "repro", cwd=a)
    sh("dvc", "remote", "add", "-d", "shared", str(remote), cwd=a)
    sh("git", "add", "-A", cwd=a)
    sh("git", "commit", "-qm", "fraction 0.05, shared remote", cwd=a)
    sh("dvc", "push", cwd=a)
    assert "Cache and remote 'shared' are in sync" in sh("dvc", "status", "-c", cwd=a)
    assert any((remote / "files" / "md5").iterdir())

    sh("git", "clone", "-q", str(a), str(b), cwd=tmp_path)
    assert not (b / "data" / "clean").exists()  # the clone has the pointers (dvc.lock), not the data
    sh("dvc", "pull", cwd=b)
    rev1 = data_sha256(a)
    assert data_sha256(b) == rev1 and any(k.startswith("data/clean/") for k in rev1)
    assert "up to date" in sh("dvc", "status", cwd=b)  # B's workspace matches its dvc.lock: nothing to rerun
    removed1 = removed_ids(b)

    # revision 2: A re-thresholds, commits and pushes; B pulls both git and data
    set_fraction(a, 0.1)
    assert stages_run(sh("dvc", "repro", cwd=a)) in (["threshold", "filter", "evaluate", "report"], [])
    sh("git", "commit", "-qam", "fraction 0.1", cwd=a)
    sh("dvc", "push", cwd=a)
    assert "Cache and remote 'shared' are in sync" in sh("dvc", "status", "-c", cwd=a)
    sh("git", "pull", "-q", "--ff-only", cwd=b)
    sh("dvc", "pull", cwd=b)
    rev2 = data_sha256(a)
    assert data_sha256(b) == rev2 and rev2 != rev1
    removed2 = removed_ids(b)
    assert (len(removed1), len(removed2)) == (20, 40)

    # B's previous revision is read from B's DVC cache (the first pull), the current one from the second
    ids = tmp_path / "ids.parquet"
    result = json.loads(sh(str(BIN / "clipscrub"), "diff", "HEAD~1", "HEAD", "--project", str(b),
                           "--format", "json", "--ids-out", str(ids), cwd=tmp_path))
    assert result["params"] == {"threshold.fraction": {"a": 0.05, "b": 0.1}}
    assert (result["counts"]["a"]["removed"], result["counts"]["b"]["removed"]) == (len(removed1), len(removed2))
    assert result["applied"]["removed"] == {"a": 20, "b": 40, "delta": 20}
    assert result["removed"]["only_a"] == len(removed1 - removed2) == 0
    assert result["removed"]["only_b"] == len(removed2 - removed1) == 20
    assert result["removed"]["both"] == len(removed1 & removed2) == 20
    import polars as pl

    assert set(pl.read_parquet(ids)["id"].to_list()) == removed1 ^ removed2
    # a reviewer's clone that never pulled: dvc.api streams both revisions from the remote
    c = tmp_path / "c"
    sh("git", "clone", "-q", str(a), str(c), cwd=tmp_path)
    again = json.loads(sh(str(BIN / "clipscrub"), "diff", "HEAD~1", "HEAD", "--project", str(c),
                          "--format", "json", "--ids-out", str(tmp_path / "c.parquet"), cwd=tmp_path))
    assert again["removed"] == result["removed"] and again["applied"] == result["applied"]
    assert not (c / "data" / "clean").exists()  # nothing checked out into the workspace
