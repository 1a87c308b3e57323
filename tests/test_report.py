"""The report stage: what its pages show, computed apart from the HTML (``report_data`` and its
parts); the pages, read through a real HTML parser; the templates' escaping; and a real headless
Chromium that renders the pipeline's report without errors."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import jinja2
import numpy as np
import polars as pl
import pytest

from clipscrub.arrays import RowReader
from clipscrub.errors import DataError
from clipscrub.stages.report import (
    TEMPLATES, Neighbour, Report, anchor_first, cut_caption, find_clusters, names, render, report_data,
    sample_card,
)
from clipscrub.flagging import flag_outliers
from tests.conftest import REPO

ARTIFACTS = Path(os.environ.get("CLIPSCRUB_TEST_ARTIFACTS", REPO / "test-artifacts"))
VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"})


@dataclasses.dataclass
class Element:
    """An element of a parsed page: its tag, attributes and children (elements and text)."""

    tag: str
    attrs: dict[str, str | None]
    children: list[Element | str] = dataclasses.field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return (self.attrs.get("class") or "").split()

    def text(self) -> str:
        """Its text, whitespace collapsed."""
        return " ".join("".join(self._texts()).split())

    def _texts(self):
        for child in self.children:
            yield from [child] if isinstance(child, str) else child._texts()

    def all(self, tag: str | None = None, *, cls: str | None = None, **attrs: str) -> list[Element]:
        """Its descendants, in document order, with ``tag``, the class ``cls`` and ``attrs``."""
        found = []
        for child in self.children:
            if isinstance(child, Element):
                if ((tag is None or child.tag == tag) and (cls is None or cls in child.classes)
                        and all(child.attrs.get(k) == v for k, v in attrs.items())):
                    found.append(child)
                found += child.all(tag, cls=cls, **attrs)
        return found


class _Tree(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open = [Element("#document", {})]

    def handle_starttag(self, tag, attrs):
        element = Element(tag, dict(attrs))
        self.open[-1].children.append(element)
        if tag not in VOID:
            self.open.append(element)

    def handle_startendtag(self, tag, attrs):
        self.open[-1].children.append(Element(tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in [e.tag for e in self.open[1:]]:
            while self.open.pop().tag != tag:
                pass

    def handle_data(self, data):
        self.open[-1].children.append(data)


def parse(text: str) -> Element:
    """A page (or a fragment) as a tree of ``Element``, by Python's own HTML parser."""
    tree = _Tree()
    tree.feed(text)
    tree.close()
    return tree.open[0]


def section(page: Element, anchor: str) -> Element:
    """A section of the page: from its heading (``<h2 id=anchor>``) to the next heading."""
    body = page.all("body")[0].children
    h2 = [i for i, c in enumerate(body) if isinstance(c, Element) and c.tag == "h2"]
    start = next(i for i in h2 if body[i].attrs.get("id") == anchor)
    return Element("section", {}, body[start:next((i for i in h2 if i > start), len(body))])


def header_text(page: Element) -> str:
    """The text above the page's first section."""
    body = page.all("body")[0].children
    first = next(i for i, c in enumerate(body) if isinstance(c, Element) and c.tag == "h2")
    return Element("header", {}, body[:first]).text()


def card_ids(part: Element) -> list[int]:
    """The samples of the cards in ``part``, in order (each card's ``id N`` link)."""
    return [int(next(a for a in card.all("a") if a.attrs.get("href", "").startswith("#sample-")).text().removeprefix("id "))
            for card in part.all("div", cls="card")]


def anchored(part: Element) -> list[int]:
    """The samples whose cards in ``part`` carry their anchor (``id="sample-N"``)."""
    return [int(card.attrs["id"].removeprefix("sample-")) for card in part.all("div", cls="card") if "id" in card.attrs]


def macros():
    """The templates' macros (card, names, caption...), to call with the data they draw."""
    return TEMPLATES.get_template("macros.html.j2").module


def report_of(root: Path, params, **changed) -> Report:
    """``report_data`` on a run's outputs; ``changed``: other folders, settings or a truth table."""
    return report_data(**{"raw_dir": root / "raw", "embeddings_dir": root / "embeddings", "scores_dir": root / "scores",
                          "flags_dir": root / "flags", "clean_dir": root / "clean", "settings": params.report,
                          "threshold": params.threshold, "base": params.base, **changed})


@pytest.fixture(scope="module")
def tiny_report(tiny_run) -> Report:
    """What the tiny run's report shows."""
    return report_of(*tiny_run)


@pytest.fixture(scope="module")
def tiny_page(tiny_run) -> Element:
    """The tiny run's report page, parsed."""
    return parse((tiny_run[0] / "report" / "index.html").read_text())


def test_flags_of_samples_the_embeddings_lack_are_refused(tiny_run, tmp_path):
    root, params = tiny_run
    flagged = int(pl.read_parquet(root / "flags" / "flags.parquet").filter(pl.col("is_flagged"))["id"][0])
    emb = tmp_path / "embeddings"
    shutil.copytree(root / "embeddings", emb)
    ids = np.load(emb / "ids.npy")
    keep = ids != flagged
    for name in ("ids", "image", "text"):
        np.save(emb / f"{name}.npy", np.load(emb / f"{name}.npy")[keep])
    with pytest.raises(DataError, match=rf"the flags name 1 samples the embeddings do not hold, e.g. ids \[{flagged}\]"):
        report_of(root, params, embeddings_dir=emb)


def test_report_is_self_contained(tiny_run, tiny_page, tiny_report):
    root, params = tiny_run
    page = (root / "report" / "index.html").read_text()
    # nothing fetched: no scripts, stylesheets, frames, or images from elsewhere
    assert not tiny_page.all("script") and not tiny_page.all("link") and not tiny_page.all("iframe")
    assert not re.search(r"url\((?!#)", page)  # url(#clip) is inside the SVG
    srcs = [img.attrs["src"] for img in tiny_page.all("img")]
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    headings = [h.text() for h in tiny_page.all("h2")]
    for title in ("Dataset", "Score histograms", "ROC and precision-recall", "Threshold what-if",
                  "Top 20 flagged samples", "Known poison not removed", "Just under the cut", "Review verdicts",
                  "Clusters among flagged samples", "Lineage"):
        assert any(h.startswith(title) for h in headings), title
    assert len(tiny_page.all("svg")) == len(params.score.detectors) + 3  # histograms + ROC + PR + what-if
    # the table of contents: a link to each section, which is there
    toc = [a.attrs["href"] for a in tiny_page.all("nav", cls="toc")[0].all("a")]
    assert toc == ["#summary", "#histograms", "#curves", "#what-if", "#gallery", "#all-flagged", "#missed", "#near-cut",
                   "#review", "#words", "#clusters", "#lineage"]
    assert all(len(tiny_page.all(id=a[1:])) == 1 for a in toc)
    # the flagged gallery's pages: as self-contained, every link between them resolves
    pages = sorted((root / "report" / "flagged").glob("page-*.html"))
    assert [p.name for p in pages] == ["page-0001.html"]
    for p in pages:
        text = p.read_text()
        tree = parse(text)
        assert not tree.all("script") and not tree.all("link") and not tree.all("iframe") and "url(" not in text
        assert all(img.attrs["src"].startswith("data:image/png;base64,") for img in tree.all("img"))
    for src, tree in [(root / "report" / "index.html", tiny_page)] + [(p, parse(p.read_text())) for p in pages]:
        for a in tree.all("a"):
            target = a.attrs["href"].partition("#")[0]
            assert not target or (src.parent / target).is_file(), (src, target)
    # the version's params hash (the sections that change a version, as its stages use them), its value on the page
    from clipscrub.params import params_hash

    lineage = json.loads((root / "clean" / "lineage.json").read_text())
    want = params_hash({n: params.section_in_use(n) for n in type(params).model_fields
                        if n not in ("evaluate", "report", "poison")})
    assert lineage["params_hash"] == want == tiny_report.header.params_hash
    assert f"Params hash {want}, code {lineage['code_version']}, " in section(tiny_page, "summary").text()


def test_report_header_states_the_applied_threshold(tiny_run, tiny_report, tiny_page):
    """The header's summary line: the applied threshold's block (data/metrics/applied.json)."""
    root, params = tiny_run
    applied = tiny_report.header.applied
    a = json.loads((root / "metrics" / "applied.json").read_text())
    removed = pl.read_parquet(root / "clean" / "removed.parquet").height
    assert (a["removed"], a["samples"]) == (removed, 400)
    assert f"kdist, top_fraction 0.05: removed {removed} of 400 (5.00%)" in applied
    assert (f"{a['poison_removed']} of the {removed} removed are known poison (precision {a['precision']:.3f}, "
            f"recall {a['recall']:.3f}; {a['poison_missed']} known poison missed)") in applied
    assert f"Applied threshold: {' '.join(applied.split())}" in header_text(tiny_page)


def _hist_svgs(svgs: list[str]) -> dict[str, str]:
    """detector -> its histogram's SVG, found by the axes title matplotlib keeps as a comment."""
    out = {}
    for svg in svgs:
        m = re.search(r"<!-- (\w+)_score \((?:high|low) = suspicious\) -->", svg)
        if m:
            out[m.group(1)] = svg
    return out
def _x_pixel(svg: str):
    """data value -> x pixel of an SVG histogram, from its x ticks' positions and labels."""
    ticks = re.findall(r'<g id="xtick_\d+">\s*<g id="line2d_\d+">.*?<use [^>]*? x="([-\d.]+)".*?<!-- (.*?) -->', svg, re.S)
    (v0, x0), (v1, x1) = [(float(label.replace("\u2212", "-")), float(x)) for x, label in (ticks[0], ticks[-1])]
    return lambda v: x0 + (v - v0) * (x1 - x0) / (v1 - v0)


def _vertical_lines(svg: str) -> list[tuple[float, bool]]:
    """(x, dashed) of each vertical line in the cut's colour."""
    lines = re.findall(r'<path d="M ([-\d.]+) [-\d.]+\s+L ([-\d.]+) [-\d.]+\s*"[^>]*style="([^"]*stroke: #2c3e50[^"]*)"', svg)
    return [(float(a), "dasharray" in style) for a, b, style in lines if a == b]


def test_histograms_mark_each_detectors_cut(tiny_run, tiny_report):
    """Solid line at the applied cut (threshold.json) on the thresholded detector's histogram; on
    every other one a dashed line where the same rule (top 5%) cuts that detector."""
    root, params = tiny_run
    hists = _hist_svgs(list(tiny_report.histograms))
    assert sorted(hists) == sorted(params.score.detectors)
    scores = pl.read_parquet(root / "scores" / "scores.parquet")
    applied = json.loads((root / "flags" / "threshold.json").read_text())["cut"]
    n_flag = round(params.threshold.fraction * scores.height)
    for d, svg in hists.items():
        sign = -1 if d == "clip" else 1  # clip: low = suspicious
        cut = sign * np.sort(sign * scores[f"{d}_score"].to_numpy())[::-1][n_flag - 1]  # the 20th most suspicious
        main = d == params.threshold.detector
        if main:
            assert cut == applied
        [(x, dashed)] = _vertical_lines(svg)
        assert x == pytest.approx(_x_pixel(svg)(cut), abs=0.01), d
        assert dashed is not main, d
        assert ("<!--  threshold -->" in svg, "<!--  same rule -->" in svg) == (main, not main), d


def _norm(caption: str | None) -> str:
    return " ".join((caption or "").lower().split())


def assert_clusters_follow_flags(root: Path, clusters: pl.DataFrame, flags: pl.DataFrame, cosine: float) -> None:
    """``clusters`` (clusters.parquet's): exactly the connected groups (>= 2) of flagged samples
    linked by a shared normalised caption, identical image bytes or image-embedding cosine >=
    ``cosine``, from scratch."""
    from scipy.sparse.csgraph import connected_components

    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    flagged = flags.filter(pl.col("is_flagged")).join(manifest, on="id").sort("id")
    ids = flagged["id"].to_numpy()
    emb_ids = np.load(root / "embeddings" / "ids.npy")
    vec = np.load(root / "embeddings" / "image.npy")[np.searchsorted(emb_ids, ids)].astype(np.float64)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    caps = np.array([_norm(c) for c in flagged["caption"]])
    sha = flagged["image_sha256"].to_numpy()
    linked = (caps[:, None] == caps[None, :]) | (sha[:, None] == sha[None, :]) | (vec @ vec.T >= cosine)
    _, label = connected_components(linked, directed=False)
    want = sorted(sorted(ids[label == c].tolist()) for c in np.unique(label) if (label == c).sum() >= 2)
    got = sorted(sorted(g["id"].to_list()) for _, g in clusters.group_by("cluster"))
    assert got == want
    assert all(g["size"].to_list() == [g.height] * g.height for _, g in clusters.group_by("cluster"))


def test_clusters_of_the_tiny_run_follow_the_flags(tiny_run):
    root, params = tiny_run
    flags = pl.read_parquet(root / "flags" / "flags.parquet")
    clusters = pl.read_parquet(root / "report" / "clusters.parquet")
    assert_clusters_follow_flags(root, clusters, flags, params.report.near_duplicate_cosine)
    assert clusters.height > 0  # this victim's flagged images are near-identical (checked above)


def test_gallery_marks_the_known_poison_and_counts_captions(tiny_run, tmp_path):
    """The tiny run's data with two of the three poisoned samples captioned "a close-up photo of a
    banana." flagged too, and a truth table naming 5 gallery samples and 2 others: the gallery
    shows the flagged samples by rank and marks exactly the 5; the banana cluster's note counts
    the caption in the whole manifest (3), not among the flagged (2)."""
    root, params = tiny_run
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    banana = sorted(manifest.filter(pl.col("caption") == "a close-up photo of a banana.")["id"].to_list())
    assert len(banana) == 3 and manifest.filter(pl.col("id").is_in(banana))["is_poison"].all()
    flags = pl.read_parquet(root / "flags" / "flags.parquet")
    assert not flags.filter(pl.col("id").is_in(banana))["is_flagged"].any()
    flags = flags.with_columns(is_flagged=pl.col("is_flagged") | pl.col("id").is_in(banana[:2]))
    (tmp_path / "flags").mkdir()
    flags.write_parquet(tmp_path / "flags" / "flags.parquet")
    gallery_ids = flags.filter(pl.col("is_flagged")).sort("rank")["id"].to_list()
    assert len(gallery_ids) == 22 <= params.report.top_n
    marked = set(banana[:2]) | set(gallery_ids[:3])
    others = [banana[2], flags.filter(~pl.col("is_flagged"))["id"][0]]
    pl.DataFrame({"id": [*marked, *others], "is_poison": True}).write_csv(tmp_path / "truth.csv")
    settings = params.report.model_copy(update={"near_duplicate_cosine": 1.0})  # caption clusters only
    report = report_of(root, params, flags_dir=tmp_path / "flags", settings=settings, truth_path=tmp_path / "truth.csv")
    assert [c.id for c in report.gallery] == gallery_ids
    assert {c.id for c in report.gallery if "poisoned" in c.tags} == marked
    assert len(marked) == 5
    assert_clusters_follow_flags(root, report.cluster_table, flags, 1.0)
    assert banana[:2] in [sorted(g["id"].to_list()) for _, g in report.cluster_table.group_by("cluster")]
    in_data: dict[str, int] = {}
    for c in manifest.filter(pl.col("status") == "ok")["caption"].to_list():
        in_data[_norm(c)] = in_data.get(_norm(c), 0) + 1
    notes = [(c.caption.text, c.caption_count) for c in report.clusters if c.caption is not None]
    assert ("a close-up photo of a banana.", 3) in notes
    assert all(n == in_data[_norm(c)] for c, n in notes), notes


def test_report_opens_in_headless_chromium(tiny_run):
    """The pipeline's report in Debian's Chromium: no errors, every image decoded, the new parts
    visible (summary line, what-if table and plot, nearest references, missed and near-cut
    galleries), and anchors followed: a sample, a cluster, the what-if section, a gallery page."""
    from playwright.sync_api import sync_playwright

    root, params = tiny_run
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed: scripts/test.sh installs Debian's package"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    index = (root / "report" / "index.html").resolve().as_uri()
    flagged_ids = pl.read_parquet(root / "flags" / "flags.parquet").filter(pl.col("is_flagged")).sort("rank")["id"].to_list()
    errors: list[str] = []
    seen: dict = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            page.goto(index)
            page.wait_for_load_state("load")
            images = page.evaluate(
                "Array.from(document.images).map(i => ({w: i.naturalWidth, h: i.naturalHeight, ok: i.complete}))")
            seen["gallery"] = page.locator("#top .card").count()
            seen["svgs"] = page.locator("figure svg").count()
            seen["summary"] = page.locator("#summary-line").inner_text()
            seen["summary_visible"] = page.locator("#summary-line").is_visible()
            page.screenshot(path=str(ARTIFACTS / "report-top.png"))
            page.screenshot(path=str(shot), full_page=True)

            def in_view(selector: str) -> bool:
                return page.evaluate("s => { const r = document.querySelector(s).getBoundingClientRect();"
                                     " return r.top >= -1 && r.top < window.innerHeight; }", selector)

            # the table of contents' link to the what-if section: a click scrolls to it
            page.click("nav.toc a[href='#what-if']")
            page.wait_for_function("location.hash === '#what-if'")
            seen["whatif_in_view"] = in_view("#what-if")
            seen["whatif_rows"] = page.locator("table.whatif tbody tr").count()
            seen["whatif_plot"] = page.locator("#what-if ~ .figs svg").first.is_visible()
            page.screenshot(path=str(ARTIFACTS / "report-whatif.png"))
            # a sample's anchor: its card, with its nearest references drawn
            first = flagged_ids[0]
            page.goto(f"{index}#sample-{first}")
            seen["sample_in_view"] = in_view(f"#sample-{first}")
            nearest = page.locator(f"#sample-{first} .nearest .nn")
            seen["nearest"] = nearest.count()
            seen["nearest_img"] = page.evaluate(
                f"Array.from(document.querySelectorAll('#sample-{first} .nearest img')).every(i => i.naturalWidth > 0)")
            seen["nearest_visible"] = nearest.first.is_visible()
            page.screenshot(path=str(ARTIFACTS / "report-sample-neighbours.png"))
            seen["missed"] = page.locator("#missed-gallery .card").count()
            seen["near_cut"] = page.locator("#near-cut-gallery .card").count()
            seen["missed_visible"] = page.locator("#missed-gallery .card").first.is_visible()
            # a cluster's anchor
            page.goto(f"{index}#cluster-0")
            seen["cluster_in_view"] = in_view("#cluster-0")
            # the gallery page link, and back
            page.goto(index)
            page.click("#all-flagged a[href='flagged/page-0001.html']")
            page.wait_for_load_state("load")
            seen["page_url"] = page.url
            seen["page_cards"] = page.locator(".card[id^=sample-]").count()
            seen["page_images"] = page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            page.screenshot(path=str(ARTIFACTS / "report-flagged-page.png"))
            page.click("a[href='../index.html']")
            page.wait_for_load_state("load")
            seen["back"] = page.url
        finally:
            browser.close()
    assert errors == []
    assert seen["gallery"] == min(len(flagged_ids), params.report.top_n)
    assert len(images) >= seen["gallery"] and all(i["ok"] and i["w"] > 0 and i["h"] > 0 for i in images)
    assert seen["svgs"] == len(params.score.detectors) + 3
    removed = pl.read_parquet(root / "clean" / "removed.parquet").height
    assert seen["summary_visible"] and f"of the {removed} removed are known poison" in seen["summary"]
    # 8 top_fraction rows (the applied 5% one of them) and the adaptive rules tail and auto
    assert seen["whatif_in_view"] and seen["whatif_rows"] == 10 and seen["whatif_plot"]
    assert seen["sample_in_view"] and seen["nearest"] == 5 and seen["nearest_img"] and seen["nearest_visible"]
    assert seen["missed"] > 0 and seen["missed_visible"] and seen["near_cut"] == params.report.top_n
    assert seen["cluster_in_view"]
    assert seen["page_url"].endswith("/report/flagged/page-0001.html") and seen["page_cards"] == len(flagged_ids)
    assert seen["page_images"] and seen["back"] == index
    assert shot.stat().st_size > 10_000
    for name in ("report-top.png", "report-whatif.png", "report-sample-neighbours.png", "report-flagged-page.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000, name


def test_clusters_join_shared_captions_and_near_identical_images(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(1, 8))
    vecs = rng.normal(size=(7, 8))
    vecs[4] = base[0]
    vecs[5] = base[0] + 1e-3  # near-identical to 4
    np.save(tmp_path / "image.npy", vecs.astype(np.float32))
    flagged = pl.DataFrame({
        "id": [10, 11, 12, 13, 14, 15, 16],
        "caption": ["A birthday cake", "a  birthday cake ", "a dog", "a cat", "x", "y", "a birthday cake"],
        "image_sha256": ["h1", "h2", "h3", "h3", "h5", "h6", "h7"],
    })
    got = find_clusters(flagged=flagged, image=RowReader(tmp_path / "image.npy"), rows=np.arange(7), cosine=0.99)
    clusters = {c: sorted(g["id"].to_list()) for c, g in got.group_by("cluster")}
    assert sorted(clusters.values()) == [[10, 11, 16], [12, 13], [14, 15]]
    kinds = dict(zip(got["id"].to_list(), got["kind"].to_list()))
    assert kinds[10] == "caption" and kinds[12] == "identical image" and kinds[14] == "near-identical image"
    assert got.filter(pl.col("id") == 10)["size"].item() == 3


# --- issue 16, review: nearest references, every flagged sample, missed / near-cut, what-if -------

def test_cards_show_each_samples_nearest_references(tiny_run, tiny_report, tiny_page):
    """Under each flagged card: its 5 nearest reference entries of the first set's first draw,
    recomputed here by brute force from the embeddings (image query against the draw's image and
    caption entries, the sample's own entries excluded): the same owners, kinds and distances."""
    root, params = tiny_run
    refs = json.loads((root / "index" / "references.json").read_text())["sets"][0]
    assert tiny_report.nearest_note == f"reference set {refs['name']}, draw 1 of {refs['draws']}, modality image_text"
    assert f"({tiny_report.nearest_note};" in section(tiny_page, "gallery").text()
    emb_ids = np.load(root / "embeddings" / "ids.npy")
    image = np.load(root / "embeddings" / "image.npy").astype(np.float64)
    text = np.load(root / "embeddings" / "text.npy").astype(np.float64)
    ref_rows = np.load(root / "index" / refs["name"] / "ref_rows.npy")[0]
    entries = np.concatenate([image[ref_rows], text[ref_rows]])
    owners = emb_ids[np.concatenate([ref_rows, ref_rows])]
    is_caption = np.arange(len(entries)) >= len(ref_rows)
    flags = pl.read_parquet(root / "flags" / "flags.parquet")
    cards = tiny_report.gallery
    assert [c.id for c in cards] == flags.filter(pl.col("is_flagged")).sort("rank")["id"].to_list()
    for card in cards:
        row = int(np.flatnonzero(emb_ids == card.id)[0])
        dist = np.linalg.norm(entries - image[row], axis=1)
        dist[owners == card.id] = np.inf  # a sample is never its own neighbour
        order = np.argsort(dist, kind="stable")[:5]
        assert [(n.id, n.caption_entry) for n in card.nearest] == [(int(owners[j]), bool(is_caption[j])) for j in order], card.id
        assert [n.distance for n in card.nearest] == pytest.approx(dist[order].tolist(), abs=1e-4), card.id


def test_every_flagged_sample_has_a_page(tiny_run, tmp_path, monkeypatch):
    """With 7 cards a page, the 20 flagged samples are on 3 pages in rank order, each card with
    its anchor; the report links every page, and each cluster member not drawn in its cluster
    links to its card's page and anchor."""
    import clipscrub.stages.report as report

    root, params = tiny_run
    monkeypatch.setattr(report, "PER_PAGE", 7)
    settings = params.report.model_copy(update={"top_n": 5, "cluster_members_shown": 2})
    summary = report.write_report(raw_dir=root / "raw", embeddings_dir=root / "embeddings", scores_dir=root / "scores",
                                  flags_dir=root / "flags", clean_dir=root / "clean", out_dir=tmp_path / "report",
                                  settings=settings, threshold=params.threshold, base=params.base)
    ranked = pl.read_parquet(root / "flags" / "flags.parquet").filter(pl.col("is_flagged")).sort("rank")["id"].to_list()
    assert summary["pages"] == 3 and len(ranked) == 20
    pages = [parse((tmp_path / "report" / "flagged" / f"page-{p:04d}.html").read_text()) for p in (1, 2, 3)]
    assert [anchored(p) for p in pages] == [card_ids(p) for p in pages] == [ranked[0:7], ranked[7:14], ranked[14:20]]
    assert "ranks 8–14 of 20 flagged, 7 a page" in pages[1].text()
    links = {(a.attrs["href"], a.text()) for a in pages[2].all("a")}
    assert ("../index.html", "← report") in links and ("page-0001.html", "1") in links
    page = parse((tmp_path / "report" / "index.html").read_text())
    assert anchored(section(page, "gallery")) == ranked[:5]
    [every] = page.all("p", id="all-flagged")
    assert [(a.attrs["href"], a.text()) for a in every.all("a")] == [(f"flagged/page-{p:04d}.html", str(p)) for p in (1, 2, 3)]
    assert every.text().startswith("All 20 flagged samples, by rank, 7 a page (3 pages)")
    clusters = pl.read_parquet(tmp_path / "report" / "clusters.parquet")
    for c, members in clusters.group_by("cluster", maintain_order=True):
        [block] = page.all("div", cls="cluster", id=f"cluster-{c[0]}")
        assert card_ids(block) == members["id"].to_list()[:2] and anchored(block) == []
        links = [(a.attrs["href"].partition("#"), a.text()) for p in block.all("p", cls="more") for a in p.all("a")]
        assert sorted(int(i) for _, i in links) == sorted(members["id"].to_list()[2:])
        for (target, _, anchor), i in links:
            pos = ranked.index(int(i))
            assert anchor == f"sample-{i}" and target == ("" if pos < 5 else f"flagged/page-{pos // 7 + 1:04d}.html")


def test_missed_poison_and_samples_under_the_cut(tiny_run, tiny_report, tiny_page):
    """Missed: the known poison filter kept, by rank. Under the cut: the unflagged samples ranked
    right after the flagged ones (top_n of them). Recomputed from the manifest, flags and removed."""
    root, params = tiny_run
    flags = pl.read_parquet(root / "flags" / "flags.parquet").sort("rank")
    removed = set(pl.read_parquet(root / "clean" / "removed.parquet")["id"].to_list())
    poison = set(pl.read_parquet(root / "raw" / "manifest.parquet").filter(pl.col("is_poison"))["id"].to_list())
    missed = [i for i in flags["id"].to_list() if i in poison and i not in removed]
    got = tiny_report.missed
    assert [c.id for c in got] == missed and len(missed) == len(poison - removed) == tiny_report.missed_total > 0
    assert all("poisoned" in c.tags for c in got)
    assert section(tiny_page, "missed").all("h2")[0].text() == f"Known poison not removed ({len(missed)})"
    assert card_ids(section(tiny_page, "missed")) == missed
    assert all("poison" in card.classes for card in section(tiny_page, "missed").all("div", cls="card"))
    under = flags.filter(~pl.col("is_flagged"))["id"].head(params.report.top_n).to_list()
    assert [c.id for c in tiny_report.near_cut] == card_ids(section(tiny_page, "near-cut")) == under
    assert all(c.nearest for c in tiny_report.near_cut)  # the references that did not make them suspicious enough
    # each sample is anchored once per page
    anchors = anchored(tiny_page)
    assert len(anchors) == len(set(anchors))


def test_summary_line_with_and_without_ground_truth(tiny_run, tiny_report, tiny_page, tmp_path):
    from tests.test_evaluate import copy_raw_without_truth

    root, params = tiny_run
    removed = set(pl.read_parquet(root / "clean" / "removed.parquet")["id"].to_list())
    poison = set(pl.read_parquet(root / "raw" / "manifest.parquet").filter(pl.col("is_poison"))["id"].to_list())
    line = tiny_report.header.summary_line
    assert line == (f"{len(removed & poison)} of the {len(removed)} removed are known poison; "
                    f"{len(poison - removed)} of the {len(poison)} known poison were missed.")
    [drawn] = tiny_page.all("p", id="summary-line")
    assert drawn.text() == line and line in header_text(tiny_page)  # above every section
    copy_raw_without_truth(root, tmp_path)
    bare = report_of(root, params, raw_dir=tmp_path / "raw")
    assert bare.header.summary_line == f"{len(removed)} of 400 removed (no ground truth)."
    assert bare.poison is None and bare.curves == () and all("precision" not in r for r in bare.what_if)
    page = parse(render(bare)["index.html"])
    assert page.all("p", id="summary-line")[0].text() == bare.header.summary_line
    assert not page.all("h2", id="missed") and "precision" not in [th.text() for th in page.all("th")]


def test_what_if_table(tiny_run, tiny_report, tiny_page):
    """Each top_fraction row: f on the threshold detector removes max(1, round(f N)) samples, the
    cut is the last one's score, precision / recall against the manifest; recomputed here. The
    applied rule's row comes first, once, then the adaptive rules (tail, auto)."""
    root, params = tiny_run
    rows = tiny_report.what_if
    part = section(tiny_page, "what-if")
    assert len(part.all("svg")) == 1
    drawn = [[td.text() for td in tr.all("td")] for tr in part.all("table", cls="whatif")[0].all("tbody")[0].all("tr")]
    assert [(d[0], d[-1]) for d in drawn] == [(r["rule"], ", ".join(r["marks"])) for r in rows]
    top = [r for r in rows if r["rule"].startswith("top_fraction ")]
    assert [r["fraction"] for r in top] == [0.05, 0.001, 0.002, 0.005, 0.01, 0.02, 0.1, 0.2]  # the applied 5% first, once
    assert rows[0] is top[0]
    scores = pl.read_parquet(root / "scores" / "scores.parquet").join(
        pl.read_parquet(root / "raw" / "manifest.parquet").select("id", "is_poison"), on="id")
    v = scores["kdist_score"].to_numpy()
    order = np.lexsort((scores["id"].to_numpy(), -v))
    y = scores["is_poison"].to_numpy()
    for r in top:
        k = max(1, round(r["fraction"] * 400))
        chosen = order[:k]
        assert (r["removed"], r["poison_removed"]) == (k, int(y[chosen].sum()))
        assert r["cut"] == pytest.approx(v[chosen[-1]], rel=1e-5)
        assert r["precision"] == pytest.approx(y[chosen].sum() / k, abs=5e-4)
        assert r["recall"] == pytest.approx(y[chosen].sum() / y.sum(), abs=5e-4)
        assert r["marks"] == (["the rule applied", "what filter removed"] if r["fraction"] == params.threshold.fraction
                              else [])
    adaptive = [r for r in rows if r["fraction"] is None]
    assert [r["rule"] for r in adaptive] == ["tail fdr 0.1", "auto z 3.5"]
    for r in adaptive:
        rule = params.threshold.model_copy(update={"method": r["rule"].split()[0]})
        mask, _ = flag_outliers(values=v, ids=scores["id"].to_numpy(), detector="kdist", settings=rule)
        assert r["removed"] == int(mask.sum())


def test_review_verdicts_on_the_page(tiny_run, tmp_path):
    """After a review (2 flagged kept, 3 unflagged removed): the summary counts what filter removed,
    the gallery marks the kept cards, the review section shows all five with their verdicts, and
    missed poison leaves out the poison the review removed."""
    from tests.test_evaluate import review_choice, reviewed_clean

    root, params = tiny_run
    keep, remove = review_choice(root)
    reviewed_clean(root, tmp_path / "clean", keep=keep, remove=remove)
    report = report_of(root, params, clean_dir=tmp_path / "clean")
    flags = pl.read_parquet(root / "flags" / "flags.parquet")
    poison = set(pl.read_parquet(root / "raw" / "manifest.parquet").filter(pl.col("is_poison"))["id"].to_list())
    removed = set(flags.filter(pl.col("is_flagged"))["id"].to_list()) - set(keep) | set(remove)
    assert (report.removed, report.review.removed, report.review.kept) == (len(removed), 3, 2)
    assert report.header.summary_line == (
        f"{len(removed & poison)} of the {len(removed)} removed are known poison; "
        f"{len(poison - removed)} of the {len(poison)} known poison were missed. "
        "Review: 3 removed by filter.remove_ids, 2 flagged samples kept by filter.keep_ids.")
    assert f"removed {len(removed)} of 400" in report.header.applied  # the applied sentence: what filter removed
    assert {c.id for c in report.gallery if "kept by review" in c.tags} == set(keep)
    review = {c.id: c.tags for c in report.review.cards}
    assert set(review) == set(keep) | set(remove)
    assert all(("kept by review" in review[i]) for i in keep)
    assert all(("removed by review" in review[i]) for i in remove)
    assert [c.id for c in report.missed] == \
        flags.sort("rank").filter(pl.col("id").is_in(sorted(poison - removed)))["id"].to_list()
    page = parse(render(report)["index.html"])
    assert section(page, "review").all("h2")[0].text() == "Review verdicts (2 kept, 3 removed)"
    part = section(page, "review")
    drawn = dict(zip(card_ids(part), (card.classes for card in part.all("div", cls="card"))))
    assert set(drawn) == set(review) and all("reviewed" in classes for classes in drawn.values())


def test_report_of_a_run_where_detection_works(planted_run):
    """The planted run (40 poisoned, all removed by the default): the summary line, the ROC curves,
    the gallery's poison marks and the what-if rows hold non-zero figures, recomputed here."""
    root, params, groups = planted_run
    report = report_of(root, params)
    page = parse((root / "report" / "index.html").read_text())
    removed = set(pl.read_parquet(root / "clean" / "removed.parquet")["id"].to_list())
    poison = set(np.flatnonzero(np.isin(groups, ["sparse", "dense"])).tolist())
    assert poison <= removed and len(poison) == 40
    line = f"40 of the {len(removed)} removed are known poison; 0 of the 40 known poison were missed."
    assert report.header.summary_line == page.all("p", id="summary-line")[0].text() == line
    assert len(report.curves) == 2 and page.all("h2", id="curves")
    assert (report.missed_total, report.missed) == (0, ())
    assert section(page, "missed").text() == "Known poison not removed (0) Every known poisoned sample was removed."
    shown = [c.id for c in report.gallery]
    assert shown and all(("poisoned" in c.tags) == (c.id in poison) for c in report.gallery)
    assert sum(i in poison for i in shown) == min(40, len(shown))  # poison ranks first
    [applied] = [r for r in report.what_if if r["rule"] == "tail fdr 0.1"]
    assert "the rule applied" in applied["marks"] and applied["poison_removed"] == 40 and applied["recall"] == 1.0
    assert applied["removed"] == len(removed)


def test_the_targets_caption_words_group_the_flagged_poison(planted_run):
    """The planted poison's captions name two targets ("a photo of a banana", "... of a kite"):
    each is one group of the caption words section, in words.parquet and in the stage's words;
    "photo", which every caption carries, is none."""
    from clipscrub.flows.cli import _report_words

    root, params, groups = planted_run
    report = report_of(root, params)
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    flagged = set(pl.read_parquet(root / "flags" / "flags.parquet").filter(pl.col("is_flagged"))["id"].to_list())
    by_word = {w.word: w for w in report.words}
    assert set(by_word) == {"banana", "kite"}
    for word, group in (("banana", "sparse"), ("kite", "dense")):
        members = set(np.flatnonzero(groups == group).tolist())
        w = by_word[word]
        assert w.size == len(members) and {c.id for c in w.cards} | {i for i, _ in w.more} == members <= flagged
        assert w.dataset_with == manifest.filter(pl.col("caption").str.contains(word)).height
        assert w.flagged == len(flagged) and w.p_value < 1e-3
    table = pl.read_parquet(root / "report" / "words.parquet")
    assert dict(table.group_by("word").len().iter_rows()) == {w: by_word[w].size for w in by_word}
    assert table["is_flagged"].all() and all(w.unflagged == 0 for w in report.words)  # the cut took every one
    page = parse((root / "report" / "index.html").read_text())
    part = section(page, "words")
    assert [d.attrs["id"] for d in part.all("div", cls="words")] == [f"word-{w.word}" for w in report.words]
    assert set(card_ids(part)) == {c.id for w in report.words for c in w.cards}
    summary = json.loads((root / "report" / "lineage.json").read_text())["stages"]["report"]["summary"]
    assert summary["caption_words"] == [{"word": w.word, "flagged": w.size, "captions": w.dataset_with}
                                        for w in report.words]
    assert f"'{report.words[0].word}' ({report.words[0].size} flagged" in _report_words(summary)[1]


def test_a_word_group_shows_the_unflagged_samples_that_carry_its_word(planted_run, tmp_path):
    """Three of the banana poison left unflagged (a cut that stopped short): the banana group
    shows them, most suspicious first, as what the cut may have missed."""
    root, params, groups = planted_run
    flags = pl.read_parquet(root / "flags" / "flags.parquet")
    sparse = flags.filter(pl.col("id").is_in(np.flatnonzero(groups == "sparse").tolist())).sort("rank")
    missed = sparse["id"].tail(3).to_list()
    (tmp_path / "flags").mkdir()
    flags.with_columns(pl.when(pl.col("id").is_in(missed)).then(False).otherwise(pl.col("is_flagged"))
                       .alias("is_flagged")).write_parquet(tmp_path / "flags" / "flags.parquet")
    report = report_of(root, params, flags_dir=tmp_path / "flags")
    banana = next(w for w in report.words if w.word == "banana")
    assert banana.unflagged == 3 and [c.id for c in banana.unflagged_cards] == missed
    assert banana.size == sparse.height - 3
    page = parse(render(report)["index.html"])
    group = page.all("div", id="word-banana")[0]
    assert "3 unflagged samples carry “banana” too" in group.text()
    assert card_ids(group)[-3:] == missed


def test_flags_unrelated_to_the_captions_make_no_word_group(tiny_run):
    """The tiny victim learns nothing: its flags hold no over-represented caption word."""
    root, params = tiny_run
    report = report_of(root, params)
    assert report.words == [] and pl.read_parquet(root / "report" / "words.parquet").height == 0
    part = section(parse((root / "report" / "index.html").read_text()), "words")
    assert "None stands out." in part.text()


@pytest.mark.parametrize(("length", "cut"), [(300, False), (301, True), (10_000_000, True)])
def test_long_captions_are_drawn_cut_short(length, cut):
    """A 10 MB caption was drawn whole on every card and tooltip (a 525 MB report)."""
    caption = cut_caption("<" + "a" * (length - 1))
    assert (caption.length, caption.cut, len(caption.text)) == (length, cut, min(length, 300))
    drawn = str(macros().caption(caption))
    assert drawn.startswith("&lt;aaa")
    if cut:
        assert drawn.endswith(f'&hellip; <span class="cut">({length:,} characters, cut short)</span>')
        assert len(drawn) < 400
    else:
        assert drawn == "&lt;" + "a" * (length - 1)


def test_cards_name_samples_by_key_and_ready_made_review_lists_work(tiny_run, tmp_path):
    """Every card names its sample the source's way (the key here); the review section says how to
    write a list and links two ready-made ones, which filter reads once lines are uncommented."""
    from clipscrub.stages.filter import filter_dataset
    from clipscrub.stages.report import write_report
    from tests.conftest import tiny_params

    root, params = tiny_run
    write_report(raw_dir=root / "raw", embeddings_dir=root / "embeddings", scores_dir=root / "scores",
                 flags_dir=root / "flags", clean_dir=root / "clean", out_dir=tmp_path / "report",
                 settings=params.report, threshold=params.threshold, base=params.base)
    page = parse((tmp_path / "report" / "index.html").read_text())
    key_of = dict(pl.read_parquet(root / "raw" / "manifest.parquet").select("id", "key").iter_rows())
    cards = page.all("div", cls="card")
    assert len(cards) >= 20
    for card, i in zip(cards, card_ids(page)):
        [who] = card.all("div", cls="who")
        assert who.text() == f"key {key_of[i]}" and [c.text() for c in who.all("code")] == [key_of[i]]
    how = section(page, "review")
    assert "No review list was applied to this version." in how.text() and "one entry per line, by key" in how.text()
    assert [a.attrs["href"] for a in how.all("a") if "download" in a.attrs] == ["review-keep.txt", "review-remove.txt"]
    flags = pl.read_parquet(root / "flags" / "flags.parquet").filter(pl.col("is_flagged")).sort("rank")
    lines = (tmp_path / "report" / "review-keep.txt").read_text().splitlines()
    entries = [line for line in lines if re.match(r"# \d{9}  # rank", line)]
    assert [e.split()[1] for e in entries] == [key_of[i] for i in flags["id"]]
    # uncomment the first two: a keep list filter applies
    keep = tmp_path / "keep.txt"
    keep.write_text("\n".join([*lines[:4], entries[0][2:], entries[1][2:], *entries[2:]]) + "\n")
    (tmp_path / "empty.txt").write_text("")
    run = tiny_params([f"filter.keep_ids={keep}", f"filter.remove_ids={tmp_path / 'empty.txt'}"])
    filter_dataset(raw_dir=root / "raw", scores_dir=root / "scores", flags_dir=root / "flags",
                   out_dir=tmp_path / "clean", settings=run.filter, params=run)
    assert pl.read_parquet(tmp_path / "clean" / "overruled.parquet")["id"].to_list() == sorted(flags["id"][:2].to_list())
    remove = (tmp_path / "report" / "review-remove.txt").read_text().splitlines()
    assert sum(1 for line in remove if re.match(r"# \d{9}  # rank", line)) == params.report.top_n


@pytest.mark.parametrize(("row", "drawn"), [
    ({"key": "s01", "file": "a <b>.jpg"}, '<div class="who">key <code>s01</code> · file <code>a &lt;b&gt;.jpg</code></div>'),
    ({"key": "s01", "url": "https://h/x.jpg?a=1&b=2"},
     '<div class="who">key <code>s01</code> · url <a href="https://h/x.jpg?a=1&amp;b=2" rel="noreferrer nofollow">'
     'https://h/x.jpg?a=1&amp;b=2</a></div>'),
    ({"key": "s01", "url": "javascript:alert(1)"}, '<div class="who">key <code>s01</code> · url <code>javascript:alert(1)</code></div>'),
    ({"key": None}, ""),
])
def test_a_cards_names_are_escaped_and_link_only_to_the_web(row, drawn):
    found = names(row)
    assert all(n.href is None or n.href.startswith("https://") for n in found)
    assert str(macros().names(found)) == drawn


def _card(**row):
    """A card of a hostile-free sample, ``row`` changing its table row."""
    return sample_card({"id": 7, "rank": 3, "is_flagged": True, "is_poison": False, "caption": "a dog", "key": "k7",
                        "kdist_score": 1.23456, **row}, detectors=["kdist"], poison_known=True, kept_by_review=set(),
                       removed_by_review=set(), removed=set(), thumb="data:image/png;base64,AAAA", nearest=None)


def test_a_card_draws_its_source_data_as_text():
    """Captions, keys, file names and urls come from the source: a card draws them as text (no
    element, no attribute broken out of), links only a web url, and keeps only our own thumbnail."""
    hostile = """<script>alert("x")</script>'"><img src=x onerror=alert(1)>"""
    neighbour = Neighbour(id=8, caption_entry=True, distance=0.25, caption=cut_caption(hostile), thumb=None)
    card = dataclasses.replace(_card(caption=hostile, key=hostile, file=hostile, url="javascript:" + hostile,
                                     is_poison=True), nearest=(neighbour,), anchor=True, tags=("poisoned", "kept by review"))
    drawn = str(macros().card(card, hostile))
    assert "<script" not in drawn and "<img src=x" not in drawn
    tree = parse(drawn)
    [div] = tree.all("div", cls="card")
    assert div.classes == ["card", "poison", "reviewed"] and div.attrs["id"] == "sample-7"
    assert not tree.all("script") and [img.attrs for img in tree.all("img")] == [
        {"src": "data:image/png;base64,AAAA", "alt": "sample 7"}]
    assert div.all("div", cls="cap")[0].text() == " ".join(hostile.split())
    [who] = div.all("div", cls="who")
    assert not who.all("a") and [c.text() for c in who.all("code")] == [
        " ".join(s.split()) for s in (hostile, hostile, ("javascript:" + hostile)[:57] + "...")]
    assert [(s.attrs["class"], s.text()) for s in div.all("span") if s.attrs.get("class") in ("tag", "rv kept")] == [
        ("tag", "poisoned"), ("rv kept", "kept by review")]
    [nearest] = div.all("div", cls="nearest")
    assert nearest.attrs["title"] == hostile
    [nn] = nearest.all("div", cls="nn")
    assert nn.attrs["title"] == f"id 8 (caption): {hostile}"
    assert [s.text() for s in nn.all("span")] == ["0.250", "8 txt"]
    assert div.all("div", cls="sc")[0].text() == "kdist 1.235"
    assert "#3 id 7" in div.text()


def test_the_templates_name_no_field_their_data_lacks():
    """Strict templates: a field the data lacks is an error, not a blank on the page."""
    fields = {f.name: getattr(_card(), f.name) for f in dataclasses.fields(_card())}
    assert "#3 id 7" in parse(str(macros().card(fields, ""))).text()
    for name in ("caption", "tags", "anchor", "scores"):
        with pytest.raises(jinja2.UndefinedError):
            macros().card({k: v for k, v in fields.items() if k != name}, "")
    with pytest.raises(jinja2.UndefinedError):
        TEMPLATES.get_template("index.html.j2").render()


def test_each_sample_is_anchored_at_its_first_card_on_a_page():
    a, b, c = _card(id=1), _card(id=2), _card(id=3)
    assert [[x.anchor for x in part] for part in anchor_first([a, b], [b, c], [a])] == [[True, True], [False, True], [False]]


def test_the_what_if_table_does_not_repeat_the_applied_rule():
    """The fraction filter removed was added as a top_fraction row: the applied rule again."""
    from clipscrub.gallery import WHAT_IF_FRACTIONS, what_if_fractions
    from clipscrub.params import ThresholdSettings

    assert what_if_fractions(ThresholdSettings(method="tail")) == sorted(WHAT_IF_FRACTIONS)
    assert 0.037 in what_if_fractions(ThresholdSettings(method="top_fraction", fraction=0.037))


@pytest.mark.parametrize("limit", [1, 6, 20, 1000])
def test_flagged_limit_bounds_the_gallery_pages_and_clusters_and_says_so(tiny_run, tmp_path, monkeypatch, limit):
    """``report.flagged_limit``: the gallery pages and the clusters hold the top ``limit`` flagged
    samples by rank; the page and the summary say so when it left some out, and the review list,
    the counts and the caption words still cover all 20."""
    import clipscrub.stages.report as report

    root, params = tiny_run
    monkeypatch.setattr(report, "PER_PAGE", 4)
    settings = params.report.model_copy(update={"top_n": 3, "flagged_limit": limit})
    summary = report.write_report(raw_dir=root / "raw", embeddings_dir=root / "embeddings", scores_dir=root / "scores",
                                  flags_dir=root / "flags", clean_dir=root / "clean", out_dir=tmp_path / "report",
                                  settings=settings, threshold=params.threshold, base=params.base)
    flags = pl.read_parquet(root / "flags" / "flags.parquet")
    ranked = flags.filter(pl.col("is_flagged")).sort("rank")["id"].to_list()
    shown = ranked[:limit]
    assert len(ranked) == 20 and summary["flagged"] == 20 and summary["flagged_shown"] == len(shown)
    assert summary["pages"] == -(-len(shown) // 4)
    pages = sorted((tmp_path / "report" / "flagged").glob("page-*.html"))
    assert [i for p in pages for i in card_ids(parse(p.read_text()))] == shown
    # clusters: exactly those of the top flagged, as if only they were flagged
    top = flags.with_columns(is_flagged=pl.col("is_flagged") & pl.col("id").is_in(shown))
    assert_clusters_follow_flags(root, pl.read_parquet(tmp_path / "report" / "clusters.parquet"), top,
                                 params.report.near_duplicate_cosine)
    keep = (tmp_path / "report" / "review-keep.txt").read_text()
    assert len([line for line in keep.splitlines() if "# rank " in line]) == 20
    page = parse((tmp_path / "report" / "index.html").read_text())
    [every] = page.all("p", id="all-flagged")
    clusters_text = section(page, "clusters").text()
    if limit < 20:
        assert summary["limit"] == f"the gallery pages and clusters cover the top {limit} of 20 flagged (report.flagged_limit)"
        assert every.text().startswith(f"The top {limit} of the 20 flagged samples (report.flagged_limit; "
                                       "review-keep.txt lists all 20), by rank, 4 a page")
        assert f"Clusters among the top {limit} of the 20 flagged" in clusters_text
    else:
        assert summary["limit"] is None and every.text().startswith("All 20 flagged samples, by rank, 4 a page")
        assert "report.flagged_limit" not in clusters_text
