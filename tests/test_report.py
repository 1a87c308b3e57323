"""The report stage: a self-contained page that a real headless Chromium renders without errors."""

from __future__ import annotations

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
    lineage = (root / "clean" / "lineage.json").read_text()
    assert '"params_hash"' in lineage and "params_hash" in page


def test_report_header_states_the_applied_threshold(tiny_run):
    """The header's summary line: the applied threshold's block (data/metrics/applied.json)."""
    import json

    root, params = tiny_run
    page = (root / "report" / "index.html").read_text()
    header = page[page.index("<h1>"):page.index("<h2 id=summary>")]
    a = json.loads((root / "metrics" / "applied.json").read_text())
    removed = pl.read_parquet(root / "clean" / "removed.parquet").height
    assert (a["removed"], a["samples"]) == (removed, 400)
    assert f"kdist, top_fraction 0.05: removed {removed} of 400 (5.00%)" in header
    assert (f"{a['poison_removed']} of the {removed} removed are known poison (precision {a['precision']:.3f}, "
            f"recall {a['recall']:.3f}; {a['poison_missed']} known poison missed)") in header


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
