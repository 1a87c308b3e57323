"""The report's pictures, drawn so that the same data draws the same bytes: matplotlib figures
as SVG to inline (score histograms, ROC and PR curves, the threshold what-if plot) and sample
thumbnails as PNG data: URIs."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl

from clipscrub.detectors import LOW_IS_SUSPICIOUS
from clipscrub.ranking import auroc, average_precision, pr_points, rank_detector, roc_points, score_histogram
from clipscrub.shards import decode_image, image_field, iter_shard, shard_path


def _pyplot():
    """matplotlib's pyplot off-screen, with the fixed SVG hash salt that makes figures reproducible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "clipscrub"
    return plt


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    # a fixed hash salt and no date: the same data draws the same bytes
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


# a ROC or PR curve with more points than this is drawn thinned (``thinned``): a curve has two
# corners per distinct known-poison score (``clipscrub.ranking``), so with a great deal of known
# poison, megabytes of SVG path (sklearn's PR curve, a point per sample, once took matplotlib's best
# legend place minutes to find at millions of samples); below it, every corner is drawn
CURVE_POINTS = 20_000
# the thinned curve's grid, in axis units (the axes run 0 to 1): far finer than a pixel of the figure
CURVE_GRID = 1 / 4000


def thinned(x: np.ndarray, y: np.ndarray, *, limit: int = CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """A curve's points (x (P,), y (P,), both in [0, 1]) as drawn: all of them up to ``limit``;
    past it, the first of each run of consecutive points in one cell of a ``CURVE_GRID`` grid,
    and the last point (so a curve keeps every turn larger than the grid's cell)."""
    if len(x) <= limit:
        return x, y
    cells = np.stack([np.floor(np.asarray(x) / CURVE_GRID), np.floor(np.asarray(y) / CURVE_GRID)])
    keep = np.ones(len(x), dtype=bool)
    keep[1:] = (cells[:, 1:] != cells[:, :-1]).any(axis=0)
    keep[-1] = True
    return np.asarray(x)[keep], np.asarray(y)[keep]


def score_figures(*, values: Callable[[str], np.ndarray], detectors: list[str], y: np.ndarray | None,
                  cuts: dict[str, float | None], threshold_detector: str, bins: int) -> tuple[list[str], list[str]]:
    """(a histogram of each detector's scores, each marking its cut (solid on
    ``threshold_detector``'s, where the threshold applies); [ROC, PR] against the known poison
    ``y`` (N,), none without it), as SVG. ``values(d)``: detector d's scores (N,), asked for when
    drawn, so that one detector's column is held at a time."""
    plt = _pyplot()
    hists = []
    for d in detectors:
        # counted (score_histogram) and drawn from the counts: matplotlib given the scores would
        # copy the column per class
        edges, counts, poisoned = score_histogram(np.asarray(values(d)).astype(np.float64, copy=False), bins=bins, y=y)
        fig, ax = plt.subplots(figsize=(3.6, 2.4))
        centres = (edges[:-1] + edges[1:]) / 2
        if y is not None:
            ax.hist([centres, centres], bins=edges, weights=[counts - poisoned, poisoned], stacked=True,
                    color=["#7f8c8d", "#c0392b"], label=["clean", "poisoned"], log=True)
            ax.legend(fontsize=7)
        else:
            ax.hist(centres, bins=edges, weights=counts, color="#7f8c8d", log=True)
        cut = cuts.get(d)
        if cut is not None and np.isfinite(cut):
            style = "-" if d == threshold_detector else "--"
            ax.axvline(cut, color="#2c3e50", linestyle=style, linewidth=1.2)
            label = "threshold" if d == threshold_detector else "same rule"
            ax.text(cut, ax.get_ylim()[1], f" {label}", fontsize=7, va="top")
        arrow = "low = suspicious" if d in LOW_IS_SUSPICIOUS else "high = suspicious"
        ax.set_title(f"{d}_score ({arrow})", fontsize=9)
        ax.tick_params(labelsize=7)
        hists.append(_svg(fig))
    curves = []
    if y is not None:
        fig_roc, ax_roc = plt.subplots(figsize=(4.2, 3.4))
        fig_pr, ax_pr = plt.subplots(figsize=(4.2, 3.4))
        for d in detectors:
            # ranked as evaluate ranks them; the curves' corners and areas exact, counted against
            # the known poison (no sort of N scores)
            counts = rank_detector(values=np.asarray(values(d)), y=y, detector=d)
            ax_roc.plot(*thinned(*roc_points(counts)), label=f"{d} ({auroc(counts):.3f})", linewidth=1)
            ax_pr.plot(*thinned(*pr_points(counts)), label=f"{d} ({average_precision(counts):.3f})", linewidth=1)
        ax_roc.plot([0, 1], [0, 1], color="#bbb", linewidth=0.8)
        for ax, title, xl, yl in ((ax_roc, "ROC (AUROC)", "false positive rate", "true positive rate"),
                                  (ax_pr, "precision-recall (AP)", "recall", "precision")):
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(xl, fontsize=8)
            ax.set_ylabel(yl, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7)
        curves = [_svg(fig_roc), _svg(fig_pr)]
    return hists, curves


def what_if_figure(rows: list[dict[str, Any]], *, applied_fraction: float, detector: str) -> str:
    """The what-if table's top_fraction ``rows`` as a plot, as SVG: precision and recall where
    they are known, else the cut, against the fraction removed (``applied_fraction`` marked)."""
    plt = _pyplot()
    rows = sorted((r for r in rows if r["fraction"] is not None), key=lambda r: r["fraction"])
    x = [r["fraction"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    if "precision" in rows[0]:
        ax.plot(x, [np.nan if r["precision"] is None else r["precision"] for r in rows], marker="o", ms=3,
                label="precision", color="#2c3e50")
        ax.plot(x, [r["recall"] for r in rows], marker="s", ms=3, label="recall", color="#c0392b")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("precision / recall", fontsize=8)
        ax.legend(fontsize=7)
    else:
        ax.plot(x, [r["cut"] for r in rows], marker="o", ms=3, color="#2c3e50")
        ax.set_ylabel(f"{detector}_score cut", fontsize=8)
    ax.axvline(applied_fraction, color="#7f8c8d", linestyle="--", linewidth=1)
    ax.text(applied_fraction, ax.get_ylim()[1], " removed", fontsize=7, va="top")
    ax.set_xscale("log")
    ax.set_xlabel(f"fraction removed (top_fraction on {detector})", fontsize=8)
    ax.set_title("what if the threshold were elsewhere", fontsize=9)
    ax.tick_params(labelsize=7)
    return _svg(fig)


def thumbnails(raw_dir: Path, rows: pl.DataFrame, sizes: dict[str, set[int]]) -> dict[tuple[str, int], str]:
    """(key, size) -> PNG data: URI for the manifest rows given (ok rows with a shard), at each
    size ``sizes`` asks of that key. One pass over the shards that hold them."""
    from PIL import Image

    wanted = rows.filter(pl.col("shard").is_not_null() & pl.col("key").is_in(list(sizes)))
    out: dict[tuple[str, int], str] = {}
    for shard, group in wanted.group_by("shard", maintain_order=True):
        keys = set(group["key"].to_list())
        for sample in iter_shard(shard_path(raw_dir, shard[0]), keys=keys):
            key = sample["__key__"]
            ext = image_field(sample)
            if key not in keys or ext is None:
                continue
            keys.discard(key)
            original, _ = decode_image(sample[ext])
            for size in sorted(sizes[key]):
                image = original.copy()
                image.thumbnail((size, size), Image.Resampling.NEAREST if max(image.size) <= size else Image.Resampling.LANCZOS)
                if max(image.size) < size:  # tiny images (the demo's 32 px) drawn larger, pixels kept
                    scale = size // max(image.size)
                    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
                buf = io.BytesIO()
                image.save(buf, format="PNG", optimize=False)
                out[key, size] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            if not keys:
                break
    return out
