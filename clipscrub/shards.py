"""Reading webdataset shards as img2dataset and clip-retrieval write them.

A sample is the tar members sharing a key: one image (``jpg``, ``jpeg``, ``png`` or ``webp``), a
caption (``txt``) and optional ``json`` metadata. The manifest's ``shard`` column is a name under
``<raw>/shards/`` for shards clipscrub wrote, or an absolute path for a user's existing shards,
which are read in place rather than copied.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Container, Iterator

import braceexpand
import numpy as np
from PIL import Image, UnidentifiedImageError

from clipscrub.errors import DataError
from clipscrub.io import fmt_bytes

if TYPE_CHECKING:
    import webdataset as wds

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PIL_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# open_clip's preprocess resizes an image's short side to the model's input size S (224-448)
# before cropping, so the resized image holds S * S * ratio pixels: bounding the aspect ratio
# bounds that work for every model (50:1 at S = 448: 10 M pixels, 30 MB). A 1 x 3,000,000 PNG is
# 6 KB and within PIL's pixel limit, yet at S = 32 it asks for 9 GB.
MAX_ASPECT_RATIO = 50
# which characters of a key may not reach a tar member name as they are (see safe_key)
_UNSAFE_KEY_CHARS = frozenset("%/\\.")
# a memory address in an error message: "<_io.BytesIO object at 0x7f...>"
ADDRESS_PATTERN = r"\s*<[^<>]* at 0x[0-9a-fA-F]+>|\s+at 0x[0-9a-fA-F]+"
_ADDRESS = re.compile(ADDRESS_PATTERN)
# webdataset's member names: key = path up to the first dot of the base name, then the extension
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META_MEMBER = re.compile(r"__[^/]*__($|/)")


def shard_writer(shard_dir: Path, shard_size: int) -> wds.ShardWriter:
    """A writer of ``shard_dir/00000.tar``, ``00001.tar``, ... holding ``shard_size`` samples each.

    mtime is fixed so identical content gives byte-identical shards (DVC and Prefect hash them).
    """
    shard_dir.mkdir(parents=True, exist_ok=True)
    # imported here: webdataset imports torch (about 0.6 GiB), which the stages that only read
    # shards or write no shards (filter with ids, precomputed embeddings) do not need
    import webdataset as wds

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


def _key_and_ext(name: str) -> tuple[str | None, str]:
    """webdataset's split of a member name: the key is all before the first dot of the base name."""
    match = _MEMBER_NAME.match(name)
    return (match.group(1), match.group(2).lower()) if match else (None, "")


def iter_shard(path: str | Path, *, keys: Container[str] | None = None,
               max_member_bytes: int | None = None) -> Iterator[dict[str, Any]]:
    """The raw samples of one tar shard (plain or compressed): ``__key__`` plus the undecoded
    bytes of each member under its lower-cased extension, grouped as webdataset groups them
    (consecutive members sharing a key; ``__*__`` metadata members skipped).

    Unlike webdataset, one bad sample does not end the shard: a sample with a member written
    twice, or a member over ``max_member_bytes`` (left unread), carries ``__error__`` saying so,
    and the samples after it follow. ``keys``: only the samples with these keys are read and
    yielded (the others' members are skipped unread). A file that is not a tar, or one cut
    short, raises ``tarfile.TarError`` or ``OSError`` after the samples before the damage.
    """
    with tarfile.open(str(path), mode="r|*") as tar:
        sample: dict[str, Any] | None = None
        current: str | None = None  # the key of the member group being read (wanted or not)
        seen: set[str] = set()  # the extensions of its members, read or not
        for info in tar:
            tar.members = []  # a stream keeps every member's header otherwise
            name = info.name
            if not info.isreg() or _META_MEMBER.match(name):
                continue
            key, ext = _key_and_ext(name)
            if key is None:
                continue
            if key != current:
                if sample is not None:
                    yield sample
                current, seen = key, set()
                sample = {"__key__": key} if keys is None or key in keys else None
            if sample is None:
                continue
            if ext in seen:
                sample.setdefault("__error__", f"tar member {name} appears more than once")
                continue
            seen.add(ext)
            if max_member_bytes is not None and info.size > max_member_bytes:
                sample.setdefault("__error__", f"tar member {name} is {fmt_bytes(info.size)}, over the "
                                               f"{fmt_bytes(max_member_bytes)} limit (download.max_file_bytes)")
                continue
            data = tar.extractfile(info)
            sample[ext] = data.read() if data is not None else b""
        if sample is not None:
            yield sample


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


def caption_problem(sample: dict[str, Any]) -> str | None:
    """Why ``caption_of`` finds no caption in a sample whose ``json`` member should hold one (not
    valid JSON, not an object, a caption that is not text); None where that is not the reason."""
    if sample.get("txt") is not None or sample.get("json") is None:
        return None
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError):
        return "no txt caption, and the json member is not valid JSON"
    if not isinstance(meta, dict):
        return f"no txt caption, and the json member is not an object: {json.dumps(meta)[:40]}"
    cap = meta.get("caption")
    if cap is not None and not isinstance(cap, str):
        return f"the json caption is not text: {json.dumps(cap)[:40]}"
    return None


def safe_key(key: str) -> str:
    """``key`` as a tar member name that stays in the folder a shard unpacks into: ``%``, ``/``,
    ``\\`` and ``.`` are percent-encoded (``../x`` -> ``%2E%2E%2Fx``), so no separator, ``..``
    or leading ``/`` survives and distinct keys stay distinct; a key without them is unchanged.
    Dots go too: webdataset ends a key at the first dot of a member's base name."""
    if not _UNSAFE_KEY_CHARS.intersection(key):
        return key
    return "".join(f"%{ord(c):02X}" if c in _UNSAFE_KEY_CHARS else c for c in key)


def stable_message(text: str) -> str:
    """``text`` without memory addresses (``<_io.BytesIO object at 0x7f...>``), so identical
    inputs give identical manifests."""
    return _ADDRESS.sub("", text)


def aspect_ratio_error(width: int, height: int) -> str | None:
    """Why an image of this size is refused (see ``MAX_ASPECT_RATIO``), or None."""
    long, short = max(width, height), min(width, height)
    if short <= 0:
        return f"image has no pixels ({width}x{height})"
    if long > MAX_ASPECT_RATIO * short:
        ratio = f"{long / short:.1f}".removesuffix(".0")
        return f"image aspect ratio {ratio}:1 exceeds {MAX_ASPECT_RATIO}:1 ({width}x{height} pixels)"
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, scaling what PIL's ``convert`` would clip (16-bit mid-grey to white,
    float 0.5 to black): 16-bit greys (``I;16*``, and ``I`` holding 0..65535, as 16-bit PNGs and
    TIFFs load) by 255/65535; other 32-bit integers from 0..2**31-1; floats (``F``) from 0..1 when
    no value exceeds 1, else clipped to 0..255 (NaN is 0)."""
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img.convert("RGB")
    x = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        finite = x[np.isfinite(x)]
        x = np.nan_to_num(x * (255.0 if finite.size and finite.max() <= 1 else 1.0), nan=0.0)
    else:
        top = 65535 if img.mode != "I" or x.max(initial=0) <= 65535 else 2**31 - 1
        x = x * (255.0 / top)
    return Image.fromarray(np.round(np.clip(x, 0, 255)).astype(np.uint8)).convert("RGB")


class _Refused(Exception):
    """An image decode_image will not decode (its reason is the message)."""


def decode_image(data: bytes) -> tuple[Image.Image, str]:
    """Fully decode image bytes: (8-bit RGB image, format extension such as ``jpg``, or ``other``).

    Raises ``ValueError`` with a short reason that is the same for the same bytes. A full
    ``load`` rather than ``verify``: truncated JPEGs pass ``verify`` and fail later, in the embed
    stage. The aspect ratio is checked from the header first, before any pixel is decoded.
    """
    if not data:
        raise ValueError("empty image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = PIL_FORMAT_EXT.get(img.format or "", "other")
            refused = aspect_ratio_error(*img.size)
            if refused:
                raise _Refused(refused)
            img.load()
            return to_rgb(img), fmt
    except _Refused as exc:
        raise ValueError(str(exc)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"image too large: {str(exc).split(' could be')[0]}") from None
    except UnidentifiedImageError:  # its message names the BytesIO object, address and all
        raise ValueError("cannot decode image: not a recognised image format") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        raise ValueError(f"cannot decode image: {type(exc).__name__}: {stable_message(str(exc))[:120]}") from None
