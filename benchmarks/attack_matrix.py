"""The attack matrix: every attack x poison rate, a victim CLIP trained on each, every detector.

Phase ``victims``: per cell (attack, rate), the pipeline's own stages build the poisoned dataset
(``download``, synthetic source), train a victim (``train``: a real open_clip model trained on
the poisoned shards, whose zero-shot accuracy and attack success rate it measures) and embed
the dataset with it (``embed``: the model's raw outputs). Cells are cached under ``--cache``,
so the phase resumes where it stopped; it is the expensive part (about 3 min a cell on 2 CPU
cores).

Phase ``detect``: per cell, every detector under every reference setting in ``SETTINGS``
(reference sizes, draws, raw or L2-normalised embeddings, fusion across sizes), computed with
the library functions the index and score stages call; and the default ``params.yaml`` setting
run through the real stages (index, score, threshold, evaluate), whose AUROC, PR-AUC and recall
at the default threshold the README table shows. A cell whose backdoor was not learned (attack
success rate < 0.5) is reported but not counted.

    python benchmarks/attack_matrix.py                         # both phases, hours on 2 CPU cores
    python benchmarks/attack_matrix.py --phase detect          # re-score the cached victims
    python benchmarks/attack_matrix.py --attacks blend,sig --rates 0.02
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from clipscrub.params import Params, apply_overrides, load_params, parse_params, read_params_file  # noqa: E402
from flows.pipeline import Layout, run_stage  # noqa: E402

RATES = (0.001, 0.005, 0.02)
# the attack of each cell: a list of download.synthetic.attacks entries, {rate} filled in
ATTACKS: dict[str, list[dict]] = {
    "badnets": [{"kind": "badnets", "target": "banana", "patch_size": 8}],
    "clean_label": [{"kind": "clean_label", "target": "star", "patch_size": 8}],
    "blend": [{"kind": "blend", "target": "banana", "alpha": 0.2}],
    "sig": [{"kind": "sig", "target": "banana", "delta": 20.0, "frequency": 6.0}],
    "wanet": [{"kind": "wanet", "target": "banana", "strength": 1.0, "grid": 4}],
    "nashville": [{"kind": "nashville", "target": "banana"}],
    "targeted": [{"kind": "targeted", "target": "banana", "images": 1}],
    # three triggers, three targets, each at the cell's rate
    "multi": [{"kind": "badnets", "target": "banana", "patch_size": 8},
              {"kind": "blend", "target": "kite", "alpha": 0.2},
              {"kind": "sig", "target": "apple", "delta": 20.0, "frequency": 6.0}],
}
MIN_ASR = 0.5


def cell_params(attack: str, rate: float, *, base_params: Path, seed: int) -> Params:
    data = apply_overrides(read_params_file(base_params), [])
    data["base"]["seed"] = seed
    data["base"]["name"] = f"{attack}-{rate}"
    data["download"]["source"] = "synthetic"
    data["download"]["synthetic"]["attacks"] = [dict(a, rate=rate) for a in ATTACKS[attack]]
    data["train"]["enabled"] = True
    return parse_params(data)


def cell_dir(cache: Path, attack: str, rate: float) -> Path:
    return cache / f"{attack}-{rate:g}"


def build_victim(attack: str, rate: float, *, cache: Path, base_params: Path, seed: int) -> dict:
    """download + train + embed one cell (skipped when its embeddings exist)."""
    root = cell_dir(cache, attack, rate)
    lay = Layout(root)
    done = root / "victim.json"
    if done.is_file():
        return json.loads(done.read_text())
    params = cell_params(attack, rate, base_params=base_params, seed=seed)
    t0 = time.perf_counter()
    times = {}
    for stage in ("download", "train", "embed"):
        t = time.perf_counter()
        run_stage(stage, params, root)
        times[stage] = round(time.perf_counter() - t, 1)
    train = json.loads(lay.train_metrics.read_text())
    record = {
        "attack": attack, "rate": rate, "attacks": [a.model_dump(mode="json") for a in params.download.synthetic.attacks],
        "samples": params.download.synthetic.num_samples,
        "poisoned": int(sum(round(a.rate * params.download.synthetic.num_samples) for a in params.download.synthetic.attacks)),
        "zero_shot_accuracy": train["zero_shot_accuracy"],
        "attack_success_rate": train["attack_success_rate"],
        "attack_success_rates": train["attack_success_rates"],
        "seconds": times, "total_seconds": round(time.perf_counter() - t0, 1),
    }
    done.write_text(json.dumps(record, indent=2))
    return record


# ------------------------------------------------------------------------------- detect
DENSITY = ("kdist", "slof", "dao", "lid")
# (label, normalize, sizes, draws, fusion): every single size, raw and normalised, and the fusions
SINGLE_SIZES = (128, 256, 512, 1024, 2048, 4096)


def settings_grid(default: Params) -> list[dict]:
    ref = default.index.reference
    grid = [{"label": f"{'unit' if norm else 'raw'} m={m}", "normalize": norm, "sizes": [m], "draws": 2, "fusion": None}
            for norm in (False, True) for m in SINGLE_SIZES]
    grid.append({"label": "paper: raw m=2048, 1 draw", "normalize": False, "sizes": [2048], "draws": 1, "fusion": None})
    grid.append({"label": "v0.1 default: unit m=750, 4 draws", "normalize": True, "sizes": [750], "draws": 4,
                 "fusion": None})
    for norm in (False, True):
        for sizes in ([128, 512, 2048], [256, 1024, 4096], [128, 256, 512, 1024, 2048, 4096]):
            for fusion in ("max_z", "max_abs_z", "mean_z"):
                grid.append({"label": f"{'unit' if norm else 'raw'} m={sizes} {fusion}", "normalize": norm,
                             "sizes": sizes, "draws": 2, "fusion": fusion})
    grid.append({"label": "default", "normalize": default.index.normalize, "sizes": list(ref.sizes), "draws": ref.draws,
                 "fusion": default.score.fusion})
    return grid


def grid_scores(*, image: np.ndarray, text: np.ndarray, y: np.ndarray, params: Params) -> dict:
    """AUROC and PR-AUC of every density detector under every setting of ``settings_grid``,
    with the library functions the index and score stages call. image, text (N, d); y (N,)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from clipscrub.detectors import fuse_scores, suspicion
    from clipscrub.neighbours import reference_sets, search_draw
    from stages.score import set_scores

    raw = {"image": image, "text": text}
    unit = {k: v / np.linalg.norm(v, axis=1, keepdims=True) for k, v in raw.items()}
    k, lid_k = params.score.k, params.score.lid_k
    n = len(y)
    cache_sets: dict[tuple, dict[str, np.ndarray]] = {}

    def per_size(norm: bool, m: int, draws: int) -> dict[str, np.ndarray]:
        key = (norm, min(m, n), draws)
        if key not in cache_sets:
            emb = unit if norm else raw
            (rs,) = reference_sets(n=n, mode="random", sizes=[m], draws=draws, seed=params.base.seed)
            per_draw = []
            for r, rows in enumerate(rs.rows):
                found = search_draw(image=emb["image"], text=emb["text"], rows=rows, modality=params.index.modality,
                                    mode="random", k=max(k, lid_k), search=params.index.search,
                                    seed=params.base.seed + r)
                per_draw.append({"neighbours": found.queries.entries[None], "distances": found.queries.distances[None],
                                 "ref_distances": found.references.distances[None]})
            arrays = {a: np.concatenate([d[a] for d in per_draw]) for a in per_draw[0]}
            cache_sets[key] = set_scores(arrays, k=k, lid_k=lid_k)
        return cache_sets[key]

    def quality(values: np.ndarray, det: str) -> dict:
        s = suspicion(values, det)
        s = np.where(np.isfinite(s), s, np.nanmax(s[np.isfinite(s)]) + 1)
        return {"auroc": round(float(roc_auc_score(y, s)), 4), "pr_auc": round(float(average_precision_score(y, s)), 4)}

    out = {}
    for g in settings_grid(params):
        per = [per_size(g["normalize"], m, g["draws"]) for m in g["sizes"]]
        out[g["label"]] = {det: quality(fuse_scores([p[det] for p in per], g["fusion"] or "max_z"), det)
                           for det in DENSITY}
    return out


PLANTED_N, PLANTED_D = 20_000, 256


def detect_planted(rate: float, *, cache: Path, params: Params) -> dict:
    """A cell without a victim: CLIP-like embeddings in which the poison is planted as one
    tight cluster next to its target caption (benchmarks/detector_scale.py's generator), the
    extreme case of a learned trigger, where poison looks dense to a large reference set."""
    from benchmarks.detector_scale import make_embeddings

    root = cache / f"planted-{rate:g}"
    root.mkdir(parents=True, exist_ok=True)
    outliers = int(round(rate * PLANTED_N))
    if not (root / "labels.npy").is_file():
        make_embeddings(root, n=PLANTED_N, d=PLANTED_D, outliers=outliers, seed=params.base.seed)
    y = np.load(root / "labels.npy").astype(bool)
    settings = grid_scores(image=np.load(root / "image.npy"), text=np.load(root / "text.npy"), y=y, params=params)
    return {"attack": "planted", "rate": rate, "samples": PLANTED_N, "poisoned": outliers, "settings": settings}


def remeasure_victim(attack: str, rate: float, *, cache: Path, params: Params, base_params: Path) -> dict:
    """The victim's zero-shot accuracy and attack success rates measured now, from its checkpoint,
    with the train stage's own measurement (``stages.train.measure_victim``)."""
    import torch

    from clipscrub.model import load_model
    from stages.train import measure_victim

    root = cell_dir(cache, attack, rate)
    cell = cell_params(attack, rate, base_params=base_params, seed=params.base.seed)
    torch.set_num_threads(cell.train.threads)
    loaded = load_model(model_name=cell.train.model_name, pretrained=None, checkpoint=str(root / "model" / "checkpoint.pt"),
                        model_config=str(root / "model" / "model_config.json"), device="cpu")
    acc, per_attack = measure_victim(loaded.model, loaded.tokenizer, loaded.preprocess, download=cell.download,
                                     base=cell.base, heldout=cell.train.heldout_samples, device=loaded.device)
    return {"zero_shot_accuracy": acc, "attack_success_rates": per_attack,
            "attack_success_rate": round(float(np.mean(list(per_attack.values()))), 4)}


def detect_cell(attack: str, rate: float, *, cache: Path, params: Params, base_params: Path) -> dict:
    """Every setting of ``settings_grid`` on one cell's victim embeddings, plus the default
    params run through the index, score, threshold and evaluate stages."""
    import shutil

    import polars as pl

    root = cell_dir(cache, attack, rate)
    victim = dict(json.loads((root / "victim.json").read_text()), **remeasure_victim(attack, rate, cache=cache, params=params,
                                                                                  base_params=base_params))
    ids = np.load(root / "embeddings" / "ids.npy")
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    y = manifest.select("id", "is_poison").join(pl.DataFrame({"id": ids}), on="id", how="right")["is_poison"].to_numpy()
    y = y.astype(bool)
    settings = grid_scores(image=np.load(root / "embeddings" / "image.npy").astype(np.float32),
                           text=np.load(root / "embeddings" / "text.npy").astype(np.float32), y=y, params=params)

    # the default, through the real stages on the cell's data (threshold and evaluate included)
    tmp = Path(tempfile.mkdtemp(prefix="matrix-"))
    try:
        for name in ("raw", "embeddings"):
            (tmp / name).symlink_to((root / name).resolve())
        t = time.perf_counter()
        for stage in ("index", "score", "threshold", "evaluate"):
            run_stage(stage, params, tmp)
        stage_seconds = round(time.perf_counter() - t, 1)
        metrics = json.loads((tmp / "metrics" / "detection.json").read_text())
        scores = pl.read_parquet(tmp / "scores" / "scores.parquet")
        rules = {}
        from stages.threshold import flag_outliers

        det = params.threshold.detector
        values = scores[f"{det}_score"].to_numpy()
        for label, rule in (("top 1%", {"method": "top_fraction", "fraction": 0.01}),
                            ("top 2%", {"method": "top_fraction", "fraction": 0.02}),
                            ("top 5%", {"method": "top_fraction", "fraction": 0.05}),
                            ("auto z 3.5", {"method": "auto", "auto_z": 3.5})):
            flagged, _ = flag_outliers(values=values, ids=scores["id"].to_numpy(), detector=det,
                                       settings=params.threshold.model_copy(update=rule))
            tp = int((flagged & y).sum())
            rules[label] = {"flagged": int(flagged.sum()), "precision": round(tp / max(1, flagged.sum()), 4),
                            "recall": round(tp / y.sum(), 4)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counted = victim["attack_success_rate"] is not None and victim["attack_success_rate"] >= MIN_ASR
    return {
        "attack": attack, "rate": rate, "victim": victim, "counted": bool(counted),
        "settings": settings,
        "default": {"detector": params.threshold.detector, "rule": f"{params.threshold.method}",
                    "stages": metrics["detectors"], "rules": rules, "index_score_seconds": stage_seconds},
    }


def write_results(results: list[dict], *, out: Path, params: Params, args, planted: list[dict]) -> None:
    default_label = "default"
    det = params.threshold.detector
    counted = [r for r in results if r["counted"]]
    summary = {
        "default_detector": det,
        "counted_cells": len(counted),
        "cells": len(results),
        "default_min_auroc_counted": min((r["settings"][default_label][det]["auroc"] for r in counted), default=None),
        "cells_below_0.95": [f"{r['attack']} {r['rate']:g}" for r in counted
                             if r["settings"][default_label][det]["auroc"] < 0.95],
    }
    # every setting's worst counted cell, per detector: what "works everywhere" means
    labels = list(results[0]["settings"]) if results else []
    summary["worst_counted_auroc"] = {
        lab: {d: min((r["settings"][lab][d]["auroc"] for r in counted), default=None) for d in DENSITY} for lab in labels
    }
    # the planted clusters count too: a trigger the victim collapsed as tightly as it can be
    summary["worst_counted_and_planted_auroc"] = {
        lab: {d: min((r["settings"][lab][d]["auroc"] for r in counted + planted), default=None) for d in DENSITY}
        for lab in labels
    }
    summary["default_min_auroc_planted"] = min((r["settings"][default_label][det]["auroc"] for r in planted),
                                               default=None)
    doc = {
        "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "params": {"index": params.index.model_dump(mode="json"), "score": params.score.model_dump(mode="json"),
                   "threshold": params.threshold.model_dump(mode="json")},
        "min_asr": MIN_ASR,
        "summary": summary,
        "cells": results,
        "planted": planted,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")


def markdown_table(doc: dict) -> str:
    det = doc["summary"]["default_detector"]
    lines = [f"| attack | rate | poisoned | ASR | zero-shot acc | counted | default AUROC {det} / SLOF / DAO / LID | "
             f"{det} PR-AUC | {det} recall / precision at the default threshold | paper setting AUROC kdist / SLOF / DAO | "
             "v0.1 default kdist AUROC |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in doc["cells"]:
        st = c["default"]["stages"]
        paper = c["settings"]["paper: raw m=2048, 1 draw"]
        old = c["settings"]["v0.1 default: unit m=750, 4 draws"]
        lines.append(
            f"| {c['attack']} | {c['rate'] * 100:g}% | {c['victim']['poisoned']} | {c['victim']['attack_success_rate']:.2f} | "
            f"{c['victim']['zero_shot_accuracy']:.2f} | {'yes' if c['counted'] else 'no'} | "
            f"**{st[det]['auroc']:.3f}** / {st['slof']['auroc']:.3f} / {st['dao']['auroc']:.3f} / {st['lid']['auroc']:.3f} | "
            f"{st[det]['pr_auc']:.3f} | {st[det]['recall_at_threshold']:.2f} / {st[det]['precision_at_threshold']:.2f} | "
            f"{paper['kdist']['auroc']:.3f} / {paper['slof']['auroc']:.3f} / {paper['dao']['auroc']:.3f} | "
            f"{old['kdist']['auroc']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=("victims", "detect", "all"), default="all")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--rates", default=",".join(f"{r:g}" for r in RATES))
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml", help="the base params (default: the repo's)")
    ap.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache" / "attack_matrix")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "attack_matrix.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", action="store_true", help="print the README table of --out")
    args = ap.parse_args()
    attacks = [a for a in args.attacks.split(",") if a]
    rates = [float(r) for r in args.rates.split(",") if r]
    cells = [(a, r) for r in rates for a in attacks]
    if args.phase in ("victims", "all"):
        for a, r in cells:
            rec = build_victim(a, r, cache=args.cache, base_params=args.params, seed=args.seed)
            print(f"victim {a} {r:g}: ASR {rec['attack_success_rate']} acc {rec['zero_shot_accuracy']} "
                  f"({rec['total_seconds']} s)", flush=True)
    if args.phase in ("detect", "all"):
        results = []
        for a, r in cells:
            if not (cell_dir(args.cache, a, r) / "victim.json").is_file():
                print(f"detect {a} {r:g}: no victim yet, skipped", flush=True)
                continue
            t = time.perf_counter()
            res = detect_cell(a, r, cache=args.cache, params=load_params(args.params), base_params=args.params)
            results.append(res)
            d = res["default"]["stages"][res["default"]["detector"]]
            print(f"detect {a} {r:g}: ASR {res['victim']['attack_success_rate']} counted {res['counted']} "
                  f"default AUROC {d['auroc']:.4f} recall {d['recall_at_threshold']:.3f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
        planted = []
        for r in rates:
            res = detect_planted(r, cache=args.cache, params=load_params(args.params))
            planted.append(res)
            print(f"planted {r:g}: default kdist AUROC {res['settings']['default']['kdist']['auroc']:.4f}", flush=True)
        write_results(results, out=args.out, params=load_params(args.params), args=args, planted=planted)
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))


if __name__ == "__main__":
    main()
