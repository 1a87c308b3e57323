"""Caption words over-represented among the flagged samples: where a backdoor's target shows.

A poisoned group's captions name its target ("a photo of a banana.", "itap of the banana"), in
as many phrasings as the attacker's templates; grouped by exact caption, one target becomes as
many clusters as it has templates. Grouped by a word that the flagged captions carry far more
often than the dataset's do, it is one group. Over-represented means significant under a
one-sided hypergeometric test: of N scored samples, n have the word in their caption and F are
flagged; with flags drawn at random, the flagged with the word follow Hypergeometric(N, n, F).
The p-value is Bonferroni-adjusted for the number of words the flagged captions hold, so the
bar is the test's, not a count tuned to one dataset. Words are taken in the order their captions
coincide with the flagged set (Dice), each tested again without the samples of the groups made before it: one that is no longer
over-represented (a template's "photo", which the flagged captions carry because they name the
target "banana") joins the groups it overlaps as an ``also`` word; one that still is makes a
group of its flagged samples outside them (another target of a multi-trigger attack).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
from scipy.stats import hypergeom

# family-wise error rate of the Bonferroni-adjusted test
ALPHA = 1e-3
WORD = r"[^\W\d_]{2,}"  # letters only, at least two: numbers and one-letter articles name no target


@dataclass(frozen=True)
class WordGroup:
    """Flagged samples whose captions carry an over-represented ``word``; ``also``: the
    over-represented words found beside it, whose flagged samples lie in this group and others."""

    word: str
    ids: np.ndarray  # (f,) ids of the flagged samples whose caption has the word and no earlier group's, ascending
    dataset_with: int  # n: scored samples whose caption has the word
    samples: int  # N: scored samples
    flagged: int  # F: flagged samples
    p_value: float  # Bonferroni-adjusted, at most 1; given the groups before it
    unflagged: np.ndarray  # (u,) ids of the unflagged samples whose caption has the word, ascending
    also: list[str] = field(default_factory=list)

    @property
    def flagged_with(self) -> int:
        return len(self.ids)


def caption_words(captions: pl.Expr) -> pl.Expr:
    """Each caption's words, a list per caption: case-folded, each once (null as no words)."""
    return captions.fill_null("").str.to_lowercase().str.extract_all(WORD).list.unique()


def find_enriched_words(*, ids: np.ndarray, captions: list[str | None] | pl.Series, flagged: np.ndarray,
                        alpha: float = ALPHA) -> list[WordGroup]:
    """Groups of flagged samples by caption words over-represented among them, the largest
    first. ``ids`` (N,), ``captions`` (N,) and ``flagged`` (N,) bool describe the scored samples;
    a word counts once per caption, case-folded."""
    ids = np.asarray(ids)
    flagged = np.asarray(flagged, dtype=bool)
    frame = pl.DataFrame({"id": ids, "caption": pl.Series(captions, dtype=pl.String)})
    return enriched_words(samples=len(ids), captions=frame.lazy(), flagged=frame.filter(pl.Series(flagged)),
                          alpha=alpha)


def enriched_words(*, samples: int, captions: pl.LazyFrame, flagged: pl.DataFrame,
                   alpha: float = ALPHA) -> list[WordGroup]:
    """``find_enriched_words`` with the dataset streamed: ``samples`` N scored samples, whose
    ``captions`` (id, caption; a scored sample it lacks has no words) are read twice as a lazy
    query (the words' dataset counts, then the unflagged samples that carry a significant word),
    never held; ``flagged`` (F rows: id, caption), the flagged samples among them. The counts
    N, n and F are the whole dataset's, so the test is exactly ``find_enriched_words``'."""
    n_samples, n_flagged = samples, flagged.height
    if n_flagged == 0 or n_flagged == n_samples:
        return []
    found = (flagged.select("id", caption_words(pl.col("caption")).alias("word")).explode("word").drop_nulls("word")
             .group_by("word").agg(pl.len().alias("f"), pl.col("id").sort().alias("ids")))
    # the dataset's counts of only the words the flagged captions hold: the words tested, and a
    # hash table of the flagged vocabulary rather than of every word of N captions
    vocabulary = found["word"].implode()
    dataset = (captions.select(caption_words(pl.col("caption")).alias("word")).explode("word")
               .filter(pl.col("word").is_in(vocabulary)).group_by("word").agg(pl.len().alias("n"))
               .collect(engine="streaming"))
    counts = found.join(dataset, on="word", how="inner").select("word", "n", "f", "ids")
    tested = counts.height  # Bonferroni over every word the flagged captions hold
    f, n = counts["f"].to_numpy(), counts["n"].to_numpy()
    counts = counts.with_columns(
        pl.Series("p", _tail(f, n, n_samples, n_flagged, tested), dtype=pl.Float64),
        pl.Series("log_p", hypergeom.logsf(f - 1, n_samples, n, n_flagged), dtype=pl.Float64),
        # how well the word's captions coincide with the flagged set (Dice: 2f / (n + F)): a target's
        # word holds most of the flagged and little else, a template's word a part of them, a
        # common word much else besides
        pl.Series("dice", 2 * f / (n + n_flagged), dtype=pl.Float64))
    significant = counts.filter(pl.col("p") < alpha).sort(["dice", "log_p", "word"], descending=[True, False, False])
    # the unflagged samples that carry each significant word: where the cut may have missed some
    others = dict(captions.filter(~pl.col("id").is_in(flagged["id"].implode()))
                  .select("id", caption_words(pl.col("caption")).alias("word")).explode("word")
                  .filter(pl.col("word").is_in(significant["word"].implode()))
                  .group_by("word").agg(pl.col("id").sort()).collect(engine="streaming").iter_rows()
                  ) if significant.height else {}
    groups: list[WordGroup] = []
    covered = np.empty(0, dtype=flagged["id"].to_numpy().dtype)  # the ids' own type
    for word, count, members_found, p_value in significant.select("word", "n", "ids", "p").iter_rows():
        members = np.asarray(members_found, dtype=covered.dtype)
        if groups:
            # tested again without the samples of the groups made so far (all flagged): a template's
            # "photo" is over-represented only through the target captions it sits in
            inside = int(np.isin(members, covered).sum())
            p_value = float(_tail(np.array([len(members) - inside]), np.array([count - inside]),
                                  n_samples - len(covered), n_flagged - len(covered), tested)[0])
            if p_value >= alpha:
                continue
            members = members[~np.isin(members, covered)]
        groups.append(WordGroup(word=word, ids=members, dataset_with=int(count), samples=n_samples,
                                flagged=n_flagged, p_value=p_value,
                                unflagged=np.asarray(others.get(word, []), dtype=covered.dtype)))
        covered = np.union1d(covered, members)
    for word, members_found in significant.select("word", "ids").iter_rows():  # the others, beside their groups
        for g in groups:
            if word != g.word and np.isin(np.asarray(members_found, dtype=covered.dtype), g.ids).any():
                g.also.append(word)
    return sorted(groups, key=lambda g: (-g.flagged_with, g.p_value, g.word))


def _tail(f: np.ndarray, n: np.ndarray, samples: int, flagged: int, tested: int) -> np.ndarray:
    """Bonferroni-adjusted P(X >= f), X ~ Hypergeometric(samples, n, flagged), capped at 1."""
    return np.minimum(hypergeom.sf(f - 1, samples, n, flagged) * tested, 1.0)
