"""Stage 9, report: self-contained HTML pages about a cleaned version, to look at before
trusting it.

Writes ``<out>/index.html``, ``<out>/flagged/page-NNNN.html`` (every figure an inline SVG, every
thumbnail a data: URI, no script: the folder opens offline) and ``<out>/clusters.parquet``. The
page holds: a summary line (what filter removed, how much of it known poison, the review's
share); the dataset summary; per-detector score histograms with the threshold marked; ROC and PR
curves when the manifest knows which samples are poisoned; a threshold what-if table and plot; a
gallery of the top-N flagged samples (thumbnail, caption, every score, the marks of the review,
and the nearest reference entries that made it suspicious), with every flagged sample on the
gallery pages (``PER_PAGE`` a page); galleries of known poison filter kept and of the samples
just under the cut; the review's verdicts; clusters of flagged samples that share a caption or
have near-identical images (natural-backdoor candidates, such as the paper's 798 birthday-cake
images under one caption); and the version's lineage. Anchors: ``#sample-<id>``,
``#cluster-<n>`` and every section's (``#what-if``, ``#missed``, ``#near-cut``, ``#review``...).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from clipscrub.arrays import RowReader
from clipscrub.detectors import LOW_IS_SUSPICIOUS, suspicion
from clipscrub.errors import DataError
from clipscrub.gallery import nearest_references, page_count, page_name, page_of, what_if_fractions
from clipscrub.io import atomic_dir, describe_model, read_json, read_manifest, require_file, write_lineage
from clipscrub.metrics import applied_metrics, applied_sentence, fmt_ratio, removed_as_flags, rule_text
from clipscrub.params import BaseSettings, ReportSettings, ThresholdSettings
from clipscrub.shards import decode_image, image_field, iter_shard, shard_path
from clipscrub.sources import read_truth
from clipscrub.flagging import REVIEW_REASON
from clipscrub.flagging import flag_outliers

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1200px;padding:0 1rem;color:#222}
h1{font-size:1.6rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
table{border-collapse:collapse}td,th{padding:.2rem .6rem;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:1rem}.figs figure{margin:0}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:.8rem}
.card{border:1px solid #ddd;border-radius:6px;padding:.4rem;font-size:12px;background:#fafafa}
.card img{display:block;margin:0 auto .3rem;image-rendering:pixelated}
.card .who{font-size:85%;color:#444;overflow-wrap:anywhere}.card .cap{font-style:italic;overflow-wrap:anywhere}.cut{color:#777;font-style:normal}.card .sc{color:#555}
.poison{border-color:#c0392b;background:#fdf0ee}.tag{color:#c0392b;font-weight:600}
.noimg{height:64px;display:flex;align-items:center;justify-content:center;color:#999}
.cluster{border:1px solid #ccc;border-radius:6px;padding:.6rem;margin:.8rem 0}
.rv{font-weight:600;color:#1f618d}.rv.removed{color:#7d3c98}.reviewed{border-style:dashed;border-width:2px}
.nearest{display:flex;flex-wrap:wrap;gap:1px;margin-top:.3rem;border-top:1px dotted #ccc;padding-top:.2rem}
.nnh{width:100%;color:#777;font-size:10px}.nn{width:33px;font-size:9px;text-align:center;color:#555;overflow:hidden}
.nn img{width:31px;height:auto;margin:0 auto}.nn span{display:block}.nn .noimg{height:31px}
.toc{margin:.6rem 0;font-size:13px}.summary{font-size:1.1rem}.more{font-size:12px}
.row{display:flex;flex-wrap:wrap;gap:.4rem}.row .card{width:170px}pre{background:#f5f5f5;padding:.8rem;overflow:auto;max-height:40rem;font-size:12px}
"""


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


def _figures(scores: pl.DataFrame, detectors: list[str], y: np.ndarray | None, cuts: dict[str, float | None],
             threshold_detector: str, bins: int) -> tuple[list[str], list[str]]:
    """(histograms, [ROC, PR]) as inline SVG."""
    from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve, average_precision_score

    plt = _pyplot()
    hists = []
    for d in detectors:
        v = scores[f"{d}_score"].to_numpy().astype(np.float64)
        finite = np.isfinite(v)
        fig, ax = plt.subplots(figsize=(3.6, 2.4))
        edges = np.histogram_bin_edges(v[finite], bins=bins) if finite.any() else bins
        if y is not None:
            ax.hist([v[finite & ~y], v[finite & y]], bins=edges, stacked=True, color=["#7f8c8d", "#c0392b"],
                    label=["clean", "poisoned"], log=True)
            ax.legend(fontsize=7)
        else:
            ax.hist(v[finite], bins=edges, color="#7f8c8d", log=True)
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
            s = suspicion(scores[f"{d}_score"].to_numpy(), d)
            s = np.where(np.isfinite(s), s, np.nanmax(np.where(np.isfinite(s), s, np.nan)) + 1)
            fpr, tpr, _ = roc_curve(y, s)
            ax_roc.plot(fpr, tpr, label=f"{d} ({roc_auc_score(y, s):.3f})", linewidth=1)
            prec, rec, _ = precision_recall_curve(y, s)
            ax_pr.plot(rec, prec, label=f"{d} ({average_precision_score(y, s):.3f})", linewidth=1)
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


def _thumbnails(raw_dir: Path, rows: pl.DataFrame, sizes: dict[str, set[int]]) -> dict[tuple[str, int], str]:
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


# a caption is drawn on every card and every tooltip that shows its sample: past this it is cut short
CAPTION_CHARS = 300


def cut_caption(caption: str | None, *, limit: int = CAPTION_CHARS) -> tuple[str, int]:
    """(the caption's first ``limit`` characters, how many it has): text, not HTML."""
    caption = caption or ""
    return caption[:limit], len(caption)


def caption_html(caption: str | None) -> str:
    """A caption as escaped HTML, cut short past ``CAPTION_CHARS`` with its full length said."""
    text, n = cut_caption(caption)
    if n <= CAPTION_CHARS:
        return html.escape(text)
    return f'{html.escape(text)}&hellip; <span class="cut">({n:,} characters, cut short)</span>'


def names_html(row: dict[str, Any]) -> str:
    """The source's own names of a sample (key, file, url): what its reviewer knows it by, and
    what a review list may name it by."""
    cells = [f"{label} <code>{html.escape(str(row[label]))}</code>" for label in ("key", "file") if row.get(label)]
    url = row.get("url")
    if url:
        shown = html.escape(url if len(url) <= 60 else url[:57] + "...")
        # a link only to the web: a url list may hold any scheme
        cells.append(f'url <a href="{html.escape(url)}" rel="noreferrer nofollow">{shown}</a>'
                     if url.lower().startswith(("http://", "https://")) else f"url <code>{shown}</code>")
    return f'<div class="who">{" · ".join(cells)}</div>' if cells else ""


def review_template(rows: pl.DataFrame, *, name: str, detector: str, verdict: str, title: str) -> str:
    """A review list ready to edit: one commented-out line per sample of ``rows`` (its ``name``
    column's value, then rank, score and caption), in the text format filter reads. Uncommenting
    a line makes it a verdict."""
    lines = [f"# clipscrub review list: {title}.",
             f"# Remove the leading '# ' of the samples to {verdict}, save the file where filter.{verdict}_ids points "
             "(clipscrub init made review/",
             f"# {verdict}_ids.txt), then rerun filter onward (dvc repro, or clipscrub run). Entries may be ids, "
             "keys, file names or urls.",
             ""]
    for row in rows.iter_rows(named=True):
        text, n = cut_caption(row["caption"], limit=80)
        caption = text.replace("\n", " ") + ("..." if n > len(text) else "")
        lines.append(f"# {row[name]}  # rank {row['rank']}, {detector} {row[f'{detector}_score']:.4g}: {caption}")
    return "\n".join(lines) + "\n"


def _normalise(caption: str) -> str:
    return re.sub(r"\s+", " ", caption.strip().lower())


def find_clusters(*, flagged: pl.DataFrame, image: RowReader | None, rows: np.ndarray, cosine: float) -> pl.DataFrame:
    """Clusters of flagged samples: a shared (normalised) caption, or image embeddings whose cosine
    is >= ``cosine`` (connected components), or identical image bytes. ``flagged``: id, caption,
    image_sha256; ``rows`` (F,): their embedding rows. Returns id, cluster, kind, size."""
    n = flagged.height
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    kinds: dict[int, set[str]] = {}
    for kind, keys in (("caption", [_normalise(c or "") for c in flagged["caption"].to_list()]),
                       ("identical image", flagged["image_sha256"].to_list())):
        first: dict[Any, int] = {}
        for i, key in enumerate(keys):
            if key is None or key == "":
                continue
            if key in first:
                union(first[key], i)
                kinds.setdefault(i, set()).add(kind)
                kinds.setdefault(first[key], set()).add(kind)
            else:
                first[key] = i
    if image is not None and n > 1:
        vecs = image.take(rows)
        vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        for start in range(0, n, 2048):
            sims = vecs[start:start + 2048] @ vecs.T
            for i, j in zip(*np.nonzero(sims >= cosine)):
                i += start
                if i < j:
                    union(int(i), int(j))
                    kinds.setdefault(int(i), set()).add("near-identical image")
                    kinds.setdefault(int(j), set()).add("near-identical image")
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    groups = sorted((m for m in members.values() if len(m) >= 2), key=lambda m: (-len(m), m[0]))
    ids = flagged["id"].to_list()
    rows_out = [
        (ids[i], c, ", ".join(sorted(set().union(*(kinds.get(j, set()) for j in m)))), len(m))
        for c, m in enumerate(groups) for i in sorted(m, key=lambda j: ids[j])
    ]
    return pl.DataFrame(rows_out, schema={"id": pl.Int64, "cluster": pl.Int64, "kind": pl.String, "size": pl.Int64},
                        orient="row")


# the flagged gallery's pages (flagged/page-NNNN.html): at most this many cards a page, so a run
# with 10,000 flagged samples writes 100 pages of a few MB each rather than one page of 300 MB
PER_PAGE = 100
# nearest reference entries shown under each card (of the index's k)
NEIGHBOURS_SHOWN = 5


class _Cards:
    """Renders sample cards: thumbnail, caption, scores, marks (poison, review), nearest references."""

    def __init__(self, *, table: dict[int, dict[str, Any]], thumbs: dict[tuple[str, int], str], size: int, mini: int,
                 detectors: list[str], y_known: bool, kept_by_review: set[int], removed_by_review: set[int],
                 removed: set[int], neighbours: dict[int, list[tuple[int, bool, float]]], neighbour_note: str):
        self.table, self.thumbs, self.size, self.mini = table, thumbs, size, mini
        self.detectors, self.y_known = detectors, y_known
        self.kept_by_review, self.removed_by_review, self.removed = kept_by_review, removed_by_review, removed
        self.neighbours, self.neighbour_note = neighbours, neighbour_note

    def _img(self, key: str | None, size: int, alt: str) -> str:
        src = self.thumbs.get((key, size)) if key is not None else None
        return f'<img src="{src}" alt="{alt}">' if src else '<div class="noimg">no image</div>'

    def card(self, sample_id: int, *, anchor: bool) -> str:
        row = self.table[sample_id]
        poison = self.y_known and bool(row["is_poison"])
        scores = " · ".join(f"{d} {row[f'{d}_score']:.4g}" for d in self.detectors)
        tags = ' <span class="tag">poisoned</span>' if poison else ""
        if sample_id in self.kept_by_review:
            tags += ' <span class="rv kept">kept by review</span>'
        elif sample_id in self.removed_by_review:
            tags += ' <span class="rv removed">removed by review</span>'
        elif not row["is_flagged"] and sample_id in self.removed:
            tags += ' <span class="rv removed">removed</span>'
        rank = f"#{row['rank']} " if row.get("rank") is not None else ""
        classes = "card" + (" poison" if poison else "") + (" reviewed" if sample_id in self.kept_by_review
                                                            or sample_id in self.removed_by_review else "")
        ident = f' id="sample-{sample_id}"' if anchor else ""
        return (f'<div class="{classes}"{ident}>{self._img(row["key"], self.size, f"sample {sample_id}")}'
                f'<div>{rank}<a href="#sample-{sample_id}">id {sample_id}</a>{tags}</div>{names_html(row)}'
                f'<div class="cap">{caption_html(row["caption"])}</div><div class="sc">{scores}</div>'
                f"{self._nearest(sample_id)}</div>")

    def _nearest(self, sample_id: int) -> str:
        found = self.neighbours.get(sample_id)
        if found is None:
            return ""
        cells = []
        for owner, caption, dist in found:
            row = self.table.get(owner)
            kind = "caption" if caption else "image"
            text, n = cut_caption((row or {}).get("caption"))
            title = html.escape(f"id {owner} ({kind}): {text}" + ("..." if n > len(text) else ""))
            img = self._img(row["key"] if row else None, self.mini, f"reference {owner}")
            cells.append(f'<div class="nn" title="{title}">{img}<span>{dist:.3f}</span><span>{owner}'
                         f'{" txt" if caption else ""}</span></div>')
        return (f'<div class="nearest" title="{html.escape(self.neighbour_note)}"><div class="nnh">nearest references: '
                "distance, id</div>" + "".join(cells) + "</div>")


def _index_for(scores_dir: Path, index_dir: Path | None) -> tuple[Path | None, str]:
    """The index the scores were computed from, and a note; (None, why) when there is none.
    Without ``index_dir``, the ``index`` folder beside the scores is used when its lineage record
    is the one the scores' lineage holds (the index is upstream of the scores, so the scores pin it)."""
    given = index_dir is not None
    candidate = index_dir if given else scores_dir.parent / "index"
    if not (candidate / "references.json").is_file() or not (candidate / "lineage.json").is_file():
        if given:
            raise DataError(f"no index in {candidate} (references.json and lineage.json): run the index stage",
                            param="--index")
        return None, "no index stage output beside the scores"
    scored_with = read_json(scores_dir / "lineage.json").get("stages", {}).get("index") \
        if (scores_dir / "lineage.json").is_file() else None
    if read_json(candidate / "lineage.json").get("stages", {}).get("index") != scored_with:
        if given:
            raise DataError(f"the index in {candidate} is not the one the scores were computed from: rerun score",
                            param="--index")
        return None, "the index beside the scores is not the one they were computed from"
    return candidate, ""


def _what_if(values: np.ndarray, ids: np.ndarray, y: np.ndarray | None, threshold: ThresholdSettings,
             fractions: list[float]) -> list[dict[str, Any]]:
    """What each rule would remove on the threshold detector (non-finite scores always), against
    the truth when known: the rule applied, the other adaptive rules (tail, auto) with their
    settings, then top_fraction at each of ``fractions``. Rows carry ``rule`` (its words), ``fraction``
    (top_fraction rows only, else None), ``cut`` and ``removed``."""
    adaptive = [threshold] + [threshold.model_copy(update={"method": m}) for m in ("tail", "auto")
                              if m != threshold.method]
    rules = [(t, t.fraction if t.method == "top_fraction" else None) for t in adaptive] + [
        (threshold.model_copy(update={"method": "top_fraction", "fraction": f}), f) for f in fractions]
    rows = []
    seen = set()
    finite = np.isfinite(values)
    for rule, f in rules:
        text = rule_text(rule)
        if text in seen:  # the applied top_fraction rule is already a row of its own
            continue
        seen.add(text)
        mask, cut = flag_outliers(values=values, ids=ids, detector=threshold.detector, settings=rule)
        mask = mask | ~finite
        n = int(mask.sum())
        row: dict[str, Any] = {"rule": text, "fraction": f, "cut": float(cut), "removed": n,
                               "applied": text == rule_text(threshold)}
        if y is not None:
            hit = int((mask & y).sum())
            row |= {"poison_removed": hit, "precision": hit / n if n else None, "recall": hit / int(y.sum())}
        rows.append(row)
    return rows


def _what_if_svg(rows: list[dict[str, Any]], *, applied_fraction: float, detector: str) -> str:
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


def summary_line(applied: dict[str, Any], *, removed_by_review: int, kept_by_review: int) -> str:
    """The page's one-line summary: ``52 of the 60 removed are known poison`` (with ground truth)
    or ``60 of 2,000 removed``, and the review's share."""
    if applied["poison_known"]:
        line = (f"{applied['poison_removed']:,} of the {applied['removed']:,} removed are known poison; "
                f"{applied['poison_missed']:,} of the {applied['poison']:,} known poison were missed.")
    else:
        line = f"{applied['removed']:,} of {applied['samples']:,} removed (no ground truth)."
    if removed_by_review or kept_by_review:
        line += (f" Review: {removed_by_review:,} removed by filter.remove_ids, "
                 f"{kept_by_review:,} flagged samples kept by filter.keep_ids.")
    return line


def _page(title: str, body: list[str]) -> str:
    return "\n".join([
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>",
        f"<meta name=viewport content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>",
        *body, "</body></html>"])


def write_report(
    *,
    raw_dir: str | Path,
    embeddings_dir: str | Path,
    scores_dir: str | Path,
    flags_dir: str | Path,
    clean_dir: str | Path,
    out_dir: str | Path,
    settings: ReportSettings,
    threshold: ThresholdSettings,
    base: BaseSettings,
    truth_path: str | Path | None = None,
    index_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``<out>/index.html``, ``<out>/flagged/page-NNNN.html`` (every flagged sample, by rank,
    ``PER_PAGE`` a page) and ``<out>/clusters.parquet``; return what the pages show.
    ``truth_path``: ``evaluate.truth``, a ground-truth table that wins over the manifest's is_poison.
    ``index_dir``: the index stage's output, for each card's nearest references (default: the
    ``index`` folder beside the scores, when it is the one they were computed from)."""
    raw_dir, emb_dir, scores_dir, flags_dir, clean_dir = map(Path, (raw_dir, embeddings_dir, scores_dir, flags_dir, clean_dir))
    manifest = read_manifest(raw_dir)
    if truth_path:
        manifest = read_truth(manifest, truth_path)
    scores = pl.read_parquet(require_file(scores_dir / "scores.parquet", param="--scores", what="scores"))
    flags = pl.read_parquet(require_file(flags_dir / "flags.parquet", param="--flags", what="flags"))
    lineage = read_json(require_file(clean_dir / "lineage.json", param="--clean", what="cleaned version"))
    removed_df = pl.read_parquet(require_file(clean_dir / "removed.parquet", param="--clean", what="cleaned version"))
    overruled_df = (pl.read_parquet(clean_dir / "overruled.parquet") if (clean_dir / "overruled.parquet").is_file()
                    else pl.DataFrame({"id": []}, schema={"id": pl.Int64}))
    removed_ids = set(removed_df["id"].to_list())
    removed_by_review = set(removed_df.filter(pl.col("reason") == REVIEW_REASON)["id"].to_list())
    kept_by_review = set(overruled_df["id"].to_list())
    detectors = [c.removesuffix("_score") for c in scores.columns if c.endswith("_score")]
    table = (scores.join(flags.select("id", "rank", "is_flagged", "reason"), on="id", how="left")
             .join(manifest.select("id", "key", "shard", "caption", "image_sha256", "is_poison",
                                   *(c for c in ("file", "url") if c in manifest.columns)), on="id", how="left"))
    # what filter actually removed: the flags, less the review's keep list, plus its remove list
    applied_flags = removed_as_flags(flags=flags, removed=removed_ids, scored=table["id"])
    truth = table["is_poison"]
    y = truth.to_numpy().astype(bool) if truth.null_count() == 0 and 0 < int(truth.sum()) < len(truth) else None
    applied = applied_metrics(flags=applied_flags, truth=pl.DataFrame({"id": table["id"], "is_poison": truth}),
                              threshold=threshold)
    applied |= {"flagged": int(flags["is_flagged"].sum()), "kept_by_review": len(kept_by_review),
                "removed_by_review": len(removed_by_review)}

    ids = table["id"].to_numpy()
    cuts: dict[str, float | None] = {}
    for d in detectors:
        values = table[f"{d}_score"].to_numpy().astype(np.float64)
        flagged_d, cut = flag_outliers(values=values, ids=ids, detector=d, settings=threshold.model_copy(update={"detector": d}))
        cuts[d] = float(cut) if np.isfinite(cut) else None
    hists, curves = _figures(table, detectors, y, cuts, threshold.detector, settings.hist_bins)
    what_if = _what_if(table[f"{threshold.detector}_score"].to_numpy().astype(np.float64), ids, y, threshold,
                       what_if_fractions(threshold))

    flagged = table.filter(pl.col("is_flagged")).sort("rank")
    emb_ids = np.load(require_file(emb_dir / "ids.npy", param="--embeddings", what="embeddings"))
    row_of = {int(i): r for r, i in enumerate(emb_ids)}
    image = RowReader(emb_dir / "image.npy") if (emb_dir / "image.npy").is_file() else None
    clusters = find_clusters(flagged=flagged, image=image, rows=np.array([row_of[int(i)] for i in flagged["id"]], dtype=np.int64),
                             cosine=settings.near_duplicate_cosine)
    # how often each clustered caption occurs in the whole dataset, flagged or not
    caption_counts = manifest.filter(pl.col("status") == "ok").group_by(
        pl.col("caption").map_elements(_normalise, return_dtype=pl.String).alias("norm")).len()

    flagged_ids = flagged["id"].to_list()
    top_ids = flagged_ids[:settings.top_n]
    cap = settings.top_n
    # known poison filter did not remove (flagged and kept by review included), most suspicious first
    missed = (table.filter(pl.col("is_poison") & ~pl.col("id").is_in(sorted(removed_ids))).sort("rank")
              if y is not None else table.clear())
    near_cut = table.filter(~pl.col("is_flagged")).sort("rank").head(cap)
    review_rows = table.filter(pl.col("id").is_in(sorted(kept_by_review | removed_by_review))).sort("rank")
    shown_in_clusters = clusters.group_by("cluster", maintain_order=True).head(settings.cluster_members_shown)
    card_ids = set(flagged_ids) | set(missed["id"].head(cap).to_list()) | set(near_cut["id"].to_list()) \
        | set(review_rows["id"].head(2 * cap).to_list()) | set(shown_in_clusters["id"].to_list())

    index_path, no_index = _index_for(scores_dir, Path(index_dir) if index_dir is not None else None)
    neighbours: dict[int, list[tuple[int, bool, float]]] = {}
    neighbour_note = ""
    if index_path is not None:
        wanted = sorted(i for i in card_ids if i in row_of)
        found = nearest_references(index_path, np.array([row_of[i] for i in wanted], dtype=np.int64), draw=0,
                                   samples=len(emb_ids))
        neighbour_note = f"reference set {found.set_name}, draw 1 of {found.draws}, modality {found.modality}"
        for i, owners, caps, dists in zip(wanted, found.owners, found.captions, found.distances):
            neighbours[i] = [(int(emb_ids[o]), bool(c), float(dist)) for o, c, dist in
                             zip(owners[:NEIGHBOURS_SHOWN], caps[:NEIGHBOURS_SHOWN], dists[:NEIGHBOURS_SHOWN]) if o >= 0]
    mini = max(16, settings.thumb_size // 3)
    sizes: dict[str, set[int]] = {}
    by_key = dict(zip(table["id"].to_list(), table["key"].to_list()))
    for i in card_ids:
        if by_key.get(i) is not None:
            sizes.setdefault(by_key[i], set()).add(settings.thumb_size)
    for found_list in neighbours.values():
        for owner, _, _ in found_list:
            if by_key.get(owner) is not None:
                sizes.setdefault(by_key[owner], set()).add(mini)
    thumbs = _thumbnails(raw_dir, table.filter(pl.col("key").is_in(list(sizes))), sizes)
    owners_needed = {o for f in neighbours.values() for o, _, _ in f}
    by_id = {r["id"]: r for r in table.filter(pl.col("id").is_in(sorted(card_ids | owners_needed))).iter_rows(named=True)}
    cards = _Cards(table=by_id, thumbs=thumbs, size=settings.thumb_size, mini=mini, detectors=detectors,
                   y_known=y is not None, kept_by_review=kept_by_review, removed_by_review=removed_by_review,
                   removed=removed_ids, neighbours=neighbours, neighbour_note=neighbour_note)

    pages = page_count(len(flagged_ids), PER_PAGE)
    position = {i: p for p, i in enumerate(flagged_ids)}

    def href(sample_id: int) -> str:
        """A flagged sample's place: its card on this page (the top N) or on its gallery page."""
        p = position[sample_id]
        return f"#sample-{sample_id}" if p < len(top_ids) else f"flagged/{page_name(page_of(p, PER_PAGE))}#sample-{sample_id}"

    anchored: set[int] = set()

    def card(sample_id: int) -> str:
        first = sample_id not in anchored  # one id= per sample and page: its first card
        anchored.add(sample_id)
        return cards.card(sample_id, anchor=first)

    # the name review lists use: the one the source's user knows (a url may hold ' #', a key may not exist)
    review_name = ("file" if "file" in table.columns else
                   "url" if "url" in table.columns and table["url"].drop_nulls().len() == table.height
                   and not table["url"].str.contains(r"\s").any() else "key")
    counts = lineage.get("counts", {})
    summary_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in counts.items())
    model = lineage.get("model", {})
    nav = ("<nav class=toc>" + " · ".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("summary", "dataset"), ("histograms", "histograms"), ("curves", "ROC / PR") if curves else (None, None),
        ("what-if", "what-if"), ("gallery", "flagged"), ("all-flagged", f"all {len(flagged_ids)} flagged"),
        ("missed", "missed poison") if y is not None else (None, None), ("near-cut", "just under the cut"),
        ("review", "review"), ("clusters", "clusters"), ("lineage", "lineage")) if a) + "</nav>")
    parts = [
        f"<h1>clipscrub report: {html.escape(base.name)}</h1>",
        f"<p class=summary id=summary-line><b>{html.escape(summary_line(applied, removed_by_review=len(removed_by_review), kept_by_review=len(kept_by_review)))}</b></p>",
        f"<p class=applied><b>Applied threshold</b>: {html.escape(applied_sentence(applied))}</p>",
        nav,
        "<h2 id=summary>Dataset</h2>",
        f"<table><tbody>{summary_rows}</tbody></table>",
        f"<p>Model: {html.escape(describe_model(model) if model.get('model_name') else 'unknown')}. "
        f"Threshold: <b>{html.escape(threshold.detector)}</b>, {html.escape(threshold.method)}; "
        f"{int(table['is_flagged'].sum())} flagged. Params hash {html.escape(str(lineage.get('params_hash')))}, "
        f"code {html.escape(str(lineage.get('code_version')))}, input manifest sha256 "
        f"{html.escape(str(lineage.get('input_manifest_sha256')))}.</p>",
        "<h2 id=histograms>Score histograms</h2>",
        "<p>Solid line: the threshold applied. Dashed: where the same rule would cut that detector.</p>",
        "<div class=figs>" + "".join(f"<figure>{h}</figure>" for h in hists) + "</div>",
    ]
    if curves:
        n_poison = int(y.sum())
        parts += ["<h2 id=curves>ROC and precision-recall</h2>",
                  f"<p>Against the {n_poison} samples the manifest marks as poisoned.</p>",
                  "<div class=figs>" + "".join(f"<figure>{c}</figure>" for c in curves) + "</div>"]
    head = "<tr><th>rule</th><th>cut</th><th>removed</th>" + (
        "<th>poison removed</th><th>precision</th><th>recall</th>" if y is not None else "") + "<th></th></tr>"
    body = []
    for r in what_if:
        mark = []
        if r["applied"]:
            mark.append("the rule applied")
        if r["fraction"] == round(applied["removed_fraction"] or 0.0, 6):
            mark.append("what filter removed")
        body.append(f"<tr><td>{html.escape(r['rule'])}</td><td>{r['cut']:.6g}</td><td>{r['removed']}</td>" + (
            f"<td>{r['poison_removed']}</td><td>{fmt_ratio(r['precision'])}</td><td>{fmt_ratio(r['recall'])}</td>"
            if y is not None else "") + f"<td>{', '.join(mark)}</td></tr>")
    parts += ["<h2 id=what-if>Threshold what-if</h2>",
              f"<p>Other rules on <b>{html.escape(threshold.detector)}</b>: the rule applied, the adaptive rules "
              "(tail: as many as stand out of the bulk; auto: a robust z-score), and top_fraction at other "
              "fractions; the cut each would put on the score, how many samples it would remove (non-finite scores always)"
              + (", and how many of them are known poison" if y is not None else "") + ". Without review lists.</p>",
              f"<table class=whatif><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>",
              f"<div class=figs><figure>{_what_if_svg(what_if, applied_fraction=applied['removed_fraction'] or 1e-3, detector=threshold.detector)}</figure></div>"]
    page_links = " ".join(f'<a href="flagged/{page_name(p)}">{p}</a>' for p in range(1, pages + 1))
    neighbour_text = (f"Under each card: its {NEIGHBOURS_SHOWN} nearest reference entries ({html.escape(neighbour_note)}; "
                      "&ldquo;txt&rdquo;: the reference's caption embedding), with their Euclidean distances."
                      if neighbours else f"No nearest references: {html.escape(no_index)}.")
    parts += [f"<h2 id=gallery>Top {len(top_ids)} flagged samples</h2>", f"<p>{neighbour_text}</p>",
              "<div class=gallery id=top>" + "".join(card(i) for i in top_ids) + "</div>",
              f"<p id=all-flagged><b>All {len(flagged_ids)} flagged samples</b>, by rank, {PER_PAGE} a page "
              f"({pages} pages): {page_links}</p>"]
    if y is not None and missed.height == 0:
        parts += ["<h2 id=missed>Known poison not removed (0)</h2>", "<p>Every known poisoned sample was removed.</p>"]
    elif y is not None:
        parts += [f"<h2 id=missed>Known poison not removed ({missed.height})</h2>",
                  f"<p>Most suspicious first; the first {min(cap, missed.height)} shown.</p>",
                  "<div class=gallery id=missed-gallery>" + "".join(card(i) for i in missed["id"].head(cap)) + "</div>"]
    parts += [f"<h2 id=near-cut>Just under the cut ({near_cut.height})</h2>",
              f"<p>The {near_cut.height} unflagged samples ranked right after the flagged ones on "
              f"{html.escape(threshold.detector)}.</p>",
              "<div class=gallery id=near-cut-gallery>" + "".join(card(i) for i in near_cut["id"]) + "</div>"]
    reviewed = "review" in lineage
    parts += [f"<h2 id=review>Review verdicts ({len(kept_by_review)} kept, {len(removed_by_review)} removed)</h2>",
              "<p>Flagged samples <b>kept by review</b> (filter.keep_ids) and unflagged samples "
              "<b>removed by review</b> (filter.remove_ids), as filter applied them"
              + (f"; the first {2 * cap} shown" if review_rows.height > 2 * cap else "") + "."
              + ("" if reviewed else " No review list was applied to this version.") + "</p>",
              f"<p class=how id=review-how>To keep a flagged sample, or to remove one the detectors missed, name it in "
              f"the file <code>filter.keep_ids</code> or <code>filter.remove_ids</code> points to (clipscrub init made "
              f"<code>review/keep_ids.txt</code> and <code>review/remove_ids.txt</code>): one entry per line, by "
              f"{review_name} (or id, key, file name or url), <code># </code> starting a comment; or a .csv / .parquet "
              f"with an <code>{review_name}</code> column. Then rerun filter onward (<code>dvc repro</code>, or "
              f"<code>clipscrub run</code>). Ready-made lists, every line commented out: "
              f'<a href="review-keep.txt" download>review-keep.txt</a> (the {flagged.height:,} flagged samples: '
              f'uncomment those to keep) and <a href="review-remove.txt" download>review-remove.txt</a> (the '
              f"{near_cut.height:,} just under the cut: uncomment those to remove).</p>",
              "<div class=gallery id=review-gallery>" + "".join(card(i) for i in review_rows["id"].head(2 * cap)) + "</div>"]
    n_clusters = clusters["cluster"].n_unique() if clusters.height else 0
    parts.append(f"<h2 id=clusters>Clusters among flagged samples ({n_clusters})</h2>")
    parts.append("<p>Flagged samples that share a caption, or whose images are identical or near-identical "
                 f"(image embedding cosine &ge; {settings.near_duplicate_cosine}): candidates for natural backdoors "
                 "and coordinated poison.</p>")
    for cluster, members in clusters.group_by("cluster", maintain_order=True):
        first = by_id.get(members["id"][0]) or table.filter(pl.col("id") == members["id"][0]).row(0, named=True)
        norm = _normalise(first["caption"] or "")
        in_data = caption_counts.filter(pl.col("norm") == norm)["len"]
        caption_note = (f" The caption &ldquo;{caption_html(first['caption'])}&rdquo; occurs {int(in_data[0])} times in the dataset."
                        if "caption" in members["kind"][0] and len(in_data) else "")
        shown = shown_in_clusters.filter(pl.col("cluster") == cluster[0])["id"].to_list()
        rest = [i for i in members["id"].to_list() if i not in set(shown)]
        more = ("<p class=more>Also: " + " ".join(f'<a href="{href(i)}">{i}</a>' for i in rest) + "</p>") if rest else ""
        parts.append(f"<div class=cluster id=cluster-{cluster[0]}><b><a href=\"#cluster-{cluster[0]}\">cluster {cluster[0]}</a></b>: "
                     f"{members.height} flagged samples, {html.escape(members['kind'][0])}.{caption_note}<div class=row>"
                     + "".join(cards.card(i, anchor=False) for i in shown) + f"</div>{more}</div>")
    parts += ["<h2 id=lineage>Lineage</h2>",
              f"<pre>{html.escape(json.dumps(lineage, indent=2, sort_keys=True))}</pre>"]
    page = _page(f"clipscrub report: {base.name}", parts)

    gallery_pages = {}
    for p in range(1, pages + 1):
        chunk = flagged_ids[(p - 1) * PER_PAGE:p * PER_PAGE]
        links = " ".join(f'<b>{q}</b>' if q == p else f'<a href="{page_name(q)}">{q}</a>' for q in range(1, pages + 1))
        ranks = f"ranks {(p - 1) * PER_PAGE + 1}&ndash;{(p - 1) * PER_PAGE + len(chunk)}" if chunk else "none flagged"
        gallery_pages[page_name(p)] = _page(f"clipscrub report: {base.name}: flagged page {p}", [
            f'<p><a href="../index.html">&larr; report</a> · pages: {links}</p>',
            f"<h1>Flagged samples, page {p} of {pages}</h1>",
            f"<p>{ranks} of {len(flagged_ids)} flagged, {PER_PAGE} a page. {neighbour_text}</p>",
            "<div class=gallery>" + "".join(cards.card(i, anchor=True) for i in chunk) + "</div>",
        ])

    summary = {"flagged": int(table["is_flagged"].sum()), "gallery": len(top_ids), "clusters": int(n_clusters),
               "clustered_samples": clusters.height, "thumbnails": len(thumbs), "ground_truth": y is not None,
               "removed": applied["removed"], "removed_by_review": len(removed_by_review),
               "kept_by_review": len(kept_by_review), "pages": pages, "missed": missed.height,
               "near_cut": near_cut.height, "nearest_references": neighbour_note or None}
    with atomic_dir(out_dir) as tmp:
        (tmp / "index.html").write_text(page, encoding="utf-8")
        for file_name, rows, verdict, title in (
                ("review-keep.txt", flagged, "keep", f"the {flagged.height:,} samples {threshold.detector} flagged, by rank"),
                ("review-remove.txt", near_cut, "remove", f"the {near_cut.height:,} unflagged samples ranked just under the cut")):
            (tmp / file_name).write_text(review_template(rows, name=review_name, detector=threshold.detector,
                                                         verdict=verdict, title=title), encoding="utf-8")
        (tmp / "flagged").mkdir()
        for name, text in gallery_pages.items():
            (tmp / "flagged" / name).write_text(text, encoding="utf-8")
        clusters.write_parquet(tmp / "clusters.parquet", statistics=False)
        write_lineage(
            tmp, stage="report", module=__name__,
            params={"base": base.model_dump(mode="json"), "threshold": threshold.model_dump(mode="json"),
                    "report": settings.model_dump(mode="json"), "evaluate.truth": None if truth_path is None else str(truth_path)},
            inputs={"raw": raw_dir, "embeddings": emb_dir, "scores": scores_dir, "flags": flags_dir, "clean": clean_dir,
                    # no index: the one read is the scores' own (checked above), so their hash pins it
                    **({"truth": Path(truth_path)} if truth_path else {})},
            upstream=[clean_dir], summary=summary,
        )
    return summary
