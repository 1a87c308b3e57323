"""The stage graph: which function each stage runs, on which paths, with which params.

The CLI (``clipscrub <stage>``), dvc.yaml and the Prefect flow all go through ``run_stage``, so
no stage is wired twice.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from clipscrub.params import Params


@dataclass(frozen=True)
class Layout:
    """Where each stage's outputs live under one data root (``data/`` for the DVC pipeline)."""

    root: Path

    @property
    def raw(self) -> Path: return self.root / "raw"
    @property
    def model(self) -> Path: return self.root / "model"
    @property
    def embeddings(self) -> Path: return self.root / "embeddings"
    @property
    def index(self) -> Path: return self.root / "index"
    @property
    def scores(self) -> Path: return self.root / "scores"
    @property
    def flags(self) -> Path: return self.root / "flags"
    @property
    def clean(self) -> Path: return self.root / "clean"
    @property
    def train_metrics(self) -> Path: return self.root / "metrics" / "train.json"
    @property
    def detection_metrics(self) -> Path: return self.root / "metrics" / "detection.json"
    @property
    def applied_metrics(self) -> Path: return self.root / "metrics" / "applied.json"
    @property
    def plots(self) -> Path: return self.root / "plots"
    @property
    def report(self) -> Path: return self.root / "report"


def _download(p: Params, lay: Layout) -> dict[str, Any]:
    from stages.download import download_dataset

    return download_dataset(out_dir=lay.raw, settings=p.download, base=p.base)


def _train(p: Params, lay: Layout) -> dict[str, Any]:
    from stages.train import train_model

    return train_model(
        raw_dir=lay.raw, out_dir=lay.model, metrics_path=lay.train_metrics,
        settings=p.train, download=p.download, base=p.base,
    )


def _embed(p: Params, lay: Layout) -> dict[str, Any]:
    from stages.embed import embed_dataset

    # the demo embeds with the victim the train stage wrote; otherwise the model `embed` names
    return embed_dataset(**_embed_args(p, lay))


def _index(p: Params, lay: Layout) -> dict[str, Any]:
    from stages.index import build_index

    return build_index(embeddings_dir=lay.embeddings, out_dir=lay.index, settings=p.index, base=p.base)


def _score(p: Params, lay: Layout) -> dict[str, Any]:
    from stages.score import score_samples

    return score_samples(
        embeddings_dir=lay.embeddings, index_dir=lay.index, out_dir=lay.scores,
        settings=p.score, index=p.index, base=p.base,
    )


def _threshold(p: Params, lay: Layout) -> dict[str, Any]:
    from stages.threshold import threshold_scores

    return threshold_scores(scores_dir=lay.scores, out_dir=lay.flags, settings=p.threshold, base=p.base)


def _filter(p: Params, lay: Layout) -> dict[str, Any]:
    from stages.filter import filter_dataset

    return filter_dataset(
        raw_dir=lay.raw, scores_dir=lay.scores, flags_dir=lay.flags, out_dir=lay.clean,
        settings=p.filter, params=p,
    )


def _evaluate(p: Params, lay: Layout) -> dict[str, Any]:
    from stages.evaluate import evaluate_detectors

    return evaluate_detectors(
        raw_dir=lay.raw, scores_dir=lay.scores, metrics_path=lay.detection_metrics, plots_dir=lay.plots,
        settings=p.evaluate, threshold=p.threshold, base=p.base,
        flags_dir=lay.flags, applied_path=lay.applied_metrics, clean_dir=lay.clean,
    )


def _report(p: Params, lay: Layout) -> dict[str, Any]:
    from stages.report import write_report

    return write_report(
        raw_dir=lay.raw, embeddings_dir=lay.embeddings, scores_dir=lay.scores, flags_dir=lay.flags,
        clean_dir=lay.clean, out_dir=lay.report, settings=p.report, threshold=p.threshold, base=p.base,
        truth_path=p.evaluate.truth, index_dir=lay.index,
    )


@dataclass(frozen=True)
class StageSpec:
    """What a stage reads, writes and depends on; dvc.yaml states the same (a test checks)."""

    inputs: tuple[str, ...]  # Layout attributes
    outputs: tuple[str, ...]  # Layout attributes
    params: tuple[str, ...]  # params sections or dotted keys
    code: tuple[str, ...]  # source files, relative to the repository root


SPECS: dict[str, StageSpec] = {
    "download": StageSpec((), ("raw",), ("base", "download"),
                          ("stages/download.py", "clipscrub/sources.py", "clipscrub/shards.py",
                           "clipscrub/synthetic.py", "clipscrub/attacks.py", "clipscrub/io.py")),
    "train": StageSpec(("raw",), ("model", "train_metrics"), ("base", "download", "train"),
                       ("stages/train.py", "clipscrub/model.py", "clipscrub/synthetic.py", "clipscrub/attacks.py",
                        "clipscrub/io.py")),
    "embed": StageSpec(("raw", "model"), ("embeddings",), ("base", "embed", "train.enabled", "train.model_name"),
                       ("stages/embed.py", "clipscrub/model.py", "clipscrub/shards.py", "clipscrub/sources.py",
                        "clipscrub/arrays.py", "clipscrub/io.py")),
    "index": StageSpec(("embeddings",), ("index",), ("base", "index"),
                       ("stages/index.py", "clipscrub/neighbours.py", "clipscrub/arrays.py", "clipscrub/io.py")),
    "score": StageSpec(("embeddings", "index"), ("scores",), ("base", "index", "score"),
                       ("stages/score.py", "clipscrub/detectors.py", "stages/index.py", "clipscrub/neighbours.py",
                        "clipscrub/arrays.py", "clipscrub/io.py")),
    "threshold": StageSpec(("scores",), ("flags",), ("base", "threshold"), ("stages/threshold.py", "clipscrub/io.py")),
    "filter": StageSpec(("raw", "scores", "flags"), ("clean",),
                        ("base", "download", "train", "embed", "index", "score", "threshold", "filter"),
                        ("stages/filter.py", "clipscrub/shards.py", "clipscrub/io.py")),
    # evaluate and report count what filter removed: the flags after a person's review lists
    "evaluate": StageSpec(("raw", "scores", "flags", "clean"), ("detection_metrics", "applied_metrics", "plots"),
                          ("base", "threshold", "evaluate"),
                          ("stages/evaluate.py", "stages/threshold.py", "stages/filter.py", "clipscrub/detectors.py",
                           "clipscrub/metrics.py", "clipscrub/sources.py", "clipscrub/io.py")),
    "report": StageSpec(("raw", "embeddings", "index", "scores", "flags", "clean"), ("report",),
                        ("base", "threshold", "report", "evaluate.truth"),
                        ("stages/report.py", "stages/threshold.py", "stages/filter.py", "clipscrub/gallery.py",
                         "clipscrub/detectors.py", "clipscrub/shards.py", "clipscrub/metrics.py",
                         "clipscrub/sources.py", "clipscrub/arrays.py", "clipscrub/io.py")),
}


def param_value(params: Params, dotted: str) -> Any:
    """The JSON value of a section (``index``) or a key in one (``train.enabled``)."""
    section, _, key = dotted.partition(".")
    data = params.section(section)
    for part in key.split(".") if key else ():
        data = data[part]
    return data


def stage_code_version(stage: str) -> str:
    """Hash of the source files a stage runs (its SPECS code list)."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in SPECS[stage].code:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    return h.hexdigest()[:16]


def stage_inputs(stage: str, params: Params, layout: Layout) -> dict[str, Path]:
    """The files a stage's output depends on, by name: upstream outputs; for ``download`` the
    user's source files; for ``embed`` the model files (the victim train wrote, or an external
    checkpoint and config) or the precomputed embeddings; for ``index`` a trusted reference list;
    for ``filter`` the review's keep and remove lists."""
    inputs = {name: getattr(layout, name) for name in SPECS[stage].inputs}
    dl = params.download
    if stage == "download" and dl.source != "synthetic":
        sub = getattr(dl, dl.source)
        if dl.source == "shards":
            from clipscrub.shards import expand_shards

            inputs.update({f"shard:{p}": p for p in expand_shards(sub.path, param="download.shards.path")})
        elif dl.source == "embeddings":
            inputs["metadata"] = Path(sub.path).expanduser() / "metadata"
        else:
            inputs["source"] = Path(sub.path).expanduser()
            if dl.source == "folder":
                inputs["captions"] = Path(dl.folder.captions).expanduser()
    if stage == "embed" and dl.source == "embeddings":
        root = Path(dl.embeddings.path).expanduser()
        inputs.update({"img_emb": root / "img_emb", "text_emb": root / "text_emb"})
    if stage == "index" and params.index.reference.mode == "trusted":
        inputs["trusted"] = Path(params.index.reference.path).expanduser()
    if stage == "filter":
        # a person's review lists: the version depends on their content, not just their paths
        inputs.update({name: Path(path).expanduser() for name, path in
                       (("keep_ids", params.filter.keep_ids), ("remove_ids", params.filter.remove_ids)) if path})
    if stage in ("evaluate", "report") and params.evaluate.truth:
        inputs["truth"] = Path(params.evaluate.truth).expanduser()
    if stage == "embed" and not params.train.enabled:
        del inputs["model"]
        for name, path in (("checkpoint", params.embed.checkpoint), ("model_config", params.embed.model_config_path)):
            if path:
                inputs[name] = Path(path)
    return inputs


def active_stages(params: Params) -> list[str]:
    """Stages in run order; ``train`` only when the params ask for the demo victim."""
    return [s for s in STAGES if s != "train" or params.train.enabled]


STAGES: dict[str, Callable[[Params, Layout], dict[str, Any]]] = {
    "download": _download,
    "train": _train,
    "embed": _embed,
    "index": _index,
    "score": _score,
    "threshold": _threshold,
    "filter": _filter,
    "evaluate": _evaluate,
    "report": _report,
}


def producer(output: str) -> str:
    """The stage that writes the Layout attribute ``output``."""
    return next(stage for stage, spec in SPECS.items() if output in spec.outputs)


def check_upstream(name: str, params: Params, root: str | Path) -> None:
    """Raise unless each upstream output ``name`` reads holds what its stage recorded writing."""
    from clipscrub.io import check_outputs

    layout = Layout(Path(root))
    for inp in SPECS[name].inputs:
        if name == "embed" and inp == "model" and not params.train.enabled:
            continue
        check_outputs(getattr(layout, inp), stage=producer(inp), root=root)


def run_stage(name: str, params: Params, root: str | Path = "data", *, hold_root: bool = True,
              assemble: bool = False) -> dict[str, Any]:
    """Run one stage on the layout under ``root``; return its summary.

    The root is held for the stage (one clipscrub process per data root; ``hold_root=False``
    where a flow holds it for its cluster's workers), and the upstream outputs are checked
    against the hashes their lineage recorded before they are read. ``assemble``: the stage's
    pieces (``plan_pieces``) have run; write its outputs from what they wrote.
    """
    from clipscrub.io import root_lock

    with root_lock(root) if hold_root else contextlib.nullcontext():
        check_upstream(name, params, root)
        if assemble and name in ("index", "score"):
            return _assemble(name, params, Layout(Path(root)))
        return STAGES[name](params, Layout(Path(root)))


def _embed_args(p: Params, lay: Layout) -> dict[str, Any]:
    trained = p.train.enabled
    return {"raw_dir": lay.raw, "out_dir": lay.embeddings, "settings": p.embed, "base": p.base,
            "model_dir": lay.model if trained else None, "model_name": p.train.model_name if trained else None}


def _piece_args(name: str, p: Params, lay: Layout) -> dict[str, Any]:
    """What every piece of index or score shares: its inputs, params and work directory (under the
    root, so on the filesystem every worker reaches)."""
    work = lay.root / f".{name}.pieces"
    if name == "index":
        return {"embeddings_dir": lay.embeddings, "work_dir": work, "settings": p.index, "base": p.base}
    return {"embeddings_dir": lay.embeddings, "index_dir": lay.index, "work_dir": work, "settings": p.score,
            "index": p.index, "base": p.base}


def plan_pieces(name: str, params: Params, root: str | Path) -> list[dict[str, Any]]:
    """The independent pieces a cluster runs in parallel before the stage itself, which then
    assembles what they wrote (the same bytes as running it whole); [] for a stage run whole.

    embed: one piece per shard (its part file). index and score: one piece per query chunk
    (``index.chunk_size`` samples), after what they share is prepared once here (the reference
    sets and their own neighbour lists; the references' k-distance and LID), as files.
    """
    lay = Layout(Path(root))
    if name not in ("embed", "index", "score"):
        return []
    check_upstream(name, params, root)
    if name == "embed":
        from stages.embed import plan_embed_parts

        return [{"groups": [i]} for i in range(plan_embed_parts(**_embed_args(params, lay)))]
    if name == "index":
        from stages.index import prepare_index as prepare
    else:
        from stages.score import prepare_score as prepare
    plan = prepare(**_piece_args(name, params, lay))
    return [{"start": start, "stop": stop} for start, stop in plan["chunks"]]


def run_piece(name: str, params: Params, root: str | Path, piece: dict[str, Any]) -> dict[str, Any]:
    """Run one piece ``plan_pieces`` planned, on whichever worker it lands on."""
    lay = Layout(Path(root))
    if name == "embed":
        from stages.embed import embed_parts

        return embed_parts(**_embed_args(params, lay), groups=piece["groups"])
    if name == "index":
        from stages.index import search_index_chunk as run
    elif name == "score":
        from stages.score import score_chunk as run
    else:
        raise ValueError(f"stage {name} has no pieces")
    run(**_piece_args(name, params, lay), start=piece["start"], stop=piece["stop"])
    return {"rows": piece["stop"] - piece["start"]}


def _assemble(name: str, p: Params, lay: Layout) -> dict[str, Any]:
    """index or score from its pieces' files: the reduce its stage function ends with."""
    import shutil

    args = _piece_args(name, p, lay)
    if name == "index":
        from stages.index import reduce_index

        summary = reduce_index(**args, out_dir=lay.index)
    else:
        from stages.score import reduce_score

        summary = reduce_score(**args, out_dir=lay.scores)
    shutil.rmtree(args["work_dir"], ignore_errors=True)
    return summary
