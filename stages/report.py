"""Stage 9, report: one self-contained HTML page about a cleaned version, to look at before
trusting it.

Writes ``<out>/index.html`` (every figure an inline SVG, every thumbnail a data: URI, so it opens
offline and can be mailed as one file) and ``<out>/clusters.parquet``. The page holds: the
dataset summary; per-detector score histograms with the threshold marked; ROC and PR curves
when the manifest knows which samples are poisoned; a gallery of the top-N flagged samples
(thumbnail, caption, every score); clusters of flagged samples that share a caption or have
near-identical images (natural-backdoor candidates, such as the paper's 798 birthday-cake
images under one caption); and the version's lineage.
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
from clipscrub.io import atomic_dir, read_json, read_manifest, require_file, write_lineage
from clipscrub.metrics import applied_metrics, applied_sentence
from clipscrub.params import BaseSettings, ReportSettings, ThresholdSettings
from clipscrub.shards import decode_image, image_field, iter_shard, shard_path
from clipscrub.sources import read_truth
from stages.threshold import flag_outliers

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1200px;padding:0 1rem;color:#222}
h1{font-size:1.6rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
table{border-collapse:collapse}td,th{padding:.2rem .6rem;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:1rem}.figs figure{margin:0}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:.8rem}
.card{border:1px solid #ddd;border-radius:6px;padding:.4rem;font-size:12px;background:#fafafa}
.card img{display:block;margin:0 auto .3rem;image-rendering:pixelated}
.card .cap{font-style:italic;overflow-wrap:anywhere}.card .sc{color:#555}
.poison{border-color:#c0392b;background:#fdf0ee}.tag{color:#c0392b;font-weight:600}
.noimg{height:64px;display:flex;align-items:center;justify-content:center;color:#999}
.cluster{border:1px solid #ccc;border-radius:6px;padding:.6rem;margin:.8rem 0}
.row{display:flex;flex-wrap:wrap;gap:.4rem}.row .card{width:170px}pre{background:#f5f5f5;padding:.8rem;overflow:auto;max-height:40rem;font-size:12px}
"""


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve, average_precision_score

    plt.rcParams["svg.hashsalt"] = "clipscrub"
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


def _thumbnails(raw_dir: Path, rows: pl.DataFrame, size: int) -> dict[str, str]:
    """key -> PNG data: URI for the manifest rows given (ok rows with a shard)."""
    from PIL import Image

    wanted = rows.filter(pl.col("shard").is_not_null())
    out: dict[str, str] = {}
    for shard, group in wanted.group_by("shard", maintain_order=True):
        keys = set(group["key"].to_list())
        for sample in iter_shard(shard_path(raw_dir, shard[0])):
            key = sample["__key__"]
            ext = image_field(sample)
            if key not in keys or key in out or ext is None:
                continue
            image, _ = decode_image(sample[ext])
            image.thumbnail((size, size), Image.Resampling.NEAREST if max(image.size) <= size else Image.Resampling.LANCZOS)
            if max(image.size) < size:  # tiny images (the demo's 32 px) drawn larger, pixels kept
                scale = size // max(image.size)
                image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
            buf = io.BytesIO()
            image.save(buf, format="PNG", optimize=False)
            out[key] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return out


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


def _card(row: dict[str, Any], thumbs: dict[str, str], detectors: list[str], poison: bool | None) -> str:
    src = thumbs.get(row["key"])
    img = (f'<img src="{src}" alt="sample {row["id"]}">' if src else '<div class="noimg">no image</div>')
    scores = " · ".join(f"{d} {row[f'{d}_score']:.4g}" for d in detectors)
    tag = ' <span class="tag">poisoned</span>' if poison else ""
    rank = f"#{row['rank']} " if row.get("rank") is not None else ""
    return (f'<div class="card{" poison" if poison else ""}">{img}<div>{rank}id {row["id"]}{tag}</div>'
            f'<div class="cap">{html.escape(row["caption"] or "")}</div><div class="sc">{scores}</div></div>')


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
) -> dict[str, Any]:
    """Write ``<out>/index.html`` and ``<out>/clusters.parquet``; return what the page shows.
    ``truth_path``: ``evaluate.truth``, a ground-truth table that wins over the manifest's is_poison."""
    raw_dir, emb_dir, scores_dir, flags_dir, clean_dir = map(Path, (raw_dir, embeddings_dir, scores_dir, flags_dir, clean_dir))
    manifest = read_manifest(raw_dir)
    if truth_path:
        manifest = read_truth(manifest, truth_path)
    scores = pl.read_parquet(require_file(scores_dir / "scores.parquet", param="--scores", what="scores"))
    flags = pl.read_parquet(require_file(flags_dir / "flags.parquet", param="--flags", what="flags"))
    lineage = read_json(require_file(clean_dir / "lineage.json", param="--clean", what="cleaned version"))
    detectors = [c.removesuffix("_score") for c in scores.columns if c.endswith("_score")]
    table = (scores.join(flags.select("id", "rank", "is_flagged", "reason"), on="id", how="left")
             .join(manifest.select("id", "key", "shard", "caption", "image_sha256", "is_poison"), on="id", how="left"))
    truth = table["is_poison"]
    y = truth.to_numpy().astype(bool) if truth.null_count() == 0 and 0 < int(truth.sum()) < len(truth) else None
    applied = applied_metrics(flags=flags, truth=pl.DataFrame({"id": table["id"], "is_poison": truth}), threshold=threshold)

    ids = table["id"].to_numpy()
    cuts: dict[str, float | None] = {}
    for d in detectors:
        values = table[f"{d}_score"].to_numpy().astype(np.float64)
        flagged_d, cut = flag_outliers(values=values, ids=ids, detector=d, settings=threshold.model_copy(update={"detector": d}))
        cuts[d] = float(cut) if np.isfinite(cut) else None
    hists, curves = _figures(table, detectors, y, cuts, threshold.detector, settings.hist_bins)

    flagged = table.filter(pl.col("is_flagged")).sort("rank")
    emb_ids = np.load(require_file(emb_dir / "ids.npy", param="--embeddings", what="embeddings"))
    row_of = {int(i): r for r, i in enumerate(emb_ids)}
    image = RowReader(emb_dir / "image.npy") if (emb_dir / "image.npy").is_file() else None
    clusters = find_clusters(flagged=flagged, image=image, rows=np.array([row_of[int(i)] for i in flagged["id"]], dtype=np.int64),
                             cosine=settings.near_duplicate_cosine)
    # how often each clustered caption occurs in the whole dataset, flagged or not
    caption_counts = manifest.filter(pl.col("status") == "ok").group_by(
        pl.col("caption").map_elements(_normalise, return_dtype=pl.String).alias("norm")).len()

    top = flagged.head(settings.top_n)
    shown_in_clusters = clusters.group_by("cluster", maintain_order=True).head(settings.cluster_members_shown)
    need = table.filter(pl.col("id").is_in(pl.concat([top["id"], shown_in_clusters["id"]]).implode()))
    thumbs = _thumbnails(raw_dir, need, settings.thumb_size)
    by_id = {r["id"]: r for r in table.filter(pl.col("id").is_in(need["id"].implode())).iter_rows(named=True)}

    def poison(r):
        return bool(r["is_poison"]) if y is not None else None

    counts = lineage.get("counts", {})
    summary_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in counts.items())
    model = lineage.get("model", {})
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>clipscrub report: {html.escape(base.name)}</title>",
        f"<meta name=viewport content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>",
        f"<h1>clipscrub report: {html.escape(base.name)}</h1>",
        f"<p class=applied><b>Applied threshold</b>: {html.escape(applied_sentence(applied))}</p>",
        "<h2 id=summary>Dataset</h2>",
        f"<table><tbody>{summary_rows}</tbody></table>",
        f"<p>Model: {html.escape(str(model.get('model_name')))} (checkpoint sha256 {html.escape(str(model.get('checkpoint_sha256')))}). "
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
    parts += [f"<h2 id=gallery>Top {top.height} flagged samples</h2>",
              "<div class=gallery>" + "".join(_card(by_id[i], thumbs, detectors, poison(by_id[i])) for i in top["id"]) + "</div>"]
    n_clusters = clusters["cluster"].n_unique() if clusters.height else 0
    parts.append(f"<h2 id=clusters>Clusters among flagged samples ({n_clusters})</h2>")
    parts.append("<p>Flagged samples that share a caption, or whose images are identical or near-identical "
                 f"(image embedding cosine &ge; {settings.near_duplicate_cosine}): candidates for natural backdoors "
                 "and coordinated poison.</p>")
    for cluster, members in clusters.group_by("cluster", maintain_order=True):
        first = by_id.get(members["id"][0]) or table.filter(pl.col("id") == members["id"][0]).row(0, named=True)
        norm = _normalise(first["caption"] or "")
        in_data = caption_counts.filter(pl.col("norm") == norm)["len"]
        caption_note = (f" The caption &ldquo;{html.escape(first['caption'] or '')}&rdquo; occurs {int(in_data[0])} times in the dataset."
                        if "caption" in members["kind"][0] and len(in_data) else "")
        shown = shown_in_clusters.filter(pl.col("cluster") == cluster[0])["id"].to_list()
        parts.append(f"<div class=cluster><b>cluster {cluster[0]}</b>: {members.height} flagged samples, "
                     f"{html.escape(members['kind'][0])}.{caption_note}<div class=row>"
                     + "".join(_card(by_id[i], thumbs, detectors, poison(by_id[i])) for i in shown) + "</div></div>")
    parts += ["<h2 id=lineage>Lineage</h2>",
              f"<pre>{html.escape(json.dumps(lineage, indent=2, sort_keys=True))}</pre>", "</body></html>"]
    page = "\n".join(parts)

    summary = {"flagged": int(table["is_flagged"].sum()), "gallery": top.height, "clusters": int(n_clusters),
               "clustered_samples": clusters.height, "thumbnails": len(thumbs), "ground_truth": y is not None}
    with atomic_dir(out_dir) as tmp:
        (tmp / "index.html").write_text(page, encoding="utf-8")
        clusters.write_parquet(tmp / "clusters.parquet", statistics=False)
        write_lineage(
            tmp, stage="report",
            params={"base": base.model_dump(mode="json"), "threshold": threshold.model_dump(mode="json"),
                    "report": settings.model_dump(mode="json"), "evaluate.truth": None if truth_path is None else str(truth_path)},
            inputs={"raw": raw_dir, "embeddings": emb_dir, "scores": scores_dir, "flags": flags_dir, "clean": clean_dir,
                    **({"truth": Path(truth_path)} if truth_path else {})},
            upstream=[clean_dir], summary=summary,
        )
    return summary
