"""Imports only go down: the library (clipscrub/) <- the stages (stages/) <- the stage graph, the
CLI and the Prefect flow (flows/). A library that imported its stages could not be used without
them, and a stage that imported the flow would tie the DVC path to Prefect."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# what each layer may import of the project's own packages
ALLOWED = {"clipscrub": {"clipscrub"}, "stages": {"clipscrub", "stages"}, "flows": {"clipscrub", "stages", "flows"}}


def project_imports(path: Path) -> set[str]:
    """The project packages a module imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        found |= {n.split(".")[0] for n in names} & set(ALLOWED)
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_only_go_down(layer):
    modules = sorted((REPO / layer).rglob("*.py"))
    assert modules
    upward = {m.relative_to(REPO).as_posix(): sorted(project_imports(m) - ALLOWED[layer]) for m in modules}
    assert {m: up for m, up in upward.items() if up} == {}


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from stages.index import build_index\n    import flows.clean\n")
    assert project_imports(module) == {"stages", "flows"}
