"""Review lists: a person's verdicts on samples, named the way that person knows them.

A list names samples by clipscrub's ``id`` or by the source's own identifiers: the shard ``key``,
the folder source's ``file``, the url list's ``url``. It is a table (``.parquet``, ``.csv``,
``.tsv``) whose first column among ``IDENTIFIERS`` names the samples (an edited removed.parquet
or kept.parquet works as it is), or a text file with one entry per line, each any identifier
(``#`` at the start of a line, or after a space, starts a comment: a url's fragment stays). Every
entry must name exactly one scored sample: an id is written in decimal (``7``; ``0007`` is a key).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl

from clipscrub.errors import DataError, ParamError

IDENTIFIERS = ("id", "key", "file", "url")
_COMMENT = re.compile(r"(^|\s)#.*$")
_DECIMAL = re.compile(r"-?[0-9]+")
_INT64_MAX = 2**63 - 1


def read_entries(path: str | Path, *, param: str, what: str = "review list") -> tuple[str | None, list[str]]:
    """(the identifier column a table names its samples by, or None for a text list; the entries as text)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(f"{what} {p} is a directory, not a file of ids", param=param)
    if not p.is_file():
        raise DataError(f"{what} not found: {p}", param=param)
    suffix = p.suffix.lower()
    try:
        if suffix in (".parquet", ".csv", ".tsv"):
            table = (pl.read_parquet(p) if suffix == ".parquet" else
                     pl.read_csv(p, separator="\t" if suffix == ".tsv" else ",", infer_schema=False))
            column = next((c for c in IDENTIFIERS if c in table.columns), None)
            if column is None:
                raise DataError(f"{p} has no id, key, file or url column (columns: {', '.join(table.columns)})",
                                param=param)
            if "status" in table.columns:  # a manifest: its failed rows were never scored
                table = table.filter(pl.col("status") == "ok")
            values = [str(v).strip() for v in table[column].drop_nulls().to_list()]
            return column, [v for v in values if v]
        lines = (_COMMENT.sub("", raw).strip() for raw in p.read_text().splitlines())
        return None, [line for line in lines if line]
    except UnicodeDecodeError:
        raise DataError(f"cannot read {p}: not a text file (one entry per line), a .parquet, .csv or .tsv",
                        param=param) from None
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"cannot read {p}: {str(exc).splitlines()[0]}", param=param) from None


def identifiers(manifest: pl.DataFrame) -> pl.DataFrame:
    """value, via, id: every identifier of the manifest's ok (scored) rows as text, ids in decimal."""
    ok = manifest.filter(pl.col("status") == "ok")
    parts = [ok.select(pl.col("id").cast(pl.String).alias("value"), pl.lit("id").alias("via"), "id")]
    parts += [ok.select(pl.col(c).cast(pl.String).alias("value"), pl.lit(c).alias("via"), "id").drop_nulls("value")
              for c in IDENTIFIERS[1:] if c in ok.columns]
    return pl.concat(parts)


def resolve_entries(entries: list[str], column: str | None, *, manifest: pl.DataFrame, param: str,
                    source: str = "the review list") -> np.ndarray:
    """The sorted, distinct ids (n,) int64 that ``entries`` name among the manifest's ok rows.

    ``column``: the identifier every entry is (a table's column); None (a text list): each entry
    may be any identifier. Raises one line naming the entries that name no scored sample, or
    more than one (a text entry that is one sample's id and another's key; a url or file that
    two samples share)."""
    if column == "id":  # a table's ids as the decimal text identifiers() holds
        entries = [str(int(e)) if _DECIMAL.fullmatch(e) else e for e in entries]
    table = identifiers(manifest)
    if column is not None:
        table = table.filter(pl.col("via") == column)
    matched = (pl.DataFrame({"value": entries}, schema={"value": pl.String}).unique(maintain_order=True)
               .join(table, on="value", how="left")
               .group_by("value", maintain_order=True).agg(pl.col("id").drop_nulls().unique().sort().alias("ids")))
    unknown = matched.filter(pl.col("ids").list.len() == 0)["value"].to_list()
    if unknown:
        if all(_DECIMAL.fullmatch(v) for v in unknown) and column in ("id", None):
            if any(abs(int(v)) > _INT64_MAX for v in unknown):
                raise DataError(f"cannot read ids from {source}: an id is out of range (ids are 64-bit integers)",
                                param=param)
            raise DataError(f"{len(unknown)} ids are not scored samples of this dataset (unknown, or failed to "
                            f"download), e.g. {[int(v) for v in unknown[:5]]}", param=param)
        noun = {"key": "keys", "file": "files", "url": "urls"}.get(column or "", "entries")
        raise DataError(f"{len(unknown)} {noun} name no scored sample of this dataset (unknown, or failed to "
                        f"download), e.g. {unknown[:5]}", param=param)
    many = matched.filter(pl.col("ids").list.len() > 1)
    if many.height:
        value, ids = many.row(0)
        raise ParamError(f"{many.height} entries name more than one sample, e.g. {value!r} (ids "
                         f"{', '.join(map(str, ids[:5]))}): name those samples by id, in a table with an id column",
                         param=param)
    return np.unique(matched["ids"].explode().cast(pl.Int64).to_numpy())


def read_review_list(path: str | Path, *, manifest: pl.DataFrame, param: str) -> np.ndarray:
    """The ids (n,) int64 a review list names (``read_entries``, then ``resolve_entries``)."""
    column, entries = read_entries(path, param=param)
    return resolve_entries(entries, column, manifest=manifest, param=param, source=Path(path).name)
