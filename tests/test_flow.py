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
from clipscrub.flows.pipeline import STAGES, Layout
from tests.conftest import REPO, free_port, make_dvc_project, tiny_params, tiny_params_dict
from tests.imageserver import image_bytes
from tests.test_sources import tiny_model  # noqa: F401 (fixture)

BIN = Path(sys.executable).parent
ALL = ["download", "train", "embed", "index", "score", "threshold", "filter", "evaluate", "report"]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def run_flow(out: Path, extra: list[str] | None = None, result_storage: str | None = None) -> dict[str, str]:
    from clipscrub.flows.clean import clean_dataset

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


def test_a_root_another_process_holds_is_refused(flow_dir):
    """The flow holds its root for the whole run; a second process on it is refused up front."""
    from clipscrub.errors import ParamError
    from tests.test_io import HOLD

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(flow_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ParamError, match=rf"another clipscrub process \(pid {holder.pid} on .+\) is writing to"):
            run_flow(flow_dir)
    finally:
        holder.kill()
        holder.wait()
    assert set(run_flow(flow_dir).values()) == {"Cached"}


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


class RunsCode:
    """Unpickling this creates ``marker``: what a crafted result record would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_record(key: str, marker: Path) -> bytes:
    """A result record as Prefect writes one, saying "pickle", whose result runs code."""
    from prefect.results import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    return ResultRecord(
        metadata=ResultRecordMetadata(storage_key=key, serializer=PickleSerializer()), result=RunsCode(marker)
    ).serialize()


def json_hook_record(key: str, marker: Path) -> bytes:
    """A record saying "json" whose object hook is subprocess.call: {"touch": 0, marker: 0} runs touch."""
    serializer = {"type": "json", "jsonlib": "json", "object_decoder": "subprocess.call", "loads_kwargs": {}}
    result = json.dumps({"touch": 0, str(marker): 0})
    return json.dumps({"metadata": {"storage_key": key, "serializer": serializer}, "result": result}).encode()


def stage_keys(out: Path) -> dict[str, str]:
    return {stage: rec["key"] for stage, rec in json.loads((out / ".clipscrub" / "state.json").read_text()).items()}


def test_tampered_results_are_refused_never_run(flow_dir, tmp_path):
    """A result record that would run code on load is refused: the stage recomputes instead."""
    import cloudpickle

    run_flow(flow_dir)  # the defaults: earlier tests may have left other params
    out = tmp_path / "run"
    shutil.copytree(flow_dir, out)
    keys, results = stage_keys(out), out / ".prefect" / "results"
    markers = [tmp_path / f"pwned-{i}" for i in range(3)]
    (results / keys["filter"]).write_bytes(json_hook_record(keys["filter"], markers[0]))
    (results / keys["evaluate"]).write_bytes(cloudpickle.dumps(RunsCode(markers[1])))  # a bare pickle
    (results / keys["report"]).write_bytes(pickle_record(keys["report"], markers[2]))
    # filter's outputs come out byte-identical, so evaluate and report keep their keys
    assert computed(run_flow(out)) == ["filter", "evaluate", "report"]
    assert not any(m.exists() for m in markers)
    assert set(run_flow(out).values()) == {"Cached"}  # the rewritten records are plain JSON
    assert json.loads(json.loads((results / keys["report"]).read_text())["result"])["gallery"] == 20


def test_tampered_results_in_a_separate_result_storage_are_refused(flow_dir, tmp_path):
    run_flow(flow_dir)
    out, store = tmp_path / "run", tmp_path / "shared-results"
    shutil.copytree(flow_dir, out)
    shutil.copytree(flow_dir / ".prefect" / "results", store)
    assert set(run_flow(out, result_storage=str(store)).values()) == {"Cached"}
    key, marker = stage_keys(out)["report"], tmp_path / "pwned"
    (store / key).write_bytes(pickle_record(key, marker))
    assert computed(run_flow(out, result_storage=str(store))) == ["report"]
    assert not marker.exists()
    assert set(run_flow(out, result_storage=str(store)).values()) == {"Cached"}


@pytest.mark.parametrize("kind", ["pickle record", "bare pickle", "json with an object hook", "not a record"])
def test_result_storage_reads_only_plain_json(tmp_path, kind):
    """What JsonResultStorage hands Prefect: a record it rebuilt from plain JSON, or a refusal."""
    import cloudpickle
    from prefect.results import ResultRecord

    from clipscrub.flows.clean import RESULT_SERIALIZER, JsonResultStorage

    storage, marker = JsonResultStorage(basepath=str(tmp_path / "results")), tmp_path / "pwned"
    storage.write_path("good", ResultRecord(metadata={"storage_key": "good", "serializer": RESULT_SERIALIZER},
                                            result={"kept": 380}).serialize(), _sync=True)
    back = ResultRecord.deserialize(storage.read_path("good", _sync=True))
    assert back.result == {"kept": 380} and back.metadata.serializer == RESULT_SERIALIZER
    bad = {"pickle record": pickle_record("bad", marker), "bare pickle": cloudpickle.dumps(RunsCode(marker)),
           "json with an object hook": json_hook_record("bad", marker), "not a record": b'{"result": "{}"}'}[kind]
    storage.write_path("bad", bad, _sync=True)
    with pytest.raises(ValueError, match="^refusing the stored result bad: "):
        storage.read_path("bad", _sync=True)
    assert not marker.exists()


def test_artifact_aurocs_match_the_evaluate_metrics(flow_dir):
    """The markdown artifact, read back from the API after a cached rerun, has evaluate's AUROCs."""
    from prefect.artifacts import Artifact

    assert set(run_flow(flow_dir).values()) == {"Cached"}
    md = Artifact.get("clipscrub-demo").data
    detection = json.loads((flow_dir / "metrics" / "detection.json").read_text())
    header = md.splitlines().index("| detector | AUROC | PR-AUC |")
    rows = [line.strip("| ").split(" | ") for line in md.splitlines()[header + 2:header + 2 + len(detection["detectors"])]]
    assert rows == [[d, f"{m['auroc']:.4f}", f"{m['pr_auc']:.4f}"]
                    for d, m in sorted(detection["detectors"].items(), key=lambda kv: -kv[1]["auroc"])]
    assert f"Detection of {detection['poisoned']} known poisoned samples:" in md


@pytest.fixture
def recorded_run(flow_dir):
    """A (cached) run on the defaults, as the API recorded it: the flow run and its task runs by stage."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from clipscrub.flows.clean import clean_dataset

    state = clean_dataset(params=tiny_params_dict(), out_dir=str(flow_dir), return_state=True)
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        return client.read_flow_run(run_id), {tr.name.rsplit("-", 1)[0]: tr for tr in task_runs}


def test_task_runs_record_the_stage_graph(recorded_run):
    """Each stage's task run names the task runs of the stages it reads from (the UI draws these edges)."""
    _, runs = recorded_run
    assert sorted(runs) == sorted(ALL)
    stage_of = {tr.id: stage for stage, tr in runs.items()}
    edges = {(stage_of[i.id], stage) for stage, tr in runs.items()
             for inputs in tr.task_inputs.values() for i in inputs if getattr(i, "id", None) in stage_of}
    from clipscrub.flows.pipeline import producer

    assert edges == {(producer(name), stage) for stage in ALL for name in STAGES[stage].inputs}
    assert {("download", "train"), ("train", "embed"), ("embed", "index"), ("index", "score"), ("score", "threshold"),
            ("threshold", "filter"), ("threshold", "evaluate"), ("filter", "report")} <= edges
    assert ("download", "index") not in edges


def test_runs_are_tagged_with_dataset_source_and_detector(recorded_run):
    flow_run, runs = recorded_run
    tags = {"dataset:demo", "source:synthetic", "detector:kdist"}
    assert tags <= set(flow_run.tags)
    assert all(tags <= set(tr.tags) for tr in runs.values())


def test_artifact_has_the_applied_rule_and_a_link_to_the_report(recorded_run, flow_dir):
    from prefect.artifacts import Artifact

    from clipscrub.metrics import applied_sentence

    flow_run, _ = recorded_run
    artifact = Artifact.get("clipscrub-demo")
    assert artifact.flow_run_id == flow_run.id
    applied = json.loads((flow_dir / "metrics" / "applied.json").read_text())
    page = (flow_dir / "report" / "index.html").resolve()
    assert applied_sentence(applied) in artifact.data  # rule, removed counts, precision and recall
    assert f"| rule | {applied['rule']} |" in artifact.data and f"| precision | {applied['precision']} |" in artifact.data
    assert f"Report: [{page}]({page.as_uri()})" in artifact.data and page.as_uri().startswith("file:///")


def test_a_changed_source_file_reruns_download(harness, tiny_model, tmp_path):  # noqa: F811 (fixture)
    """download.source folder: an edited image or captions file is new input: download reruns."""
    import polars as pl

    from clipscrub.flows.clean import clean_dataset

    folder, captions = tmp_path / "images", tmp_path / "captions.csv"
    folder.mkdir()
    colours = [(40 * i % 256, 90 * i % 256, 170 * i % 256) for i in range(1, 13)]
    for i, colour in enumerate(colours):
        (folder / f"{i}.png").write_bytes(image_bytes("PNG", colour=colour))
    files = [f"{i}.png" for i in range(12)]
    pl.DataFrame({"file": files, "caption": [f"picture {i}" for i in range(12)]}).write_csv(captions)
    data = tiny_params_dict(["train.enabled=false", "index.reference.mode=all", "index.k=4", "score.k=2",
                             "score.lid_k=3", "score.iforest.n_estimators=10", "threshold.fraction=0.2"])
    data["download"].update(source="folder", shard_size=4)
    data["download"]["folder"].update(path=str(folder), captions=str(captions))
    data["embed"].update(model_name="tiny", pretrained=None, checkpoint=str(tiny_model / "tiny.pt"),
                         model_config=str(tiny_model / "tiny.json"), batch_size=5)
    out = tmp_path / "run"

    def run() -> dict[str, str]:
        return clean_dataset(params=data, out_dir=str(out))["states"]

    def manifest() -> pl.DataFrame:
        return pl.read_parquet(out / "raw" / "manifest.parquet")

    assert set(run().values()) == {"Completed"}
    assert set(run().values()) == {"Cached"}
    before = manifest()
    (folder / "3.png").write_bytes(image_bytes("PNG", colour=(7, 7, 7)))
    states = run()
    assert states["download"] == "Completed" and states["embed"] == "Completed"
    after = manifest().join(before, on="file", suffix="_before")
    assert after.filter(pl.col("image_sha256") != pl.col("image_sha256_before"))["file"].to_list() == ["3.png"]
    captions.write_text(captions.read_text().replace("picture 5", "a different caption"))
    assert run()["download"] == "Completed"
    assert manifest().filter(pl.col("file") == "5.png")["caption"].to_list() == ["a different caption"]


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
        for name in STAGES[stage].outputs:
            assert sha256_path(getattr(flow_lay, name)) == sha256_path(getattr(dvc_lay, name)), (stage, name)


def test_summary_markdown_shows_the_applied_block(tiny_run):
    """The artifact's text (the real-server test reads it back through the API)."""
    from clipscrub.metrics import APPLIED_KEYS, applied_sentence
    from clipscrub.flows.clean import summary_markdown

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


class ConnectionLog:
    """A listener that records the first bytes of every connection made to it: a proxy stand-in."""

    def __init__(self):
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.seen: list[bytes] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            with conn:
                conn.settimeout(5)
                try:
                    self.seen.append(conn.recv(200))
                except OSError:
                    self.seen.append(b"")

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=10)


def test_run_on_a_temporary_server_is_quiet_and_sends_nothing(tmp_path):
    """`clipscrub run` without PREFECT_API_URL: no traceback on stderr and no connection leaving the
    machine (every proxied request lands in a local log), whatever the environment said."""
    import sqlite3

    proxy = ConnectionLog()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "DO_NOT_TRACK"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               HTTP_PROXY=proxy.url, HTTPS_PROXY=proxy.url, ALL_PROXY=proxy.url, NO_PROXY="127.0.0.1,localhost")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    try:
        res = clipscrub("run", "-p", "params.yaml", "-o", "run", "--json", cwd=tmp_path, env=env)
    finally:
        proxy.close()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    printed = json.loads(res.stdout.splitlines()[0])
    assert set(printed["states"].values()) == {"Completed"}
    # each stage's wall time, as the flow waited for it
    assert printed["seconds"].keys() == printed["states"].keys() and all(t >= 0 for t in printed["seconds"].values())
    assert "Traceback" not in res.stderr and "telemetry" not in res.stderr.lower(), res.stderr[-3000:]
    assert not [line for line in res.stderr.splitlines() if "| ERROR" in line or "| CRITICAL" in line], res.stderr
    assert proxy.seen == []
    # the server's telemetry service, had it run, keeps its session in the server's database
    db = sqlite3.connect(tmp_path / "prefect-home" / "prefect.db")
    assert db.execute("select count(*) from configuration where key = 'TELEMETRY_SESSION'").fetchone() == (0,)
    db.close()


def test_temporary_server_gets_analytics_off(tmp_path):
    """The mechanism: the server private_prefect starts reports analytics off through its own API,
    and the client's tracking is off, where the environment left both on."""
    code = """if True:
        import json, httpx
        from prefect.settings import Settings
        from prefect._internal.analytics.enabled import is_telemetry_enabled
        from clipscrub.flows.clean import private_prefect
        before = (Settings().server.analytics_enabled, is_telemetry_enabled())
        with private_prefect() as url:
            server = httpx.get(url + "/admin/settings", timeout=30).json()["server"]
            during = (server["analytics_enabled"], server["services"]["scheduler"]["enabled"], is_telemetry_enabled())
        print(json.dumps({"before": before, "during": during, "after": is_telemetry_enabled()}))
    """
    from prefect._internal.analytics.ci_detection import CI_ENV_VARS

    drop = {"DO_NOT_TRACK", *CI_ENV_VARS}  # Prefect's client tracks nothing on CI machines
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in drop}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.splitlines()[-1]) == {"before": [True, True], "during": [False, False, False], "after": True}


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
        params = tiny_params()
        assert run["name"] == f"{params.base.name}-{params.hash()[:8]}"
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
            [sys.executable, "-m", "clipscrub.flows.serve", "-p", "params.yaml", "-o", "served", "--name", "nightly"],
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


def local_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a `clipscrub run` on its own temporary server, its database under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return env


def start_run(tmp_path: Path, *extra: str) -> subprocess.Popen:
    """`clipscrub run` on the tiny demo in a session (process group) of its own, as a terminal starts it."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    return subprocess.Popen([str(BIN / "clipscrub"), "run", "-p", "params.yaml", "-o", "run", *extra],
                            cwd=tmp_path, env=local_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_stage(proc: subprocess.Popen, state: Path, stage: str) -> list:
    """Wait until the run records ``stage`` finished; return its temporary server's processes."""
    import psutil

    deadline = time.monotonic() + 600
    while not (state.is_file() and stage in json.loads(state.read_text() or "{}")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{stage} did not finish in 600 s"
        time.sleep(0.2)
    servers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "clipscrub.flows.tether" in " ".join(p.cmdline())]
    assert len(servers) == 1  # the temporary server, run through its tether
    return servers


@pytest.mark.parametrize(("signum", "target", "cluster"), [
    (2, "group", []),  # Ctrl-C at a terminal: SIGINT to the whole process group
    (2, "group", ["--cluster", "local:2"]),
    (2, "process", []),
    (15, "process", []),  # SIGTERM, e.g. from a scheduler's timeout
])
def test_an_interrupted_run_stops_says_where_and_resumes(tmp_path, signum, target, cluster):
    """The run stops (it hung for minutes, holding the root), says which stages finished on one
    line, leaves no server behind, and a rerun reuses what finished."""
    import psutil

    proc = start_run(tmp_path, *cluster)
    servers = wait_for_stage(proc, tmp_path / "run" / ".clipscrub" / "state.json", "download")
    if target == "group":
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        pytest.fail(f"the run did not stop within 90 s of signal {signum}: {proc.communicate()[1][-3000:]}")
    assert proc.returncode == 128 + signum, err[-3000:]
    # the last line, but for a cluster's multiprocessing resource tracker that may warn after it
    (last,) = [line for line in err.splitlines() if line.startswith("clipscrub: interrupted")]
    name = "SIGINT" if signum == 2 else "SIGTERM"
    assert last.startswith(f"clipscrub: interrupted ({name}): download"), err[-3000:]
    assert "did not; rerun to resume from" in last and last.endswith(f"clipscrub run -p params.yaml -o run{''.join(' ' + a for a in cluster)}")
    # the server lived until the run had said its last: no report to a dead API
    assert "ConnectError" not in err and "ConcurrencySlotAcquisitionError" not in err, err[-3000:]
    gone, alive = psutil.wait_procs(servers, timeout=15)
    assert not alive
    res = subprocess.run([str(BIN / "clipscrub"), "run", "-p", "params.yaml", "-o", "run", "--json"],
                         cwd=tmp_path, env=local_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]  # the root lock was released
    states = json.loads(res.stdout.splitlines()[-1])["states"]
    assert states["download"] == "Cached" and states["report"] == "Completed"


def test_a_killed_run_leaves_no_server(tmp_path):
    """SIGKILL runs no cleanup: the temporary server notices its parent is gone and stops."""
    import psutil

    proc = start_run(tmp_path)
    servers = wait_for_stage(proc, tmp_path / "run" / ".clipscrub" / "state.json", "download")
    port = next(c.laddr.port for c in servers[0].net_connections() if c.status == psutil.CONN_LISTEN)
    proc.kill()
    proc.communicate(timeout=60)
    gone, alive = psutil.wait_procs(servers, timeout=15)
    assert not alive, "the temporary server outlived its run"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.parametrize(("env", "args", "expected"), [
    ({"HOME": "/proc/clipscrub-home"}, [],
     "PREFECT_HOME: /proc/clipscrub-home/.prefect is not writable (/proc does not accept new files"),
    ({}, ["--cluster", "tcp://127.0.0.1:{port}"], "--cluster: no Dask scheduler answers at tcp://127.0.0.1:{port}"),
])
def test_a_run_that_cannot_start_says_so_at_once(tmp_path, env, args, expected):
    """An unwritable Prefect home (HOME read-only, PREFECT_HOME unset) or a scheduler address where
    nothing listens: one line, before any stage (they were minutes of retries and pages of logs)."""
    port = free_port()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    full = {**{k: v for k, v in local_env(tmp_path).items() if k != "PREFECT_HOME"}, **env}
    if not env:
        full["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    res = clipscrub("run", "-p", "params.yaml", "-o", "run", *[a.format(port=port) for a in args], cwd=tmp_path,
                    env=full)
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"clipscrub: error: {expected.format(port=port)}"), res.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_second_version_reuses_the_first_ones_upstream_work(flow_dir, tmp_path):
    """Another threshold into another run directory with --reuse: download to score are linked in
    (same inodes, nothing recomputed), threshold onward run, the first version is untouched, and
    clipscrub diff compares the two."""
    from clipscrub.diff import diff_versions, load_version
    from clipscrub.flows.clean import clean_dataset

    run_flow(flow_dir)  # the fixture may have been rerun with other params by now: back to the defaults
    before = {p: sha256_path(p) for p in (flow_dir / "clean", flow_dir / "scores", flow_dir / "embeddings")}
    second = tmp_path / "tight"
    result = clean_dataset(params=tiny_params_dict(["threshold.fraction=0.1"]), out_dir=str(second), reuse=str(flow_dir))
    states = result["states"]
    assert [s for s in ALL if states[s] == "Reused"] == ["download", "train", "embed", "index", "score"]
    assert [s for s in ALL if states[s] == "Completed"] == ["threshold", "filter", "evaluate", "report"]
    assert os.stat(second / "embeddings" / "image.npy").st_ino == os.stat(flow_dir / "embeddings" / "image.npy").st_ino
    assert before == {p: sha256_path(p) for p in before}
    a, b = load_version(str(flow_dir), label="A"), load_version(str(second), label="B")
    diff = diff_versions(a, b)
    assert diff["params"] == {"threshold.fraction": {"a": 0.05, "b": 0.1}}
    assert (diff["counts"]["a"]["removed"], diff["counts"]["b"]["removed"]) == (20, 40)
    # its rerun computes nothing: the reused stages stay reused, the rest come from its cache
    again = run_flow(second, ["threshold.fraction=0.1"])
    assert [s for s in ALL if again[s] == "Reused"] == ["download", "train", "embed", "index", "score"]
    assert [s for s in ALL if again[s] == "Cached"] == ["threshold", "filter", "evaluate", "report"]
