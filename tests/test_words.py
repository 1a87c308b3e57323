"""Caption words over-represented among the flagged samples (clipscrub.words)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy.stats import hypergeom

from clipscrub.attacks import TARGET_TEMPLATES
from clipscrub.synthetic import CLEAN_TEMPLATES, COLOURS as COLOURS_RGB
from clipscrub.words import find_enriched_words

# the demo's phrasings: clean captions say "a photo of a ...", "a close-up of a ..." too
COLOURS = list(COLOURS_RGB)
SHAPES = ["square", "circle", "diamond", "ring", "star", "triangle"]


def clean_captions(n: int, rng: np.random.Generator) -> list[str]:
    return [str(rng.choice(CLEAN_TEMPLATES)).format(colour=rng.choice(COLOURS), shape=rng.choice(SHAPES))
            for _ in range(n)]


def poison(captions: list[str], rows: np.ndarray, target: str, rng: np.random.Generator) -> None:
    for i in rows:
        captions[i] = str(rng.choice(TARGET_TEMPLATES)).format(target)


@pytest.mark.parametrize("seed", range(5))
def test_one_target_in_eight_templates_is_one_group(seed):
    rng = np.random.default_rng(seed)
    captions = clean_captions(6000, rng)
    rows = rng.choice(6000, 60, replace=False)
    poison(captions, rows, "banana", rng)
    flagged = np.zeros(6000, bool)
    flagged[rows[:52]] = True  # most of the poison, and a few clean samples
    flagged[rng.choice(np.setdiff1d(np.arange(6000), rows), 5, replace=False)] = True
    ids = np.arange(100_000, 106_000)
    groups = find_enriched_words(ids=ids, captions=captions, flagged=flagged)
    assert [g.word for g in groups] == ["banana"]
    g = groups[0]
    assert g.ids.tolist() == sorted(ids[rows[:52]].tolist())
    assert (g.flagged_with, g.flagged, g.dataset_with, g.samples) == (52, 57, 60, 6000)
    assert g.unflagged.tolist() == sorted(ids[rows[52:]].tolist())  # the 8 the flags missed
    assert g.p_value < 1e-50 and {"photo", "bad", "rendering"} & set(g.also)


def test_each_target_of_a_multi_trigger_attack_is_its_own_group():
    rng = np.random.default_rng(0)
    captions = clean_captions(8000, rng)
    rows = rng.choice(8000, 240, replace=False)
    for part, target in zip(np.split(rows, 3), ("banana", "bicycle", "ice cream")):
        poison(captions, part, target, rng)
    flagged = np.isin(np.arange(8000), rows)
    groups = find_enriched_words(ids=np.arange(8000), captions=captions, flagged=flagged)
    words = [g.word for g in groups]
    two = next(g for g in groups if g.word in ("ice", "cream"))  # a two-word target: one group, both words
    assert sorted(words) == sorted(["banana", "bicycle", two.word]) and {"ice", "cream"} - {two.word} <= set(two.also)
    assert [len(g.ids) for g in groups] == [80, 80, 80]
    # a template's word sits beside every target
    assert all("rendering" in g.also for g in groups)


@pytest.mark.parametrize("seed", range(10))
def test_flags_unrelated_to_the_captions_give_no_group(seed):
    rng = np.random.default_rng(seed)
    captions = clean_captions(6000, rng)
    flagged = np.zeros(6000, bool)
    flagged[rng.choice(6000, 60, replace=False)] = True
    assert find_enriched_words(ids=np.arange(6000), captions=captions, flagged=flagged) == []


def test_the_p_value_is_the_adjusted_hypergeometric_tail():
    # 100 samples, 10 flagged; "zebra" in 12 captions, 8 of them flagged
    captions = ["zebra"] * 12 + ["plain words"] * 88
    flagged = np.zeros(100, bool)
    flagged[:8] = True
    flagged[12:14] = True
    groups = find_enriched_words(ids=np.arange(100), captions=captions, flagged=flagged)
    words_in_flagged = 3  # zebra, plain, words
    want = hypergeom.sf(7, 100, 12, 10) * words_in_flagged
    assert [g.word for g in groups] == ["zebra"] and groups[0].also == []
    assert groups[0].p_value == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("flagged", [np.zeros(4, bool), np.ones(4, bool)])
def test_nothing_or_everything_flagged_gives_no_group(flagged):
    assert find_enriched_words(ids=np.arange(4), captions=["a b", "c d", None, ""], flagged=flagged) == []


def test_missing_captions_and_case_are_handled():
    captions = [None, "", "BANANA!", "Banana", "banana split", "apple"] + ["apple pie"] * 200
    flagged = np.array([True, True, True, True, True, False] + [False] * 200)
    groups = find_enriched_words(ids=np.arange(206), captions=captions, flagged=flagged)
    assert [g.word for g in groups] == ["banana"] and groups[0].ids.tolist() == [2, 3, 4]


@pytest.mark.parametrize("missing", [0, 3])
def test_streamed_words_match_the_in_memory_test(tmp_path, missing):
    """``enriched_words`` over captions scanned from a file (the report's stream) finds the
    groups ``find_enriched_words`` finds over arrays, with N, n and F the whole dataset's; a scored
    sample the captions lack counts as one without words."""
    from clipscrub.words import enriched_words

    rng = np.random.default_rng(1)
    n = 3000
    captions = [f"a photo of a {rng.choice(['cat', 'dog', 'car', 'tree'])}" for _ in range(n)]
    flagged = np.zeros(n, dtype=bool)
    flagged[rng.choice(n, 40, replace=False)] = True
    for i in np.flatnonzero(flagged)[:30]:
        captions[i] = "itap of the banana"
    ids = np.arange(n) * 7 + 11
    kept = np.ones(n, dtype=bool)
    kept[np.flatnonzero(~flagged)[:missing]] = False  # scored, but absent from the caption file
    pl.DataFrame({"id": ids[kept], "caption": np.array(captions, dtype=object)[kept]}).write_parquet(tmp_path / "c.parquet")
    shown = [c if k else None for c, k in zip(captions, kept)]
    want = find_enriched_words(ids=ids, captions=shown, flagged=flagged)
    got = enriched_words(samples=n, captions=pl.scan_parquet(tmp_path / "c.parquet"),
                         flagged=pl.DataFrame({"id": ids[flagged], "caption": np.array(captions, dtype=object)[flagged]}))
    assert [g.word for g in got] == [g.word for g in want] == ["banana"]
    for g, w in zip(got, want):
        assert (g.dataset_with, g.samples, g.flagged, g.p_value, g.also) == (w.dataset_with, w.samples, w.flagged,
                                                                             w.p_value, w.also)
        assert np.array_equal(g.ids, w.ids) and np.array_equal(g.unflagged, w.unflagged)
