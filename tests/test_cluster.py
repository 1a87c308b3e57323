"""`clipscrub run --cluster`: the flow's tasks on a real Dask cluster (a LocalCluster of worker
processes, as prefect-dask's own tests use), with the bytes of an in-process run."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import yaml

from clipscrub.flows.cli import main
from clipscrub.errors import ParamError
from tests.conftest import output_hashes, tiny_params_dict

# Small shards, chunks and filter pieces: embed has 20 pieces to spread over the workers, index and
# score 4 each, filter 40 (the kept ids: a re-shard is one piece)
EXTRA = ["download.shard_size=20", "index.chunk_size=100", "filter.output=ids", "filter.piece_size=10"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    proj = tmp_path_factory.mktemp("cluster")
    (proj / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(EXTRA)))
    return proj


@pytest.fixture(scope="module")
def in_process(project) -> dict[str, str]:
    """The same params run in one process: the bytes a cluster run must write."""
    os.chdir(project)
    assert main(["run", "-p", "params.yaml", "-o", "single"]) == 0
    return output_hashes(project / "single")


def test_a_cluster_run_writes_the_bytes_of_an_in_process_run_and_reruns_from_cache(project, in_process, capsys):
    os.chdir(project)
    assert main(["run", "-p", "params.yaml", "-o", "cluster", "--cluster", "local:2", "--json"]) == 0
    out = capsys.readouterr().out
    assert output_hashes(project / "cluster") == in_process
    assert len(in_process) > 40
    printed = yaml.safe_load(out.splitlines()[0])
    assert set(printed["states"].values()) == {"Completed"}
    assert printed["pieces"] == {"embed": 20, "index": 4, "score": 4, "filter": 40}
    # a rerun on the cluster is served from the cache, as in process
    assert main(["run", "-p", "params.yaml", "-o", "cluster", "--cluster", "local:2", "--json"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out.splitlines()[0])
    assert set(printed["states"].values()) == {"Cached"} and printed["pieces"] == {}
    assert output_hashes(project / "cluster") == in_process


@pytest.mark.parametrize("stage,parts,written", [("embed", ".embeddings.parts", "part-*.npz"),
                                                ("filter", ".filter.pieces/parts", "*.parquet")])
def test_a_worker_killed_mid_run_costs_only_its_piece(project, in_process, capsys, stage, parts, written):
    """SIGKILL a worker process while a stage's pieces are running: the run finishes, with the
    same bytes; the scheduler gives the lost piece to another worker (its nanny starts a new one)."""
    from distributed import Client, LocalCluster

    os.chdir(project)
    parts = project / f"killed-{stage}" / parts
    killed: dict[str, object] = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, silence_logs=40) as cluster, Client(cluster) as client:
        def kill_a_busy_worker() -> None:
            # once the stage's first part is written, the pieces are in flight: kill a worker holding one
            while not killed.get("stop"):
                busy = {w: tasks for w, tasks in client.processing().items() if tasks}
                if parts.is_dir() and any(parts.glob(written)) and busy:
                    worker = next(iter(busy))
                    killed["tasks"] = busy[worker]
                    pid = client.run(os.getpid, workers=[worker])[worker]
                    os.kill(pid, signal.SIGKILL)
                    killed["pid"] = pid
                    return
                threading.Event().wait(0.05)

        watcher = threading.Thread(target=kill_a_busy_worker, daemon=True)
        watcher.start()
        try:
            rc = main(["run", "-p", "params.yaml", "-o", f"killed-{stage}", "--cluster", cluster.scheduler_address])
        finally:
            killed["stop"] = True
            watcher.join()
    assert rc == 0, capsys.readouterr().err[-3000:]
    assert "pid" in killed, f"no worker was busy while {stage}'s parts were written"
    assert output_hashes(project / f"killed-{stage}") == in_process


@pytest.mark.parametrize("value", ["local:0", "local", "8786", "http://host:8786", "tcp://host"])
def test_a_bad_cluster_value_is_one_line(value, tmp_path):
    from clipscrub.flows.clean import task_runner_for

    with pytest.raises(ParamError, match=r"expected local:N \(N >= 1\) or a scheduler address tcp://host:port"):
        task_runner_for(value)


def worker_gpus(n_workers: int, gpus: list[str]) -> list[str | None]:
    from distributed import Client

    from clipscrub.flows.cluster import local_cluster

    with local_cluster(n_workers=n_workers, gpus=gpus) as cluster, Client(cluster) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        threads = set(client.nthreads().values())
    assert threads == {1}
    return sorted(seen.values(), key=str)


@pytest.mark.parametrize("n_workers,gpus,expected", [
    (3, ["0", "1"], ["0", "0", "1"]),  # more workers than GPUs: round-robin
    (2, ["3", "5"], ["3", "5"]),  # the GPUs this process was given, by their own names
    (1, [], [None]),  # no GPUs: the environment is left alone
])
def test_a_local_cluster_gives_each_worker_one_gpu(n_workers, gpus, expected, monkeypatch):
    """The worker processes start with CUDA_VISIBLE_DEVICES naming one GPU each (set by the
    nanny before the process starts, so torch and faiss in the worker see only that one)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_gpus(n_workers, gpus) == expected


@pytest.mark.parametrize("value,expected", [("2,3", ["2", "3"]), ("", []), ("-1", [])])
def test_visible_gpus_follow_cuda_visible_devices(value, expected, monkeypatch):
    from clipscrub.flows.cluster import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert visible_gpus() == expected
