"""Reading webdataset shards as img2dataset and clip-retrieval write them.

A sample is the tar members sharing a key: one image (``jpg``, ``jpeg``, ``png`` or ``webp``), a
caption (``txt``) and optional ``json`` metadata. The manifest's ``shard`` column is a name under
``<raw>/shards/`` for shards clipscrub wrote, or an absolute path for a user's existing shards,
which are read in place rather than copied.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import braceexpand
import webdataset as wds
from PIL import Image

from clipscrub.errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PIL_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def shard_writer(shard_dir: Path, shard_size: int) -> wds.ShardWriter:
    """A writer of ``shard_dir/00000.tar``, ``00001.tar``, ... holding ``shard_size`` samples each.

    mtime is fixed so identical content gives byte-identical shards (DVC and Prefect hash them).
    """
    shard_dir.mkdir(parents=True, exist_ok=True)
    return wds.ShardWriter(str(shard_dir / "%05d.tar"), maxcount=shard_size, mtime=0, verbose=0)


def shard_name(position: int, shard_size: int) -> str:
    """The name of the shard ``shard_writer`` puts its ``position``-th sample (0-based) in."""
    return f"{position // shard_size:05d}.tar"


def shard_path(raw_dir: str | Path, shard: str) -> Path:
    """Where a manifest ``shard`` entry lives."""
    p = Path(shard)
    return p if p.is_absolute() else Path(raw_dir) / "shards" / shard


def expand_shards(pattern: str, *, param: str) -> list[Path]:
    """Local shard files from a file, a directory of ``*.tar`` or a brace pattern
    (``/data/{00000..00099}.tar``), as absolute paths in pattern order."""
    p = Path(pattern).expanduser()
    if p.is_dir():
        paths = sorted(p.glob("*.tar"))
        if not paths:
            raise DataError(f"no .tar shards in directory {p}", param=param)
        return [q.resolve() for q in paths]
    paths = [Path(x).expanduser() for x in braceexpand.braceexpand(pattern)]
    missing = [str(q) for q in paths if not q.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"shard not found: {missing[0]}{more}", param=param)
    return [q.resolve() for q in paths]


def iter_shard(path: str | Path) -> Iterator[dict[str, Any]]:
    """The raw samples of one tar shard: ``__key__`` plus bytes per extension, undecoded."""
    ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    yield from ds


def image_field(sample: dict[str, Any]) -> str | None:
    """The extension under which a sample holds its image, if any."""
    for ext in IMAGE_EXTS:
        if sample.get(ext) is not None:
            return ext
    return None


def caption_of(sample: dict[str, Any]) -> str | None:
    """The caption: the ``txt`` member, else ``json``'s ``caption`` (clip-retrieval's layout)."""
    if sample.get("txt") is not None:
        return sample["txt"].decode("utf-8", errors="replace")
    if sample.get("json") is not None:
        try:
            cap = json.loads(sample["json"]).get("caption")
        except (ValueError, AttributeError):
            return None
        return cap if isinstance(cap, str) else None
    return None


def decode_image(data: bytes) -> tuple[Image.Image, str]:
    """Fully decode image bytes: (RGB image, format extension such as ``jpg``, or ``other``).

    Raises ``ValueError`` with a short reason. A full ``load`` rather than ``verify``: truncated
    JPEGs pass ``verify`` and fail later, in the embed stage.
    """
    if not data:
        raise ValueError("empty image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = PIL_FORMAT_EXT.get(img.format or "", "other")
            img.load()
        return img.convert("RGB"), fmt
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"image too large: {str(exc).split(' could be')[0]}") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        raise ValueError(f"cannot decode image: {type(exc).__name__}: {str(exc)[:120]}") from None
