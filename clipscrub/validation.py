"""Great Expectations suites at every stage boundary.

Each stage validates what it is about to publish, inside its scratch directory, so an output
that fails a suite is never renamed into place. GX (Core 1.x) has no polars support: every
suite runs on a small pandas view of the facts the expectations need (an embedding's norm, a
neighbour list's smallest index, ...), never on the raw arrays. The index, score and filter
samples' suites see one row per block of ``BLOCK_ROWS`` samples (``block_view``: the block's
extreme figures and the id that holds each), so their view stays small however many samples
there are.

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
from clipscrub.io import ascending

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
    """One pandas view and the GX expectations it must meet. A failure names rows by
    ``id_column``; a view of blocks (``unit="blocks"``) names, for a failing column ``c``, the
    sample in ``c_id`` that holds the block's figure."""

    name: str
    frame: "pd.DataFrame"
    expectations: list[Any] = field(default_factory=list)
    id_column: str = "id"
    unit: str = "rows"

    def id_columns(self) -> list[str]:
        if self.unit == "rows":
            return [self.id_column]
        return [c for c in self.frame.columns if c.endswith("_id")]


# samples per row of a block view: the index, score and filter suites' views hold N / BLOCK_ROWS rows
BLOCK_ROWS = 65536


def block_view(*, ids: np.ndarray, figures: dict[str, tuple[np.ndarray, str]], block: int | None = None) -> "pd.DataFrame":
    """One row per block of ``block`` consecutive samples: ``rows`` (the block's size) and per
    figure ``name -> (values (N,), how)`` its block value ``name`` (``how``: ``min``, ``max`` or
    ``sum``; NaN when any of the block's values is NaN, so a null check still sees it) and
    ``name_id``, the id of the sample that decides it (the first NaN, else the minimum for
    ``min``, the maximum for ``max`` and ``sum``): the sample a failure of that figure names.
    ``block``: default ``BLOCK_ROWS``."""
    import pandas as pd

    block = block or BLOCK_ROWS
    n = len(ids)
    starts = np.arange(0, n, block)
    out: dict[str, Any] = {"rows": np.minimum(starts + block, n) - starts}
    for name, (values, how) in figures.items():
        values = np.asarray(values)
        value = np.empty(len(starts), dtype=np.float64 if values.dtype.kind == "f" else np.int64)
        holder = np.empty(len(starts), dtype=np.asarray(ids).dtype)
        for b, start in enumerate(starts):
            part = values[start : start + block]
            nan = np.isnan(part) if part.dtype.kind == "f" else np.zeros(len(part), dtype=bool)
            if nan.any():
                at, value[b] = int(np.argmax(nan)), np.nan
            else:
                at = int(np.argmin(part)) if how == "min" else int(np.argmax(part))
                value[b] = part.sum() if how == "sum" else part[at]
            holder[b] = ids[start + at]
        out[name], out[f"{name}_id"] = value, holder
    return pd.DataFrame(out)


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


def _describe(result: Any, table: Table) -> str:
    cfg = result.expectation_config
    id_column = table.id_column if table.unit == "rows" else f"{cfg.kwargs.get('column')}_id"
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "condition_parser", "column", "row_condition")}
    where = f"({cfg.kwargs['column']})" if "column" in cfg.kwargs else ""
    text = f"{cfg.type}{where}"
    if kwargs:
        # GX stores bounds as floats: min_value=1, not 1.0
        text += " " + ", ".join(f"{k}={_bound(v)}" for k, v in sorted(kwargs.items()))
    r = result.result or {}
    if "unexpected_count" in r:
        text += f": {r['unexpected_count']} of {r.get('element_count')} {table.unit}"
        ids = [row.get(id_column) for row in r.get("partial_unexpected_index_list") or []][:SHOWN_IDS]
        values = (r.get("partial_unexpected_list") or [])[:SHOWN_IDS]
        if ids:
            text += f", e.g. {table.id_column}s {[_plain(i) for i in ids]}"
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
            result_format={"result_format": "SUMMARY", "unexpected_index_column_names": table.id_columns()},
        )
        failures += [f"{suite.name}: {_describe(r, table)}" for r in result.results if not r.success]
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
    """The index suite on per-query ``checks`` (N,) ``NEIGHBOUR_CHECKS`` (``check_neighbours``),
    one row per block of queries (``block_view``)."""
    E = _gx()
    view = block_view(ids=ids, figures={
        "min_entry": (checks["min_entry"], "min"), "max_entry": (checks["max_entry"], "max"),
        "self_hits": (checks["self_hits"], "sum"), "unsorted": (checks["unsorted"], "sum"),
        "min_distance": (checks["min_distance"], "min")})
    n = len(ids)
    return [Table(name, view, [
        E.ExpectColumnSumToBeBetween(column="rows", min_value=n, max_value=n),
        E.ExpectColumnValuesToBeBetween(column="min_entry", min_value=0),
        E.ExpectColumnValuesToBeBetween(column="max_entry", max_value=entries - 1),
        E.ExpectColumnValuesToBeInSet(column="self_hits", value_set=[0]),
        E.ExpectColumnValuesToBeInSet(column="unsorted", value_set=[0]),
        E.ExpectColumnValuesToNotBeNull(column="min_distance"),
        E.ExpectColumnValuesToBeBetween(column="min_distance", min_value=0),
    ], unit="blocks")]


def score_tables(scores: pl.DataFrame | pl.LazyFrame, *, ids: np.ndarray, detectors: list[str],
                 block: int | None = None) -> list[Table]:
    """One row per embedded sample, in the embeddings' order (so each id once, as the embed
    suite checked them); every score finite unless the row names it in ``non_finite_scores``.
    One row per block of samples (``block_view``); a lazy table (the written file, scanned) is
    read a block at a time, so the check holds one block, not the dataset."""
    import pandas as pd

    E = _gx()
    block = block or BLOCK_ROWS
    lazy = scores.lazy().select("id", "non_finite_scores", *(f"{d}_score" for d in detectors))
    rows = lazy.select(pl.len()).collect().item()
    n = len(ids)
    views = []
    for start in range(0, rows, block) if rows else [0]:
        part = lazy.slice(start, block).collect()
        got = part["id"].to_numpy()
        want = np.asarray(ids[start:start + len(got)])
        same = np.zeros(len(got), dtype=np.int64)
        same[: len(want)] = got[: len(want)] != want
        marked = part["non_finite_scores"].is_not_null().to_numpy()
        figures: dict[str, tuple[np.ndarray, str]] = {"id_mismatch": (same, "sum")}
        for d in detectors:
            # 1 where a score is not finite and its row does not say so
            figures[f"unmarked_{d}"] = ((~np.isfinite(part[f"{d}_score"].to_numpy()) & ~marked).astype(np.int64), "sum")
        views.append(block_view(ids=got, figures=figures, block=block))
    view = pd.concat(views, ignore_index=True)
    exps = [E.ExpectColumnSumToBeBetween(column="rows", min_value=n, max_value=n)]
    exps += [E.ExpectColumnValuesToBeInSet(column=c, value_set=[0]) for c in figures]
    return [Table("scores", view, exps, unit="blocks")]


def _repeated(ids: np.ndarray, kept: int) -> np.ndarray:
    """1 (uint8) on each later row of an id in ``ids`` (N,), the kept rows [0, kept) first, then
    the removed: where each part ascends (as filter writes them), the removed rows are searched
    in the kept ones; otherwise every id is sorted."""
    head, tail = ids[:kept], ids[kept:]
    repeated = np.zeros(len(ids), dtype=np.uint8)
    if ascending(head) and bool(np.all(tail[1:] >= tail[:-1])):
        at = np.minimum(np.searchsorted(head, tail), max(kept - 1, 0))
        repeated[kept:] = (head[at] == tail) if kept else False
        repeated[kept + 1:] |= tail[1:] == tail[:-1]
        return repeated
    order = np.argsort(ids, kind="stable")
    repeated[order[1:]] = ids[order[1:]] == ids[order[:-1]]
    return repeated


def filter_tables(*, kept: pl.DataFrame, removed: pl.DataFrame, scored_ids: pl.Series, out_dir: Path,
                  required: list[str]) -> list[Table]:
    """kept + removed = scored, no id in both (nor twice in one), every removed row with a
    reason, and the version's files (lineage.json among them) present and non-empty. The
    samples' view has one row per block of kept-then-removed rows (``block_view``)."""
    import pandas as pd

    E = _gx()
    ids = np.concatenate([kept["id"].cast(pl.Int64).to_numpy(), removed["id"].cast(pl.Int64).to_numpy()])
    repeated = _repeated(ids, kept.height)
    scored = scored_ids.cast(pl.Int64).to_numpy()
    if not ascending(scored):
        scored = np.unique(scored)
    # a block at a time, one byte a row: a web-scale version's ids are the only N-long arrays
    unscored = np.zeros(len(ids), dtype=np.uint8)
    for start in range(0, len(ids), BLOCK_ROWS):
        part = ids[start:start + BLOCK_ROWS]
        at = np.minimum(np.searchsorted(scored, part), max(len(scored) - 1, 0))
        unscored[start:start + BLOCK_ROWS] = scored[at] != part if len(scored) else True
    no_reason = np.zeros(len(ids), dtype=np.uint8)
    no_reason[kept.height:] = removed["reason"].is_null().to_numpy()
    figures = {"repeated_id": (repeated, "sum"), "unscored": (unscored, "sum"), "no_reason": (no_reason, "sum")}
    view = block_view(ids=ids, figures=figures)
    files = pd.DataFrame({"file": required, "bytes": [(out_dir / f).stat().st_size if (out_dir / f).is_file() else 0
                                                      for f in required]})
    n = len(scored_ids)
    return [
        Table("samples", view, [E.ExpectColumnSumToBeBetween(column="rows", min_value=n, max_value=n)]
              + [E.ExpectColumnValuesToBeInSet(column=c, value_set=[0]) for c in figures], unit="blocks"),
        Table("files", files, [E.ExpectColumnValuesToBeBetween(column="bytes", min_value=1)], id_column="file"),
    ]
