"""The documentation: the README stays a short tour whose links resolve, the MkDocs site under
docs/ builds with every link and anchor checked, the benchmark tables equal their JSON, and the
id-contract walk of docs/data-layout.md runs on a real pipeline's outputs."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from markdown.extensions.toc import slugify

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def load_tables():
    spec = importlib.util.spec_from_file_location("benchmark_tables", REPO / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def anchors(page: Path) -> set[str]:
    """The heading anchors MkDocs (and GitHub) give the headings of a markdown page."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slugify(re.sub(r"[`*]", "", h), "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_the_readme_is_a_short_tour():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    headings = [line for line in lines if line.startswith("## ")]
    # a newcomer's order: how to start, what it does, their own data, then the rest
    assert headings[:3] == ["## Quickstart", "## What the demo shows", "## Your data"]


@pytest.mark.parametrize("name", ["README.md", "data/README.md"])
def test_links_in_the_repository_readmes_resolve(name):
    page = REPO / name
    links = LINK.findall(page.read_text())
    assert links
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.is_file(), f"{name}: {link} names no file"
        if anchor:
            assert anchor in anchors(target), f"{name}: {link}: no heading makes #{anchor}"


def test_the_documentation_site_builds_with_every_link_and_anchor_checked(tmp_path):
    """mkdocs.yml is strict and validates links, anchors and omitted pages: any warning fails the
    build, so a page left out of the nav, a link to a missing page or a missing anchor does."""
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    pages = sorted(p.relative_to(DOCS).with_suffix("").as_posix() for p in DOCS.glob("*.md"))
    for page in pages:
        built = tmp_path / "site" / ("index.html" if page == "index" else f"{page}/index.html")
        assert built.is_file(), page
    index = (tmp_path / "site" / "index.html").read_text()
    assert all(f'href="{p}/"' in index for p in pages if p != "index")  # the docs index links every page


def test_a_broken_link_fails_the_build(tmp_path):
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with open(tmp_path / "docs" / "index.md", "a") as f:
        f.write("\nSee [the thresholds](parameters.md#no-such-heading).\n")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "no-such-heading" in out.stderr


def test_every_benchmark_table_in_the_docs_equals_its_json():
    assert load_tables().stale_tables(DOCS) == []


def test_a_figure_that_differs_from_its_json_is_named(tmp_path):
    tables = load_tables()
    shutil.copytree(DOCS, tmp_path / "docs")
    page = tmp_path / "docs" / "benchmarks.md"
    text = page.read_text()
    sizing = tables.sizing().splitlines()[2]  # the first data row
    edited = sizing.replace(" h |", "1 h |", 1)
    assert sizing in text and edited != sizing
    page.write_text(text.replace(sizing, edited))
    assert tables.stale_tables(tmp_path / "docs") == ["benchmarks.md: sizing differs from its JSON"]
    tables.stale_tables(tmp_path / "docs", write=True)
    assert page.read_text() == text


def test_the_id_contract_walk_leads_from_a_flagged_sample_to_its_references(tiny_run):
    """The snippet of docs/data-layout.md, run on the tiny pipeline's outputs, names the same
    references (owner ids, keys, kinds, distances) as the report's own lookup."""
    from clipscrub.gallery import nearest_references

    root, _ = tiny_run
    page = (DOCS / "data-layout.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    assert 'root = Path("data")' in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code.replace('root = Path("data")', f"root = Path({str(root)!r})"), {})
    printed = [re.match(r"(\d+) <- (image|caption) of (\d+) \((.*)\) at ([\d.]+)$", line).groups()
               for line in out.getvalue().splitlines()]
    assert printed

    ids = np.load(root / "embeddings" / "ids.npy")
    manifest = pl.read_parquet(root / "raw" / "manifest.parquet")
    flags = pl.read_parquet(root / "flags" / "flags.parquet").filter(pl.col("is_flagged")).sort("rank")
    sample = int(flags["id"][0])
    row = int(np.flatnonzero(ids == sample)[0])
    found = nearest_references(root / "index", np.array([row]), samples=len(ids))
    valid = found.owners[0] >= 0
    keys = dict(zip(manifest["id"].to_list(), manifest["key"].to_list()))
    expected = [(str(sample), "caption" if cap else "image", str(int(ids[o])), keys[int(ids[o])], f"{d:.3f}")
                for o, cap, d in zip(found.owners[0][valid], found.captions[0][valid], found.distances[0][valid])]
    assert printed == expected
