"""The stage graph: which function each stage runs, on which paths, with which params, as the
declarations in ``clipscrub.stages`` state it.

The CLI (``clipscrub <stage>``), dvc.yaml and the Prefect flow all go through ``run_stage``, so
no stage is wired twice.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipscrub.dag import Stage, code_version, file_keys, is_active, param_keys, params_value, settings_value
from clipscrub.params import Params
from clipscrub.stages import OUTPUTS
from clipscrub.stages import STAGES as DECLARED

STAGES: dict[str, Stage] = {s.name: s for s in DECLARED}


@dataclass(frozen=True)
class Layout:
    """Where each stage's outputs live under one data root (``data/`` for the DVC pipeline):
    ``layout.<output>`` is ``root / OUTPUTS[output].path``."""

    root: Path

    def __getattr__(self, name: str) -> Path:
        if name not in OUTPUTS:
            raise AttributeError(name)
        return self.root / OUTPUTS[name].path


def inactive_outputs(params: Params) -> set[str]:
    """The outputs of stages that do not run for these params (train's, unless train.enabled)."""
    return {o for s in STAGES.values() if not is_active(s, params) for o in s.outputs}


def stage_kwargs(stage: str, params: Params, layout: Layout) -> dict[str, Any]:
    """The keyword arguments ``stage``'s function is called with: its paths under ``layout``
    (an output of a stage that does not run for these params: None) and its settings."""
    decl = STAGES[stage]
    inactive = inactive_outputs(params) - set(decl.outputs)
    kwargs: dict[str, Any] = {kw: None if out in inactive else getattr(layout, out) for kw, out in decl.paths.items()}
    kwargs.update({kw: settings_value(params, key) for kw, key in decl.settings.items()})
    return kwargs


def param_value(params: Params, dotted: str) -> Any:
    """The JSON value of a section (``index``) or a key in one (``train.enabled``)."""
    return params_value(params, dotted)


def stage_code_version(stage: str) -> str:
    """``<version>+<hash>`` of the modules the stage imports (``clipscrub.dag.code_version``)."""
    return code_version(STAGES[stage].module)


def stage_files(stage: str, params: Params) -> dict[str, Path]:
    """The files ``stage`` reads that its params name, by params key (a shards pattern: each
    shard it expands to, keyed ``download.shards.path:<file>``)."""
    found: dict[str, Path] = {}
    for key in file_keys(STAGES[stage], params):
        value = str(settings_value(params, key))  # usable from here, not as written
        if key == "download.shards.path":
            from clipscrub.shards import expand_shards

            found.update({f"{key}:{p}": Path(p) for p in expand_shards(value, param=key)})
        else:
            found[key] = Path(value).expanduser()
    return found


def stage_inputs(stage: str, params: Params, layout: Layout) -> dict[str, Path]:
    """Every file ``stage``'s outputs depend on, by name: the upstream outputs it reads (of stages
    that run for these params) and the files its params name (``stage_files``)."""
    inactive = inactive_outputs(params)
    inputs = {name: getattr(layout, name) for name in STAGES[stage].inputs if name not in inactive}
    return {**inputs, **stage_files(stage, params)}


def active_stages(params: Params) -> list[str]:
    """Stages in run order; those with a ``when`` key only where it holds (train: the demo victim)."""
    return [name for name, decl in STAGES.items() if is_active(decl, params)]


def producer(output: str) -> str:
    """The stage that writes the Layout attribute ``output``."""
    return next(stage for stage, decl in STAGES.items() if output in decl.outputs)


def check_upstream(name: str, params: Params, root: str | Path) -> None:
    """Raise unless each upstream output ``name`` reads holds what its stage recorded writing."""
    from clipscrub.io import check_outputs

    layout = Layout(Path(root))
    for inp in STAGES[name].inputs:
        if is_active(STAGES[producer(inp)], params):
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
        if assemble and name in ("index", "score", "filter"):
            return _assemble(name, params, Layout(Path(root)))
        return STAGES[name].function()(**stage_kwargs(name, params, Layout(Path(root))))


def _piece_args(name: str, p: Params, lay: Layout) -> dict[str, Any]:
    """What every piece of index or score shares: the stage's arguments, with a work directory
    (under the root, so on the filesystem every worker reaches) in place of its output."""
    args = {k: v for k, v in stage_kwargs(name, p, lay).items() if k != "out_dir"}
    return {**args, "work_dir": lay.root / f".{name}.pieces"}


def plan_pieces(name: str, params: Params, root: str | Path) -> list[dict[str, Any]]:
    """The independent pieces a cluster runs in parallel before the stage itself, which then
    assembles what they wrote (the same bytes as running it whole); [] for a stage run whole.

    embed: one piece per shard (its part file). index and score: one piece per query chunk
    (``index.chunk_size`` samples), after what they share is prepared once here (the reference
    sets and their own neighbour lists; the references' k-distance and LID), as files. filter: one
    piece per ``filter.piece_size`` rows of the manifest (the removed ids prepared once).
    """
    lay = Layout(Path(root))
    if name not in ("embed", "index", "score", "filter"):
        return []
    check_upstream(name, params, root)
    if name == "embed":
        from clipscrub.stages.embed import plan_embed_parts

        return [{"groups": [i]} for i in range(plan_embed_parts(**stage_kwargs("embed", params, lay)))]
    if name == "index":
        from clipscrub.stages.index import prepare_index as prepare
    elif name == "score":
        from clipscrub.stages.score import prepare_score as prepare
    else:
        from clipscrub.stages.filter import prepare_filter

        plan = prepare_filter(**_piece_args(name, params, lay))
        return [{"start": start, "stop": stop} for start, stop in plan["pieces"]]
    plan = prepare(**_piece_args(name, params, lay))
    return [{"start": start, "stop": stop} for start, stop in plan["chunks"]]


def run_piece(name: str, params: Params, root: str | Path, piece: dict[str, Any]) -> dict[str, Any]:
    """Run one piece ``plan_pieces`` planned, on whichever worker it lands on."""
    lay = Layout(Path(root))
    if name == "embed":
        from clipscrub.stages.embed import embed_parts

        return embed_parts(**stage_kwargs("embed", params, lay), groups=piece["groups"])
    if name == "index":
        from clipscrub.stages.index import search_index_chunk as run
    elif name == "score":
        from clipscrub.stages.score import score_chunk as run
    elif name == "filter":
        from clipscrub.stages.filter import filter_piece as run
    else:
        raise ValueError(f"stage {name} has no pieces")
    run(**_piece_args(name, params, lay), start=piece["start"], stop=piece["stop"])
    return {"rows": piece["stop"] - piece["start"]}


def _assemble(name: str, p: Params, lay: Layout) -> dict[str, Any]:
    """index, score or filter from its pieces' files: the reduce its stage function ends with."""
    import shutil

    args = _piece_args(name, p, lay)
    if name == "index":
        from clipscrub.stages.index import reduce_index

        summary = reduce_index(**args, out_dir=lay.index)
    elif name == "filter":
        from clipscrub.stages.filter import reduce_filter

        summary = reduce_filter(**args, out_dir=lay.clean)
    else:
        from clipscrub.stages.score import reduce_score

        summary = reduce_score(**args, out_dir=lay.scores)
    shutil.rmtree(args["work_dir"], ignore_errors=True)
    return summary


# ------------------------------------------------------------------ dvc.yaml, from the declarations
CODE_STAMPS = ".clipscrub/code"  # the installed clipscrub's code version per stage, in a user's project
DVC_HEADER = (
    "The clipscrub pipeline, written by `clipscrub dvc-yaml` from the stage declarations (clipscrub.stages) and "
    "the params file: regenerate it when you change a path in the params (a stage run by DVC stops if this file "
    "lacks a dependency its params name). Each stage is `clipscrub <stage>`, over the same function the Prefect "
    "flow runs; it depends on its upstream outputs, the files its params name, and {code}."
)


def code_files(stage: str) -> list[Path]:
    """The source files of the modules ``stage`` imports (``clipscrub.dag.imported_modules``)."""
    from clipscrub.dag import imported_modules

    return [path for _, path in imported_modules(STAGES[stage].module)]


def dvc_file_deps(stage: str, params: Params, folder: Path) -> list[str]:
    """The files ``stage``'s params name, as dvc.yaml at ``folder`` lists them: a shards folder or
    file as given, a brace pattern as the folder it names shards in (a shard added there reruns
    download too)."""
    import os

    from clipscrub.dag import relative_dep

    deps = []
    for key in file_keys(STAGES[stage], params):
        value = str(settings_value(params, key))
        if key == "download.shards.path" and "{" in value:  # a brace pattern: the folder it names shards in
            value = os.path.dirname(value.split("{", 1)[0]) or "."
        deps.append(relative_dep(value, folder))
    return list(dict.fromkeys(deps))


def in_project(folder: Path) -> bool:
    """Whether clipscrub's own source lies under ``folder`` (the repository's DVC project, where
    stages depend on the source files; elsewhere on the installed version's stamps)."""
    import os

    base = os.path.abspath(folder)
    return all(os.path.abspath(p).startswith(base + os.sep) for p in code_files("download"))


def dvc_yaml_text(params: Params, *, folder: Path, params_file: str = "params.yaml", root: str = "data") -> str:
    """dvc.yaml for ``params`` in the DVC project at ``folder``: one stage per active stage (see
    ``clipscrub.dag.dvc_stages``). Inside clipscrub's repository a stage depends on the source
    files it imports; in any other project on ``.clipscrub/code/<stage>.txt``, which the
    always-run ``clipscrub-code`` stage rewrites from the installed clipscrub, so an upgrade reruns
    the stages whose code it changed and no other."""
    import os
    import textwrap

    import yaml

    from clipscrub.dag import dvc_stages

    source = in_project(folder)

    def code(stage) -> list[str]:
        if source:
            return sorted(Path(os.path.relpath(p, folder)).as_posix() for p in code_files(stage.name))
        return [f"{CODE_STAMPS}/{stage.name}.txt"]

    stages = dvc_stages(tuple(STAGES.values()), OUTPUTS, params, root=root, params_file=params_file, code=code,
                        files=lambda stage: dvc_file_deps(stage.name, params, folder))
    if not source:
        stamps = {"cmd": f"clipscrub code --out {CODE_STAMPS}", "always_changed": True,
                  # every stage's file, as `clipscrub code` writes them all: none is left untracked
                  "outs": [{f"{CODE_STAMPS}/{name}.txt": {"cache": False}} for name in STAGES]}
        stages = {"clipscrub-code": stamps, **stages}
    what = ("the source files it imports" if source else
            f"the installed clipscrub's code for it ({CODE_STAMPS}/<stage>.txt, rewritten by the always-run "
            "clipscrub-code stage: an upgrade reruns only the stages whose code changed)")
    body = yaml.safe_dump({"stages": stages}, sort_keys=False, default_flow_style=False, width=100)
    return "".join(f"# {line}\n" for line in textwrap.wrap(DVC_HEADER.format(code=what), 96)) + body


def write_code_stamps(out: Path) -> dict[str, str]:
    """``<out>/<stage>.txt`` for every stage: the installed clipscrub's code version for it and the
    modules it is made of. Files whose content is unchanged are left as they are."""
    from clipscrub.dag import imported_modules

    out.mkdir(parents=True, exist_ok=True)
    versions = {}
    for name, decl in STAGES.items():
        versions[name] = code_version(decl.module)
        # the code's hash, not clipscrub's version: a release that leaves a stage's code alone does not rerun it
        text = f"{versions[name].partition('+')[2]}\n" + "".join(f"{m}\n" for m, _ in imported_modules(decl.module))
        path = out / f"{name}.txt"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
    return versions


def check_dvc_deps(stage: str, params: Params, dvc_yaml: Path) -> None:
    """Under ``dvc repro`` (``DVC_STAGE`` names the stage): raise unless ``dvc_yaml`` lists every
    file the stage's params name among its deps, and every params key it depends on. Otherwise
    DVC would not rerun the stage when that file or key changes, and the cleaned version would go
    stale without a word."""
    import yaml

    from clipscrub.errors import ParamError

    if not dvc_yaml.is_file():
        return
    entry = ((yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}).get(stage)
    if not isinstance(entry, dict):
        return
    folder = dvc_yaml.parent
    listed = {Path(folder, d).resolve() if not Path(d).is_absolute() else Path(d) for d in entry.get("deps") or []}
    for dep in dvc_file_deps(stage, params, folder):
        path = Path(folder, dep).resolve()
        if path not in listed and not any(parent in listed for parent in path.parents):
            raise ParamError(
                f"{dvc_yaml} does not list {dep} as a dependency of stage {stage}, so DVC would not rerun it when "
                f"that file changes: regenerate dvc.yaml with `clipscrub dvc-yaml` (and commit it), then rerun",
                param=stage)
    # params keys too: switching download.source brings another source's settings into use
    keys: set[str] = set()
    for item in entry.get("params") or []:  # a key, or {params file: [keys]}
        for group in item.values() if isinstance(item, dict) else [[item]]:
            keys.update(group)
    for key in param_keys(STAGES[stage], params):
        parts = key.split(".")
        if not any(".".join(parts[:i]) in keys for i in range(1, len(parts) + 1)):
            raise ParamError(
                f"{dvc_yaml} does not list the param {key} as a dependency of stage {stage}, so DVC would not rerun "
                f"it when that param changes: regenerate dvc.yaml with `clipscrub dvc-yaml` (and commit it), then rerun",
                param=stage)
