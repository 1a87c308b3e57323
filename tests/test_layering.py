"""Imports only go down: the library (clipscrub/) <- the stages (stages/, installed as
clipscrub.stages) <- the stage graph, the CLI and the Prefect flow (flows/, clipscrub.flows). A
library that imported its stages could not be used without them, a stage that imported the flow
would tie the DVC path to Prefect, and a stage that imported another stage would rerun whenever
that one's code changed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = {"clipscrub": "library", "stages": "stages", "flows": "flows"}
# what each layer may import of the project's own code
ALLOWED = {"library": {"library"}, "stages": {"library"}, "flows": {"library", "stages", "flows"}}


def layer_of(module: str) -> str | None:
    """The layer an imported module name belongs to (None: not the project's)."""
    parts = module.split(".")
    if parts[0] != "clipscrub":
        return None
    if len(parts) > 1 and parts[1] in ("stages", "flows"):
        return parts[1]
    return "library"


def project_imports(path: Path) -> set[str]:
    """The project modules a module imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        found |= {n for n in names if layer_of(n)}
    return found


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_imports_only_go_down(folder):
    layer = LAYERS[folder]
    modules = sorted((REPO / folder).glob("*.py"))
    assert modules
    upward = {m.relative_to(REPO).as_posix(): sorted(n for n in project_imports(m) if layer_of(n) not in ALLOWED[layer])
              for m in modules}
    assert {m: up for m, up in upward.items() if up} == {}


def test_no_top_level_stages_or_flows_import():
    """Everything is imported under the clipscrub namespace: a wheel installs no `stages` or `flows`."""
    bare = {m.relative_to(REPO).as_posix(): sorted(n for n in _all_imports(m) if n.split(".")[0] in ("stages", "flows"))
            for folder in (*LAYERS, "tests", "benchmarks") for m in sorted((REPO / folder).rglob("*.py"))}
    assert {m: n for m, n in bare.items() if n} == {}


def _all_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module or "")
    return found


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from clipscrub.stages.index import build_index\n    import clipscrub.flows.clean\n"
                      "    import clipscrub.io\n")
    assert {layer_of(n) for n in project_imports(module)} == {"stages", "flows", "library"}
