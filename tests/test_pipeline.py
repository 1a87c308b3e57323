"""dvc.yaml, the CLI and the Prefect flow describe the same stage graph (clipscrub.pipeline)."""

from __future__ import annotations

import yaml

from clipscrub.pipeline import SPECS, STAGES, Layout
from tests.conftest import REPO


def _paths(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def test_dvc_yaml_matches_the_stage_specs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGES)
    lay = Layout(REPO.joinpath("data").relative_to(REPO))
    for name, spec in SPECS.items():
        st = stages[name]
        assert st["cmd"] == f"clipscrub {name} --params params.yaml --root data"
        inputs = [getattr(lay, i).as_posix() for i in spec.inputs]
        assert sorted(st["deps"]) == sorted(inputs + list(spec.code)), name
        assert st["params"] == list(spec.params), name
        outputs = _paths(st.get("outs")) + _paths(st.get("metrics")) + _paths(st.get("plots"))
        expected = []
        for o in spec.outputs:
            path = getattr(lay, o).as_posix()
            expected += [f"{path}/roc", f"{path}/hist", f"{path}/pr"] if o == "plots" else [path]
        assert sorted(outputs) == sorted(expected), name


def test_code_files_exist():
    for spec in SPECS.values():
        for rel in spec.code:
            assert (REPO / rel).is_file(), rel


def test_trusted_reference_file_is_an_index_input(tmp_path):
    """The flow's cache key for index covers the trusted list's content, not just its path."""
    from clipscrub.params import parse_params
    from clipscrub.pipeline import Layout, stage_inputs

    ids = tmp_path / "clean_ids.txt"
    params = parse_params({"index": {"reference": {"mode": "trusted", "path": str(ids)}}})
    assert stage_inputs("index", params, Layout(tmp_path))["trusted"] == ids
    assert "trusted" not in stage_inputs("index", parse_params({}), Layout(tmp_path))


def test_two_runs_write_identical_bytes(tiny_run, tmp_path):
    """Same params, fresh directory: every output file of every stage has the same sha256."""
    from clipscrub.io import sha256_file
    from clipscrub.pipeline import STAGES, run_stage
    from clipscrub.validation import VALIDATION_DIR

    first, params = tiny_run
    second = tmp_path / "data"
    for stage in STAGES:
        run_stage(stage, params, second)

    def hashes(root):
        # data docs carry the time of the validation; they are a report, not an output
        return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
                if p.is_file() and p.relative_to(root).parts[0] != VALIDATION_DIR}

    a, b = hashes(first), hashes(second)
    assert len(a) > 20 and a.keys() == b.keys()
    assert {name for name in a if a[name] != b[name]} == set()
