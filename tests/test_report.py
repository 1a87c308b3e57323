"""The report stage: a self-contained page that a real headless Chromium renders without errors."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from clipscrub.arrays import RowReader
from stages.report import find_clusters
from tests.conftest import REPO

ARTIFACTS = Path(os.environ.get("CLIPSCRUB_TEST_ARTIFACTS", REPO / "test-artifacts"))


def test_report_is_self_contained(tiny_run):
    root, params = tiny_run
    page = (root / "report" / "index.html").read_text()
    # nothing fetched: no scripts, stylesheets, or images from elsewhere
    assert not re.search(r"<script|<link|<iframe|url\((?!#)", page)  # url(#clip) is inside the SVG
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for section in ("Dataset", "Score histograms", "ROC and precision-recall", "Top 20 flagged samples",
                    "Clusters among flagged samples", "Lineage"):
        assert section in page
    assert page.count("<svg") == len(params.score.detectors) + 2  # histograms + ROC + PR
    # the version's params hash (the sections that change a version), its value on the page
    from stages.filter import REPORTING

    lineage = json.loads((root / "clean" / "lineage.json").read_text())
    want = params.hash(*(n for n in type(params).model_fields if n not in REPORTING))
    assert lineage["params_hash"] == want
    assert f"Params hash {want}, code {lineage['code_version']}, " in page


def test_report_header_states_the_applied_threshold(tiny_run):
    """The header's summary line: the applied threshold's block (data/metrics/applied.json)."""
    root, params = tiny_run
    page = (root / "report" / "index.html").read_text()
    header = page[page.index("<h1>"):page.index("<h2 id=summary>")]
    a = json.loads((root / "metrics" / "applied.json").read_text())
    removed = pl.read_parquet(root / "clean" / "removed.parquet").height
    assert (a["removed"], a["samples"]) == (removed, 400)
    assert f"kdist, top_fraction 0.05: removed {removed} of 400 (5.00%)" in header
    assert (f"{a['poison_removed']} of the {removed} removed are known poison (precision {a['precision']:.3f}, "
            f"recall {a['recall']:.3f}; {a['poison_missed']} known poison missed)") in header


def _hist_svgs(page: str) -> dict[str, str]:
    """detector -> its histogram's inline SVG, found by the axes title matplotlib keeps as a comment."""
    out = {}
    for svg in re.findall(r"<svg.*?</svg>", page, re.S):
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


def test_histograms_mark_each_detectors_cut(tiny_run):
    """Solid line at the applied cut (threshold.json) on the thresholded detector's histogram; on
    every other one a dashed line where the same rule (top 5%) cuts that detector."""
    root, params = tiny_run
    page = (root / "report" / "index.html").read_text()
    hists = _hist_svgs(page)
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


def assert_clusters_follow_flags(root: Path, report_dir: Path, flags: pl.DataFrame, cosine: float) -> pl.DataFrame:
    """clusters.parquet: exactly the connected groups (>= 2) of flagged samples linked by a shared
    normalised caption, identical image bytes or image-embedding cosine >= ``cosine``, from scratch."""
    from scipy.sparse.csgraph import connected_components

    clusters = pl.read_parquet(report_dir / "clusters.parquet")
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
    return clusters


def test_clusters_of_the_tiny_run_follow_the_flags(tiny_run):
    root, params = tiny_run
    flags = pl.read_parquet(root / "flags" / "flags.parquet")
    clusters = assert_clusters_follow_flags(root, root / "report", flags, params.report.near_duplicate_cosine)
    assert clusters.height > 0  # this victim's flagged images are near-identical (checked above)


def test_gallery_marks_the_known_poison_and_counts_captions(tiny_run, tmp_path):
    """The tiny run's data with two of the three poisoned samples captioned "a close-up photo of a
    banana." flagged too, and a truth table naming 5 gallery samples and 2 others: the gallery
    shows the flagged samples by rank and marks exactly the 5; the banana cluster's note counts
    the caption in the whole manifest (3), not among the flagged (2)."""
    from stages.report import write_report

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
    write_report(raw_dir=root / "raw", embeddings_dir=root / "embeddings", scores_dir=root / "scores",
                 flags_dir=tmp_path / "flags", clean_dir=root / "clean", out_dir=tmp_path / "report", settings=settings,
                 threshold=params.threshold, base=params.base, truth_path=tmp_path / "truth.csv")
    page = (tmp_path / "report" / "index.html").read_text()
    gallery = page[page.index("<div class=gallery>"):page.index("<h2 id=clusters>")]
    cards = re.findall(r'<div class="card( poison)?">.*?<div>(?:#\d+ )?id (\d+)( <span class="tag">poisoned</span>)?</div>', gallery)
    assert [int(i) for _, i, _ in cards] == gallery_ids
    assert {int(i) for cls, i, tag in cards if cls} == {int(i) for cls, i, tag in cards if tag} == marked
    assert len(marked) == 5
    clusters = assert_clusters_follow_flags(root, tmp_path / "report", flags, 1.0)
    assert banana[:2] in [sorted(g["id"].to_list()) for _, g in clusters.group_by("cluster")]
    in_data: dict[str, int] = {}
    for c in manifest.filter(pl.col("status") == "ok")["caption"].to_list():
        in_data[_norm(c)] = in_data.get(_norm(c), 0) + 1
    notes = [(html.unescape(c), int(n))
             for c, n in re.findall(r"The caption &ldquo;(.*?)&rdquo; occurs (\d+) times in the dataset\.", page)]
    assert ("a close-up photo of a banana.", 3) in notes
    assert all(n == in_data[_norm(c)] for c, n in notes), notes


def test_report_opens_in_headless_chromium(tiny_run):
    from playwright.sync_api import sync_playwright

    root, params = tiny_run
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed: scripts/test.sh installs Debian's package"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            page.goto((root / "report" / "index.html").resolve().as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate(
                "Array.from(document.images).map(i => ({w: i.naturalWidth, h: i.naturalHeight, ok: i.complete}))")
            gallery = page.locator(".gallery .card").count()
            svgs = page.locator("figure svg").count()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == []
    flagged = int(pl.read_parquet(root / "flags" / "flags.parquet")["is_flagged"].sum())
    assert gallery == min(flagged, params.report.top_n)
    assert len(images) >= gallery and all(i["ok"] and i["w"] > 0 and i["h"] > 0 for i in images)
    assert svgs == len(params.score.detectors) + 2
    assert shot.stat().st_size > 10_000


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
