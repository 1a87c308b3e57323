"""The documentation's benchmark tables, generated from ``benchmarks/results/*.json``.

A table in ``docs/`` sits between two markers, and only this script writes what is between them:

    <!-- generated: sizing -->
    | dataset | workers | ...
    <!-- end generated -->

    python benchmarks/tables.py            # rewrite every generated table in docs/
    python benchmarks/tables.py --check    # exit 1, naming each table that differs from its JSON

``tests/test_docs.py`` runs the check, so a figure in the docs cannot drift from its measurement.
Only the standard library: the tests and the docs build import it without the benchmark's stack.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOCS = REPO / "docs"
BLOCK = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- end generated -->)", re.S)

# the attack matrix's reference settings (benchmarks/attack_matrix.py names them so in its JSON)
V02 = "v0.2 default: max_abs_z, no copies drawn once, vetting or caption set"
PAPER = "paper: raw m=2048, 1 draw"
DATASETS = {3.3e6: "CC3M (3.3M)", 12.4e6: "CC12M (12.4M)", 413e6: "LAION-400M (413M)"}
DETECTOR_NAMES = {"kdist": "kdist", "slof": "SLOF", "dao": "DAO", "lid": "LID", "iforest": "iforest",
                  "clip": "CLIP", "lof": "LOF"}


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _aurocs(auroc: dict[str, float]) -> str:
    return ", ".join(f"{DETECTOR_NAMES.get(k.split(' ')[0], k.split(' ')[0])} {v:.3f}" for k, v in auroc.items())


def _gb(x: float) -> str:
    return f"{x / 1000:.1f} TB" if x >= 1000 else f"{x:.0f} GB" if x >= 10 else f"{x:.1f} GB"


# ------------------------------------------------------------------ attack matrix
def attack_matrix_cells(doc: dict[str, Any] | None = None) -> str:
    """Every cell: the default's AUROC and what its cut removes, beside the paper's fixed 1%."""
    doc = doc or _load("attack_matrix")
    det = doc["summary"]["default_detector"]
    rows = []
    for c in doc["cells"] + doc["planted"]:
        d, rule = c["default"], c["default"]["rules"]["default"]
        v = c.get("victim", {})
        if c.get("clean"):
            label = "clean" if c["rate"] == 0 else f"clean + clusters {c['rate'] * 100:g}%"
            extra = f" ({rule['removed_in_clusters']} in clusters)" if c["rate"] > 0 else ""
            rows.append([label, "0", "-", "clean", "-", f"**{_pct(rule['removed_fraction'])}**{extra} / - / -",
                         "-", "-", "-"])
            continue
        asr = "-" if v.get("attack_success_rate") is None else f"{v['attack_success_rate']:.2f}"
        large = " (larger victim)" if "@large" in c["attack"] else ""
        rows.append([f"{c['attack'].replace('@large', '')} {c['rate'] * 100:g}%{large}",
                     str(c.get("poisoned", v.get("poisoned"))), asr, "yes" if c["counted"] else "no",
                     f"**{d['auroc']:.3f}**",
                     f"**{_pct(rule['removed_fraction'])} / {rule['recall']:.2f} / {rule['precision']:.2f}**",
                     f"{d['rules']['top 1%']['recall']:.2f}", f"{c['settings'][V02][det]['auroc']:.3f}",
                     f"{c['settings'][PAPER][det]['auroc']:.3f}"])
    return _table(["cell", "poisoned", "ASR", "counted", f"default {det} AUROC",
                   "default rule: removed / recall / precision", "top 1%: recall", "v0.2 default AUROC",
                   "paper setting AUROC"], rows)


def attack_matrix_settings(doc: dict[str, Any] | None = None) -> str:
    """The worst AUROC over the judged cells, per setting (the default without each of its parts)."""
    doc = doc or _load("attack_matrix")
    det = doc["summary"]["default_detector"]
    return _table(["setting", f"worst AUROC, counted + planted cells ({det})"],
                  [[label, "-" if worst[det] is None else f"{worst[det]:.3f}"]
                   for label, worst in doc["summary"]["worst_judged_auroc"].items()])


def attack_matrix_rules(doc: dict[str, Any] | None = None) -> str:
    """Each cut rule on the default's scores: worst recall and most removed, judged and clean cells."""
    doc = doc or _load("attack_matrix")
    judged = [c for c in doc["cells"] if c["counted"]] + doc["planted"]
    clean = [c for c in doc["cells"] if c.get("clean")]
    rows = []
    for label in doc["cells"][0]["default"]["rules"] if doc["cells"] else []:
        rec = min((c["default"]["rules"][label]["recall"] for c in judged), default=None)
        rem = max((c["default"]["rules"][label]["removed_fraction"] for c in judged), default=None)
        rem_clean = max((c["default"]["rules"][label]["removed_fraction"] for c in clean), default=None)
        rows.append([label, "-" if rec is None else f"{rec:.2f}", _pct(rem), _pct(rem_clean)])
    return _table(["rule", "worst recall, judged cells", "most removed, judged cells", "most removed, clean cells"],
                  rows)


# ------------------------------------------------------------------ 1M index + score
def detector_default() -> str:
    """The default reference sets at 1M against bare faiss on the same entries (detector_default.json)."""
    doc = _load("detector_default")
    d, f = doc["parts"]["default"], doc["parts"]["default_floor"]
    return _table(["part", "wall time", "peak RSS", "AUROC on the planted poison"], [
        [f"**default**: clipscrub index + score with `params.yaml`'s reference sets ({d['reference_entries']:,} "
         "entries searched per sample), copies drawn once and judged by caption, max_z fusion",
         f"{d['wall_s']:.1f} s (index {d['index_s']:.1f}, score {d['score_s']:.1f})", f"{d['peak_rss_gib']:.2f} GiB",
         _aurocs(d["auroc"])],
        ["**default floor**: bare faiss exact search of the same queries against the same draws' entries, and "
         "of the captions against the caption set's", f"{f['wall_s']:.1f} s", f"{f['peak_rss_gib']:.2f} GiB",
         _aurocs(f["auroc"])],
        ["default / floor", f"**{doc['default_over_floor']:.2f}**", "", ""],
    ])


def detectors_v01() -> str:
    """v0.1's rows (one reference size, L2-normalised embeddings; detectors.json)."""
    p = _load("detectors")["parts"]

    def timed(r: dict[str, Any]) -> str:
        return f"{r['wall_s']:.1f} s" + (f" (index {r['index_s']:.1f}, score {r['score_s']:.1f})" if "index_s" in r
                                         else "")

    labels = {
        "a": f"(a) clipscrub index + score, m = 16,384 ({p['a']['reference_entries']:,} entries), all six detectors",
        "b": f"(b) bare faiss exact search, same N x {p['a']['reference_entries']:,} entries (the floor)",
        "a_eq": "(a') clipscrub index + score, m = 2,048 (the reference size of c)",
        "c": "(c) the paper's within-batch torch scoring, batch 2,048, kdist + SLOF + DAO",
        "d": f"(d) scikit-learn LocalOutlierFactor (16 neighbours), {p['d']['samples']:,} subset "
             f"({p['d']['outliers_in_subset']} poisoned in it)",
        "all": f"whole dataset as reference (`mode: all`, modality image, {p['all']['search']} search, "
               f"recall@16 {p['all']['recall_at_k']:.3f})",
    }
    return _table(["part", "wall time", "peak RSS", "AUROC on the planted poison"],
                  [[label, timed(p[k]), f"{p[k]['peak_rss_gib']:.2f} GiB", _aurocs(p[k]["auroc"])]
                   for k, label in labels.items()])


# ------------------------------------------------------------------ cluster, sizing, embed, download
def cluster_scaling() -> str:
    """The stages that have pieces, single process against 1 and 2 Dask workers (cluster_scaling.json)."""
    doc = _load("cluster_scaling")
    c = doc["config"]
    names = {"index_score": f"index + score ({c['n'] / 1e6:g}M x {c['d']})",
             "embed": f"embed (demo, {c['embed_samples']:,}, random-weight victim; best of {c['embed_repeats']})"}
    pieces = {"index_score": f"{c['n'] // c['index_chunk_size'] + 1} + {c['n'] // c['index_chunk_size'] + 1}",
              "embed": str(c["embed_samples"] // c["shard_size"])}
    rows = []
    for key, label in names.items():
        s = doc["parts"][key]["summary"]
        rows.append([label, pieces[key], f"{s['wall_s']['single']:.2f} s", f"{s['wall_s']['w1']:.2f} s",
                     f"{s['wall_s']['w2']:.2f} s", f"**{s['speedup_w2_over_w1']:.2f}x** ({s['efficiency_w2']:.2f})",
                     f"{s['cpu_speedup_w2_over_w1']:.2f}x ({s['cpu_efficiency_w2']:.2f})",
                     f"{s['cpu_w2']['total']['amdahl_bound_2_workers']:.2f}x",
                     "yes" if s["outputs_identical_all_runs"] else "**no**"])
    return _table(["stage (size)", "pieces", "single (2 threads)", "1 worker", "2 workers", "wall 2 vs 1 (eff.)",
                   "CPU 2 vs 1 (eff.)", "Amdahl bound", "outputs identical"], rows)


def sizing() -> str:
    """What CC3M, CC12M and LAION-400M take on W workers, from measured per-piece costs (sizing.json)."""
    rows = [[DATASETS.get(r["samples"], f"{r['samples']:,.0f}"), str(r["workers"]), f"{r['embed_h']:.2f} h",
             f"{r['index_score_h']:.2f} h", _gb(r["embeddings_gb"]), _gb(r["index_gb"]),
             f"{_gb(r['largest_after_index_gb'])} ({r['largest_after_index_stage']})",
             f"{r['index_piece_ram_gb']:.2f} GB"] for r in _load("sizing")["rows"]]
    return _table(["dataset", "workers", "embed (GPU)", "index + score (1 core each)", "embeddings", "index",
                   "largest process after index", "index piece RAM"], rows)


def embed_floor() -> str:
    """The embed stage against decode + preprocess + the model's towers (embed_floor.json)."""
    runs = _load("embed_floor")["runs"]
    rows = []
    for run in (runs["vit_b_32"], runs["demo"]):
        ips, per = run["images_per_s"], run["stage_over_floor_per_repeat"]["stage_workers_0"]
        rows.append([f"{run['model']}, {run['model_input_px']} px, {run['samples']:,} images",
                     f"{ips['decode']:,.0f} img/s", f"{ips['preprocess']:,.0f} img/s", f"{ips['floor']:,.1f} img/s",
                     f"{ips['stage_workers_0']:,.1f} img/s",
                     f"**{run['stage_over_floor']['stage_workers_0']:.2f}** ({min(per):.2f}-{max(per):.2f})"])
    return _table(["model (input)", "read + decode", "+ preprocess", "floor", "embed stage",
                   "stage / floor (range over repeats)"], rows)


def download() -> str:
    """img2dataset alone against the urls source with the same options (download.json)."""
    doc = _load("download")
    n = doc["urls"]
    secs = {k: sorted(v) for k, v in doc["seconds"].items()}

    def cell(name: str, pick: Callable[[list[float]], float]) -> str:
        s = pick(secs[name])
        return f"{s:.1f} s ({n / s:.0f} images/s)"

    best, median = (lambda s: s[0]), (lambda s: s[len(s) // 2])
    return _table([f"run ({n:,} URLs)", f"best of {doc['options']['repeats']}",
                   f"median of {doc['options']['repeats']}"], [
        ["img2dataset alone", cell("img2dataset", best), cell("img2dataset", median)],
        ["clipscrub `urls` source (img2dataset + manifest)", cell("clipscrub", best), cell("clipscrub", median)],
        ["img2dataset / clipscrub, time", f"{doc['clipscrub_fraction_of_img2dataset']:.2f}",
         f"{doc['clipscrub_fraction_of_img2dataset_median']:.2f}"],
    ])


def tail_scale() -> str:
    """The stages after embed, each in its own process, at every size measured (tail_scale.json)."""
    doc = _load("tail_scale")
    sizes = doc["sizes"]
    stages = max((s["stages"] for s in sizes), key=len)  # a size may stop early (--until)
    rows = [[stage] + [f"{s['stages'][stage]['wall_s']:,.1f} s, {s['stages'][stage]['peak_rss_gib']:.2f} GiB"
                       if stage in s["stages"] else "not run" for s in sizes] for stage in stages]
    rows.append(["poison removed (evaluate)"] + [
        f"{s['stages']['evaluate']['applied']['poison_removed']} of {s['poisoned']} "
        f"({s['stages']['evaluate']['applied']['removed']:,} removed)" for s in sizes])
    rows.append(["data on disk"] + [f"{sum(s['disk_gib'].values()):.1f} GiB" for s in sizes])
    return _table(["stage (wall time, peak RSS)"] + [f"{s['samples']:,} samples" for s in sizes], rows)


def tail_scale_cluster() -> str:
    """The whole pipeline as ``clipscrub run --cluster``, at the sizes measured so (tail_scale.json):
    each stage's wall time as the flow waited for it (with its pieces), each process's peak RSS."""
    sizes = [s for s in _load("tail_scale")["sizes"] if "cluster" in s]
    if not sizes:
        return _table(["cluster run"], [["not measured"]])
    order = ("download", "train", "embed", "index", "score", "threshold", "filter", "evaluate", "report")
    stages = [st for st in order if any(st in s["cluster"]["stages_s"] for s in sizes)]

    def stage_cell(s: dict[str, Any], stage: str) -> str:
        c = s["cluster"]
        if stage not in c["stages_s"]:
            return "not run"
        pieces = c["pieces"].get(stage)
        return f"{c['stages_s'][stage]:,.1f} s" + (f" ({pieces} piece{'s' if pieces != 1 else ''})" if pieces else "")

    def processes(s: dict[str, Any], role: str) -> str:
        peaks = [p["peak_rss_gib"] for p in s["cluster"]["processes"] if p["role"] == role]
        return ", ".join(f"{g:.2f} GiB" for g in peaks) or "none"

    cluster = sizes[0]["cluster"]["cluster"]
    rows = [[f"{stage} (wall)"] + [stage_cell(s, stage) for s in sizes] for stage in stages]
    rows.append(["whole run (wall)"] + [f"{s['cluster']['wall_s']:,.1f} s" for s in sizes])
    rows.append(["driver, peak RSS"] + [processes(s, "driver") for s in sizes])
    rows.append(["workers, peak RSS each"] + [processes(s, "worker") for s in sizes])
    return _table([f"`--cluster {cluster}`"] + [f"{s['samples']:,} samples" for s in sizes], rows)


TABLES: dict[str, Callable[[], str]] = {
    "attack-matrix-cells": attack_matrix_cells, "attack-matrix-settings": attack_matrix_settings,
    "attack-matrix-rules": attack_matrix_rules, "detector-default": detector_default,
    "detectors-v01": detectors_v01, "cluster-scaling": cluster_scaling, "sizing": sizing,
    "embed-floor": embed_floor, "download": download, "tail-scale": tail_scale,
    "tail-scale-cluster": tail_scale_cluster,
}


def stale_tables(docs: Path = DOCS, *, write: bool = False) -> list[str]:
    """``page: table`` for every generated block of ``docs`` whose text differs from its JSON (and
    ``unknown table`` / ``missing`` lines for a marker no function makes or a table no page shows);
    with ``write``, rewrites the blocks and returns what it changed."""
    problems, seen = [], set()
    for page in sorted(docs.rglob("*.md")):
        text = page.read_text()

        def fill(m: re.Match) -> str:
            name = m.group(2)
            seen.add(name)
            if name not in TABLES:
                problems.append(f"{page.relative_to(docs)}: unknown table {name!r}")
                return m.group(0)
            table = TABLES[name]() + "\n"
            if m.group(3) != table:
                problems.append(f"{page.relative_to(docs)}: {name} differs from its JSON" + (" (rewritten)" if write else ""))
            return m.group(1) + table + m.group(4)

        new = BLOCK.sub(fill, text)
        if write and new != text:
            page.write_text(new)
    problems += [f"missing: no page shows table {name!r}" for name in TABLES if name not in seen]
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its JSON")
    ap.add_argument("--docs", type=Path, default=DOCS)
    args = ap.parse_args()
    problems = stale_tables(args.docs, write=not args.check)
    print("\n".join(problems) or "every generated table matches its JSON")
    errors = [p for p in problems if "unknown table" in p or p.startswith("missing")]
    sys.exit(1 if (problems if args.check else errors) else 0)


if __name__ == "__main__":
    main()
