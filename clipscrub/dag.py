"""A pipeline of stages, each declared once (``Stage``), and what follows from the declarations:
the keyword arguments a stage function is called with, the files it depends on (upstream
outputs, the files its params name, the code it imports) and the ``dvc.yaml`` that tells DVC.

The declarations live with the stages (``clipscrub.stages.STAGES``); this module names none.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

PACKAGE = "clipscrub"


@dataclass(frozen=True)
class Output:
    """Something a stage writes under the data root, at ``path`` (relative to it): ``kind``
    ``out`` (a directory or file DVC caches), ``metric`` (a JSON file DVC shows, not cached) or
    ``plots`` (a directory of plot files, each named in ``plots`` with its DVC properties)."""

    path: str
    kind: str = "out"
    plots: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """One stage. The CLI, the Prefect flow and its cache keys, and dvc.yaml are derived from it.

    ``run``: ``module:function``, a plain function of keyword arguments that returns a summary;
    ``paths``: keyword -> output name: an upstream stage's output it reads, or one of its own
    ``outputs``; ``settings``: keyword -> a params section (``index``), a dotted key
    (``evaluate.truth``) or ``*`` (the whole ``Params``); ``params``: the sections or keys its
    outputs depend on; ``files``: the params keys naming files it reads (a key under
    ``download.<source>.`` only while that source is in use); ``when``: a boolean params key
    without which the stage does not run (what it would have written is then passed as None).
    """

    name: str
    run: str
    help: str
    example: str
    paths: Mapping[str, str]
    outputs: tuple[str, ...]
    settings: Mapping[str, str]
    params: tuple[str, ...]
    files: tuple[str, ...] = ()
    when: str | None = None

    @property
    def module(self) -> str:
        return self.run.partition(":")[0]

    @property
    def inputs(self) -> tuple[str, ...]:
        """The upstream outputs it reads, in declaration order."""
        return tuple(dict.fromkeys(v for v in self.paths.values() if v not in self.outputs))

    def function(self) -> Callable[..., dict[str, Any]]:
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)


def params_value(params: Any, key: str) -> Any:
    """A params section as JSON (``index``), a key in one (``train.enabled``, ``index.reference.path``),
    or ``*``: the ``Params`` object itself."""
    if key == "*":
        return params
    section, _, rest = key.partition(".")
    data = params.section(section)
    for part in rest.split(".") if rest else ():
        data = data[part]
    return data


def param_keys(stage: Stage, params: Any) -> list[str]:
    """The params keys ``stage``'s outputs depend on: its declared sections and keys, a section
    that narrows itself to what is in use (``in_use``: download, to the source in use) as the
    keys it keeps. What dvc.yaml lists, the Prefect cache key hashes, and so the
    columns of ``dvc exp show``."""
    keys: list[str] = []
    for entry in stage.params:
        settings = getattr(params, entry) if "." not in entry else None
        keys += [f"{entry}.{k}" for k in settings.in_use()] if hasattr(settings, "in_use") else [entry]
    return keys


def is_active(stage: Stage, params: Any) -> bool:
    return stage.when is None or bool(params_value(params, stage.when))


def settings_value(params: Any, key: str) -> Any:
    """What a ``settings`` keyword receives: a section's typed settings, a key's typed value (a
    path usable from here, not as written), or the whole ``Params``."""
    if key == "*":
        return params
    node = params
    for part in key.split("."):
        fields = type(node).model_fields
        node = getattr(node, next((name for name, f in fields.items() if (f.alias or name) == part), part))
    return node


def file_keys(stage: Stage, params: Any) -> list[str]:
    """The ``files`` keys that name a file for these params: set, and (under ``download.<x>.``)
    of the source in use."""
    source = params.download.source
    keys = []
    for key in stage.files:
        parts = key.split(".")
        if parts[0] == "download" and len(parts) > 2 and parts[1] != source:
            continue
        if params_value(params, key):
            keys.append(key)
    return keys


# ------------------------------------------------------------------ the code a stage runs
def _module_file(name: str) -> Path | None:
    """The source file of module ``name`` of the package, or None where ``name`` is not a module
    (a function or class imported from one). Finds it without running the module itself."""
    parent, _, leaf = name.rpartition(".")
    if not parent:
        return None
    try:
        spec = importlib.util.find_spec(parent)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None  # the parent is a module: ``leaf`` is something defined in it
    for folder in spec.submodule_search_locations:
        path = Path(folder) / f"{leaf}.py"
        if path.is_file():
            return path
    return None


def _imported_names(path: Path, module: str) -> set[str]:
    """Every module name an ``import`` in ``path`` (module ``module``) could name, at module level
    or inside functions: ``from a.b import c`` names ``a.b`` and ``a.b.c``."""
    names: set[str] = set()
    package = module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


@lru_cache(maxsize=None)
def imported_modules(module: str) -> tuple[tuple[str, Path], ...]:
    """(name, source file) of ``module`` and of every module of the package it imports, directly
    or through one another, and of their templates (``module_templates``), sorted by name.
    Package ``__init__`` files are left out: they hold the version and the stage declarations,
    which are not what a stage computes."""
    found: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = _module_file(name)
        if path is None:
            continue
        found[name] = path
        todo += [n for n in _imported_names(path, name) if n.split(".")[0] == PACKAGE and n not in found]
    if module not in found:
        raise ValueError(f"{module} is not a module of {PACKAGE}")
    for name, path in list(found.items()):
        found.update(module_templates(name, path))
    return tuple(sorted(found.items()))


def module_templates(name: str, path: Path) -> dict[str, Path]:
    """The template files of module ``name`` (source ``path``): every file under
    ``templates/<leaf>/`` beside it, named ``<name>:templates/<leaf>/<file>``. They decide what
    the module writes as much as its code does, so they are part of its code version."""
    leaf = name.rpartition(".")[2]
    folder = path.parent / "templates" / leaf
    if not folder.is_dir():
        return {}
    return {f"{name}:{f.relative_to(path.parent).as_posix()}": f
            for f in sorted(folder.rglob("*")) if f.is_file() and "__pycache__" not in f.parts}


def code_version(module: str) -> str:
    """``<clipscrub version>+<hash>`` of the source of ``module`` and of every package module it
    imports: what a stage's outputs depend on, the same whether clipscrub runs from a clone or
    from an installed wheel (modules are named, not located)."""
    from clipscrub import __version__

    h = hashlib.sha256()
    for name, path in imported_modules(module):
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{__version__}+{h.hexdigest()[:16]}"


# ------------------------------------------------------------------ dvc.yaml
def relative_dep(path: str | Path, folder: Path) -> str:
    """A dependency path as dvc.yaml at ``folder`` names it: relative where it lies under that
    folder, absolute otherwise (DVC takes local paths outside the project as they are)."""
    target = Path(os.path.abspath(Path(path).expanduser()))
    base = Path(os.path.abspath(folder))
    try:
        return target.relative_to(base).as_posix()
    except ValueError:
        return target.as_posix()


def dvc_stages(stages: Iterable[Stage], outputs: Mapping[str, Output], params: Any, *, root: str,
               params_file: str, code: Callable[[Stage], list[str]],
               files: Callable[[Stage], list[str]]) -> dict[str, Any]:
    """The ``stages`` mapping of a dvc.yaml for ``params``: per active stage its command (the CLI
    over the same function), its deps (upstream outputs, ``code(stage)``, ``files(stage)``: the
    files its params name), its params and its outputs (``root``-relative paths). Params are
    named by key (``param_keys``), in the order declared; the params file is DVC's default unless
    ``params_file`` names another."""
    out: dict[str, Any] = {}
    producers = {o: s.name for s in stages for o in s.outputs}
    active = {s.name for s in stages if is_active(s, params)}
    for stage in stages:
        if stage.name not in active:
            continue
        inputs = [i for i in stage.inputs if producers.get(i) in active]
        entry: dict[str, Any] = {
            "cmd": f"clipscrub {stage.name} --params {params_file} --root {root}",
            "deps": [f"{root}/{outputs[i].path}" for i in inputs] + code(stage) + files(stage),
            "params": param_keys(stage, params) if params_file == "params.yaml" else [{params_file: param_keys(stage, params)}],
        }
        for name in stage.outputs:
            o = outputs[name]
            path = f"{root}/{o.path}"
            if o.kind == "out":
                entry.setdefault("outs", []).append(path)
            elif o.kind == "metric":
                entry.setdefault("metrics", []).append({path: {"cache": False}})
            else:
                entry.setdefault("plots", []).extend(
                    {f"{path}/{plot}": {**props, "cache": False}} for plot, props in o.plots.items())
        out[stage.name] = entry
    return out
