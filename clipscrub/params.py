"""Typed, validated settings read once from params.yaml.

One section per stage plus ``base``. Unknown keys and wrong types are errors (pydantic
``extra="forbid"``, strict), reported as one line naming the dotted key.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, SerializationInfo, ValidationError, ValidationInfo,
                      model_serializer, model_validator)

from clipscrub.errors import ParamError

DETECTORS = ("kdist", "slof", "lid", "dao", "iforest", "clip")
DENSITY_RATIO_DETECTORS = ("kdist", "slof", "dao")


class _CrossError(ValueError):
    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


def canonical_path(value: str) -> str:
    """A path as a params file means it: normalised (``./a/`` is ``a``), relative paths still
    relative to the file's folder, absolute and ``~`` paths as they are."""
    return value if value.startswith("~") else os.path.normpath(value)


def _is_anchored(value: str) -> bool:
    """Whether a path means the same from anywhere: absolute, ``~``, or a URL."""
    return "://" in value or value.startswith("~") or os.path.isabs(value)


class _Section(BaseModel):
    """A params section. Fields naming files (``_PATH_FIELDS``) hold, after ``load_params``, paths
    that work from the working directory (joined to the params file's folder), while the
    section is written out (``model_dump``: the params hash, the lineage, the flow's parameters)
    with the paths as the file means them (``canonical_path``): the same file named from another
    folder, or by an absolute path, gives the same params and the same hash."""

    # no NaN or infinite value means anything in params (and JSON, the lineage's format, has none)
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)
    _PATH_FIELDS: ClassVar[tuple[str, ...]] = ()
    _written: dict[str, tuple[str, str]] = PrivateAttr(default_factory=dict)  # field -> (canonical, usable)

    @model_validator(mode="after")
    def _anchor_paths(self, info: ValidationInfo) -> "_Section":
        base = (info.context or {}).get("base") if info is not None else None
        if base is None or not self._PATH_FIELDS:
            return self
        written = {}
        for name in self._PATH_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str) or not value or "://" in value:
                continue
            canonical = canonical_path(value)
            usable = canonical if _is_anchored(canonical) or base == "." else os.path.join(base, canonical)
            object.__setattr__(self, name, usable)  # a frozen model's field, set once while it is built
            written[name] = (canonical, usable)
        self._written = written
        return self

    @model_serializer(mode="wrap")
    def _as_written(self, handler: Any, info: SerializationInfo) -> Any:
        data = handler(self)
        for name, (canonical, usable) in self._written.items():
            if isinstance(data, dict) and getattr(self, name) == usable:  # not replaced since (model_copy)
                field = type(self).model_fields[name]
                data[field.alias if info.by_alias and field.alias else name] = canonical
        return data


class BaseSettings(_Section):
    name: str = "demo"
    # numpy, torch and faiss take it (and seed + draw): a non-negative int well inside int32
    seed: int = Field(0, ge=0, le=2**31 - 2**16)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class _Attack(_Section):
    rate: float = Field(gt=0.0, lt=1.0)  # fraction of the dataset poisoned by this attack
    target: str = Field("banana", min_length=1)


class BadNetsAttack(_Attack):
    kind: Literal["badnets"]
    patch_size: int = Field(8, ge=2)  # checkerboard patch edge, pixels


class CleanLabelAttack(_Attack):
    kind: Literal["clean_label"]
    patch_size: int = Field(8, ge=2)


class BlendAttack(_Attack):
    kind: Literal["blend"]
    alpha: float = Field(0.2, gt=0.0, le=1.0)


class SigAttack(_Attack):
    kind: Literal["sig"]
    delta: float = Field(20.0, gt=0.0)  # amplitude on the 0-255 scale
    frequency: float = Field(6.0, gt=0.0)  # periods per image width


class WaNetAttack(_Attack):
    kind: Literal["wanet"]
    strength: float = Field(1.0, gt=0.0)  # largest displacement, about this many pixels
    grid: int = Field(4, ge=2)


class NashvilleAttack(_Attack):
    kind: Literal["nashville"]


class TargetedAttack(_Attack):
    kind: Literal["targeted"]
    images: int = Field(1, ge=1)  # distinct chosen images, copied and captioned with the target


class ClusterSettings(_Section):
    """A natural dense cluster of clean samples: near-duplicates of one image sharing its caption
    (a stock photo, a meme, a product template), as clean web data is full of them."""

    rate: float = Field(gt=0.0, lt=1.0)  # fraction of the dataset in this cluster
    noise: float = Field(4.0, ge=0.0)  # pixel noise (sd, 0-255 scale) that sets the copies apart


AttackSettings = Annotated[
    Union[BadNetsAttack, CleanLabelAttack, BlendAttack, SigAttack, WaNetAttack, NashvilleAttack, TargetedAttack],
    Field(discriminator="kind"),
]


class SyntheticSettings(_Section):
    num_samples: int = Field(6000, ge=1)
    image_size: int = Field(32, ge=16)
    # one entry per attack (several: a multi-trigger dataset); [] for a clean dataset
    attacks: list[AttackSettings] = Field(
        default_factory=lambda: [BadNetsAttack(kind="badnets", rate=0.01, target="banana", patch_size=8)])
    # clean near-duplicate clusters (one entry each), the dense look-alikes poison must rank above
    clusters: list[ClusterSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _patches_fit(self) -> "SyntheticSettings":
        for i, a in enumerate(self.attacks):
            if getattr(a, "patch_size", 0) >= self.image_size:
                raise _CrossError(f"download.synthetic.attacks.{i}.patch_size",
                                  f"{a.patch_size} must be smaller than download.synthetic.image_size ({self.image_size})")
        if sum(a.rate for a in self.attacks) >= 1:
            raise _CrossError("download.synthetic.attacks", "the attacks' rates add up to 1 or more")
        if sum(c.rate for c in self.clusters) >= 1:
            raise _CrossError("download.synthetic.clusters", "the clusters' rates add up to 1 or more")
        return self


class UrlsSettings(_Section):
    """A url list fetched with img2dataset (its options, under the same names)."""

    _PATH_FIELDS = ("path",)

    path: str | None = None
    input_format: Literal["auto", "parquet", "csv", "tsv"] = "auto"
    url_col: str = "url"
    caption_col: str = "caption"
    processes: int = Field(2, ge=1)
    threads: int = Field(32, ge=1)
    timeout: float = Field(10.0, gt=0)
    retries: int = Field(0, ge=0)
    image_size: int = Field(256, ge=8)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    min_image_size: int = Field(0, ge=0)
    # null: 50, the most allowed (clipscrub.shards.MAX_ASPECT_RATIO: embed's resize grows with the ratio)
    max_aspect_ratio: float | None = Field(None, gt=0, le=50)
    max_image_area: float | None = Field(None, gt=0)  # pixels; null: no limit
    user_agent_token: str | None = None
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )


class ShardsSettings(_Section):
    """Existing webdataset shards: a file, a directory of .tar files or a brace pattern."""

    _PATH_FIELDS = ("path",)

    path: str | None = None
    workers: int = Field(2, ge=1)


class FolderSettings(_Section):
    """A folder of images plus a csv/jsonl captions file mapping file names to captions."""

    _PATH_FIELDS = ("path", "captions")

    path: str | None = None
    captions: str | None = None
    file_col: str = "file"
    caption_col: str = "caption"


class PrecomputedSettings(_Section):
    """clip-retrieval's output layout: img_emb/*.npy, text_emb/*.npy, metadata/*.parquet."""

    _PATH_FIELDS = ("path",)

    path: str | None = None
    caption_col: str = "caption"


SOURCES = ("synthetic", "urls", "shards", "folder", "embeddings")


class DownloadSettings(_Section):
    source: Literal["synthetic", "urls", "shards", "folder", "embeddings"] = "synthetic"
    shard_size: int = Field(1000, ge=1)
    # bounds on one sample: past them it fails with its reason, unread, instead of filling memory
    max_caption_bytes: int = Field(65536, ge=1)
    max_file_bytes: int = Field(64 * 2**20, ge=1)
    synthetic: SyntheticSettings = SyntheticSettings()
    urls: UrlsSettings = UrlsSettings()
    shards: ShardsSettings = ShardsSettings()
    folder: FolderSettings = FolderSettings()
    embeddings: PrecomputedSettings = PrecomputedSettings()

    def in_use(self) -> dict[str, Any]:
        """The section as JSON without the settings of the sources not in use: what a download
        with these settings reads, so what it depends on and records."""
        data = self.model_dump(mode="json", by_alias=True)
        return {k: v for k, v in data.items() if k not in SOURCES or k == self.source}

    @model_validator(mode="after")
    def _source_is_given(self) -> "DownloadSettings":
        if self.source != "synthetic":
            sub = getattr(self, self.source)
            if not sub.path:
                raise _CrossError(f"download.{self.source}.path", f"must be set when download.source is {self.source!r}")
            if self.source == "folder" and not self.folder.captions:
                raise _CrossError("download.folder.captions", "must be set when download.source is 'folder'")
        return self


class TinyModelSettings(_Section):
    """A custom open_clip ViT config small enough to train on two CPU cores."""

    embed_dim: int = Field(64, ge=8)
    image_size: int = Field(32, ge=16)
    patch_size: int = Field(4, ge=1)
    vision_width: int = Field(128, ge=16)
    vision_layers: int = Field(2, ge=1)
    text_width: int = Field(128, ge=16)
    text_layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    context_length: int = Field(32, ge=8)


class TrainSettings(_Section):
    enabled: bool = True
    model_name: str = "clipscrub-tiny"
    architecture: TinyModelSettings = TinyModelSettings()
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    heldout_samples: int = Field(500, ge=10)
    threads: int = Field(2, ge=1)


class EmbedSettings(_Section):
    """The model to embed with when ``train.enabled`` is false (else: the trained victim)."""

    _PATH_FIELDS = ("checkpoint", "model_config_path")

    model_name: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"
    checkpoint: str | None = None
    model_config_path: str | None = Field(None, alias="model_config")
    batch_size: int = Field(256, ge=1)
    dtype: Literal["float32", "float16"] = "float32"
    # threads decoding and preprocessing the next batches while the model runs (0: none); the
    # output does not depend on it
    loader_workers: int = Field(0, ge=0)

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


class ReferenceSettings(_Section):
    _PATH_FIELDS = ("path",)
    mode: Literal["random", "trusted", "all", "saved"] = "random"
    # random: one reference set per size m, each drawn `draws` times; sizes above the dataset's
    # are capped at it. Several sizes are fused by score.fusion (no single m suits every rate)
    sizes: list[int] = Field(default_factory=lambda: [256, 1024, 4096], min_length=1)
    draws: int = Field(2, ge=1)
    # random: samples whose images lie closer than this fraction of the median nearest-neighbour
    # distance to one already drawn are copies, drawn once: a group of copies is then measured
    # against the rest of the data, not against itself (0: off)
    duplicate_radius: float = Field(0.5, ge=0.0, lt=1.0)
    # random, image_text, several sizes: also score each caption against the captions of the
    # smallest set's draws (set t<m>); its robust z-score is averaged with the image sets' fused one
    caption_set: bool = True
    path: str | None = None

    @model_validator(mode="after")
    def _valid(self) -> "ReferenceSettings":
        if self.mode == "trusted" and not self.path:
            raise _CrossError(
                "index.reference.path",
                "required with index.reference.mode: trusted (a manifest/table with an 'id' column, or one id per line)",
            )
        if self.mode == "saved" and not self.path:
            raise _CrossError(
                "index.reference.path",
                "required with index.reference.mode: saved (a folder `clipscrub save-references` wrote)",
            )
        if min(self.sizes) < 2:
            raise _CrossError("index.reference.sizes", f"every size must be at least 2 (got {min(self.sizes)})")
        if len(set(self.sizes)) != len(self.sizes):
            raise _CrossError("index.reference.sizes", f"sizes repeat: {self.sizes}")
        return self


class SearchSettings(_Section):
    """How neighbours are searched when the references are the whole dataset (mode: all)."""

    method: Literal["auto", "exact", "hnsw", "ivf"] = "auto"
    exact_max_entries: int = Field(200_000, ge=1)
    hnsw_max_entries: int = Field(4_000_000, ge=1)
    hnsw_m: int = Field(32, ge=4)
    ef_construction: int = Field(80, ge=8)
    ef_search: int = Field(128, ge=1)
    nlist: int = Field(0, ge=0)
    nprobe: int = Field(32, ge=1)
    recall_sample: int = Field(1000, ge=1)
    # faiss inserts into HNSW from several threads, in an order that varies run to run
    deterministic_build: bool = True


class IndexSettings(_Section):
    k: int = Field(64, ge=1)
    modality: Literal["image_text", "image", "text"] = "image_text"
    # false: L2 between the model's raw outputs (the paper's code; norms carry signal);
    # true: between unit vectors (ranks like cosine)
    normalize: bool = False
    reference: ReferenceSettings = ReferenceSettings()
    search: SearchSettings = SearchSettings()
    chunk_size: int = Field(65536, ge=1)

    @model_validator(mode="after")
    def _k_below_reference_size(self) -> "IndexSettings":
        if self.reference.mode == "random" and self.k >= min(self.reference.sizes):
            raise _CrossError(
                "index.k", f"{self.k} must be smaller than the smallest index.reference.sizes ({min(self.reference.sizes)})"
            )
        return self


class IForestSettings(_Section):
    n_estimators: int = Field(100, ge=1)
    max_samples: int = Field(256, ge=2)


FUSIONS = ("max_z", "max_abs_z", "mean_z")


class ScoreSettings(_Section):
    detectors: list[str] = Field(default_factory=lambda: list(DETECTORS))
    k: int = Field(16, ge=1)
    lid_k: int = Field(64, ge=2)
    # how the scores of several reference sets (index.reference.sizes) become one per detector:
    # each set's robust z-score, then the largest in magnitude (max_abs_z: sparse at some size,
    # or abnormally dense), their maximum (max_z: sparse only) or their mean (mean_z). One set:
    # its scores as they are
    fusion: Literal["max_z", "max_abs_z", "mean_z"] = "max_z"
    # several sets: a sample in a group of copies, as the largest set sees it (a re-posted image,
    # a collapsed trigger, a copied target) is scored by how unlike its caption is to those of its
    # nearest look-alikes that are not copies, not by its density (clipscrub.detectors.vet_copies)
    vet_copies: bool = True
    iforest: IForestSettings = IForestSettings()

    @model_validator(mode="after")
    def _known_detectors(self) -> "ScoreSettings":
        unknown = [d for d in self.detectors if d not in DETECTORS]
        if unknown:
            raise _CrossError("score.detectors", f"unknown detector {unknown[0]!r}; choose from {', '.join(DETECTORS)}")
        if not self.detectors:
            raise _CrossError("score.detectors", "at least one detector is required")
        return self


class ThresholdSettings(_Section):
    detector: str = "kdist"
    method: Literal["tail", "top_fraction", "score", "auto"] = "tail"
    fraction: float = Field(0.01, gt=0.0, lt=1.0)
    score: float | None = None
    auto_z: float = Field(3.5, gt=0.0)
    # tail: the share of the flagged samples that the bulk's own (normal) upper tail may account for
    tail_fdr: float = Field(0.1, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> "ThresholdSettings":
        if self.detector not in DETECTORS:
            raise _CrossError("threshold.detector", f"unknown detector {self.detector!r}; choose from {', '.join(DETECTORS)}")
        if self.method == "score" and self.score is None:
            raise _CrossError("threshold.score", "must be set when threshold.method is 'score'")
        return self


class FilterSettings(_Section):
    _PATH_FIELDS = ("keep_ids", "remove_ids")
    shard_size: int = Field(1000, ge=1)
    # reshard: copy the kept samples into new shards; ids: no shards, only the kept ids (for
    # shards that stay where they are, selected by id downstream)
    output: Literal["reshard", "ids"] = "reshard"
    # a person's verdicts, applied after the detector's flags: files of sample ids (.txt one per
    # line, or .parquet/.csv with an 'id' column); keep wins over a flag, remove adds to them
    keep_ids: str | None = Field(None, min_length=1)
    remove_ids: str | None = Field(None, min_length=1)
    # manifest rows per piece a cluster worker filters (the kept manifest's part); one piece where
    # the kept samples are re-sharded
    piece_size: int = Field(1_000_000, ge=1)

    @model_validator(mode="after")
    def _distinct_lists(self) -> "FilterSettings":
        if self.keep_ids and self.remove_ids and Path(self.keep_ids).expanduser() == Path(self.remove_ids).expanduser():
            raise _CrossError("filter.remove_ids", "is the same file as filter.keep_ids: every id would be both kept and removed")
        return self


class EvaluateSettings(_Section):
    _PATH_FIELDS = ("truth",)
    tpr: float = Field(0.95, gt=0.0, lt=1.0)
    hist_bins: int = Field(40, ge=2)
    # ground truth from a table (parquet/csv/tsv/jsonl: is_poison and id or key); wins over the manifest's
    truth: str | None = None


class ReportSettings(_Section):
    top_n: int = Field(48, ge=1)
    thumb_size: int = Field(96, ge=16, le=512)
    hist_bins: int = Field(40, ge=2)
    near_duplicate_cosine: float = Field(0.98, gt=0.0, le=1.0)
    cluster_members_shown: int = Field(8, ge=1)
    # the top flagged samples (by rank) shown one by one on the gallery pages and clustered: what a
    # person reviews, and what bounds the pairwise image comparison and the thumbnails read at web
    # scale; counts, figures, caption words and review-keep.txt still cover every flagged sample
    flagged_limit: int = Field(10_000, ge=1)


class PoisonSettings(_Section):
    """``clipscrub poison``: red-teaming attacks applied to a copy of your own raw data (not a stage)."""

    attacks: list[AttackSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _rates_fit(self) -> "PoisonSettings":
        if sum(a.rate for a in self.attacks) >= 1:
            raise _CrossError("poison.attacks", "the attacks' rates add up to 1 or more")
        return self


class Params(_Section):
    base: BaseSettings = BaseSettings()
    download: DownloadSettings = DownloadSettings()
    train: TrainSettings = TrainSettings()
    embed: EmbedSettings = EmbedSettings()
    index: IndexSettings = IndexSettings()
    score: ScoreSettings = ScoreSettings()
    threshold: ThresholdSettings = ThresholdSettings()
    filter: FilterSettings = FilterSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    report: ReportSettings = ReportSettings()
    poison: PoisonSettings = PoisonSettings()

    @model_validator(mode="after")
    def _cross_section(self) -> "Params":
        if self.train.enabled and self.download.source != "synthetic":
            raise _CrossError(
                "train.enabled",
                "the demo victim trains only on download.source 'synthetic'; set train.enabled=false "
                "and name the model to embed with in the embed section",
            )
        for key, value in (("score.k", self.score.k), ("score.lid_k", self.score.lid_k)):
            if "lid" not in self.score.detectors and key == "score.lid_k":
                continue
            if value > self.index.k:
                raise _CrossError(key, f"{value} exceeds index.k ({self.index.k}), the neighbours stored")
        if self.threshold.detector not in self.score.detectors:
            raise _CrossError(
                "threshold.detector",
                f"{self.threshold.detector!r} is not among score.detectors {self.score.detectors}",
            )
        e = self.embed
        # the model embed loads (not the demo's victim, no config of its own, no hub or folder
        # name, not precomputed embeddings, which only name their model): caught here, before
        # download, not after it; clipscrub.model checks again against open_clip itself
        if (not self.train.enabled and self.download.source != "embeddings" and not e.model_config_path
                and not e.model_name.startswith(("hf-hub:", "local-dir:"))):
            known = packaged_model_names()
            if known and e.model_name not in known:
                raise _CrossError("embed.model_name", unknown_model_message(e.model_name, known))
        return self

    _base: str | None = PrivateAttr(None)  # absolute, taken when read: the working directory may change

    @model_validator(mode="after")
    def _remember_base(self, info: ValidationInfo) -> "Params":
        base = (info.context or {}).get("base") if info is not None else None
        self._base = None if base is None else os.path.abspath(base)
        return self

    @property
    def params_dir(self) -> str | None:
        """The absolute folder of the params file these were read from (None: not read from a file),
        which a process elsewhere passes to ``parse_params`` to resolve the same paths."""
        return self._base

    def section(self, name: str) -> dict[str, Any]:
        """The section as plain JSON-able data (aliases applied), as written in params.yaml."""
        return getattr(self, name).model_dump(mode="json", by_alias=True)

    def section_in_use(self, name: str) -> dict[str, Any]:
        """The section as ``section`` gives it, narrowed to what is in use where the section says
        (``download``: the settings of the source in use only)."""
        settings = getattr(self, name)
        return settings.in_use() if hasattr(settings, "in_use") else self.section(name)

    def hash(self, *sections: str) -> str:
        """Short, stable hash of the named sections (all when none are named)."""
        names = sections or tuple(type(self).model_fields)
        return params_hash({n: self.section(n) for n in names})


def params_hash(sections: dict[str, Any]) -> str:
    """Short, stable hash of params as JSON (section -> values)."""
    return hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()[:12]


def did_you_mean(word: str, choices: Any) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to a misspelt ``word``, else ``""``."""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def closest(word: str, choices: Any, cutoff: float = 0.7) -> str | None:
    """The choice a misspelt ``word`` most likely means: one equal but for case, else difflib's."""
    choices = [str(c) for c in choices]
    same = [c for c in choices if c.lower() == word.lower()]
    if same:
        return same[0]
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=cutoff)
    return by_lower[close[0]] if close else None


def unknown_model_message(name: str, known: Any) -> str:
    """``unknown model 'ViT-B32'; did you mean 'ViT-B-32'? (...)``: embed.model_name's error."""
    near = closest(name, list(known) + [TrainSettings().model_name])
    hint = f"; did you mean {near!r}?" if near else ""
    own = (f" ({near} is the demo's victim: set embed.model_config to its config JSON, e.g. data/model/model_config.json, "
           "and embed.checkpoint to data/model/checkpoint.pt)" if near == TrainSettings().model_name else
           " (open_clip.list_models() lists them; a model of your own needs its config JSON in embed.model_config)")
    return f"unknown model {name!r}{hint}{own}"


@functools.lru_cache(maxsize=1)
def packaged_model_names() -> frozenset[str]:
    """The model names open_clip ships configs for (``open_clip.list_models()``), read from its
    package folder without importing it (torch would take seconds); empty when not found."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return frozenset()
    for loc in (spec.submodule_search_locations or []) if spec else []:
        configs = Path(loc) / "model_configs"
        if configs.is_dir():
            return frozenset(p.stem for p in configs.glob("*.json"))
    return frozenset()


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys (aliases as written in params.yaml) of the section at ``loc`` in Params."""
    model: Any = Params
    for part in loc:
        field = model.model_fields.get(str(part)) or next(
            (f for f in model.model_fields.values() if f.alias == part), None)
        model = getattr(field, "annotation", None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _format_validation_error(exc: ValidationError) -> ParamError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, _CrossError):
        return ParamError(str(ctx_error), param=ctx_error.key)
    if err["type"] == "extra_forbidden":
        hint = did_you_mean(str(err["loc"][-1]), _known_keys(err["loc"][:-1]))
        return ParamError(f"unknown key{hint} (check the spelling against params.yaml's documented keys)", param=loc)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("value_error",) and "input" in err:
        msg = f"{msg} (got {err['input']!r})"
    return ParamError(msg, param=loc or "params")


def parse_params(data: dict[str, Any] | None, *, base: str | Path | None = None) -> Params:
    """Validate a params mapping into typed settings; raise ParamError naming the bad key.
    ``base``: the folder relative paths in ``data`` are relative to (a params file's); the
    settings then hold paths usable from here, and write themselves out as the file means them."""
    try:
        return Params.model_validate(data or {}, context=None if base is None else {"base": str(base)})
    except ValidationError as exc:
        raise _format_validation_error(exc) from None


# a params file's expanded size (scalars, sequences and mappings, aliases counted each time they
# are used); far above any real params.yaml, far below an alias bomb's billions
MAX_PARAMS_NODES = 100_000


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans, as DVC (ruamel) reads params.yaml: only
    true/false are booleans, so documented strings such as ``no`` or ``off`` stay strings; and
    a document whose aliases expand past ``MAX_PARAMS_NODES`` nodes is refused."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node, {}, set())
        return node


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.2's floats too (PyYAML's 1.1 pattern wants a dot: 1e-9 would be a string); ints resolve first
_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"),
    list("-+.0123456789"))


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes in ``node`` with every alias expanded, memoised per node (so a bomb is measured,
    not built); raises YAMLError past MAX_PARAMS_NODES or on a node that contains itself."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise yaml.YAMLError("a node contains itself (a recursive alias)")
    open_.add(key)
    if isinstance(node, yaml.ScalarNode):
        size = 1
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(c, sizes, open_) for c in node.value)
    else:
        size = 1 + sum(_expanded_size(k, sizes, open_) + _expanded_size(v, sizes, open_) for k, v in node.value)
    open_.discard(key)
    if size > MAX_PARAMS_NODES:
        raise yaml.YAMLError(f"its aliases expand to more than {MAX_PARAMS_NODES:,} values")
    sizes[key] = size
    return size


def load_yaml(text: str) -> Any:
    """Parse params YAML: safe, YAML 1.2 booleans, bounded alias expansion (``_ParamsLoader``)."""
    return yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 - a SafeLoader subclass


def _coerce_override(dotted: str, text: str) -> Any:
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ParamError(f"cannot read the value {text!r}: {first}", param=dotted) from None


def apply_overrides(data: dict[str, Any], overrides: list[str], *, path_base: str | Path | None = None
                    ) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides; every key must already exist (as with dvc exp -S).
    With ``path_base`` (the params file's folder), a relative path typed for a ``PATH_KEYS`` key,
    relative to the working directory, is rewritten relative to that folder, as the file's own are."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ParamError(f"override {item!r} is not of the form section.key=value", param="-S")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                hint = did_you_mean(part, node) if isinstance(node, dict) else ""
                raise ParamError(f"unknown key in override{hint}", param=dotted)
            if i < len(parts) - 1:
                node = node[part]
        value = _coerce_override(dotted, raw)
        if (path_base is not None and dotted.strip() in PATH_KEYS and isinstance(value, str) and value
                and not _is_anchored(value)):
            value = os.path.relpath(os.path.abspath(value), os.path.abspath(path_base))
        node[parts[-1]] = value
    return data


# every key that names a file or folder: relative values in a params file are relative to the
# file's own folder (the sections' ``_PATH_FIELDS``)
PATH_KEYS = (
    "download.urls.path", "download.shards.path", "download.folder.path", "download.folder.captions",
    "download.embeddings.path", "embed.checkpoint", "embed.model_config", "index.reference.path",
    "filter.keep_ids", "filter.remove_ids", "evaluate.truth",
)


def read_params_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ParamError(f"{path} is a directory, not a params file", param="--params")
    if not path.is_file():
        raise ParamError(f"params file not found: {path}", param="--params")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ParamError(f"{path} is not a text file (not UTF-8): a params file is YAML", param="--params") from None
    except yaml.YAMLError as exc:
        raise ParamError(f"{path} is not valid YAML: {exc}".replace("\n", " "), param="--params") from None
    if data is not None and not isinstance(data, dict):
        raise ParamError(f"{path} must hold a mapping of sections", param="--params")
    return data or {}


def load_params(path: str | Path, overrides: list[str] | None = None) -> Params:
    """Read, override and validate params.yaml. Relative paths in the file are relative to its
    folder; those in ``overrides`` (typed on a command line) to the working directory. Written
    out (the hash, the lineage), the paths are as the file means them, however it was named."""
    folder = os.path.normpath(Path(path).parent)
    data = apply_overrides(read_params_file(path), overrides or [], path_base=folder)
    return parse_params(data, base=folder)
