"""The attack matrix: every attack x poison rate, a victim CLIP trained on each, every detector.

Phase ``victims``: per cell (attack, rate), the pipeline's own stages build the poisoned dataset
(``download``, synthetic source), train a victim (``train``: a real open_clip model trained on
the poisoned shards, whose zero-shot accuracy and attack success rate it measures) and embed
the dataset with it (``embed``: the model's raw outputs). Cells are cached under ``--cache``,
so the phase resumes where it stopped; it is the expensive part (about 3 min a cell on 2 CPU
cores). Clean cells (``clean``, no poison; at rates 1-5%: that share of the set in natural
clusters, clean near-duplicates sharing a caption) judge what the default removes from data
with nothing to find; ``<attack>@large`` trains a larger victim (``LARGE``).

Phase ``detect``: per cell, every density detector under the reference settings of
``settings_grid`` (the default, the default without each of its parts, v0.2's default, the
paper's single batch, single sizes), computed with the library functions the index and score
stages call; and the default ``params.yaml`` run through the real index, score and threshold
stages, with every cut rule of ``rule_grid`` applied to its scores (removed fraction, recall,
precision). A cell whose backdoor was not learned (attack success rate < 0.5) is reported but
not counted. Three planted cells (no victim) place the poison as one tight cluster.

    python benchmarks/attack_matrix.py                         # both phases, hours on 2 CPU cores
    python benchmarks/attack_matrix.py --phase detect          # re-score the cached victims
    python benchmarks/attack_matrix.py --attacks blend,sig --rates 0.02
    python benchmarks/attack_matrix.py --phase victims --attacks nashville@large --rates 0.02
    python benchmarks/attack_matrix.py --table                 # the docs' tables from --out (benchmarks/tables.py)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from clipscrub.params import Params, apply_overrides, load_params, parse_params, read_params_file  # noqa: E402
from clipscrub.flows.pipeline import Layout, run_stage  # noqa: E402
from tables import PAPER, V02, attack_matrix_cells, attack_matrix_rules, attack_matrix_settings  # noqa: E402

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
# clean cells (no poison): the rate is the share of the set in natural dense clusters, near-duplicates
# of one image sharing its caption, one cluster per entry (clean web data is full of them)
CLEAN: dict[float, list[float]] = {0.0: [], 0.01: [0.01], 0.03: [0.01, 0.02], 0.05: [0.02, 0.03]}
CLEAN_RATES = tuple(CLEAN)


# ``<attack>@large``: the same cell with a larger victim, trained on twice the pairs for longer,
# which learns triggers the default victim does not (more cells count)
LARGE = {"download.synthetic.num_samples": 12_000, "train.epochs": 15}


def cell_params(attack: str, rate: float, *, base_params: Path, seed: int) -> Params:
    data = apply_overrides(read_params_file(base_params), [])
    attack, _, size = attack.partition("@")
    data["base"]["seed"] = seed
    data["base"]["name"] = f"{attack}-{rate}"
    data["download"]["source"] = "synthetic"
    if size == "large":
        data = apply_overrides(data, [f"{k}={v}" for k, v in LARGE.items()])
    elif size:
        raise SystemExit(f"unknown victim size {size!r} (only 'large')")
    if attack == "clean":
        data["download"]["synthetic"]["attacks"] = []
        data["download"]["synthetic"]["clusters"] = [{"rate": r} for r in CLEAN[rate]]
    else:
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


def settings_grid() -> list[tuple[str, list[str]]]:
    """The settings compared per cell, as overrides of the default params: the default without
    each of its parts, v0.2's default and the paper's single batch."""
    return [
        ("default, copies not drawn once (radius 0)", ["index.reference.duplicate_radius=0"]),
        ("default, copies not vetted", ["score.vet_copies=false"]),
        ("default, no caption set", ["index.reference.caption_set=false"]),
        (V02, ["index.reference.duplicate_radius=0", "score.vet_copies=false", "index.reference.caption_set=false",
               "score.fusion=max_abs_z"]),
        (PAPER, ["index.reference.sizes=[2048]", "index.reference.draws=1", "index.reference.duplicate_radius=0"]),
    ]


def stage_scores(emb: Path, params: Params) -> Any:
    """scores.parquet of the index and score stage functions on the embeddings in ``emb``."""
    import shutil

    import polars as pl

    from clipscrub.stages.index import build_index
    from clipscrub.stages.score import score_samples

    tmp = Path(tempfile.mkdtemp(prefix="matrix-"))
    try:
        build_index(embeddings_dir=emb, out_dir=tmp / "index", settings=params.index, base=params.base)
        score_samples(embeddings_dir=emb, index_dir=tmp / "index", out_dir=tmp / "scores", settings=params.score,
                      index=params.index, base=params.base)
        return pl.read_parquet(tmp / "scores" / "scores.parquet")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quality(values: np.ndarray, y: np.ndarray, det: str) -> dict:
    """AUROC and PR-AUC of one detector's scores (N,) against y (N,), non-finite most suspicious."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from clipscrub.detectors import suspicion

    if y.all() or not y.any():
        return {"auroc": None, "pr_auc": None}
    s = suspicion(values, det)
    s = np.where(np.isfinite(s), s, np.nanmax(s[np.isfinite(s)]) + 1)
    return {"auroc": round(float(roc_auc_score(y, s)), 4), "pr_auc": round(float(average_precision_score(y, s)), 4)}


def grid_scores(*, emb: Path, y: np.ndarray, params: Params, base_params: Path) -> dict:
    """AUROC and PR-AUC of every density detector under every setting of ``settings_grid``, through
    the stage functions. y (N,)."""
    out = {}
    for label, overrides in settings_grid():
        p = parse_params(apply_overrides(read_params_file(base_params), overrides))
        scores = stage_scores(emb, p)
        out[label] = {det: quality(scores[f"{det}_score"].to_numpy(), y, det) for det in DENSITY}
    return out


def rule_grid(params: Params) -> list[tuple[str, dict]]:
    """The cut rules compared on the default's scores: the default first, then the paper's fixed
    fractions, the robust z-score, and the tail rule at other false-discovery shares."""
    return [("default", {}), ("top 1%", {"method": "top_fraction", "fraction": 0.01}),
            ("top 5%", {"method": "top_fraction", "fraction": 0.05}), ("auto z 3.5", {"method": "auto", "auto_z": 3.5})
            ] + [(f"tail fdr {q:g}", {"method": "tail", "tail_fdr": q}) for q in (0.05, 0.1, 0.2, 0.3)]


def apply_rules(*, values: np.ndarray, ids: np.ndarray, y: np.ndarray, params: Params,
                clusters: np.ndarray | None = None) -> dict:
    """Each rule of ``rule_grid`` on the scores (N,): removed fraction, recall and precision
    against y (N,), and how many removed samples lie in the natural clusters (rows (C,))."""
    from clipscrub.stages.threshold import flag_outliers

    det = params.threshold.detector
    out = {}
    for label, update in rule_grid(params):
        flagged, cut = flag_outliers(values=values, ids=ids, detector=det,
                                     settings=params.threshold.model_copy(update=update))
        flagged = flagged | ~np.isfinite(values)
        tp = int((flagged & y).sum())
        row = {"removed": int(flagged.sum()), "removed_fraction": round(float(flagged.mean()), 4),
               "cut": round(float(cut), 4) if np.isfinite(cut) else None,
               "recall": round(tp / int(y.sum()), 4) if y.any() else None,
               "precision": round(tp / max(1, int(flagged.sum())), 4) if y.any() else None}
        if clusters is not None:
            row["removed_in_clusters"] = int(flagged[clusters].sum())
        if label == "default" and not y.any():  # clean data: which samples the default removes
            row["removed_ids"] = ids[flagged].tolist()
        out[label] = row
    return out


def run_default(root: Path, *, params: Params, y: np.ndarray, clusters: np.ndarray | None = None) -> dict:
    """The default params through the index, score and threshold stage functions on ``root``'s
    embeddings; every density detector's AUROC and every rule of ``rule_grid`` on its scores."""
    import shutil

    import polars as pl

    from clipscrub.stages.threshold import threshold_scores

    t = time.perf_counter()
    scores = stage_scores(root, params)
    seconds = round(time.perf_counter() - t, 1)
    tmp = Path(tempfile.mkdtemp(prefix="matrix-"))
    try:  # the stage's own flags, checked against the rule applied here
        (tmp / "scores").mkdir()
        scores.write_parquet(tmp / "scores" / "scores.parquet")
        threshold_scores(scores_dir=tmp / "scores", out_dir=tmp / "flags", settings=params.threshold, base=params.base)
        flagged_by_stage = int(pl.read_parquet(tmp / "flags" / "flags.parquet")["is_flagged"].sum())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    det = params.threshold.detector
    ids = scores["id"].to_numpy()
    values = scores[f"{det}_score"].to_numpy().astype(np.float64)
    rules = apply_rules(values=values, ids=ids, y=y, params=params, clusters=clusters)
    assert flagged_by_stage == rules["default"]["removed"], "threshold stage and rule disagree"
    return {"detector": det, "method": params.threshold.method, **quality(values, y, det),
            "detectors": {d: quality(scores[f"{d}_score"].to_numpy(), y, d) for d in DENSITY},
            "copies": int(scores["is_copy"].sum()) if "is_copy" in scores.columns else None,
            "rules": rules, "index_score_seconds": seconds}


PLANTED_N, PLANTED_D = 20_000, 256


def detect_planted(rate: float, *, cache: Path, params: Params, base_params: Path) -> dict:
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
    settings = grid_scores(emb=root, y=y, params=params, base_params=base_params)
    return {"attack": "planted", "rate": rate, "samples": PLANTED_N, "poisoned": outliers, "counted": True,
            "settings": settings, "default": run_default(root, params=params, y=y)}


def remeasure_victim(attack: str, rate: float, *, cache: Path, params: Params, base_params: Path) -> dict:
    """The victim's zero-shot accuracy and attack success rates measured now, from its checkpoint,
    with the train stage's own measurement (``stages.train.measure_victim``)."""
    import torch

    from clipscrub.model import load_model
    from clipscrub.stages.train import measure_victim

    root = cell_dir(cache, attack, rate)
    cell = cell_params(attack, rate, base_params=base_params, seed=params.base.seed)
    torch.set_num_threads(cell.train.threads)
    loaded = load_model(model_name=cell.train.model_name, pretrained=None, checkpoint=str(root / "model" / "checkpoint.pt"),
                        model_config=str(root / "model" / "model_config.json"), device="cpu")
    acc, per_attack = measure_victim(loaded.model, loaded.tokenizer, loaded.preprocess, download=cell.download,
                                     base=cell.base, heldout=cell.train.heldout_samples, device=loaded.device)
    return {"zero_shot_accuracy": acc, "attack_success_rates": per_attack,
            "attack_success_rate": round(float(np.mean(list(per_attack.values()))), 4) if per_attack else None}


def detect_cell(attack: str, rate: float, *, cache: Path, params: Params, base_params: Path) -> dict:
    """Every setting of ``settings_grid`` on one cell's victim embeddings, plus the default
    params run through the index, score and threshold stages, with every cut rule."""
    import polars as pl

    from clipscrub.synthetic import plan_clusters

    root = cell_dir(cache, attack, rate)
    victim = dict(json.loads((root / "victim.json").read_text()), **remeasure_victim(attack, rate, cache=cache, params=params,
                                                                                  base_params=base_params))
    ids = np.load(root / "embeddings" / "ids.npy")
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    y = manifest.select("id", "is_poison").join(pl.DataFrame({"id": ids}), on="id", how="right")["is_poison"].to_numpy()
    y = y.astype(bool)
    cell = cell_params(attack, rate, base_params=base_params, seed=params.base.seed)
    clusters = None
    if cell.download.synthetic.clusters:  # synthetic ids are row numbers
        rows = plan_clusters(num_samples=cell.download.synthetic.num_samples, clusters=cell.download.synthetic.clusters,
                             seed=cell.base.seed + 2)
        clusters = np.flatnonzero(np.isin(ids, np.concatenate(rows)))
    settings = grid_scores(emb=root / "embeddings", y=y, params=params, base_params=base_params)
    clean = attack.partition("@")[0] == "clean"
    counted = not clean and victim["attack_success_rate"] is not None and victim["attack_success_rate"] >= MIN_ASR
    default = run_default(root / "embeddings", params=params, y=y, clusters=clusters)
    removed = default["rules"]["default"].pop("removed_ids", None)
    if removed is not None:  # what the default took from clean data: caption, the label drawn, cluster or not
        labels = manifest.select("id", "caption").join(pl.DataFrame({"id": removed}), on="id", how="right")
        members = set(ids[clusters].tolist()) if clusters is not None else set()
        default["removed_from_clean"] = [{"id": int(i), "caption": c, "in_cluster": int(i) in members}
                                         for i, c in zip(labels["id"], labels["caption"])]
    return {"attack": attack, "rate": rate, "victim": victim, "counted": bool(counted), "clean": clean,
            "cluster_members": None if clusters is None else int(len(clusters)), "settings": settings, "default": default}


TARGETS = {"auroc": 0.99, "recall": 0.90, "removed_poisoned": 0.05, "removed_clean": 0.02, "removed_clusters": 0.03}


def write_results(results: list[dict], *, out: Path, params: Params, args, planted: list[dict]) -> None:
    det = params.threshold.detector
    judged = [r for r in results if r["counted"]] + planted
    clean = [r for r in results if r.get("clean")]

    def default_rule(r: dict) -> dict:
        return r["default"]["rules"]["default"]

    def name(r: dict) -> str:
        return f"{r['attack']} {r['rate']:g}"

    summary = {
        "default_detector": det,
        "default_rule": params.threshold.model_dump(mode="json"),
        "targets": TARGETS,
        "counted_cells": sum(r["counted"] for r in results),
        "cells": len(results),
        "planted_cells": len(planted),
        "clean_cells": len(clean),
        "default_min_auroc_judged": min((r["default"]["auroc"] for r in judged), default=None),
        "default_min_recall_judged": min((default_rule(r)["recall"] for r in judged), default=None),
        "default_max_removed_judged": max((default_rule(r)["removed_fraction"] for r in judged), default=None),
        "default_removed_clean": {name(r): default_rule(r)["removed_fraction"] for r in clean},
        "missed": [name(r) for r in judged if r["default"]["auroc"] < TARGETS["auroc"]
                   or default_rule(r)["recall"] < TARGETS["recall"]
                   or default_rule(r)["removed_fraction"] > TARGETS["removed_poisoned"]]
        + [name(r) for r in clean if default_rule(r)["removed_fraction"]
           > (TARGETS["removed_clusters"] if r["rate"] > 0 else TARGETS["removed_clean"])],
    }
    labels = list(results[0]["settings"]) if results else []
    summary["worst_judged_auroc"] = {"default": {d: min((r["default"]["detectors"][d]["auroc"] for r in judged),
                                                        default=None) for d in DENSITY}}
    summary["worst_judged_auroc"] |= {
        lab: {d: min((r["settings"][lab][d]["auroc"] for r in judged), default=None) for d in DENSITY} for lab in labels
    }
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=("victims", "detect", "all"), default=None,
                    help="default: all, or none with --table")
    ap.add_argument("--attacks", default=",".join([*ATTACKS, "clean"]),
                    help="attacks; 'clean' adds the clean cells (rates: their natural clusters' share); "
                         "<attack>@large: that attack with a larger victim (LARGE)")
    ap.add_argument("--rates", default=",".join(f"{r:g}" for r in RATES))
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml", help="the base params (default: the repo's)")
    ap.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache" / "attack_matrix")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "attack_matrix.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", action="store_true", help="print the docs' tables of --out")
    args = ap.parse_args()
    if args.phase is None:
        args.phase = "none" if args.table else "all"
    attacks = [a for a in args.attacks.split(",") if a]
    rates = [float(r) for r in args.rates.split(",") if r]
    cells = [(a, r) for r in rates for a in attacks if a != "clean"]
    cells += [("clean", r) for r in CLEAN_RATES if "clean" in attacks]
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
            print(f"detect {a} {r:g}: ASR {res['victim']['attack_success_rate']} counted {res['counted']} "
                  f"default AUROC {res['default'].get('auroc')} rules {res['default']['rules']} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
        planted = []
        for r in rates:
            res = detect_planted(r, cache=args.cache, params=load_params(args.params), base_params=args.params)
            planted.append(res)
            print(f"planted {r:g}: default AUROC {res['default']['auroc']} rules {res['default']['rules']}", flush=True)
        write_results(results, out=args.out, params=load_params(args.params), args=args, planted=planted)
    if args.table:
        doc = json.loads(args.out.read_text())
        print("\n\n".join(f(doc) for f in (attack_matrix_cells, attack_matrix_settings, attack_matrix_rules)))


if __name__ == "__main__":
    main()
