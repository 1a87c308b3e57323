"""The stages after embed at scale: wall time and peak RSS of each, at 1M, 4M and 16M samples.

Synthetic clip-retrieval embeddings (d = 32 by default, so that the search does not dominate):
clean pairs around 100 concepts ("a photo of concept 17"), and 0.01% poison collapsed next to a
target caption ("a photo of a banana"; detector_scale.py's scales), written as parts of 1M rows (``img_emb/``,
``text_emb/``: float16 as clip-retrieval writes them; ``metadata/``: caption and url). The
repository's params.yaml runs on them with the embeddings source (no victim) and the
overrides below, stage by stage: download and embed (which only copy the arrays), then index,
score, threshold, filter, evaluate and report, each as ``clipscrub <stage>`` in a process of
its own, so its wall time and peak RSS (its VmHWM, read as it exits) are its own.

Overrides: ``index.k=16`` and ``score.lid_k=16`` (the neighbour lists of params.yaml's k = 64 and
its 8 reference draws take 8 B x 64 x 8 = 4 KB a sample, 66 GB at 16M), ``embed.dtype=float16``.

    python benchmarks/tail_scale.py                                # 1M, 4M, 16M
    python benchmarks/tail_scale.py --sizes 1000000 --keep          # one size, leave its data
    python benchmarks/tail_scale.py --sizes 16000000 --until evaluate  # stop before the report
    python benchmarks/tail_scale.py --workdir /tmp/tail --keep --until index  # data for later runs
    python benchmarks/tail_scale.py --workdir /tmp/tail --keep --from score   # rerun score onwards

``--from`` reruns the stages from that one on the data a ``--keep`` run left, and keeps the
figures that ``--out`` already holds for the stages before it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PART = 1_000_000
STAGES = ("download", "embed", "index", "score", "threshold", "filter", "evaluate", "report")
OVERRIDES = ["train.enabled=false", "download.source=embeddings", "embed.model_name=synthetic-d32",
             "embed.pretrained=null", "embed.dtype=float16", "index.k=16", "score.lid_k=16"]


def write_source(out: Path, *, n: int, d: int, seed: int) -> int:
    """clip-retrieval parts of ``n`` synthetic pairs in ``out``; returns how many are poisoned.

    The scales of benchmarks/detector_scale.py in a latent space of d / 2 dimensions: concept
    centres unit vectors, a sample 0.3 from its centre, a caption 0.15 from its image's latent
    point plus a modality gap of 0.5, 0.05 of isotropic noise; a poisoned pair next to a target
    caption, within 0.03 of the others."""
    import polars as pl

    rng = np.random.default_rng(seed)
    latent, concepts = d // 2, 100
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    noise = lambda *shape: rng.normal(size=shape).astype(np.float32) / np.sqrt(shape[-1])  # noqa: E731
    basis = np.linalg.qr(rng.normal(size=(d, latent)))[0].astype(np.float32)  # (d, latent), orthonormal
    centres = unit(rng.normal(size=(concepts, latent))).astype(np.float32)
    gap = 0.5 * unit(rng.normal(size=d)).astype(np.float32)
    target = unit(rng.normal(size=latent)).astype(np.float32)
    poison = np.sort(rng.choice(n, max(10, n // 10_000), replace=False))
    names = np.array([f"a photo of concept {c}" for c in range(concepts)], dtype=object)
    for sub in ("img_emb", "text_emb", "metadata"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, n, PART)):
        rows = min(PART, n - start)
        concept = rng.integers(0, concepts, size=rows)
        z = centres[concept] + 0.3 * noise(rows, latent)
        image = z @ basis.T + 0.05 * noise(rows, d)
        text = (z + 0.15 * noise(rows, latent)) @ basis.T + gap + 0.05 * noise(rows, d)
        here = poison[(poison >= start) & (poison < start + rows)] - start
        image[here] = (target + 0.03 * noise(len(here), latent)) @ basis.T + 0.3 * gap + 0.05 * noise(len(here), d)
        text[here] = (target + 0.03 * noise(len(here), latent)) @ basis.T + gap + 0.05 * noise(len(here), d)
        captions = names[concept]
        captions[here] = "a photo of a banana"
        np.save(out / "img_emb" / f"img_emb_{i}.npy", unit(image).astype(np.float16))
        np.save(out / "text_emb" / f"text_emb_{i}.npy", unit(text).astype(np.float16))
        is_poison = np.zeros(rows, dtype=bool)
        is_poison[here] = True
        pl.DataFrame({"url": [f"https://example.com/{start + j}.jpg" for j in range(rows)], "caption": captions,
                      "is_poison": is_poison}).write_parquet(out / "metadata" / f"metadata_{i}.parquet")
    return len(poison)


# runs `clipscrub <stage> ...` and writes its own VmHWM at exit: wait4's ru_maxrss is no good
# here, since Linux carries the parent's high-water mark into a child across fork and exec
LAUNCH = """import atexit, sys
path = sys.argv[1]
def peak():
    with open(path, "w") as f:
        f.write(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")))
atexit.register(peak)
from clipscrub.flows.cli import main
sys.argv = ["clipscrub", *sys.argv[2:]]
sys.exit(main())
"""


def measure(args: list[str], *, log: Path) -> tuple[float, float, str]:
    """``clipscrub *args`` in a process of its own (stderr to ``log``): its wall time, its peak
    RSS in GiB (its VmHWM), its stdout."""
    peak = log.with_suffix(".peak")
    with open(log.with_suffix(".out"), "w+") as out, open(log, "w") as err:
        t = time.perf_counter()
        code = subprocess.call([sys.executable, "-c", LAUNCH, str(peak), *args], stdout=out, stderr=err)
        wall = time.perf_counter() - t
        out.seek(0)
        text = out.read()
    if code:
        raise SystemExit(f"clipscrub {args[0]} failed ({code}):\n{log.read_text()[-3000:]}")
    kib = int(peak.read_text().split()[1])
    return wall, kib / 2**20, text


def measure_cluster(params: Path, *, out: Path, cluster: str, log: Path) -> dict:
    """``clipscrub run --cluster CLUSTER`` of the whole pipeline into ``out`` (fresh): its wall
    time, each stage's (as the flow waited for it, pieces included), the pieces mapped, and the
    peak RSS of each process of the run (the driver, each worker), from their VmHWM, read every
    0.2 s while they live (a process's last reading before it exits is its peak within 0.2 s)."""
    import psutil

    shutil.rmtree(out, ignore_errors=True)
    peaks: dict[int, dict] = {}
    with open(log, "w") as err, open(log.with_suffix(".out"), "w+") as stdout:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "clipscrub.flows.cli", "run", "-p", str(params), "-o", str(out),
                                 "--cluster", cluster, "--json"], stdout=stdout, stderr=err)
        driver = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                family = [driver] + driver.children(recursive=True)
            except psutil.Error:
                family = []
            for p in family:
                try:
                    hwm = next(int(line.split()[1]) for line in open(f"/proc/{p.pid}/status") if line.startswith("VmHWM"))
                    role = "driver" if p.pid == proc.pid else ("worker" if "multiprocessing" in " ".join(p.cmdline())
                                                               else p.name())
                except (OSError, StopIteration, psutil.Error):
                    continue
                peaks[p.pid] = {"role": role, "peak_rss_gib": round(max(hwm / 2**20, peaks.get(p.pid, {}).get(
                    "peak_rss_gib", 0.0)), 2)}
            time.sleep(0.2)
        wall = time.perf_counter() - t
        stdout.seek(0)
        text = stdout.read()
    if proc.returncode:
        raise SystemExit(f"clipscrub run --cluster {cluster} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    result = json.loads(text.strip().splitlines()[-1])
    processes = sorted(peaks.values(), key=lambda r: (r["role"] != "driver", -r["peak_rss_gib"]))
    return {"cluster": cluster, "wall_s": round(wall, 1), "stages_s": result.get("seconds", {}),
            "pieces": result.get("pieces", {}), "processes": [p for p in processes if p["peak_rss_gib"] >= 0.05]}


def measure_size(n: int, *, d: int, work: Path, seed: int, overrides: list[str], until: str = STAGES[-1],
                 start: str = STAGES[0], before: dict | None = None, cluster: str | None = None) -> dict:
    """``before``: this size's record from an earlier run, whose figures stand for the stages
    before ``start`` (which reruns on the data that run left in ``work``). ``cluster``: also run
    the whole pipeline as ``clipscrub run --cluster CLUSTER`` on the same source
    (``measure_cluster``)."""
    import yaml

    src, root = work / "src", work / "data"
    if start == STAGES[0]:
        t = time.perf_counter()
        poisoned = write_source(src, n=n, d=d, seed=seed)
        made = round(time.perf_counter() - t, 1)
        from clipscrub.params import apply_overrides

        params = apply_overrides(yaml.safe_load((REPO / "params.yaml").read_text()),
                                 overrides + [f"download.embeddings.path={src}"])
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        stages = {}
    else:
        if not (work / "params.yaml").is_file():
            raise SystemExit(f"--from {start}: no data of {n:,} samples in {work} (run with --keep first)")
        import polars as pl

        poisoned = int(pl.read_parquet(sorted((src / "metadata").glob("*.parquet")), columns=["is_poison"])
                       ["is_poison"].sum())
        made = (before or {}).get("source_s")
        stages = {k: v for k, v in (before or {}).get("stages", {}).items() if STAGES.index(k) < STAGES.index(start)}
    for stage in STAGES[STAGES.index(start): STAGES.index(until) + 1]:
        wall, rss, out = measure([stage, "-p", str(work / "params.yaml"), "--root", str(root), "--json"],
                                 log=work / f"{stage}.log")
        summary = json.loads(out)
        stages[stage] = {"wall_s": round(wall, 1), "peak_rss_gib": round(rss, 2)}
        print(f"{n:>10,} {stage:<9} {wall:8.1f} s  {rss:6.2f} GiB", flush=True)
        if stage == "evaluate":
            stages[stage]["applied"] = {k: summary.get("applied", {}).get(k) for k in
                                        ("removed", "poison_removed", "poison", "precision", "recall")}
    disk = {p.name: round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**30, 2)
            for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    record = {"samples": n, "poisoned": poisoned, "source_s": made, "stages": stages, "disk_gib": disk}
    if cluster:
        record["cluster"] = measure_cluster(work / "params.yaml", out=work / "run", cluster=cluster,
                                            log=work / "cluster.log")
        c = record["cluster"]
        print(f"{n:>10,} cluster {cluster}: {c['wall_s']:.1f} s; stages {c['stages_s']}; processes "
              + ", ".join(f"{p['role']} {p['peak_rss_gib']:.2f} GiB" for p in c["processes"]), flush=True)
        shutil.rmtree(work / "run", ignore_errors=True)
    elif before and "cluster" in before:
        record["cluster"] = before["cluster"]
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000000,4000000,16000000")
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where each size's data goes (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="leave each size's data in --workdir")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "tail_scale.json"))
    ap.add_argument("-S", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="a params override after the benchmark's own (e.g. index.k=64)")
    ap.add_argument("--until", default=STAGES[-1], choices=STAGES, help="the last stage to run (default: report)")
    ap.add_argument("--cluster", default=None, metavar="local:N",
                    help="also run the whole pipeline as `clipscrub run --cluster local:N` per size: wall time per "
                    "stage, peak RSS per process")
    ap.add_argument("--from", dest="start", default=STAGES[0], choices=STAGES,
                    help="the first stage to run, on the data a --keep run left in --workdir (default: download)")
    args = ap.parse_args()
    from detector_scale import machine

    if args.start != STAGES[0] and not args.workdir:
        raise SystemExit("--from needs the --workdir of an earlier --keep run")
    base = Path(args.workdir or tempfile.mkdtemp(prefix="tail-scale-"))
    # with --from, the figures of the stages before it, and of sizes not rerun, are the earlier run's
    earlier = (json.loads(Path(args.out).read_text())["sizes"]
               if args.start != STAGES[0] and Path(args.out).is_file() else [])
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        work = base / f"n{n}"
        if args.start == STAGES[0]:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        before = next((r for r in earlier if r["samples"] == n), None)
        rows.append(measure_size(n, d=args.d, work=work, seed=args.seed, overrides=OVERRIDES + args.extra,
                                 until=args.until, start=args.start, before=before, cluster=args.cluster))
        if not args.keep:
            shutil.rmtree(work)
        Path(args.out).write_text(json.dumps({"machine": machine(), "d": args.d, "overrides": OVERRIDES + args.extra,
                                              "sizes": sorted(rows + [r for r in earlier if r["samples"] not in {x["samples"] for x in rows}],
                                                        key=lambda r: r["samples"])}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
