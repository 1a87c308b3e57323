"""The Prefect flow: same stage functions, cached by content, identical outputs to dvc repro."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from clipscrub.io import sha256_path
from clipscrub.pipeline import SPECS, Layout
from tests.conftest import REPO, make_dvc_project, tiny_params_dict

BIN = Path(sys.executable).parent
ALL = ["download", "train", "embed", "index", "score", "threshold", "filter", "evaluate", "report"]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def run_flow(out: Path, extra: list[str] | None = None, result_storage: str | None = None) -> dict[str, str]:
    from flows.clean import clean_dataset

    result = clean_dataset(params=tiny_params_dict(extra), out_dir=str(out), result_storage=result_storage)
    return result["states"]


def computed(states: dict[str, str]) -> list[str]:
    return [s for s in ALL if states.get(s) == "Completed"]


@pytest.fixture(scope="module")
def flow_dir(harness, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flow") / "run"
    states = run_flow(out)
    assert computed(states) == ALL
    return out


def test_identical_rerun_computes_nothing(flow_dir):
    states = run_flow(flow_dir)
    assert set(states.values()) == {"Cached"}
    assert list(states) == ALL


def test_threshold_change_recomputes_threshold_onward(flow_dir):
    assert computed(run_flow(flow_dir, ["threshold.fraction=0.1"])) == ["threshold", "filter", "evaluate", "report"]
    # and back: the earlier results are still in the cache, but the outputs on disk changed
    assert computed(run_flow(flow_dir)) == ["threshold", "filter", "evaluate", "report"]
    assert set(run_flow(flow_dir).values()) == {"Cached"}


def test_model_change_recomputes_train_onward(flow_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(flow_dir, out)
    states = run_flow(out, ["train.lr=0.0005"])
    assert computed(states) == ALL[1:]


def test_missing_or_edited_outputs_are_recomputed(flow_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(flow_dir, out)
    shutil.rmtree(out / "flags")
    # threshold reruns; its output is byte-identical, so filter, evaluate and report stay cached
    assert computed(run_flow(out)) == ["threshold"]
    (out / "clean" / "removed.parquet").write_bytes(b"tampered")
    assert computed(run_flow(out)) == ["filter"]
    assert sha256_path(out / "clean") == sha256_path(flow_dir / "clean")


def test_results_persist_to_any_fsspec_url(harness, tmp_path):
    url = f"memory://clipscrub-test-{os.getpid()}"
    out = tmp_path / "run"
    assert computed(run_flow(out, result_storage=url)) == ALL
    assert set(run_flow(out, result_storage=url).values()) == {"Cached"}
    import fsspec

    assert fsspec.filesystem("memory").ls(url.removeprefix("memory://"))


def test_flow_outputs_equal_dvc_repro(flow_dir, tmp_path):
    """Same params: every artifact of the flow run has the content hash dvc repro's has."""
    proj = make_dvc_project(tmp_path / "proj", tiny_params_dict())
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    res = subprocess.run(["dvc", "repro"], cwd=proj, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    dvc_lay, flow_lay = Layout(proj / "data"), Layout(flow_dir)
    # the flow fixture may have been rerun with other params by now: rerun it on the defaults
    run_flow(flow_dir)
    for stage in ALL:
        for name in SPECS[stage].outputs:
            assert sha256_path(getattr(flow_lay, name)) == sha256_path(getattr(dvc_lay, name)), (stage, name)


def test_summary_markdown_shows_the_applied_block(tiny_run):
    """The artifact's text (the real-server test reads it back through the API)."""
    from clipscrub.metrics import APPLIED_KEYS, applied_sentence
    from flows.clean import summary_markdown

    root, params = tiny_run
    applied = json.loads((root / "metrics" / "applied.json").read_text())
    counts = json.loads((root / "clean" / "lineage.json").read_text())["counts"]
    md = summary_markdown(params, root, {"filter": counts}, {s: "Completed" for s in ALL})
    assert "removed fraction" in md and "## Applied threshold" in md
    assert applied_sentence(applied) in md
    rows = dict(line.strip("| ").split(" | ") for line in md.splitlines()
                if line.startswith("| ") and line.count(" | ") == 1 and not line.startswith("| metric"))
    assert [k for k in rows if k in APPLIED_KEYS] == list(APPLIED_KEYS)
    assert rows["detector"] == "kdist" and rows["rule"] == "top_fraction 0.05"
    assert rows["removed"] == str(counts["removed"]) == "20" and rows["poison_known"] == "true"
    assert rows["precision"] == json.dumps(applied["precision"]) and rows["poison"] == "4"


def clipscrub(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "clipscrub"), *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-p", "missing.yaml"], "--params: params file not found: missing.yaml"),
        (["-S", "threshold.fractoin=0.1"], "threshold.fractoin: unknown key in override"),
        (["-S", "index.k=5000"], "index.k: 5000 must be smaller than the smallest index.reference.sizes"),
        (["-o", "params.yaml/run"], "--out: params.yaml/run is not writable"),
        (["-o", "/proc/clipscrub-run"], "--out: /proc/clipscrub-run is not writable"),
    ],
)
def test_bad_run_input_is_a_clear_error(tmp_path, args, expected):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    if "-o" not in args:
        args = [*args, "-o", "run"]
    if "-p" not in args:
        args = ["-p", "params.yaml", *args]
    res = clipscrub("run", *args, cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"clipscrub: error: {expected}"), res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
    assert not Path("/proc/clipscrub-run").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_against_a_real_prefect_server(tmp_path):
    """`prefect server start` on 127.0.0.1, a `clipscrub run` against it, read back via the API."""
    port = free_port()
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prefect server did not start in 240 s"
            time.sleep(1)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
        res = clipscrub("run", "-p", "params.yaml", "-o", "run", cwd=tmp_path, env=dict(env, PREFECT_API_URL=api))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=30).json()
        assert len(runs) == 1
        run = runs[0]
        assert run["state"]["type"] == "COMPLETED"
        assert run["name"].startswith("demo-")
        tasks = httpx.post(
            f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run["id"]]}}}, timeout=30
        ).json()
        assert sorted(t["name"].rsplit("-", 1)[0] for t in tasks) == sorted(ALL)
        assert {t["state"]["type"] for t in tasks} == {"COMPLETED"}
        artifacts = httpx.post(f"{api}/artifacts/filter", json={}, timeout=30).json()
        assert any(a["type"] == "markdown" and "removed fraction" in a["data"] for a in artifacts)
        # the applied threshold's block (run/metrics/applied.json), as a sentence and a table
        applied = json.loads((tmp_path / "run" / "metrics" / "applied.json").read_text())
        md = next(a["data"] for a in artifacts if a["type"] == "markdown")
        assert "## Applied threshold" in md and applied["rule"] == "top_fraction 0.05"
        assert f"{applied['poison_removed']} of the {applied['removed']} removed are known poison" in md
        assert "| rule | top_fraction 0.05 |" in md and f"| removed | {applied['removed']} |" in md
        assert "| poison_known | true |" in md and f"| recall | {applied['recall']} |" in md

        # serving the flow registers a deployment carrying the params as its parameters
        served = subprocess.Popen(
            [sys.executable, "-m", "flows.serve", "-p", "params.yaml", "-o", "served", "--name", "nightly"],
            cwd=tmp_path, env=dict(env, PREFECT_API_URL=api, PYTHONPATH=str(REPO)),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                deps = httpx.post(f"{api}/deployments/filter", json={}, timeout=30).json()
                if deps:
                    break
                assert served.poll() is None, "flows.serve exited"
                assert time.monotonic() < deadline, "no deployment registered in 120 s"
                time.sleep(1)
            assert deps[0]["name"] == "nightly"
            assert deps[0]["parameters"]["params"]["threshold"]["fraction"] == 0.05
            assert deps[0]["parameters"]["out_dir"] == str(tmp_path / "served")
        finally:
            os.killpg(served.pid, 15)
            served.wait(timeout=60)
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()
        log.close()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{api}/health", timeout=2)
