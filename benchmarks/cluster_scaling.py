"""Cluster scaling: the stages that have pieces, on a Dask LocalCluster of 1 and of 2 workers.

The flow on a cluster (``clipscrub run --cluster local:N``, flows/clean.py) runs a stage that has
pieces as a map and a reduce: ``plan_pieces`` in the flow's process, one task per piece
(``run_piece``) on the workers, then the stage itself with ``assemble=True`` on a worker. This
benchmark times exactly that with distributed's ``Client`` (no Prefect in between, so what is
measured is the engine's scaling), for

  embed        the demo dataset (``download`` with params.yaml's defaults: 6,000 samples in 6
               shards of 1,000) and the demo victim (``train``; ``--victim random``: its
               architecture at seeded random weights, the same computation): one piece per shard
  index_score  index then score on N synthetic CLIP-like embeddings (d = 512, the generator of
               benchmarks/detector_scale.py), params.yaml's index and score: one piece per
               ``index.chunk_size`` queries

in three modes, each in a fresh interpreter (so no hash, model or forest cache carries over):

  single  today's one process: ``run_stage`` whole, torch and faiss on both cores
  w1      flows.cluster.local_cluster(n_workers=1), as ``--cluster local:1`` starts it: processes,
          one thread each, loopback, no dashboard
  w2      flows.cluster.local_cluster(n_workers=2)

dask pins OMP/MKL/OpenBLAS to one thread in each worker; the child checks it in every worker
(torch, faiss and threadpoolctl's view) and records it. Each run records its wall time, the
plan / map / reduce split, every piece's worker and time, the CPU seconds of the client and each
worker, and the CPU the rest of the machine used meanwhile (/proc/stat): on a machine shared
with other work, the last says how much of the two cores the run could have had. Outputs are
compared by sha256 across the modes. ``--parts prefect`` also measures Prefect's own cost per
mapped task (20 no-op tasks on the DaskTaskRunner of ``--cluster local:2``).

    python benchmarks/cluster_scaling.py --n 20000 --chunk-size 4096 --parts index_score  # a quick look
    python benchmarks/cluster_scaling.py --parts index_score               # N = 1,000,000: ~35 min on 2 busy cores
    python benchmarks/cluster_scaling.py --parts embed,prefect --victim random --repeats 2

A run replaces its parts in an existing --out file and keeps the others. Data are prepared once
under benchmarks/.cache/cluster_scaling/ (the 1M embeddings: 4 GB, ~2 min) and reused; the code
every run imports is a snapshot taken as the benchmark starts (runs/code there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# not again in a worker process, which re-imports this file as its __main__ with the client's
# sys.path (the code snapshot first): the snapshot must stay first
for _p in (REPO, REPO / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

CACHE = REPO / "benchmarks" / ".cache" / "cluster_scaling"
CODE = ("clipscrub", "stages", "flows")  # what code_version hashes, and what the stages import
MODES = ("single", "w1", "w2")
DIM = 512
STAGES = {"embed": ("embed",), "index_score": ("index", "score")}
OUTPUTS = {"embed": "embeddings", "index": "index", "score": "scores"}


def _pipeline():
    """clipscrub's stage graph module (imported late: from the code snapshot on sys.path)."""
    from clipscrub.flows import pipeline

    return pipeline


# ---------------------------------------------------------------------------------- code
def snapshot_code(dest: Path) -> Path:
    """A copy of the package taken once, which every run imports (``sys.path[0]``, inherited by the
    workers): an edit to the working tree during the benchmark changes neither what runs nor the
    ``code_version`` the lineage records, so the three modes can be compared byte for byte."""
    shutil.rmtree(dest, ignore_errors=True)
    for name in CODE:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def use_code(code: Path) -> None:
    if "clipscrub" in sys.modules:
        raise RuntimeError("clipscrub was imported before the code snapshot was put first on sys.path")
    sys.path.insert(0, str(code))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


# ---------------------------------------------------------------------------------- data
def base_params(chunk_size: int | None, extra: list[str] | None = None) -> dict[str, Any]:
    from clipscrub.params import apply_overrides, read_params_file

    return apply_overrides(read_params_file(REPO / "params.yaml"),
                           ([f"index.chunk_size={chunk_size}"] if chunk_size else []) + (extra or []))


def demo_root(victim: str) -> Path:
    """The demo's raw shards, and with ``victim`` trained its victim, made once: ``download``
    (+ ``train``)."""
    from clipscrub.params import parse_params

    root = CACHE / "demo"
    params = parse_params(base_params(None))
    for stage, done in (("download", root / "raw" / "lineage.json"), ("train", root / "model" / "lineage.json")):
        if (stage == "download" or victim == "trained") and not done.is_file():
            t0 = time.perf_counter()
            _pipeline().run_stage(stage, params, root)
            print(f"data: {stage} {time.perf_counter() - t0:.0f} s", flush=True)
    return root


def random_victim() -> list[str]:
    """The overrides that embed with the demo's victim architecture (train.architecture) at seeded
    random weights instead of the trained ones, as an external model (train.enabled=false): the
    same computation, without training's minutes. The checkpoint is made once."""
    import open_clip
    import torch

    from clipscrub.io import write_json
    from clipscrub.model import register_model_config, tiny_model_config
    from clipscrub.params import parse_params

    params = parse_params(base_params(None))
    name = params.train.model_name
    d = CACHE / "victim-random"
    if not (d / "checkpoint.pt").is_file():
        config = tiny_model_config(params.train.architecture)
        register_model_config(name, config)
        torch.manual_seed(params.base.seed)
        model = open_clip.create_model(name, pretrained=None)
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / "model_config.json", config)
        torch.save({"epoch": 0, "name": name, "state_dict": model.state_dict()}, d / "checkpoint.pt")
    return ["train.enabled=false", f"embed.model_name={name}", "embed.pretrained=null",
            f"embed.checkpoint={d / 'checkpoint.pt'}", f"embed.model_config={d / 'model_config.json'}"]


def embeddings_root(n: int) -> Path:
    """N x 512 synthetic embeddings in the embed stage's layout (image, text, ids, model.json,
    lineage.json sealed with every file's hash), made once."""
    from detector_scale import make_embeddings

    from clipscrub.io import seal_outputs, write_json, write_lineage

    root = CACHE / f"emb-{n}-{DIM}"
    emb = root / "embeddings"
    if (emb / "lineage.json").is_file():
        return root
    tmp = root / ".embeddings.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    outliers = max(10, n // 10_000)
    t0 = time.perf_counter()
    make_embeddings(tmp, n=n, d=DIM, outliers=outliers, seed=0)
    (tmp / "labels.npy").rename(root / "labels.npy")  # ground truth, not an embed output
    info = {"model_name": "synthetic", "pretrained": None, "checkpoint": None, "checkpoint_sha256": None,
            "generator": "benchmarks/detector_scale.py make_embeddings, seed 0"}
    write_json(tmp / "model.json", info)
    write_lineage(tmp, stage="embed", params={"synthetic": {"n": n, "d": DIM, "outliers": outliers, "seed": 0}},
                  inputs={}, upstream=[], summary={"samples": n, "dim": DIM}, extra={"model": info})
    seal_outputs(tmp)
    tmp.rename(emb)
    print(f"data: {n} x {DIM} embeddings, {time.perf_counter() - t0:.0f} s", flush=True)
    return root


def clear_outputs(part: str, root: Path) -> None:
    """Remove what a run of ``part`` writes, so each run starts from its inputs alone."""
    for stage in STAGES[part]:
        out = root / OUTPUTS[stage]
        shutil.rmtree(out, ignore_errors=True)
        for hidden in root.glob(f".{out.name}.*"):  # embed's parts, a reduce's work directory
            shutil.rmtree(hidden, ignore_errors=True)
        shutil.rmtree(root / f".{stage}.pieces", ignore_errors=True)


def output_hashes(part: str, root: Path) -> dict[str, str]:
    from clipscrub.io import sha256_file

    out: dict[str, str] = {}
    for stage in STAGES[part]:
        d = root / OUTPUTS[stage]
        out.update({p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()})
    return out


# ---------------------------------------------------------------------------------- accounting
def cpu_seconds() -> float:
    """CPU seconds (user + system) of the calling process, all its threads."""
    t = os.times()
    return t.user + t.system


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def thread_settings() -> dict[str, Any]:
    """What a process would run torch, faiss and BLAS with."""
    import faiss
    import torch
    from threadpoolctl import threadpool_info

    import clipscrub

    return {"code": str(Path(clipscrub.__file__).parent.parent), "torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads(),
            "pools": sorted({f"{p['internal_api']}={p['num_threads']}" for p in threadpool_info()}),
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}


def warm_imports() -> float:
    """Import what the stages import; its seconds (paid once per worker process, before any piece)."""
    t0 = time.perf_counter()
    import faiss  # noqa: F401
    import great_expectations  # noqa: F401  (imported lazily by every stage's validation)
    import open_clip  # noqa: F401
    import sklearn.ensemble  # noqa: F401
    import torch  # noqa: F401

    import clipscrub.stages.embed
    import clipscrub.stages.index
    import clipscrub.stages.score  # noqa: F401
    _pipeline()
    return time.perf_counter() - t0


def timed_piece(name: str, params: dict[str, Any], root: str, piece: dict[str, Any]) -> dict[str, Any]:
    """``run_piece`` as the flow's piece task calls it (params as plain JSON), with its worker,
    wall interval and CPU seconds."""
    from clipscrub.params import parse_params

    pid, c0, t0 = os.getpid(), cpu_seconds(), time.time()
    _pipeline().run_piece(name, parse_params(params), root, piece)
    return {"pid": pid, "start": t0, "stop": time.time(), "cpu_s": cpu_seconds() - c0}


def timed_reduce(name: str, params: dict[str, Any], root: str) -> dict[str, Any]:
    """The stage's own task on a cluster: ``run_stage(assemble=True, hold_root=False)``."""
    from clipscrub.params import parse_params

    pid, c0, t0 = os.getpid(), cpu_seconds(), time.time()
    _pipeline().run_stage(name, parse_params(params), root, assemble=True, hold_root=False)
    return {"pid": pid, "start": t0, "stop": time.time(), "cpu_s": cpu_seconds() - c0}


# ---------------------------------------------------------------------------------- one run
def run_single(part: str, params: dict[str, Any], root: Path) -> dict[str, Any]:
    from clipscrub.params import parse_params

    p = parse_params(params)
    stages: dict[str, Any] = {}
    for stage in STAGES[part]:
        c0, t0 = cpu_seconds(), time.perf_counter()
        _pipeline().run_stage(stage, p, root)
        stages[stage] = {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(cpu_seconds() - c0, 2)}
    return {"stages": stages, "threads": thread_settings()}


def run_cluster(part: str, params: dict[str, Any], root: Path, workers: int) -> dict[str, Any]:
    from distributed import Client

    from clipscrub.io import root_lock
    from clipscrub.params import parse_params
    from clipscrub.flows.cluster import local_cluster

    p = parse_params(params)
    t0 = time.perf_counter()
    cluster = local_cluster(n_workers=workers)  # the cluster --cluster local:N starts
    client = Client(cluster)
    try:
        startup = {"cluster_start_s": round(time.perf_counter() - t0, 2)}
        # the stages' imports, once per worker, before the clock starts (a flow's workers pay it
        # once per run, whatever the data size): recorded, not timed into the stages
        startup["worker_import_s"] = {str(k): round(v, 2) for k, v in client.run(warm_imports).items()}
        threads = client.run(thread_settings)
        pids = client.run(os.getpid)
        stages: dict[str, Any] = {}
        with root_lock(root):  # the flow holds the root for its workers
            for stage in STAGES[part]:
                cpu0 = client.run(cpu_seconds)
                c0, t0 = cpu_seconds(), time.perf_counter()
                pieces = _pipeline().plan_pieces(stage, p, root)
                t_plan, c_plan = time.perf_counter(), cpu_seconds()
                futures = client.map(timed_piece, [stage] * len(pieces), [params] * len(pieces), [str(root)] * len(pieces),
                                     pieces, pure=False)
                done = client.gather(futures)
                t_map = time.perf_counter()
                reduce = client.submit(timed_reduce, stage, params, str(root), pure=False).result()
                t_end = time.perf_counter()
                cpu1 = client.run(cpu_seconds)
                stages[stage] = {
                    "wall_s": round(t_end - t0, 2),
                    "plan_s": round(t_plan - t0, 2), "map_s": round(t_map - t_plan, 2), "reduce_s": round(t_end - t_map, 2),
                    "client_cpu_s": round(c_plan - c0, 2),
                    "worker_cpu_s": round(sum(cpu1[w] - cpu0[w] for w in cpu0), 2),
                    "pieces": len(done),
                    "piece_s": [round(d["stop"] - d["start"], 2) for d in done],
                    "piece_cpu_s": [round(d["cpu_s"], 2) for d in done],
                    "piece_worker": [sorted(pids.values()).index(d["pid"]) for d in done],
                    "reduce_cpu_s": round(reduce["cpu_s"], 2),
                    **_balance(done, workers),
                }
        return {"stages": stages, "threads": {str(k): v for k, v in threads.items()}, **startup}
    finally:
        client.close()
        cluster.close()


def _balance(done: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    """Per worker: the seconds its pieces ran; and the map's makespan over the mean worker's load
    (1.0: perfectly balanced)."""
    busy: dict[int, float] = {}
    for d in done:
        busy[d["pid"]] = busy.get(d["pid"], 0.0) + d["stop"] - d["start"]
    loads = sorted(busy.values(), reverse=True) + [0.0] * (workers - len(busy))
    span = max(d["stop"] for d in done) - min(d["start"] for d in done) if done else 0.0
    return {"worker_busy_s": [round(b, 2) for b in loads],
            "imbalance": round(max(loads) / (sum(loads) / workers), 3) if done and sum(loads) else None,
            "map_span_s": round(span, 2)}


def child(mode: str, part: str, params: dict[str, Any], root: Path, out: Path) -> None:
    warm = warm_imports()  # like the workers: imports are not the stage's time
    clear_outputs(part, root)
    load0, jif0 = os.getloadavg(), machine_jiffies()
    t0 = time.perf_counter()
    if mode == "single":
        result = run_single(part, params, root)
    else:
        result = run_cluster(part, params, root, workers=int(mode[1:]))
    wall = time.perf_counter() - t0
    jif1 = machine_jiffies()
    result.update({
        "mode": mode, "part": part, "import_s": round(warm, 2),
        "wall_s": round(sum(s["wall_s"] for s in result["stages"].values()), 2),
        "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        # the share of the machine's CPU that was busy over the whole run (ours and everyone else's)
        "machine_busy": round((jif1[0] - jif0[0]) / max(1, jif1[1] - jif0[1]), 3),
        "process_wall_s": round(wall, 2),
    })
    result["outputs"] = output_hashes(part, root)
    out.write_text(json.dumps(result))


def measure(mode: str, part: str, args, root: Path, work: Path) -> dict[str, Any]:
    """One run in a fresh interpreter: no sha256, model or forest cached by an earlier run (the
    on-disk hash cache starts empty for each run and is shared by its client and workers)."""
    out = work / f"{part}-{mode}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", f"{mode}:{part}", "--root", str(root), "--code", str(work / "code")]
    hashes = work / f"hash-cache-{part}-{mode}"
    shutil.rmtree(hashes, ignore_errors=True)
    code = subprocess.run(cmd, check=False, env={**os.environ, "CLIPSCRUB_HASH_CACHE": str(hashes)}).returncode
    shutil.rmtree(hashes, ignore_errors=True)
    if code != 0:
        raise SystemExit(f"{part} {mode} failed with exit code {code}")
    result = json.loads(out.read_text())
    stages = {s: v["wall_s"] for s, v in result["stages"].items()}
    print(f"{part} {mode}: {result['wall_s']} s {stages} (machine busy {result['machine_busy']:.0%}, "
          f"load {result['loadavg_before'][0]})", flush=True)
    return result


# ---------------------------------------------------------------------------------- prefect
def prefect_overhead(tasks: int = 20) -> dict[str, Any]:
    """Seconds a flow on ``--cluster local:2`` spends on ``tasks`` mapped no-op tasks, against the
    same no-ops mapped with distributed's Client on the same kind of cluster."""
    from distributed import Client
    from prefect import flow, task

    from clipscrub.flows.clean import private_prefect, task_runner_for
    from clipscrub.flows.cluster import local_cluster

    def noop(i: int) -> int:
        return i

    with local_cluster(n_workers=2) as cluster, Client(cluster) as client:
        client.gather(client.map(noop, range(tasks), pure=False))  # warm
        t0 = time.perf_counter()
        client.gather(client.map(noop, range(tasks), pure=False))
        dask_s = time.perf_counter() - t0

    noop_task = task(noop, name="noop", persist_result=False)
    timings: dict[str, float] = {}

    @flow(name="noop-map")
    def mapped(n: int) -> None:
        noop_task.submit(-1).result()  # the first task brings the workers up
        t = time.perf_counter()
        futures = [noop_task.submit(i) for i in range(n)]
        [f.result() for f in futures]
        timings["map"] = time.perf_counter() - t

    with private_prefect():
        t0 = time.perf_counter()
        mapped.with_options(task_runner=task_runner_for("local:2"))(tasks)
        flow_s = time.perf_counter() - t0
    return {"tasks": tasks, "workers": 2, "prefect_map_s": round(timings["map"], 2),
            "prefect_per_task_s": round(timings["map"] / tasks, 3), "prefect_flow_s": round(flow_s, 1),
            "dask_map_s": round(dask_s, 3), "dask_per_task_s": round(dask_s / tasks, 4)}


# ---------------------------------------------------------------------------------- report
def machine() -> dict[str, Any]:
    import faiss
    import torch

    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version(), "faiss": faiss.__version__, "torch": torch.__version__}
    try:
        import distributed

        info["distributed"] = distributed.__version__
        info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                                   if l.startswith("model name"))
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, StopIteration):
        pass
    return info


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Speedups of w2 over w1 (efficiency: speedup / 2) and of each mode against single, from
    wall times; and the same from each run's wall time scaled by the machine's idle share (what
    the run would have taken had other work not shared the cores), as a cross-check."""
    wall = {m: r["wall_s"] for m, r in runs.items()}
    out: dict[str, Any] = {"wall_s": wall}
    if "w1" in wall and "w2" in wall:
        s = wall["w1"] / wall["w2"]
        out.update({"speedup_w2_over_w1": round(s, 3), "efficiency_w2": round(s / 2, 3), "target_1_7x_met": s >= 1.7})
    if "single" in wall:
        out.update({f"{m}_over_single": round(wall[m] / wall["single"], 3) for m in wall if m != "single"})
    out.update(cpu_view(runs))
    hashes = {m: r["outputs"] for m, r in runs.items()}
    first = next(iter(hashes.values()))
    out["outputs_identical"] = all(h == first for h in hashes.values())
    out["output_files"] = len(first)
    if not out["outputs_identical"]:
        out["differing_files"] = sorted({f for h in hashes.values() for f in h if any(g.get(f) != h[f] for g in hashes.values())})
    return out


def cpu_view(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The cluster runs from their CPU seconds, which other work on the machine does not inflate
    (its wall times it does): per stage, the serial part (plan in the client, reduce on a worker)
    and the pieces; the wall a run would take with one free core per process (plan + the busiest
    worker's pieces + reduce); and Amdahl's bound on 2 workers from the serial share."""
    view: dict[str, Any] = {}
    for mode in ("w1", "w2"):
        if mode not in runs:
            continue
        per: dict[str, Any] = {}
        for stage, st in runs[mode]["stages"].items():
            busiest: dict[int, float] = {}
            for w, c in zip(st["piece_worker"], st["piece_cpu_s"]):
                busiest[w] = busiest.get(w, 0.0) + c
            serial = st["client_cpu_s"] + st["reduce_cpu_s"]
            pieces = sum(st["piece_cpu_s"])
            per[stage] = {"serial_cpu_s": round(serial, 2), "pieces_cpu_s": round(pieces, 2),
                          "serial_share": round(serial / (serial + pieces), 3) if serial + pieces else None,
                          "free_core_wall_s": round(serial + max(busiest.values(), default=0.0), 2)}
        tot_serial = sum(v["serial_cpu_s"] for v in per.values())
        tot_pieces = sum(v["pieces_cpu_s"] for v in per.values())
        f = tot_serial / (tot_serial + tot_pieces) if tot_serial + tot_pieces else 0.0
        per["total"] = {"serial_cpu_s": round(tot_serial, 2), "pieces_cpu_s": round(tot_pieces, 2), "serial_share": round(f, 3),
                        "free_core_wall_s": round(sum(v["free_core_wall_s"] for v in per.values()), 2),
                        "amdahl_bound_2_workers": round(1 / (f + (1 - f) / 2), 3)}
        view[f"cpu_{mode}"] = per
    if "cpu_w1" in view and "cpu_w2" in view:
        s = view["cpu_w1"]["total"]["free_core_wall_s"] / view["cpu_w2"]["total"]["free_core_wall_s"]
        view["cpu_speedup_w2_over_w1"] = round(s, 3)
        view["cpu_efficiency_w2"] = round(s / 2, 3)
    return view


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="embeddings for index + score")
    ap.add_argument("--parts", default="embed,index_score,prefect")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--chunk-size", type=int, default=None, help="index.chunk_size for every mode (default: params.yaml)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each mode of embed (alternating)")
    ap.add_argument("--victim", choices=("trained", "random"), default="trained",
                    help="embed with the trained demo victim (train runs once, minutes) or its architecture "
                         "at random weights (the same computation)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cluster_scaling.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--code", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = CACHE / "runs"

    if args.child:
        use_code(Path(args.code))
        mode, part = args.child.split(":")
        params = json.loads((work / f"params-{part}.json").read_text())
        child(mode, part, params, Path(args.root), work / f"{part}-{mode}.json")
        return

    work.mkdir(parents=True, exist_ok=True)
    use_code(snapshot_code(work / "code"))
    params = base_params(args.chunk_size)
    parts = args.parts.split(",")
    modes = args.modes.split(",")
    # the parts run now replace theirs in an existing report; the others are kept
    out = Path(args.out)
    report: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    report.update({
        "machine": machine(),
        "config": {"n": args.n, "d": DIM, "index_chunk_size": params["index"]["chunk_size"],
                   "index_k": params["index"]["k"], "reference_sizes": params["index"]["reference"]["sizes"],
                   "draws": params["index"]["reference"]["draws"], "detectors": params["score"]["detectors"],
                   "embed_samples": params["download"]["synthetic"]["num_samples"],
                   "shard_size": params["download"]["shard_size"], "embed_repeats": args.repeats},
    })
    report.setdefault("parts", {})
    for part in parts:
        load = [round(x, 2) for x in os.getloadavg()]
        if part == "prefect":
            report["prefect"] = {**prefect_overhead(), "loadavg_start": load}
            print("prefect", json.dumps(report["prefect"]), flush=True)
            continue
        root = demo_root(args.victim) if part == "embed" else embeddings_root(args.n)
        extra = random_victim() if part == "embed" and args.victim == "random" else []
        (work / f"params-{part}.json").write_text(json.dumps(base_params(args.chunk_size, extra)))
        repeats = args.repeats if part == "embed" else 1
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for r in range(repeats):
            for mode in modes[r % len(modes):] + modes[:r % len(modes)]:  # a drift in load favours none
                runs[mode].append(measure(mode, part, args, root, work))
        clear_outputs(part, root)
        best = {m: min(rs, key=lambda x: x["wall_s"]) for m, rs in runs.items()}  # the least disturbed run
        entry = {"repeats": repeats, "overrides": extra + ([f"index.chunk_size={args.chunk_size}"] if args.chunk_size else []),
                 **({"victim": args.victim} if part == "embed" else {}), "loadavg_start": load, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                 "summary": summarise(best), "runs": {m: [_public(r) for r in rs] for m, rs in runs.items()}}
        entry["summary"]["outputs_identical_all_runs"] = len({json.dumps(r["outputs"], sort_keys=True)
                                                              for rs in runs.values() for r in rs}) == 1
        report["parts"][part] = entry
        print(part, json.dumps(entry["summary"]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def _public(run: dict[str, Any]) -> dict[str, Any]:
    """A run as reported: its outputs as one combined hash rather than a file list."""
    import hashlib

    out = {k: v for k, v in run.items() if k != "outputs"}
    out["outputs_sha256"] = hashlib.sha256(json.dumps(run["outputs"], sort_keys=True).encode()).hexdigest()
    return out


if __name__ == "__main__":
    main()
