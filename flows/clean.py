"""The clipscrub pipeline as a Prefect 3 flow over the same stage functions as dvc.yaml.

Each stage is a task that calls ``flows.pipeline.run_stage`` and passes file paths only.
A task's cache key is built like DVC's stage hash: the content hashes of its input artifacts,
its params (the sections dvc.yaml lists for it) and its code version (the hash of the source
files it runs). Results persist under ``<out>/.prefect/results`` (or any fsspec URL) as plain
JSON, and are read back only as plain JSON (``JsonResultStorage``): never unpickled.

Prefect's cache says "this key was computed", not "the outputs on disk are that computation's":
so the flow also keeps ``<out>/.clipscrub/state.json`` (per stage: the key and the content hashes
of the outputs it left), and refreshes the cache of a stage whose outputs are missing or changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Iterator, NoReturn

from prefect import flow, get_run_logger, tags, task
from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem, RemoteFileSystem, WritableFileSystem
from prefect.logging import get_logger
from prefect.results import ResultRecord, ResultRecordMetadata
from prefect.runtime import flow_run
from prefect.serializers import JSONSerializer
from prefect.tasks import exponential_backoff

from clipscrub.io import check_writable_dir, root_lock, sha256_path
from clipscrub.metrics import APPLIED_KEYS, applied_sentence, read_applied
from clipscrub.params import Params, parse_params
from clipscrub.errors import ClipscrubError, ParamError
from clipscrub.dag import param_keys
from clipscrub.flows.pipeline import (STAGES, Layout, active_stages, param_value, plan_pieces, producer, run_piece,
                                      run_stage, stage_code_version, stage_inputs)

STATE_FILE = Path(".clipscrub") / "state.json"

# What each run in this process has done so far, by run directory: {"finished": [stages], "running":
# stage or None}. `clipscrub run` reads it when a signal stops the run, to say where it stopped.
PROGRESS: dict[str, dict[str, Any]] = {}


def stage_cache_key(stage: str, params: Params, root: str | Path) -> str:
    """Hash of (stage, its code version, its params, the contents of its inputs)."""
    lay = Layout(Path(root))
    h = hashlib.sha256()
    h.update(f"{stage}\0{stage_code_version(stage)}\0".encode())
    for key in param_keys(STAGES[stage], params):
        h.update(key.encode() + b"=" + json.dumps(param_value(params, key), sort_keys=True).encode() + b"\0")
    for name, path in sorted(stage_inputs(stage, params, lay).items()):
        h.update(name.encode() + b":" + sha256_path(path).encode() + b"\0")
    return f"clipscrub-{stage}-{h.hexdigest()[:40]}"


def _task_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    params = parse_params(json.loads(parameters["params"]), base=parameters.get("params_dir"))
    return stage_cache_key(parameters["stage"], params, parameters["root"])


def output_hashes(stage: str, root: str | Path) -> dict[str, str] | None:
    """Content hash of each output of ``stage`` under ``root``; None if any is missing."""
    lay = Layout(Path(root))
    paths = {name: getattr(lay, name) for name in STAGES[stage].outputs}
    if not all(p.exists() for p in paths.values()):
        return None
    return {name: sha256_path(p) for name, p in paths.items()}


def _read_state(root: Path) -> dict[str, Any]:
    path = root / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def reuse_outputs(stage: str, key: str, *, source: Path, root: Path) -> dict[str, Any] | None:
    """Put ``stage``'s outputs from the run directory ``source`` into ``root`` when ``source``
    computed them under the same cache ``key`` (the same code, params and input contents) and
    they are still the bytes it recorded; return its summary then, else None.

    Files are hard links (a copy across filesystems): every stage publishes by renaming a new
    folder into place, so no later write in either run changes the other's files."""
    import shutil

    if source.resolve() == root.resolve():
        return None
    recorded = _read_state(source).get(stage, {})
    if recorded.get("key") != key or "summary" not in recorded or output_hashes(stage, source) != recorded.get("outputs"):
        return None

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    lay_from, lay_to = Layout(source), Layout(root)
    for name in STAGES[stage].outputs:
        src, dst = Path(getattr(lay_from, name)), Path(getattr(lay_to, name))
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.reuse-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        if src.is_dir():
            shutil.copytree(src, tmp, copy_function=link)
        else:
            link(str(src), str(tmp))
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    return recorded["summary"]


def _write_state(root: Path, state: dict[str, Any]) -> None:
    path = root / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(path)


# Plain JSON both ways: no object hook, so nothing in a result names a class to import
RESULT_SERIALIZER = JSONSerializer(object_decoder=None)
PLAIN_JSON = {"jsonlib": "json", "object_decoder": None, "loads_kwargs": {}}


class JsonResultStorage(WritableFileSystem):
    """Task result storage that gives Prefect only records it rebuilt from plain JSON.

    A stored result record names its own serializer and Prefect obeys it when it looks a
    cached task up: a record saying "pickle" (or "json" with another jsonlib or object hook)
    runs code of the writer's choosing. So every read parses the record as plain JSON,
    refuses anything else, and returns a record rebuilt with ``RESULT_SERIALIZER``. Prefect
    treats a refused record as a cache miss: the stage recomputes and overwrites it.
    """

    _block_type_name = "clipscrub JSON results"
    basepath: str  # a local directory or an fsspec URL

    def _files(self) -> WritableFileSystem:
        if "://" in self.basepath:
            return RemoteFileSystem(basepath=self.basepath)
        return LocalFileSystem(basepath=self.basepath)

    @staticmethod
    def _refuse(path: str, why: str) -> NoReturn:
        get_logger("clipscrub").warning("refusing the stored result %s: %s; the stage is recomputed", path, why)
        raise ValueError(f"refusing the stored result {path}: {why}")

    def _plain_record(self, path: str, content: bytes) -> bytes:
        try:
            record = json.loads(content)
            text, serializer = record["result"], dict(record["metadata"]["serializer"])
        except (ValueError, TypeError, KeyError):  # not JSON (a pickle, say), or not a record
            self._refuse(path, "not a JSON result record")
        if serializer.get("type") != "json":
            self._refuse(path, f"its serializer is {serializer.get('type')!r}, not plain JSON")
        # "json" too can name a module to import and a hook to call on every object
        odd = [f"{k}={serializer.get(k)!r}" for k, v in PLAIN_JSON.items() if serializer.get(k) != v]
        if odd:
            self._refuse(path, f"its serializer is not plain JSON ({', '.join(odd)})")
        try:
            value = json.loads(text)
        except (ValueError, TypeError):
            self._refuse(path, "its result is not JSON text")
        return ResultRecord(
            metadata=ResultRecordMetadata(
                storage_key=path,
                serializer=RESULT_SERIALIZER,
                storage_block_id=self._block_document_id,
            ),
            result=value,
        ).serialize()

    async def aread_path(self, path: str) -> bytes:
        return self._plain_record(path, await self._files().aread_path(path))

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        return self._plain_record(path, self._files().read_path(path, _sync=True))

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await self._files().awrite_path(path, content)

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
        return self._files().write_path(path, content, _sync=True)


def _run_stage_task(stage: str, params: str, root: str, params_dir: str | None = None,
                    hold_root: bool = True, assemble: bool = False) -> dict[str, Any]:
    logger = get_run_logger()
    logger.info("running stage %s into %s", stage, root)
    # as plain JSON: a fresh run returns what a cached one reads back
    summary = run_stage(stage, parse_params(json.loads(params), base=params_dir), root, hold_root=hold_root,
                        assemble=assemble)
    summary = json.loads(json.dumps(summary, sort_keys=True, default=str))
    logger.info("stage %s done: %s", stage, json.dumps(summary, sort_keys=True))
    return summary


def _reused_stage_task(stage: str, source: str, summary: dict[str, Any]) -> dict[str, Any]:
    get_run_logger().info("stage %s reused from %s (same code, params and inputs): %s", stage, source,
                          json.dumps(summary, sort_keys=True))
    return summary


# a stage whose outputs came from another run directory (--reuse): a task run, so the UI shows it
REUSED_TASK = task(_reused_stage_task, name="reused", cache_policy=NO_CACHE, persist_result=False)


def _run_piece_task(stage: str, params: str, root: str, piece: dict[str, Any],
                    params_dir: str | None = None) -> dict[str, Any]:
    summary = run_piece(stage, parse_params(json.loads(params), base=params_dir), root, piece)
    get_run_logger().info("%s piece %s done: %s", stage, json.dumps(piece), json.dumps(summary, sort_keys=True))
    return summary


def retry_unless_input_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry what may pass a second time (a lost worker, a flaky host), never a ClipscrubError:
    the same input fails the same way, after a backoff and another page of logs."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 (no result to read: retry as Prefect would)
        return True
    return not isinstance(exc, ClipscrubError)


# A piece writes a file its stage then assembles; the stage's own task is what is cached. A
# piece lost with its worker is run again on another (Dask reschedules it; this retries it).
PIECE_TASK = task(_run_piece_task, name="piece", cache_policy=NO_CACHE, persist_result=False, retries=2,
                  retry_condition_fn=retry_unless_input_error)


def check_scheduler(address: str, *, timeout: float = 5.0) -> None:
    """Stop at once, on one line, when nothing listens at a scheduler ``address`` (tcp://host:port):
    dask's client would retry for its connect timeout (30 s) and end in a page of tracebacks."""
    import socket

    host, _, port = address.split("://", 1)[1].rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise ParamError(f"no Dask scheduler answers at {address} ({why}): start one there (`dask scheduler`), "
                         "or run on this machine with local:N", param="--cluster") from None


def task_runner_for(cluster: str | None) -> Any:
    """The flow's task runner for ``--cluster``: ``local:N`` (a LocalCluster of N worker
    processes, one thread each) or a scheduler's address (``tcp://host:8786``); None: in-process."""
    if not cluster:
        return None
    from prefect_dask import DaskTaskRunner

    local = re.fullmatch(r"local:(\d+)", cluster)
    if local and int(local.group(1)) >= 1:
        # one thread per worker, on loopback, and one GPU per worker where there are GPUs
        return DaskTaskRunner(cluster_class="clipscrub.flows.cluster.local_cluster",
                              cluster_kwargs={"n_workers": int(local.group(1))})
    if re.fullmatch(r"(tcp|tls)://[^/\s]+:\d+", cluster):
        check_scheduler(cluster)
        return DaskTaskRunner(address=cluster)
    raise ParamError(f"expected local:N (N >= 1) or a scheduler address tcp://host:port, got {cluster!r}",
                     param="--cluster")


def upstream_stages(stage: str, active: list[str]) -> list[str]:
    """The active stages whose outputs ``stage`` reads (its declared inputs): its edges in the flow graph."""
    return [s for s in active if s in {producer(name) for name in STAGES[stage].inputs}]


def run_tags(params: Params) -> list[str]:
    """Tags that let runs be filtered in the UI by dataset, source and the detector that decides."""
    return [f"dataset:{params.base.name}", f"source:{params.download.source}", f"detector:{params.threshold.detector}"]


def _tag_flow_run(names: list[str]) -> None:
    """Add ``names`` to this flow run's tags (those it was created with, by a deployment say, stay)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        client.update_flow_run(run.id, tags=list(dict.fromkeys([*run.tags, *names])))


STAGE_TASKS = {
    name: task(
        _run_stage_task,
        name=name,
        cache_key_fn=_task_cache_key,
        persist_result=True,
        result_serializer=RESULT_SERIALIZER,
        # a URL list fetch can fail transiently; the other stages are deterministic
        retries=3 if name == "download" else 0,
        retry_delay_seconds=exponential_backoff(backoff_factor=5) if name == "download" else 0,
        retry_condition_fn=retry_unless_input_error,
    )
    for name in STAGES
}


def _flow_run_name() -> str:
    params = parse_params(flow_run.parameters["params"])
    return f"{params.base.name}-{params.hash()[:8]}"


def result_storage_for(out_dir: str | Path, url: str | None) -> JsonResultStorage:
    """Local storage under the run's directory, a local path, or any fsspec URL (s3://, gs://...).

    Saved as a block: Prefect wants task result storage persisted server-side, so that the UI
    and later runs can resolve it.
    """
    if url is None:
        base = str((Path(out_dir) / ".prefect" / "results").resolve())
    elif "://" not in url or url.startswith("file://"):
        base = str(Path(url.removeprefix("file://")).resolve())
    else:
        base = url
    storage = JsonResultStorage(basepath=base)
    storage.save("clipscrub-" + hashlib.sha256(base.encode()).hexdigest()[:12], overwrite=True)
    return storage


# A temporary server lives for one run: the services that schedule, repossess, expire or
# automate runs have nothing to do there, and each is one more writer on its sqlite file
TEMPORARY_SERVER_SETTINGS = {
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": False,
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": False,
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": False,
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": False,
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": False,
    "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": False,
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": False,
}


def tethered_server(app_dir: Path) -> Any:
    """Prefect's temporary server (``SubprocessASGIServer``), run the way ``clipscrub run`` needs it.

    - In a session of its own, tethered to this process (``clipscrub.flows.tether``): a Ctrl-C at
      the terminal does not kill it under the run (which would then retry every state report for
      minutes), and it stops by itself when this process dies without stopping it.
    - With ``app_dir`` (an empty folder) as uvicorn's ``--app-dir`` instead of prefect's own
      parent folder. uvicorn inserts ``--app-dir`` at the head of ``sys.path`` before it imports
      the app; prefect passes its parent, site-packages, so every top-level module there shadows
      the standard library in the server. img2dataset requires the Python 3.6 ``dataclasses``
      backport (PyPI ``dataclasses`` 0.6, the last without ``python_requires<3.7``), whose
      ``dataclasses.py`` lands in site-packages: pydantic then imports it instead of the standard
      library's and the server dies at import.
    """
    import subprocess
    import sys

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class TetheredServer(SubprocessASGIServer):
        _instances: ClassVar[dict[int | None, SubprocessASGIServer]] = {}  # not shared with prefect's own servers

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # prefect's own command and environment (server/api/server.py), run through the tether
            env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1", **get_current_settings().to_environment_variables(exclude_unset=True)}
            return subprocess.Popen(
                [sys.executable, "-m", "clipscrub.flows.tether", str(os.getpid()), "uvicorn",
                 "--app-dir", str(app_dir), "--factory", "prefect.server.api.server:create_app",
                 "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env=env, start_new_session=True,
            )

    return TetheredServer()


@contextmanager
def private_prefect() -> Iterator[str]:
    """Prefect that sends nothing off this machine, on a temporary server unless PREFECT_API_URL is set.

    Yields the API URL. Analytics are off in the server (its telemetry service phoned home,
    and failed loudly offline) and in the client (DO_NOT_TRACK). Prefect's own temporary
    server stops at interpreter exit, racing the event and log workers still sending to it:
    this one stops only after they have drained. It imports the standard library first, even
    with the ``dataclasses`` backport installed, and it dies with this process (``tethered_server``).
    """
    import prefect.settings as ps
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    saved = os.environ.get("DO_NOT_TRACK")
    os.environ["DO_NOT_TRACK"] = "1"  # read by Prefect's client analytics at each event
    try:
        with ps.temporary_settings(updates={ps.PREFECT_SERVER_ANALYTICS_ENABLED: False}):
            url = ps.get_current_settings().api.url
            if url:
                yield url
                return
            # the server process inherits these: it is started with the current settings
            home = ps.PREFECT_HOME.value()
            try:  # the server keeps its database there: unwritable, it retries for minutes, then fails
                check_writable_dir(home, param="PREFECT_HOME")
            except ClipscrubError as exc:
                raise ClipscrubError(f"{exc.message}; the temporary Prefect server keeps its database there: set "
                                     "PREFECT_HOME to a writable folder, or PREFECT_API_URL to a running Prefect "
                                     "server", param="PREFECT_HOME") from None
            with (ps.temporary_settings(updates={getattr(ps, k): v for k, v in TEMPORARY_SERVER_SETTINGS.items()}),
                  tempfile.TemporaryDirectory(prefix="clipscrub-app-dir-") as app_dir):
                server = tethered_server(Path(app_dir))
                timeout = max(120, ps.PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
                try:
                    try:
                        server.start(timeout=timeout)
                    except RuntimeError as exc:  # prefect's: the server never answered
                        why = (str(exc).splitlines() or [""])[0][:200]
                        raise ClipscrubError(f"the temporary Prefect server did not start ({why}); its output is "
                                             "above: fix what it names, or set PREFECT_API_URL to a running Prefect "
                                             "server") from None
                    with ps.temporary_settings(updates={ps.PREFECT_API_URL: server.api_url}):
                        try:
                            yield server.api_url
                        finally:
                            APILogWorker.drain_all(timeout=60)
                            EventsWorker.drain_all(timeout=60)
                finally:
                    server.stop()
    finally:
        if saved is None:
            os.environ.pop("DO_NOT_TRACK", None)
        else:
            os.environ["DO_NOT_TRACK"] = saved


def summary_markdown(params: Params, root: Path, summaries: dict[str, Any], states: dict[str, str]) -> str:
    lines = [f"# clipscrub run `{params.base.name}` (params {params.hash()[:8]})", ""]
    for stage, summary in summaries.items():
        if isinstance(summary, dict) and summary.get("warning"):
            lines += [f"**Warning ({stage}):** {summary['warning']}", ""]
    filt = summaries.get("filter", {})
    if filt:
        frac = filt["removed"] / max(1, filt["scored"])
        lines += [
            "| input | failed | scored | flagged | kept by review | removed by review | removed | removed fraction | kept |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {filt['input']} | {filt['failed']} | {filt['scored']} | {filt.get('flagged', filt['removed'])} | "
            f"{filt.get('kept_by_review', 0)} | {filt.get('removed_by_review', 0)} | {filt['removed']} | {frac:.4f} | "
            f"{filt['kept']} |",
            "",
        ]
    applied = read_applied(Layout(root).applied_metrics)  # the evaluate stage's flat block
    if applied:
        lines += ["## Applied threshold", "", applied_sentence(applied), "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v if isinstance(v, str) else json.dumps(v)} |"
                  for k, v in ((k, applied[k]) for k in APPLIED_KEYS if k in applied)]
        lines.append("")
    ev = summaries.get("evaluate", {})
    if ev.get("ground_truth"):
        lines += [f"Detection of {ev['poisoned']} known poisoned samples:", "", "| detector | AUROC | PR-AUC |", "| --- | --- | --- |"]
        for d, m in sorted(ev["detectors"].items(), key=lambda kv: -kv[1]["auroc"]):
            lines.append(f"| {d} | {m['auroc']:.4f} | {m['pr_auc']:.4f} |")
        lines.append("")
    lines += ["| stage | state |", "| --- | --- |"] + [f"| {s} | {st} |" for s, st in states.items()]
    rep = summaries.get("report", {})
    if rep:
        page = Path(root).resolve() / "report" / "index.html"
        lines += ["", (f"Report: [{page}]({page.as_uri()}) ({rep['gallery']} samples in the gallery, "
                       f"{rep['clusters']} clusters of flagged samples sharing a caption or an image)")]
    lines += ["", f"Outputs: `{root}`"]
    return "\n".join(lines)


@flow(name="clean-dataset", flow_run_name=_flow_run_name, log_prints=True)
def clean_dataset(params: dict[str, Any], out_dir: str, result_storage: str | None = None,
                  cluster: str | None = None, params_dir: str | None = None,
                  reuse: str | None = None) -> dict[str, Any]:
    """Run every stage on ``params`` (a params.yaml mapping) into ``out_dir``.
    ``params_dir``: the folder its relative paths are relative to (the params file's; default:
    the working directory). ``reuse``: another run directory whose stages computed under the same
    cache key are not run again but linked in (``reuse_outputs``; state ``Reused``): a second
    version from other threshold or filter params shares the first one's embeddings, index and
    scores.

    With ``cluster`` (run the flow with ``task_runner_for(cluster)``), each stage's task runs on
    the cluster's workers and a stage that has pieces (``plan_pieces``) first maps them over
    the workers; the outputs are the bytes an in-process run writes, and the cache is the same.
    Returns ``{"states": {stage: "Completed" | "Cached"}, "summaries": {stage: summary},
    "seconds": {stage: wall seconds}}`` (a reused stage has none; with a cluster also
    ``"pieces": {stage: count}``, the pieces it mapped).
    """
    settings = parse_params(params, base=params_dir)
    root = Path(out_dir)
    storage = result_storage_for(root, result_storage)
    state = _read_state(root)
    states: dict[str, str] = {}
    summaries: dict[str, Any] = {}
    counts: dict[str, int] = {}  # pieces run on the cluster, by stage
    seconds: dict[str, float] = {}  # each stage's wall time as the flow waited for it (pieces included)
    active = active_stages(settings)
    done: dict[str, Any] = {}  # each stage's final state
    names = run_tags(settings)
    _tag_flow_run(names)
    # the params as the file means them (with its folder, every worker resolves the same paths),
    # as one JSON string made before any task: Prefect links a task's inputs to earlier results
    # by id(), and the many objects of a dict could reuse the address of a finished stage's summary
    payload = json.dumps(settings.model_dump(mode="json", by_alias=True), sort_keys=True)
    # held for the whole run, so no other clipscrub process writes the root between two stages
    progress = PROGRESS[str(root.resolve())] = {"finished": [], "running": None}
    with root_lock(root), tags(*names):
        for stage in active:
            progress["running"] = stage
            started = time.perf_counter()
            # the stages it reads from, as final states: the edges of the UI's graph. States, not
            # futures: a Dask runner swaps futures for their results, which name no task run
            after = [done[s] for s in upstream_stages(stage, active)]
            key = stage_cache_key(stage, settings, root)
            recorded = state.get(stage, {})
            intact = recorded.get("key") == key and recorded.get("outputs") == output_hashes(stage, root)
            # linked in from another run (now, or by an earlier run here: no task result of ours to read)
            source = recorded.get("reused_from") if intact else None
            summary = recorded.get("summary") if source else None
            if not intact and reuse and (summary := reuse_outputs(stage, key, source=Path(reuse), root=root)) is not None:
                source = str(reuse)
            if summary is not None:
                done[stage] = REUSED_TASK.with_options(task_run_name=f"{stage}-reused")(
                    stage=stage, source=source, summary=summary, wait_for=[done[s] for s in upstream_stages(stage, active)],
                    return_state=True)
                summaries[stage], states[stage] = summary, "Reused"
                state[stage] = {"key": key, "outputs": output_hashes(stage, root), "summary": summary, "reused_from": source}
                _write_state(root, state)
                progress["finished"].append(stage)
                continue
            t = STAGE_TASKS[stage].with_options(result_storage=storage, refresh_cache=not intact)
            args = {"stage": stage, "params": payload, "root": str(root), "params_dir": params_dir}
            if cluster:
                pieces = []
                if not intact:
                    pieces = [PIECE_TASK.with_options(task_run_name=f"{stage}-piece-{i}").submit(
                        **args, piece=piece, wait_for=after) for i, piece in enumerate(plan_pieces(stage, settings, root))]
                    for piece_run in pieces:
                        piece_run.result()  # raises the first piece's error
                    if pieces:
                        counts[stage] = len(pieces)
                # the flow holds the root for its workers
                future = t.submit(**args, hold_root=False, assemble=bool(pieces),
                                  wait_for=after + [piece_run.state for piece_run in pieces])
                future.wait()
                run_state = done[stage] = future.state
            else:
                run_state = done[stage] = t(**args, wait_for=after, return_state=True)
            summaries[stage] = run_state.result()
            states[stage] = run_state.name
            state[stage] = {"key": key, "outputs": output_hashes(stage, root), "summary": summaries[stage]}
            _write_state(root, state)
            seconds[stage] = round(time.perf_counter() - started, 1)
            progress["finished"].append(stage)
            progress["running"] = None
    create_markdown_artifact(
        summary_markdown(settings, root, summaries, states),
        key="clipscrub-" + re.sub(r"[^a-z0-9-]+", "-", settings.base.name.lower()).strip("-"),
        description="clipscrub run summary",
    )
    return {"states": states, "summaries": summaries, "seconds": seconds, **({"pieces": counts} if cluster else {})}
