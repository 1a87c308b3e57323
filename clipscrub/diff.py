"""Compare two cleaned dataset versions: ``clipscrub diff A B``.

A version is what the filter stage wrote (``lineage.json`` + ``removed.parquet``) plus the
evaluate stage's ``applied.json`` (the applied threshold's flat block) and, when ground truth
exists, its ``detection.json``. A and B may each be a directory
(a data root such as ``data/`` or a ``clipscrub run -o`` directory, or the cleaned version's own
directory), or a git revision or DVC experiment name of the DVC project at ``project``, read
through ``dvc.api`` from git and the DVC cache without touching the workspace.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from clipscrub.errors import DataError

CLEAN = "data/clean"
METRICS = "data/metrics/detection.json"
APPLIED = "data/metrics/applied.json"
METRIC_KEYS = ("auroc", "pr_auc", "fpr_at_tpr", "precision_at_threshold", "recall_at_threshold")
# the detector's flags and what a person's review lists changed (filter.keep_ids / remove_ids)
REVIEW_KEYS = ("flagged", "removed_by_review", "kept_by_review")


@dataclass
class Version:
    label: str
    lineage: dict[str, Any]
    removed: pl.DataFrame
    metrics: dict[str, Any] | None
    applied: dict[str, Any] | None = None  # clipscrub.metrics.applied_metrics, from applied.json


def _from_dir(path: Path, label: str) -> Version:
    clean = path if (path / "lineage.json").is_file() else path / "clean"
    if not (clean / "lineage.json").is_file() or not (clean / "removed.parquet").is_file():
        raise DataError(f"{path} holds no cleaned version (lineage.json and removed.parquet, or clean/ with them)", param=label)
    metrics_path = clean.parent / "metrics" / "detection.json"
    applied_path = clean.parent / "metrics" / "applied.json"
    return Version(
        label=str(path),
        lineage=json.loads((clean / "lineage.json").read_text()),
        removed=pl.read_parquet(clean / "removed.parquet"),
        metrics=json.loads(metrics_path.read_text()) if metrics_path.is_file() else None,
        applied=json.loads(applied_path.read_text()) if applied_path.is_file() else None,
    )


def _from_rev(rev: str, project: Path, label: str) -> Version:
    import dvc.api

    def read(path: str, mode: str = "r"):
        with dvc.api.open(path, repo=str(project), rev=rev, mode=mode) as f:
            return f.read()

    try:
        lineage = json.loads(read(f"{CLEAN}/lineage.json"))
        removed = pl.read_parquet(io.BytesIO(read(f"{CLEAN}/removed.parquet", "rb")))
    except Exception as exc:  # dvc raises scm, path and cache errors of many kinds
        raise DataError(
            f"{rev!r} is neither a directory nor a git revision or DVC experiment of {project} with a cleaned "
            f"version ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            param=label,
        ) from None
    try:
        metrics = json.loads(read(METRICS))
    except Exception:
        metrics = None  # no ground truth in that version
    try:
        applied = json.loads(read(APPLIED))
    except Exception:
        applied = None  # a version from before applied.json
    return Version(label=rev, lineage=lineage, removed=removed, metrics=metrics, applied=applied)


def load_version(spec: str, *, project: str | Path = ".", label: str = "A") -> Version:
    """A version from a directory, or else a git revision / DVC experiment of ``project``."""
    path = Path(spec)
    if path.is_dir():
        return _from_dir(path, label)
    return _from_rev(spec, Path(project), label)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def _applied_delta(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any]:
    """Per key of the applied block: A, B and, for numbers known in both, B - A (else None)."""
    from clipscrub.metrics import APPLIED_KEYS

    a, b = a or {}, b or {}
    keys = list(APPLIED_KEYS) + sorted((a.keys() | b.keys()) - set(APPLIED_KEYS))
    out = {}
    for k in keys:
        va, vb = a.get(k), b.get(k)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
        out[k] = {"a": va, "b": vb, "delta": round(vb - va, 6) if numeric else None}
    return out


def _review_counts(counts: dict[str, Any]) -> dict[str, Any]:
    """Flagged, removed by review and kept by review; a version cleaned without review lists
    records none, and removed exactly what was flagged."""
    if "removed_by_review" in counts:
        return {k: counts.get(k) for k in REVIEW_KEYS}
    return {"flagged": counts.get("removed"), "removed_by_review": 0, "kept_by_review": 0}


def diff_versions(a: Version, b: Version) -> dict[str, Any]:
    """Params that differ, counts, removed ids only in A / only in B / in both (with their
    Jaccard overlap), the applied threshold's block of each (``applied``: per key A, B and the
    delta B - A), where either was reviewed the review's counts of each (``review``: flagged,
    removed by review, kept by review) and, where both have ground truth, per-detector metric
    deltas (B - A)."""
    pa, pb = _flatten(a.lineage.get("params", {})), _flatten(b.lineage.get("params", {}))
    params = {k: {"a": pa.get(k), "b": pb.get(k)} for k in sorted(pa.keys() | pb.keys()) if pa.get(k) != pb.get(k)}
    ra, rb = set(a.removed["id"].to_list()), set(b.removed["id"].to_list())
    union = ra | rb
    result: dict[str, Any] = {
        "a": a.label,
        "b": b.label,
        "params": params,
        "same_input": a.lineage.get("input_manifest_sha256") == b.lineage.get("input_manifest_sha256"),
        "counts": {"a": a.lineage.get("counts", {}), "b": b.lineage.get("counts", {})},
        "removed": {
            "only_a": len(ra - rb),
            "only_b": len(rb - ra),
            "both": len(ra & rb),
            "jaccard": round(len(ra & rb) / len(union), 6) if union else 1.0,
        },
    }
    ca, cb = result["counts"]["a"], result["counts"]["b"]
    if "removed_by_review" in ca or "removed_by_review" in cb:
        va, vb = _review_counts(ca), _review_counts(cb)
        result["review"] = {k: {"a": va[k], "b": vb[k]} for k in REVIEW_KEYS}
    if a.applied or b.applied:
        result["applied"] = _applied_delta(a.applied, b.applied)
    if a.metrics and b.metrics and a.metrics.get("ground_truth") and b.metrics.get("ground_truth"):
        da, db = a.metrics.get("detectors", {}), b.metrics.get("detectors", {})
        result["metrics"] = {
            d: {k: {"a": da[d][k], "b": db[d][k], "delta": round(db[d][k] - da[d][k], 6)} for k in METRIC_KEYS}
            for d in sorted(da.keys() & db.keys())
        }
    return result


def differing_ids(a: Version, b: Version) -> pl.DataFrame:
    """Ids removed in exactly one version: id, removed_in (``a`` | ``b``), reason in that version."""
    ra = a.removed.select("id", pl.col("reason").alias("reason_a"))
    rb = b.removed.select("id", pl.col("reason").alias("reason_b"))
    both = ra.join(rb, on="id", how="full", coalesce=True)
    return (
        both.filter(pl.col("reason_a").is_null() | pl.col("reason_b").is_null())
        .select("id", pl.when(pl.col("reason_a").is_not_null()).then(pl.lit("a")).otherwise(pl.lit("b")).alias("removed_in"),
                pl.coalesce("reason_a", "reason_b").alias("reason"))
        .sort("id")
    )


def _cell(v: Any, *, delta: bool = False) -> str:
    if v is None:
        return "" if delta else "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:+.4f}" if delta else f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:+d}" if delta else str(v)
    return str(v)


def format_table(result: dict[str, Any]) -> str:
    """The diff as plain-text tables."""
    lines = [f"A: {result['a']}", f"B: {result['b']}"]
    if not result["same_input"]:
        lines.append("warning: A and B were cleaned from different input manifests")
    lines += ["", "params that differ:"]
    if result["params"]:
        width = max(len(k) for k in result["params"])
        lines += [f"  {k:<{width}}  {v['a']!r:>12} -> {v['b']!r}" for k, v in result["params"].items()]
    else:
        lines.append("  (none)")
    ca, cb = result["counts"]["a"], result["counts"]["b"]
    rows = [(key, ca[key], cb[key]) for key in ("input", "scored", "kept", "removed") if key in ca and key in cb]
    # the detector's flags and the review beside them: removed = flagged + removed_by_review - kept_by_review
    rows += [(key, v["a"], v["b"]) for key, v in result.get("review", {}).items()]
    width = max([8] + [len(key) for key, _, _ in rows])
    lines += ["", f"  {'count':<{width}} {'A':>10} {'B':>10} {'B - A':>10}"]
    for key, va, vb in rows:
        delta = vb - va if isinstance(va, int) and isinstance(vb, int) else None
        lines.append(f"  {key:<{width}} {_cell(va):>10} {_cell(vb):>10} {_cell(delta, delta=True):>10}".rstrip())
    r = result["removed"]
    lines += ["", f"removed only in A: {r['only_a']}, only in B: {r['only_b']}, in both: {r['both']} "
                  f"(Jaccard {r['jaccard']:.4f})"]
    if "applied" in result:
        lines += ["", "applied threshold (each version's metrics/applied.json):",
                  f"  {'key':<20} {'A':>18} {'B':>18} {'B - A':>10}"]
        for k, v in result["applied"].items():
            lines.append(f"  {k:<20} {_cell(v['a']):>18} {_cell(v['b']):>18} {_cell(v['delta'], delta=True):>10}".rstrip())
    if "metrics" in result:
        lines += ["", f"  {'detector':<10} {'metric':<24} {'A':>9} {'B':>9} {'delta':>9}"]
        for d, ms in result["metrics"].items():
            for k, v in ms.items():
                lines.append(f"  {d:<10} {k:<24} {v['a']:>9.4f} {v['b']:>9.4f} {v['delta']:>+9.4f}")
    return "\n".join(lines)
