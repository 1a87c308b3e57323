"""Stage 9, report: self-contained HTML pages about a cleaned version, to look at before
trusting it.

Writes ``<out>/index.html``, ``<out>/flagged/page-NNNN.html`` (every figure an inline SVG, every
thumbnail a data: URI, no script: the folder opens offline), ``<out>/clusters.parquet`` and
``<out>/words.parquet``. The
page holds: a summary line (what filter removed, how much of it known poison, the review's
share); the dataset summary; per-detector score histograms with the threshold marked; ROC and PR
curves when the manifest knows which samples are poisoned; a threshold what-if table and plot; a
gallery of the top-N flagged samples (thumbnail, caption, every score, the marks of the review,
and the nearest reference entries that made it suspicious), with every flagged sample on the
gallery pages (``PER_PAGE`` a page); galleries of known poison filter kept and of the samples
just under the cut; the review's verdicts; the caption words over-represented among the flagged
(``clipscrub.words``: a backdoor's target, however many templates phrase it); clusters of
flagged samples that share a caption or have near-identical images (natural-backdoor
candidates, such as the paper's 798 birthday-cake images under one caption); and the version's
lineage. Anchors: ``#sample-<id>``, ``#word-<word>``, ``#cluster-<n>`` and every section's
(``#what-if``, ``#missed``, ``#near-cut``, ``#review``, ``#words``...).

What the pages show is computed apart, as plain data (``report_data``, and the parts it calls:
``header``, ``what_if_rows``, ``sample_card``, ``cluster_views``...); ``render`` draws it with the
templates in ``templates/report/`` (the pages, their macros and their CSS).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import polars as pl
from markupsafe import Markup

from clipscrub.arrays import RowReader
from clipscrub.errors import DataError
from clipscrub.figures import score_figures, thumbnails, what_if_figure
from clipscrub.gallery import nearest_references, page_count, page_name, page_of, what_if_fractions
from clipscrub.io import (atomic_dir, describe_model, read_column, read_frame, read_json, require_file, rows_of_ids,
                          scan_manifest, write_lineage)
from clipscrub.metrics import applied_metrics, applied_sentence, fmt_ratio, removed_as_flags, rule_text
from clipscrub.params import BaseSettings, ReportSettings, ThresholdSettings
from clipscrub.sources import scored_truth
from clipscrub.flagging import REVIEW_REASON
from clipscrub.flagging import flag_outliers
from clipscrub.words import WordGroup, enriched_words

# autoescaped: captions, keys, file names and urls are the source's data and draw as text; only
# our own figures pass as markup (Markup). Strict: a field a template names that its data lacks is
# an error, not a blank on the page
TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates" / "report"),
                               autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
TEMPLATES.filters["ratio"] = fmt_ratio


# a caption is drawn on every card and every tooltip that shows its sample: past this it is cut short
CAPTION_CHARS = 300


@dataclass(frozen=True)
class Caption:
    """A caption's first characters (text, not HTML) and its whole length."""

    text: str
    length: int

    @property
    def cut(self) -> bool:
        return self.length > len(self.text)


def cut_caption(caption: str | None, *, limit: int = CAPTION_CHARS) -> Caption:
    """The caption's first ``limit`` characters and how many it has."""
    caption = caption or ""
    return Caption(caption[:limit], len(caption))


@dataclass(frozen=True)
class Name:
    """One of the source's own names of a sample: ``label`` key, file or url, ``text`` as shown
    (a long url cut short), ``href`` the url to link to (http(s) urls only, else None)."""

    label: str
    text: str
    href: str | None = None


def names(row: dict[str, Any]) -> tuple[Name, ...]:
    """The source's own names of a sample (key, file, url): what its reviewer knows it by, and
    what a review list may name it by."""
    found = [Name(label, str(row[label])) for label in ("key", "file") if row.get(label)]
    url = row.get("url")
    if url:
        # a link only to the web: a url list may hold any scheme
        found.append(Name("url", url if len(url) <= 60 else url[:57] + "...",
                          url if url.lower().startswith(("http://", "https://")) else None))
    return tuple(found)


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
        caption = cut_caption(row["caption"], limit=80)
        text = caption.text.replace("\n", " ") + ("..." if caption.cut else "")
        lines.append(f"# {row[name]}  # rank {row['rank']}, {detector} {row[f'{detector}_score']:.4g}: {text}")
    return "\n".join(lines) + "\n"


def review_name(samples: pl.DataFrame | pl.LazyFrame) -> str:
    """The column review lists name samples by: the one the source's user knows (a url may hold
    ' #', a key may not exist). ``samples``: the scored samples' names, a lazy frame streamed."""
    samples = samples.lazy()
    columns = samples.collect_schema().names()
    if "file" in columns:
        return "file"
    if "url" in columns:
        urls = samples.select(pl.col("url").null_count().alias("blank"),
                              pl.col("url").str.contains(r"\s").any().alias("spaced")).collect(engine="streaming")
        if urls["blank"][0] == 0 and not urls["spaced"][0]:
            return "url"
    return "key"


def normalised(captions: pl.Expr) -> pl.Expr:
    """Captions as clusters compare them: trimmed, lower case, each run of whitespace one space
    (null as ""); an expression, so the whole dataset's captions are counted without a Python
    call per caption."""
    return captions.fill_null("").str.strip_chars().str.to_lowercase().str.replace_all(r"\s+", " ")


def _normalise(captions: list[str | None] | pl.Series) -> list[str]:
    return pl.select(normalised(pl.lit(pl.Series(captions, dtype=pl.String)))).to_series().to_list()


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
    for kind, keys in (("caption", _normalise(flagged["caption"])),
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


@dataclass(frozen=True)
class Neighbour:
    """A nearest reference entry of a sample: its owner's id, whether it is the owner's caption
    embedding (else its image's), its Euclidean distance, the owner's caption and thumbnail."""

    id: int
    caption_entry: bool
    distance: float
    caption: Caption
    thumb: str | None  # a PNG data: URI; None where the owner has no image


@dataclass(frozen=True)
class Card:
    """A sample as a card shows it. ``tags``: ``poisoned`` (known poison, with ground truth only),
    then at most one of ``kept by review``, ``removed by review`` and ``removed`` (unflagged, yet
    removed). ``nearest``: None without an index. ``anchor``: the card carries the sample's
    anchor, ``sample-<id>`` (its first card on a page)."""

    id: int
    rank: int | None
    thumb: str | None
    names: tuple[Name, ...]
    caption: Caption
    scores: tuple[tuple[str, float], ...]  # (detector, score)
    tags: tuple[str, ...]
    nearest: tuple[Neighbour, ...] | None
    anchor: bool = False


def sample_card(row: dict[str, Any], *, detectors: list[str], poison_known: bool, kept_by_review: set[int],
                removed_by_review: set[int], removed: set[int], thumb: str | None,
                nearest: tuple[Neighbour, ...] | None) -> Card:
    """The card of the sample of ``row`` (a report table row: id, rank, is_flagged, is_poison,
    caption, key / file / url and each detector's ``<d>_score``)."""
    sample_id = row["id"]
    tags = ("poisoned",) if poison_known and row["is_poison"] else ()
    if sample_id in kept_by_review:
        tags += ("kept by review",)
    elif sample_id in removed_by_review:
        tags += ("removed by review",)
    elif not row["is_flagged"] and sample_id in removed:
        tags += ("removed",)
    return Card(id=sample_id, rank=row.get("rank"), thumb=thumb, names=names(row), caption=cut_caption(row["caption"]),
                scores=tuple((d, row[f"{d}_score"]) for d in detectors), tags=tags, nearest=nearest)


def anchor_first(*sections: Sequence[Card]) -> list[tuple[Card, ...]]:
    """The galleries of one page, in page order, each sample's first card anchored: one
    ``id="sample-<id>"`` per sample and page."""
    seen: set[int] = set()
    out = []
    for cards in sections:
        out.append(tuple(replace(c, anchor=c.id not in seen) for c in cards))
        seen.update(c.id for c in cards)
    return out


def sample_href(sample_id: int, *, position: int, top_n: int, per_page: int) -> str:
    """Where the index page links a flagged sample (``position``: its place, from 0, among the
    flagged by rank): its card on the index (the top ``top_n``) or on its gallery page."""
    if position < top_n:
        return f"#sample-{sample_id}"
    return f"flagged/{page_name(page_of(position, per_page))}#sample-{sample_id}"


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


def _nearest(index_path: Path, wanted: list[int], *, rows: np.ndarray,
             emb_ids: np.ndarray) -> tuple[dict[int, list[tuple[int, bool, float]]], str]:
    """id -> its ``NEIGHBOURS_SHOWN`` nearest reference entries (owner id, caption entry, distance)
    for each of the ``wanted`` ids (embedding rows ``rows``), and a note naming the set, draw and
    modality they come from."""
    found = nearest_references(index_path, rows, draw=0, samples=len(emb_ids))
    k = NEIGHBOURS_SHOWN
    note = f"reference set {found.set_name}, draw 1 of {found.draws}, modality {found.modality}"
    if read_json(index_path / "references.json")["sets"][0].get("saved"):
        # their owners are -1 - id of the saved version's samples, whose images are not here
        note += ": saved references of an earlier version, not shown"
    return ({i: [(int(emb_ids[o]), bool(c), float(d)) for o, c, d in zip(owners[:k], caps[:k], dists[:k]) if o >= 0]
             for i, owners, caps, dists in zip(wanted, found.owners, found.captions, found.distances)}, note)


def what_if_rows(*, values: np.ndarray, ids: np.ndarray, y: np.ndarray | None, threshold: ThresholdSettings,
                 removed_fraction: float) -> list[dict[str, Any]]:
    """What each rule would remove on the threshold detector's ``values`` (N,) (non-finite scores
    always), against the truth ``y`` (N,) when known: the rule applied, the other adaptive rules
    (tail, auto) with their settings, then top_fraction at each of ``what_if_fractions``. Rows
    carry ``rule`` (its words), ``fraction`` (top_fraction rows only, else None), ``cut``,
    ``removed``, ``marks`` (``the rule applied``; ``what filter removed``: the row whose fraction
    is ``removed_fraction``) and, with ``y``, ``poison_removed``, ``precision`` (None where it
    removes none) and ``recall``."""
    adaptive = [threshold] + [threshold.model_copy(update={"method": m}) for m in ("tail", "auto")
                              if m != threshold.method]
    rules = [(t, t.fraction if t.method == "top_fraction" else None) for t in adaptive] + [
        (threshold.model_copy(update={"method": "top_fraction", "fraction": f}), f) for f in what_if_fractions(threshold)]
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
        marks = [m for m, on in (("the rule applied", text == rule_text(threshold)),
                                 ("what filter removed", f == round(removed_fraction, 6))) if on]
        row: dict[str, Any] = {"rule": text, "fraction": f, "cut": float(cut), "removed": n, "marks": marks}
        if y is not None:
            hit = int((mask & y).sum())
            row |= {"poison_removed": hit, "precision": hit / n if n else None, "recall": hit / int(y.sum())}
        rows.append(row)
    return rows


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


@dataclass(frozen=True)
class Header:
    """The index page's top and dataset section."""

    name: str  # the version's (base.name)
    summary_line: str
    applied: str  # the applied threshold in a sentence
    counts: tuple[tuple[str, Any], ...]  # the lineage's counts: (what, how many)
    model: str  # in words
    detector: str
    method: str
    flagged: int
    params_hash: str
    code_version: str
    input_manifest_sha256: str


def header(*, lineage: dict[str, Any], applied: dict[str, Any], name: str, threshold: ThresholdSettings,
           flagged: int) -> Header:
    """The header of a cleaned version (its ``lineage``) that filter cleaned as ``applied`` says
    (``applied_metrics``, with the review's counts)."""
    model = lineage.get("model", {})
    return Header(name=name, summary_line=summary_line(applied, removed_by_review=applied["removed_by_review"],
                                                       kept_by_review=applied["kept_by_review"]),
                  applied=applied_sentence(applied), counts=tuple(lineage.get("counts", {}).items()),
                  model=describe_model(model) if model.get("model_name") else "unknown", detector=threshold.detector,
                  method=threshold.method, flagged=flagged, params_hash=str(lineage.get("params_hash")),
                  code_version=str(lineage.get("code_version")),
                  input_manifest_sha256=str(lineage.get("input_manifest_sha256")))


@dataclass(frozen=True)
class Cluster:
    """A cluster as the index page shows it."""

    number: int
    size: int
    kind: str  # caption, identical image, near-identical image: those that link its members
    caption: Caption | None  # a caption cluster's (its first member's); else None
    caption_count: int | None  # how often that caption occurs in the whole dataset
    cards: tuple[Card, ...]  # of its first members
    more: tuple[tuple[int, str], ...]  # (id, href of its card) of the others


def cluster_views(clusters: pl.DataFrame, *, captions: dict[int, str | None], caption_counts: dict[str, int],
                  cards: dict[int, Card], links: dict[int, str], shown: int) -> list[Cluster]:
    """Each cluster of ``clusters`` (``find_clusters``' table), its first ``shown`` members as
    ``cards``, the others as ``links``. ``captions``: id -> caption, of every member;
    ``caption_counts``: normalised caption -> how often it occurs in the dataset."""
    out = []
    for (number,), members in clusters.group_by("cluster", maintain_order=True):
        ids, kind = members["id"].to_list(), members["kind"][0]
        count = caption_counts.get(_normalise([captions[ids[0]]])[0]) if "caption" in kind else None
        out.append(Cluster(number=number, size=len(ids), kind=kind, caption_count=count,
                           caption=None if count is None else cut_caption(captions[ids[0]]),
                           cards=tuple(cards[i] for i in ids[:shown]), more=tuple((i, links[i]) for i in ids[shown:])))
    return out


@dataclass(frozen=True)
class WordView:
    """A caption word over-represented among the flagged (``clipscrub.words.WordGroup``) as the
    index page shows it."""

    word: str
    also: tuple[str, ...]
    size: int  # flagged samples in the group
    flagged: int
    dataset_with: int  # scored samples whose caption has the word
    samples: int
    p_value: float
    clusters: tuple[int, ...]  # the caption clusters among its samples
    cards: tuple[Card, ...]  # of its first members
    more: tuple[tuple[int, str], ...]  # (id, href of its card) of the others on the gallery pages
    unlisted: int  # its flagged samples past the gallery pages (report.flagged_limit): counted, not linked
    unflagged: int  # unflagged samples whose caption has the word: what the cut may have missed
    unflagged_cards: tuple[Card, ...]  # of the most suspicious of them


def word_views(groups: list[WordGroup], *, clusters: pl.DataFrame, cards: dict[int, Card], links: dict[int, str],
               order: dict[int, int], unflagged: dict[str, list[int]], shown: int) -> list[WordView]:
    """Each word group, its flagged samples in rank order (``order``: id -> place among the
    flagged by rank): the first ``shown`` as ``cards``, the others as ``links`` (those on the
    gallery pages; the rest counted), with the caption clusters it holds; ``unflagged``: word ->
    the unflagged samples whose caption has it, in rank order, the first ``shown`` as cards."""
    caption_clusters = clusters.filter(pl.col("kind").str.contains("caption"))
    out = []
    for g in groups:
        ids = sorted(g.ids.tolist(), key=order.__getitem__)
        held = caption_clusters.filter(pl.col("id").is_in(ids))["cluster"].unique(maintain_order=True).to_list()
        more = tuple((i, links[i]) for i in ids[shown:] if i in links)
        out.append(WordView(word=g.word, also=tuple(g.also), size=len(ids), flagged=g.flagged,
                            dataset_with=g.dataset_with, samples=g.samples, p_value=g.p_value, clusters=tuple(held),
                            cards=tuple(cards[i] for i in ids[:shown]), more=more,
                            unlisted=len(ids[shown:]) - len(more), unflagged=len(unflagged[g.word]),
                            unflagged_cards=tuple(cards[i] for i in unflagged[g.word][:shown])))
    return out


@dataclass(frozen=True)
class ReviewSection:
    """The review section."""

    kept: int  # flagged samples the review kept
    removed: int  # samples the review removed
    applied: bool  # whether a review list was applied to this version
    name: str  # the column review lists name samples by
    cards: tuple[Card, ...]  # the first reviewed samples, by rank
    total: int  # reviewed samples
    flagged: int  # lines of the ready-made keep list
    near_cut: int  # lines of the ready-made remove list


@dataclass(frozen=True)
class GalleryPage:
    """A page of the flagged gallery: its cards hold the flagged samples ``first`` to ``last`` by rank."""

    number: int
    name: str
    cards: tuple[Card, ...]
    first: int
    last: int


def gallery_pages(cards: Sequence[Card], *, per_page: int) -> list[GalleryPage]:
    """The flagged samples' ``cards`` (by rank), ``per_page`` a page; one page when there are none."""
    return [GalleryPage(number=p, name=page_name(p), cards=tuple(cards[(p - 1) * per_page:p * per_page]),
                        first=(p - 1) * per_page + 1, last=min(p * per_page, len(cards)))
            for p in range(1, page_count(len(cards), per_page) + 1)]


@dataclass(frozen=True)
class Report:
    """What the pages show, and what is written beside them (the last three fields)."""

    header: Header
    histograms: tuple[Markup, ...]  # inline SVG, a detector each
    curves: tuple[Markup, ...]  # ROC and PR, with ground truth; else none
    what_if: list[dict[str, Any]]  # what_if_rows
    what_if_plot: Markup
    poison: int | None  # known poison samples; None without ground truth
    removed: int  # what filter removed
    nearest_note: str  # which reference entries the cards' nearest are; "" without an index
    no_index: str  # why there is no index
    neighbours_shown: int
    gallery: tuple[Card, ...]  # the top flagged
    per_page: int
    pages: list[GalleryPage]
    shown_flagged: int  # the top flagged on the gallery pages and clustered (report.flagged_limit)
    missed: tuple[Card, ...]  # known poison filter kept, the first
    missed_total: int
    near_cut: tuple[Card, ...]
    review: ReviewSection
    clusters: list[Cluster]
    words: list[WordView]  # caption words over-represented among the flagged
    cosine: float  # near_duplicate_cosine
    lineage: str  # the version's lineage, JSON
    cluster_table: pl.DataFrame  # find_clusters': clusters.parquet
    word_table: pl.DataFrame  # words.parquet: id, word, is_flagged, p_value: each group's samples, and the unflagged with its word
    review_lists: dict[str, str]  # file name -> review_template
    thumbnails: int  # how many were drawn


def limit_note(report: Report) -> str | None:
    """What ``report.flagged_limit`` left out, in words (None where it left out nothing): ``the
    gallery pages and clusters cover the top 10,000 of 160,000 flagged``."""
    if report.shown_flagged >= report.header.flagged:
        return None
    return (f"the gallery pages and clusters cover the top {report.shown_flagged:,} of {report.header.flagged:,} "
            "flagged (report.flagged_limit)")


def report_data(*, raw_dir: str | Path, embeddings_dir: str | Path, scores_dir: str | Path, flags_dir: str | Path,
                clean_dir: str | Path, settings: ReportSettings, threshold: ThresholdSettings, base: BaseSettings,
                truth_path: str | Path | None = None, index_dir: str | Path | None = None) -> Report:
    """Read the stages' outputs and compute what the pages show (arguments: ``write_report``'s).

    Memory stays bounded at web scale: the only columns of N rows held are the scored ids, the
    truth and one detector's scores at a time (for the cuts, figures and what-if table); the
    captions are streamed (caption words, caption counts, the review lists' naming column), and
    whole rows are read only for the samples shown or listed (the flagged, a few hundred others)."""
    raw_dir, emb_dir, scores_dir, flags_dir, clean_dir = map(Path, (raw_dir, embeddings_dir, scores_dir, flags_dir, clean_dir))
    manifest = scan_manifest(raw_dir)
    scores = pl.scan_parquet(require_file(scores_dir / "scores.parquet", param="--scores", what="scores"))
    flags_scan = pl.scan_parquet(require_file(flags_dir / "flags.parquet", param="--flags", what="flags"))
    lineage = read_json(require_file(clean_dir / "lineage.json", param="--clean", what="cleaned version"))
    removed_df = pl.read_parquet(require_file(clean_dir / "removed.parquet", param="--clean", what="cleaned version"))
    overruled_df = (pl.read_parquet(clean_dir / "overruled.parquet") if (clean_dir / "overruled.parquet").is_file()
                    else pl.DataFrame({"id": []}, schema={"id": pl.Int64}))
    removed_ids = set(removed_df["id"].to_list())
    removed_by_review = set(removed_df.filter(pl.col("reason") == REVIEW_REASON)["id"].to_list())
    kept_by_review = set(overruled_df["id"].to_list())
    detectors = [c.removesuffix("_score") for c in scores.collect_schema().names() if c.endswith("_score")]
    shown_columns = [c for c in ("key", "shard", "caption", "image_sha256", "file", "url")
                     if c in manifest.collect_schema().names()]

    # the scored samples, in the scores' order, and their truth (a ground-truth table wins over
    # the manifest's is_poison): the columns of N rows the report holds
    ids = read_column(scores_dir / "scores.parquet", "id")  # each N-long column read once, not copied
    ids_s = pl.Series("id", ids)  # the same memory
    truth = scored_truth(raw_dir, ids=ids, truth=truth_path)
    truth_table = pl.DataFrame({"id": ids_s, "is_poison": truth})
    y = truth.to_numpy().astype(bool) if truth.null_count() == 0 and 0 < int(truth.sum()) < len(truth) else None
    flags = read_frame(flags_dir / "flags.parquet", ["id", "is_flagged", *(c for c in ("is_non_finite",)
                                                                          if c in flags_scan.collect_schema().names())])
    # what filter actually removed: the flags, less the review's keep list, plus its remove list
    applied = applied_metrics(flags=removed_as_flags(flags=flags, removed=removed_ids, scored=ids_s),
                              truth=truth_table, threshold=threshold)
    applied |= {"flagged": int(flags["is_flagged"].sum()), "kept_by_review": len(kept_by_review),
                "removed_by_review": len(removed_by_review)}
    del flags

    def column(detector: str) -> np.ndarray:
        """One detector's scores (N,), in the scores' order: read when needed, not kept."""
        return read_column(scores_dir / "scores.parquet", f"{detector}_score")

    cuts: dict[str, float | None] = {}
    for d in detectors:
        _, cut = flag_outliers(values=column(d).astype(np.float64, copy=False), ids=ids, detector=d,
                               settings=threshold.model_copy(update={"detector": d}))
        cuts[d] = float(cut) if np.isfinite(cut) else None
    hists, curves = score_figures(values=column, detectors=detectors, y=y, cuts=cuts,
                                  threshold_detector=threshold.detector, bins=settings.hist_bins)
    what_if = what_if_rows(values=column(threshold.detector).astype(np.float64, copy=False), ids=ids, y=y,
                           threshold=threshold, removed_fraction=applied["removed_fraction"] or 0.0)

    def rows(wanted: Any) -> pl.DataFrame:
        """The rows of the scored samples among ``wanted`` ids (a few thousand, not N): id, each
        ``<d>_score``, rank, is_flagged, reason, the manifest's names and caption, is_poison."""
        among = pl.col("id").is_in(pl.Series(np.unique(np.asarray(wanted, dtype=np.int64))).implode())
        return (scores.filter(among)
                .join(flags_scan.select("id", "rank", "is_flagged", "reason").filter(among), on="id", how="left")
                .join(manifest.select("id", *shown_columns).filter(among), on="id", how="left")
                .join(truth_table.lazy().filter(among), on="id", how="left")
                .collect())

    def by_rank(wanted: Any) -> list[int]:
        """The scored samples among ``wanted`` ids, by rank."""
        return rows(wanted).sort("rank")["id"].to_list()

    flagged_by_rank = flags_scan.filter(pl.col("is_flagged")).select("id").collect()["id"]
    flagged = rows(flagged_by_rank).sort("rank")  # (F rows): the clusters', words' and review list's
    emb_ids = np.load(require_file(emb_dir / "ids.npy", param="--embeddings", what="embeddings"))
    image = RowReader(emb_dir / "image.npy") if (emb_dir / "image.npy").is_file() else None
    flagged_rows = rows_of_ids(emb_ids, flagged["id"].to_numpy())
    if (flagged_rows < 0).any():  # a row of -1 would read the last embedding
        raise DataError(f"the flags name {int((flagged_rows < 0).sum())} samples the embeddings do not hold, e.g. ids "
                        f"{flagged['id'].filter(pl.Series(flagged_rows < 0)).head(5).to_list()}: rerun score and "
                        "threshold", param="--flags")
    # the top flagged, one by one: on the gallery pages, and clustered (pairwise, so bounded)
    limit = settings.flagged_limit
    paged = flagged.head(limit)
    clusters = find_clusters(flagged=paged, image=image, rows=flagged_rows[:limit], cosine=settings.near_duplicate_cosine)
    # one target's captions in many phrasings, one group (not a cluster per template); the
    # unflagged samples that carry its word are where the cut may have missed some. The
    # dataset's captions are streamed, the scored ones only (the manifest's ok samples: embed's
    # rows, whose ids filter checked the flags against; picked by status, not a set of N ids)
    scored_captions = manifest.filter(pl.col("status") == "ok").select("id", "caption")
    groups = enriched_words(samples=len(ids), captions=scored_captions, flagged=flagged.select("id", "caption"))
    others = np.concatenate([g.unflagged for g in groups]) if groups else np.empty(0, np.int64)
    ranked = np.asarray(by_rank(others), dtype=np.int64)
    unflagged = {g.word: ranked[np.isin(ranked, g.unflagged)].tolist() for g in groups}
    flagged_ids, shown_ids, cap = flagged["id"].to_list(), paged["id"].to_list(), settings.top_n
    order = {i: p for p, i in enumerate(flagged_ids)}
    # known poison filter did not remove (flagged and kept by review included), most suspicious first
    missed = (by_rank(ids[y & ~np.isin(ids, np.fromiter(removed_ids, dtype=np.int64, count=len(removed_ids)))])
              if y is not None else [])
    near_cut = rows(flags_scan.filter(~pl.col("is_flagged")).sort("rank").head(cap).select("id").collect()["id"]
                    ).sort("rank")
    reviewed = by_rank(sorted(kept_by_review | removed_by_review))
    card_ids = set(shown_ids) | set(flagged_ids[:cap]) | set(missed[:cap]) | set(near_cut["id"].to_list()) | set(reviewed[:2 * cap])
    card_ids |= {i for ids in unflagged.values() for i in ids[:settings.cluster_members_shown]}
    # a word group's first flagged samples are drawn whether or not they made the gallery pages
    card_ids |= {i for g in groups for i in sorted(g.ids.tolist(), key=order.__getitem__)[:settings.cluster_members_shown]}

    index_path, no_index = _index_for(scores_dir, Path(index_dir) if index_dir is not None else None)
    card_rows = rows_of_ids(emb_ids, sorted(card_ids))
    found, note = (_nearest(index_path, [i for i, r in zip(sorted(card_ids), card_rows) if r >= 0],
                            rows=card_rows[card_rows >= 0], emb_ids=emb_ids)
                   if index_path is not None else ({}, ""))
    del emb_ids
    owners = {o for f in found.values() for o, _, _ in f}
    drawn = rows(sorted(card_ids | owners))
    by_id = {r["id"]: r for r in drawn.iter_rows(named=True)}
    mini = max(16, settings.thumb_size // 3)
    sizes: dict[str, set[int]] = {}
    for wanted, size in ((card_ids, settings.thumb_size), (owners, mini)):
        for i in wanted:
            if by_id.get(i, {}).get("key") is not None:
                sizes.setdefault(by_id[i]["key"], set()).add(size)
    thumbs = thumbnails(raw_dir, drawn.filter(pl.col("key").is_in(list(sizes))), sizes)

    def thumb(sample_id: int, size: int) -> str | None:
        return thumbs.get((by_id.get(sample_id, {}).get("key"), size))

    cards = {i: sample_card(by_id[i], detectors=detectors, poison_known=y is not None, kept_by_review=kept_by_review,
                            removed_by_review=removed_by_review, removed=removed_ids, thumb=thumb(i, settings.thumb_size),
                            nearest=None if i not in found else tuple(
                                Neighbour(id=o, caption_entry=c, distance=d, thumb=thumb(o, mini),
                                          caption=cut_caption(by_id.get(o, {}).get("caption"))) for o, c, d in found[i]))
             for i in sorted(card_ids)}
    gallery, missed_cards, near_cut_cards, review_cards = anchor_first(*(
        [cards[i] for i in shown] for shown in (flagged_ids[:cap], missed[:cap], near_cut["id"], reviewed[:2 * cap])))
    clustered = clusters["id"].to_list()
    # how often each clustered caption occurs in the whole dataset, flagged or not: counted in a
    # stream of the normalised captions, keeping only the clustered ones (not a table of every caption)
    wanted_captions = sorted(set(_normalise([by_id[i]["caption"] for i in clustered])))
    counted = (manifest.filter(pl.col("status") == "ok").select(normalised(pl.col("caption")).alias("norm"))
               .filter(pl.col("norm").is_in(pl.Series(wanted_captions, dtype=pl.String).implode()))
               .group_by("norm").len().collect(engine="streaming")) if wanted_captions else None
    # the scored samples are the manifest's ok ones (embed's rows; filter checked the flags' ids
    # against them): picked by status, not by a set of N ids
    name = review_name(manifest.filter(pl.col("status") == "ok")
                       .select(*(c for c in ("file", "url") if c in shown_columns)))
    # the flagged with a card to link to: on the gallery pages, or in the index page's top_n
    links = {i: sample_href(i, position=p, top_n=cap, per_page=PER_PAGE)
             for p, i in enumerate(flagged_ids[:max(limit, cap)])}
    return Report(
        header=header(lineage=lineage, applied=applied, name=base.name, threshold=threshold, flagged=len(flagged_ids)),
        histograms=tuple(map(Markup, hists)), curves=tuple(map(Markup, curves)), what_if=what_if,
        what_if_plot=Markup(what_if_figure(what_if, applied_fraction=applied["removed_fraction"] or 1e-3,
                                            detector=threshold.detector)),
        poison=None if y is None else int(y.sum()), removed=applied["removed"], nearest_note=note, no_index=no_index,
        neighbours_shown=NEIGHBOURS_SHOWN, gallery=gallery, per_page=PER_PAGE,
        pages=gallery_pages([replace(cards[i], anchor=True) for i in shown_ids], per_page=PER_PAGE),
        shown_flagged=len(shown_ids), missed=missed_cards, missed_total=len(missed), near_cut=near_cut_cards,
        review=ReviewSection(kept=len(kept_by_review), removed=len(removed_by_review), applied="review" in lineage,
                             name=name, cards=review_cards, total=len(reviewed), flagged=flagged.height,
                             near_cut=near_cut.height),
        clusters=cluster_views(clusters, captions={i: by_id[i]["caption"] for i in clustered},
                               caption_counts={} if counted is None else dict(counted.iter_rows()), cards=cards,
                               shown=settings.cluster_members_shown, links=links),
        words=word_views(groups, clusters=clusters, cards=cards, links=links, order=order, unflagged=unflagged,
                         shown=settings.cluster_members_shown),
        cosine=settings.near_duplicate_cosine, lineage=json.dumps(lineage, indent=2, sort_keys=True),
        cluster_table=clusters, thumbnails=len(thumbs),
        word_table=pl.DataFrame(
            [(i, g.word, True, g.p_value) for g in groups for i in g.ids.tolist()]
            + [(i, g.word, False, g.p_value) for g in groups for i in unflagged[g.word]],
            schema={"id": pl.Int64, "word": pl.String, "is_flagged": pl.Boolean, "p_value": pl.Float64}, orient="row"),
        review_lists={"review-keep.txt": review_template(
                          flagged, name=name, detector=threshold.detector, verdict="keep",
                          title=f"the {flagged.height:,} samples {threshold.detector} flagged, by rank"),
                      "review-remove.txt": review_template(
                          near_cut, name=name, detector=threshold.detector, verdict="remove",
                          title=f"the {near_cut.height:,} unflagged samples ranked just under the cut")})


def rendered(report: Report) -> Iterator[tuple[str, str]]:
    """The pages one at a time: (path in the report folder, HTML), ``index.html`` first."""
    index, gallery = TEMPLATES.get_template("index.html.j2"), TEMPLATES.get_template("flagged_page.html.j2")
    yield "index.html", index.render(report=report)
    for page in report.pages:
        yield f"flagged/{page.name}", gallery.render(report=report, page=page)


def render(report: Report) -> dict[str, str]:
    """The pages: path in the report folder (``index.html``, ``flagged/page-NNNN.html``) -> HTML."""
    return dict(rendered(report))


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
    """Write ``<out>/index.html``, ``<out>/flagged/page-NNNN.html`` (the top ``report.flagged_limit``
    flagged samples, by rank, ``PER_PAGE`` a page), ``<out>/clusters.parquet`` and the ready-made review lists; return what
    the pages show. ``truth_path``: ``evaluate.truth``, a ground-truth table that wins over the
    manifest's is_poison. ``index_dir``: the index stage's output, for each card's nearest
    references (default: the ``index`` folder beside the scores, when it is the one they were
    computed from)."""
    report = report_data(raw_dir=raw_dir, embeddings_dir=embeddings_dir, scores_dir=scores_dir, flags_dir=flags_dir,
                         clean_dir=clean_dir, settings=settings, threshold=threshold, base=base, truth_path=truth_path,
                         index_dir=index_dir)
    summary = {"flagged": report.header.flagged, "gallery": len(report.gallery), "clusters": len(report.clusters),
               "clustered_samples": report.cluster_table.height, "thumbnails": report.thumbnails,
               "caption_words": [{"word": w.word, "flagged": w.size, "captions": w.dataset_with} for w in report.words],
               "ground_truth": report.poison is not None, "removed": report.removed,
               "removed_by_review": report.review.removed, "kept_by_review": report.review.kept,
               "pages": len(report.pages), "flagged_shown": report.shown_flagged, "limit": limit_note(report),
               "missed": report.missed_total, "near_cut": len(report.near_cut),
               "nearest_references": report.nearest_note or None}
    with atomic_dir(out_dir) as tmp:
        (tmp / "flagged").mkdir()
        for name, text in rendered(report):
            (tmp / name).write_text(text, encoding="utf-8")
        for name, text in report.review_lists.items():
            (tmp / name).write_text(text, encoding="utf-8")
        report.cluster_table.write_parquet(tmp / "clusters.parquet", statistics=False)
        report.word_table.write_parquet(tmp / "words.parquet", statistics=False)
        write_lineage(
            tmp, stage="report", module=__name__,
            params={"base": base.model_dump(mode="json"), "threshold": threshold.model_dump(mode="json"),
                    "report": settings.model_dump(mode="json"), "evaluate.truth": None if truth_path is None else str(truth_path)},
            inputs={"raw": Path(raw_dir), "embeddings": Path(embeddings_dir), "scores": Path(scores_dir),
                    "flags": Path(flags_dir), "clean": Path(clean_dir),
                    # no index: the one read is the scores' own (checked above), so their hash pins it
                    **({"truth": Path(truth_path)} if truth_path else {})},
            upstream=[Path(clean_dir)], summary=summary,
        )
    return summary
