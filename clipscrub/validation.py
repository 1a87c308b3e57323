"""Great Expectations suites at every stage boundary.

Each stage validates what it is about to publish, inside its scratch directory, so an output
that fails a suite is never renamed into place. GX (Core 1.x) has no polars support: every
suite runs on a small pandas view, one row per sample with the per-row facts the expectations
need (an embedding's norm, a neighbour list's smallest index, ...), never on the raw arrays.

Data docs (GX's HTML) for the stage's latest validation go to ``<run dir>/validation/<stage>/``
on success and failure; a failure raises ``ValidationError`` naming the expectation, the
column and a few offending sample ids.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from clipscrub.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

    from clipscrub.arrays import RowReader

VALIDATION_DIR = "validation"
STATUSES = ("ok", "failed")
# embeddings are the model's raw outputs: any finite norm but a (near-)zero one, which has no direction
MIN_NORM = 1e-6
SHOWN_IDS = 5


class ValidationError(DataError):
    """A stage's output failed its Great Expectations suite."""


@dataclass
class Table:
    """One pandas view and the GX expectations it must meet."""

    name: str
    frame: "pd.DataFrame"
    expectations: list[Any] = field(default_factory=list)
    id_column: str = "id"


def docs_dir_for(out_dir: str | Path, stage: str) -> Path:
    """Where a stage writing ``out_dir`` puts its data docs: ``validation/<stage>`` beside it."""
    return Path(out_dir).parent / VALIDATION_DIR / stage


def _context(docs_dir: Path):
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    ctx.add_data_docs_site(
        site_name="clipscrub",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    return ctx


def _describe(result: Any, id_column: str) -> str:
    cfg = result.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "condition_parser", "column", "row_condition")}
    where = f"({cfg.kwargs['column']})" if "column" in cfg.kwargs else ""
    text = f"{cfg.type}{where}"
    if kwargs:
        # GX stores bounds as floats: min_value=1, not 1.0
        text += " " + ", ".join(f"{k}={_bound(v)}" for k, v in sorted(kwargs.items()))
    r = result.result or {}
    if "unexpected_count" in r:
        text += f": {r['unexpected_count']} of {r.get('element_count')} rows"
        ids = [row.get(id_column) for row in r.get("partial_unexpected_index_list") or []][:SHOWN_IDS]
        values = (r.get("partial_unexpected_list") or [])[:SHOWN_IDS]
        if ids:
            text += f", e.g. {id_column}s {[_plain(i) for i in ids]}"
        if values:
            text += f" (values {[_plain(v) for v in values]})"
    elif "observed_value" in r:
        text += f": observed {_plain(r['observed_value'])}"
    return text


def _bound(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v == v:
        return round(v, 6)
    return v


def validate(stage: str, tables: list[Table], *, docs_dir: str | Path) -> dict[str, Any]:
    """Run each table's expectations with GX; write data docs to ``docs_dir``; raise on failure.

    Returns ``{"suites": [...], "expectations": n}`` for the stage's lineage.
    """
    import great_expectations as gx

    # GX sets some of its loggers to INFO explicitly; with a root handler (open_clip installs
    # one) they would print a line per context to the stage's stderr
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("great_expectations")]:
        logging.getLogger(name).setLevel(logging.WARNING)
    docs_dir = Path(docs_dir)
    shutil.rmtree(docs_dir, ignore_errors=True)
    docs_dir.mkdir(parents=True, exist_ok=True)
    ctx = _context(docs_dir)
    source = ctx.data_sources.add_pandas(stage)
    failures: list[str] = []
    total = 0
    for table in tables:
        batch = source.add_dataframe_asset(table.name).add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"{stage}.{table.name}"))
        for exp in table.expectations:
            suite.add_expectation(exp)
        total += len(table.expectations)
        definition = ctx.validation_definitions.add(gx.ValidationDefinition(name=suite.name, data=batch, suite=suite))
        result = definition.run(
            batch_parameters={"dataframe": table.frame},
            result_format={"result_format": "SUMMARY", "unexpected_index_column_names": [table.id_column]},
        )
        failures += [f"{suite.name}: {_describe(r, table.id_column)}" for r in result.results if not r.success]
    ctx.build_data_docs(site_names=["clipscrub"])
    if failures:
        shown = "; ".join(failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")
        raise ValidationError(
            f"validation failed: {shown} (data docs: {docs_dir / 'index.html'})",
            param=stage,
        )
    return {"suites": [f"{stage}.{t.name}" for t in tables], "expectations": total}


def _gx():
    import great_expectations as gx

    return gx.expectations


# --- the suites -------------------------------------------------------------------------------


def manifest_tables(manifest: pl.DataFrame) -> list[Table]:
    """Unique ids and keys, known statuses, non-empty captions and an image hash on ok rows."""
    E = _gx()
    view = manifest.select(
        "id", "key", "status",
        pl.col("caption").str.strip_chars().str.len_chars().alias("caption_chars"),
        "image_sha256",
        # precomputed embeddings come without images (and usually without hashes)
        pl.col("shard").is_not_null().alias("has_image"),
    ).to_pandas()
    ok_with_image = 'status == "ok" and has_image == True'
    return [Table("manifest", view, [
        E.ExpectColumnValuesToBeUnique(column="id"),
        E.ExpectColumnValuesToNotBeNull(column="id"),
        E.ExpectColumnValuesToBeInSet(column="status", value_set=list(STATUSES)),
        E.ExpectColumnValuesToBeUnique(column="key", row_condition='status == "ok"', condition_parser="pandas"),
        E.ExpectColumnValuesToBeBetween(column="caption_chars", min_value=1, row_condition='status == "ok"',
                                        condition_parser="pandas"),
        E.ExpectColumnValuesToNotBeNull(column="image_sha256", row_condition=ok_with_image, condition_parser="pandas"),
        E.ExpectColumnValueLengthsToEqual(column="image_sha256", value=64, row_condition=ok_with_image,
                                          condition_parser="pandas"),
    ])]


def _norms(reader: "RowReader", chunk_size: int) -> np.ndarray:
    out = np.concatenate([np.linalg.norm(rows, axis=1) for _, rows in reader.chunks(chunk_size)])
    return np.where(np.isfinite(out), out, np.nan)  # non-finite -> null, which GX counts


def embedding_tables(*, ids: np.ndarray, image: "RowReader", text: "RowReader", dim: int | None, ok_ids: np.ndarray,
                     chunk_size: int = 65536) -> list[Table]:
    """Finite, non-zero embeddings of the model's dimension, one per ok manifest row."""
    import pandas as pd

    E = _gx()
    n = len(ids)
    view = pd.DataFrame({
        "id": ids,
        "manifest_id": ok_ids if len(ok_ids) == n else np.full(n, -1),
        "image_norm": _norms(image, chunk_size),
        "text_norm": _norms(text, chunk_size),
        "image_dim": np.full(n, image.shape[1]),
        "text_dim": np.full(n, text.shape[1]),
    })
    exps = [
        E.ExpectTableRowCountToEqual(value=len(ok_ids)),
        E.ExpectColumnValuesToBeUnique(column="id"),
        E.ExpectColumnPairValuesToBeEqual(column_A="id", column_B="manifest_id"),
    ]
    for col in ("image_norm", "text_norm"):
        exps += [E.ExpectColumnValuesToNotBeNull(column=col),
                 E.ExpectColumnValuesToBeBetween(column=col, min_value=MIN_NORM)]
    if dim is not None:
        exps += [E.ExpectColumnValuesToBeInSet(column=c, value_set=[dim]) for c in ("image_dim", "text_dim")]
    return [Table("embeddings", view, exps)]


# per query, over a reference set's draws: what the index suite checks
NEIGHBOUR_CHECKS = np.dtype([("min_entry", "<i8"), ("max_entry", "<i8"), ("self_hits", "<i8"), ("unsorted", "<i8"),
                             ("min_distance", "<f8")])


def check_neighbours(*, neighbours: np.ndarray, distances: np.ndarray, owners: list[np.ndarray], entries: int,
                     rows: np.ndarray) -> np.ndarray:
    """The index suite's per-query figures (Q,) ``NEIGHBOUR_CHECKS`` for queries of dataset rows
    ``rows`` (Q,): ``neighbours``/``distances`` (r, Q, K), ``owners[r]`` (R,) the row each entry of
    draw r belongs to. A chunk computes them for its own rows as it writes them, so the reduce
    validates without reading every neighbour list back."""
    out = np.empty(len(rows), dtype=NEIGHBOUR_CHECKS)
    nb = np.asarray(neighbours)
    d = np.asarray(distances)  # compared as stored: no float64 copy of (r, Q, K)
    ints = np.iinfo(nb.dtype)  # int32 or int64 (clipscrub.neighbours.entry_dtype)
    lo, hi = nb.min(axis=2, initial=ints.max), nb.max(axis=2, initial=ints.min)  # (r, Q)
    out["min_entry"] = lo.min(axis=0, initial=ints.max)
    out["max_entry"] = hi.max(axis=0, initial=ints.min)
    out["self_hits"] = 0
    for r in range(len(nb)):
        if lo[r].min(initial=0) >= 0 and hi[r].max(initial=0) < entries:  # all in range (always, unless a bug)
            out["self_hits"] += (owners[r][nb[r]] == rows[:, None]).sum(axis=1)
            continue
        inside = (nb[r] >= 0) & (nb[r] < entries)  # out of range: counted above, not here
        out["self_hits"] += ((owners[r][np.where(inside, nb[r], 0)] == rows[:, None]) & inside).sum(axis=1)
    out["unsorted"] = (d[..., 1:] < d[..., :-1]).sum(axis=(0, 2))
    # NaN in any draw stays NaN (it must not vanish in the minimum)
    per_draw = np.where(np.isfinite(d).all(axis=2), d.min(axis=2, initial=np.inf), np.nan)
    out["min_distance"] = per_draw.min(axis=0)
    return out


def neighbour_tables(*, ids: np.ndarray, neighbours: np.ndarray, distances: np.ndarray, owners: list[np.ndarray],
                     entries: int, chunk_size: int = 65536, name: str = "neighbours") -> list[Table]:
    """No query's own image or caption among its neighbours, distances sorted and non-negative,
    entry indices in range. ``neighbours``/``distances``: (r, N, K); ``owners[r]``: (R,) row of
    the sample each entry of draw r belongs to."""
    n = neighbours.shape[1]
    checks = np.concatenate([
        check_neighbours(neighbours=neighbours[:, start : min(start + chunk_size, n)],
                         distances=distances[:, start : min(start + chunk_size, n)], owners=owners, entries=entries,
                         rows=np.arange(start, min(start + chunk_size, n)))
        for start in range(0, n, chunk_size)
    ]) if n else np.empty(0, dtype=NEIGHBOUR_CHECKS)
    return neighbour_check_tables(ids=ids, checks=checks, entries=entries, name=name)


def neighbour_check_tables(*, ids: np.ndarray, checks: np.ndarray, entries: int, name: str = "neighbours") -> list[Table]:
    """The index suite on per-query ``checks`` (N,) ``NEIGHBOUR_CHECKS`` (``check_neighbours``)."""
    import pandas as pd

    E = _gx()
    n = len(ids)
    view = pd.DataFrame({"id": ids, **{field: checks[field] for field in NEIGHBOUR_CHECKS.names}})
    return [Table(name, view, [
        E.ExpectTableRowCountToEqual(value=n),
        E.ExpectColumnValuesToBeBetween(column="min_entry", min_value=0),
        E.ExpectColumnValuesToBeBetween(column="max_entry", max_value=entries - 1),
        E.ExpectColumnValuesToBeInSet(column="self_hits", value_set=[0]),
        E.ExpectColumnValuesToBeInSet(column="unsorted", value_set=[0]),
        E.ExpectColumnValuesToNotBeNull(column="min_distance"),
        E.ExpectColumnValuesToBeBetween(column="min_distance", min_value=0),
    ])]


def score_tables(scores: pl.DataFrame, *, ids: np.ndarray, detectors: list[str]) -> list[Table]:
    """One row per embedded sample; every score finite unless the row names it in
    ``non_finite_scores``."""
    E = _gx()
    view = scores.select(
        "id",
        pl.col("non_finite_scores").is_not_null().alias("marked"),
        # inf -> null: GX's null checks see NaN but not inf
        *[pl.when(pl.col(f"{d}_score").is_finite()).then(pl.col(f"{d}_score")).alias(f"{d}_score") for d in detectors],
    ).to_pandas()
    view["embedded_id"] = ids if len(ids) == len(view) else -1
    exps = [
        E.ExpectTableRowCountToEqual(value=len(ids)),
        E.ExpectColumnValuesToBeUnique(column="id"),
        E.ExpectColumnPairValuesToBeEqual(column_A="id", column_B="embedded_id"),
    ]
    exps += [E.ExpectColumnValuesToNotBeNull(column=f"{d}_score", row_condition="marked == False", condition_parser="pandas")
             for d in detectors]
    return [Table("scores", view, exps)]


def filter_tables(*, kept: pl.DataFrame, removed: pl.DataFrame, scored_ids: pl.Series, out_dir: Path,
                  required: list[str]) -> list[Table]:
    """kept + removed = scored, no id in both, every removed row with a reason, and the
    version's files (lineage.json among them) present and non-empty."""
    import pandas as pd

    E = _gx()
    rows = pl.concat([
        kept.select("id", pl.lit("kept").alias("part"), pl.lit("-").alias("reason")),
        removed.select("id", pl.lit("removed").alias("part"), pl.col("reason").cast(pl.String)),
    ])
    view = rows.with_columns(pl.col("id").is_in(scored_ids.implode()).alias("was_scored")).to_pandas()
    files = pd.DataFrame({"file": required, "bytes": [(out_dir / f).stat().st_size if (out_dir / f).is_file() else 0
                                                      for f in required]})
    return [
        Table("samples", view, [
            E.ExpectTableRowCountToEqual(value=len(scored_ids)),
            E.ExpectColumnValuesToBeUnique(column="id"),
            E.ExpectColumnValuesToBeInSet(column="was_scored", value_set=[True]),
            E.ExpectColumnValuesToNotBeNull(column="reason"),
        ]),
        Table("files", files, [E.ExpectColumnValuesToBeBetween(column="bytes", min_value=1)], id_column="file"),
    ]
