"""Download throughput: clipscrub's ``urls`` source against plain img2dataset on the same list.

A loopback HTTP server (its own process) serves N distinct URLs over a pool of JPEGs larger than
the target size, so both runs fetch, decode, resize and re-encode every image. The two runs
alternate ``--repeats`` times with the same img2dataset options; the figures kept are each one's
best (least disturbed) run and its median. Target (issue 4): clipscrub keeps >= 90% of img2dataset's throughput.

    python benchmarks/download_throughput.py            # 10,000 URLs, writes benchmarks/results/download.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _serve(pool_size: int, ready, stop) -> None:
    from tests.imageserver import ImageServer, image_bytes

    rng_colours = [((37 * i) % 256, (91 * i) % 256, (151 * i) % 256) for i in range(pool_size)]
    routes = {f"/img{i}.jpg": ("image/jpeg", image_bytes("JPEG", size=(400, 300), colour=c)) for i, c in enumerate(rng_colours)}
    with ImageServer(routes) as srv:
        ready.put(srv.base_url)
        stop.wait()


def _options(args) -> dict:
    """The img2dataset options the clipscrub run uses, from the same params."""
    return dict(processes_count=args.processes, thread_count=args.threads, timeout=10, retries=0,
                number_sample_per_shard=1000, image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=True,
                encode_format="jpg", encode_quality=95, min_image_size=0, max_aspect_ratio=float("inf"),
                max_image_area=float("inf"), user_agent_token=None,
                disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"])


def run_img2dataset(url_list: Path, out: Path, args) -> float:
    from img2dataset import download

    t = time.perf_counter()
    download(url_list=str(url_list), input_format="parquet", url_col="url", caption_col="caption",
             output_folder=str(out), output_format="webdataset", compute_hash="sha256", enable_wandb=False,
             distributor="multiprocessing", **_options(args))
    return time.perf_counter() - t


def run_clipscrub(url_list: Path, out: Path, args) -> tuple[float, dict]:
    from clipscrub.params import parse_params
    from clipscrub.stages.download import download_dataset

    params = parse_params({"train": {"enabled": False}, "download": {
        "source": "urls", "shard_size": 1000,
        "urls": {"path": str(url_list), "processes": args.processes, "threads": args.threads, "timeout": 10.0,
                 "image_size": 256, "resize_mode": "keep_ratio"}}})
    t = time.perf_counter()
    summary = download_dataset(out_dir=out, settings=params.download, base=params.base)
    return time.perf_counter() - t, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--urls", type=int, default=10_000)
    ap.add_argument("--pool", type=int, default=200, help="distinct images served")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "download.json")
    args = ap.parse_args()

    import polars as pl

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(args.pool, ready, stop), daemon=True)
    server.start()
    base = ready.get(timeout=60)
    work = Path(tempfile.mkdtemp(prefix="clipscrub-bench-download-"))
    try:
        url_list = work / "urls.parquet"
        pl.DataFrame({"url": [f"{base}/img{i % args.pool}.jpg?n={i}" for i in range(args.urls)],
                      "caption": [f"picture number {i}" for i in range(args.urls)]}).write_parquet(url_list)
        runs: dict[str, list[float]] = {"img2dataset": [], "clipscrub": []}
        summary = {}
        for r in range(args.repeats):
            out = work / f"plain-{r}"
            runs["img2dataset"].append(run_img2dataset(url_list, out, args))
            ok_plain = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
            shutil.rmtree(out)
            seconds, summary = run_clipscrub(url_list, work / f"clipscrub-{r}", args)
            runs["clipscrub"].append(seconds)
            shutil.rmtree(work / f"clipscrub-{r}")
            print(f"repeat {r}: img2dataset {runs['img2dataset'][-1]:.1f} s ({ok_plain} ok), "
                  f"clipscrub {seconds:.1f} s ({summary['ok']} ok)", flush=True)
    finally:
        stop.set()
        server.join(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    import statistics

    best = {k: min(v) for k, v in runs.items()}
    median = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "benchmark": "download_throughput",
        "urls": args.urls,
        "ok": summary.get("ok"),
        "options": {"processes": args.processes, "threads": args.threads, "image_size": 256, "resize_mode": "keep_ratio",
                    "served_image": "400x300 JPEG", "repeats": args.repeats},
        "seconds": runs,
        "images_per_second": {k: round(args.urls / v, 1) for k, v in best.items()},
        "images_per_second_median": {k: round(args.urls / v, 1) for k, v in median.items()},
        "clipscrub_fraction_of_img2dataset": round(best["img2dataset"] / best["clipscrub"], 3),
        "clipscrub_fraction_of_img2dataset_median": round(median["img2dataset"] / median["clipscrub"], 3),
        "target_fraction": 0.9,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
    }
    result["meets_target"] = result["clipscrub_fraction_of_img2dataset"] >= 0.9
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
