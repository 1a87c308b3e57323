"""Sizing on paper: what cleaning CC3M, CC12M and LAION-400M takes on W workers, from the costs
the other benchmarks measured (no new measurement here).

Inputs (benchmarks/results/):
  cluster_scaling.json  index + score on 1M x 512 on a LocalCluster: CPU seconds of the pieces
                        (one thread each) and of the serial plan / assembly, at params.yaml's
                        reference sets (exact search costs N x entries x d, so a query's cost
                        scales with the reference entries it is compared with)
  embed_floor.json      ViT-B-32 at 224 px on this CPU (images/s of the floor)
  tail_scale.json       peak RSS of each stage after index, each in its own process, at 1M, 4M and
                        16M samples: per stage a fixed cost plus a cost per sample (a least-squares
                        line through the sizes measured), carried to each dataset's size
and one figure that is not ours, used only where no GPU was measured: the paper cleans CC3M
(3.3M pairs) in about 15 minutes on 4 A100s, embedding included, so >= 3.3M / (900 s x 4)
= 917 pairs/s per A100 end to end (``--gpu-pairs-per-s`` replaces it).

Storage and the index piece's memory are computed from the array shapes the stages write
(float32 embeddings, int32 + float32 neighbour lists).

    python benchmarks/sizing.py            # prints the markdown table, writes results/sizing.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DATASETS = {"CC3M": 3.3e6, "CC12M": 12.4e6, "LAION-400M": 413e6}
PAPER_PAIRS_PER_GPU_S = 3.3e6 / (15 * 60) / 4


def measured() -> dict[str, Any]:
    scaling = json.loads((RESULTS / "cluster_scaling.json").read_text())
    part = scaling["parts"]["index_score"]
    cfg = scaling["config"]
    w1 = part["summary"]["cpu_w1"]
    n, k, draws, sizes = cfg["n"], cfg["index_k"], cfg["draws"], cfg["reference_sizes"]
    entries_per_query = sum(2 * m for m in sizes) * draws  # image + caption entries of every draw
    floor = json.loads((RESULTS / "embed_floor.json").read_text())["runs"]["vit_b_32"]["images_per_s"]["floor"]
    return {
        "n": n, "d": cfg["d"], "k": k, "draws": draws, "sizes": sizes, "chunk_size": cfg["index_chunk_size"],
        "detectors": len(cfg["detectors"]), "entries_per_query": entries_per_query,
        "index_piece_cpu_s_per_query": w1["index"]["pieces_cpu_s"] / n,
        "score_piece_cpu_s_per_query": w1["score"]["pieces_cpu_s"] / n,
        "serial_cpu_s_per_query": w1["total"]["serial_cpu_s"] / n,
        "vit_b_32_cpu_pairs_per_s": floor,
        "tail": tail_memory(),
    }


AFTER_INDEX = ("score", "threshold", "filter", "evaluate", "report")


def tail_memory() -> dict[str, dict[str, Any]]:
    """Per stage after index: ``fixed_gib`` + ``per_sample_b`` x N, the least-squares line through
    its peak RSS at the sizes tail_scale.json measured it (two at least), and those sizes."""
    sizes = json.loads((RESULTS / "tail_scale.json").read_text())["sizes"]
    fits = {}
    for stage in AFTER_INDEX:
        points = [(r["samples"], r["stages"][stage]["peak_rss_gib"]) for r in sizes if stage in r["stages"]]
        if len(points) < 2:
            continue
        n, gib = zip(*points)
        slope, fixed = np.polyfit(np.array(n, dtype=np.float64), np.array(gib), 1)
        fits[stage] = {"fixed_gib": float(fixed), "per_sample_b": float(max(slope, 0.0)) * 2**30, "sizes": list(n)}
    return fits


def largest_after_index(samples: float, fits: dict[str, dict[str, Any]]) -> tuple[str, float]:
    """The stage after index whose single process the fitted lines put highest at ``samples``,
    and that peak in GB."""
    peaks = {stage: (f["fixed_gib"] * 2**30 + f["per_sample_b"] * samples) / 1e9 for stage, f in fits.items()}
    stage = max(peaks, key=peaks.get)
    return stage, peaks[stage]


def size(samples: float, workers: int, m: dict[str, Any], gpu_rate: float) -> dict[str, Any]:
    sets = len(m["sizes"])
    embed_h = samples / (gpu_rate * workers) / 3600
    pieces_h = samples * (m["index_piece_cpu_s_per_query"] + m["score_piece_cpu_s_per_query"]) / workers / 3600
    serial_h = samples * m["serial_cpu_s_per_query"] / 3600
    return {
        "samples": samples, "workers": workers,
        "embed_h": embed_h,  # GPU workers, at the (assumed) per-GPU rate
        "index_score_h": pieces_h + serial_h,  # one CPU core per worker, exact search, as measured
        "embeddings_gb": samples * 2 * m["d"] * 4 / 1e9,
        "index_gb": samples * sets * m["draws"] * m["k"] * 8 / 1e9,  # int32 entry + float32 distance
        # the largest single process after index (score's reduce, threshold, filter, evaluate, report)
        **dict(zip(("largest_after_index_stage", "largest_after_index_gb"), largest_after_index(samples, m["tail"]))),
        # an index piece: its queries, one draw's entries, its (chunk, k) results for every draw
        "index_piece_ram_gb": (m["chunk_size"] * m["d"] * 4 * 2 + max(m["sizes"]) * 2 * m["d"] * 4
                               + m["chunk_size"] * m["k"] * 8 * m["draws"] * sets) / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu-pairs-per-s", type=float, default=PAPER_PAIRS_PER_GPU_S)
    ap.add_argument("--workers", default="1,4,8,32")
    args = ap.parse_args()
    m = measured()
    rows = [size(n, int(w), m, args.gpu_pairs_per_s) for n in DATASETS.values() for w in args.workers.split(",")]
    names = {v: k for k, v in DATASETS.items()}
    print(f"measured: index pieces {m['index_piece_cpu_s_per_query'] * 1e6:.0f} CPU-us/query against "
          f"{m['entries_per_query']:,} reference entries (k={m['k']}), score pieces "
          f"{m['score_piece_cpu_s_per_query'] * 1e6:.0f} CPU-us/query, serial {m['serial_cpu_s_per_query'] * 1e6:.0f} "
          f"CPU-us/query; embed at {args.gpu_pairs_per_s:.0f} pairs/s per GPU (assumed); ViT-B-32 on this CPU "
          f"{m['vit_b_32_cpu_pairs_per_s']:.1f} pairs/s")
    for stage, f in m["tail"].items():
        print(f"{stage}: {f['fixed_gib']:.2f} GiB + {f['per_sample_b']:.1f} B per sample (peak RSS at "
              f"{', '.join(f'{n / 1e6:g}M' for n in f['sizes'])})")
    print("| dataset | workers | embed (GPU) | index + score (1 core each) | embeddings | index | largest process after "
          "index | index piece RAM |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {names[r['samples']]} | {r['workers']} | {r['embed_h']:.2f} h | {r['index_score_h']:.2f} h "
              f"| {r['embeddings_gb']:.0f} GB | {r['index_gb']:.0f} GB | {r['largest_after_index_gb']:.1f} GB "
              f"({r['largest_after_index_stage']}) | {r['index_piece_ram_gb']:.2f} GB |")
    (RESULTS / "sizing.json").write_text(json.dumps({"measured": m, "gpu_pairs_per_s": args.gpu_pairs_per_s,
                                                      "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
