"""dvc.yaml, the CLI and the Prefect flow describe the same stage graph (clipscrub.pipeline)."""

from __future__ import annotations

import json

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


def test_every_stage_records_its_lineage(tiny_run):
    """Each stage's lineage.json: the params it was given, the sha256 of each upstream output it
    read (as they are now: nothing downstream rewrites them), this code's version, and its upstream
    stages' records unchanged. Filter's record is the version's: params, hash, input manifest."""
    from clipscrub.io import code_version, sha256_file, sha256_path
    from clipscrub.pipeline import Layout, param_value, stage_inputs
    from stages.filter import REPORTING

    root, params = tiny_run
    lay = Layout(root)
    version = code_version()
    out_dirs = {"download": lay.raw, "train": lay.model, "embed": lay.embeddings, "index": lay.index,
                "score": lay.scores, "threshold": lay.flags, "report": lay.report}
    clean = json.loads((lay.clean / "lineage.json").read_text())
    records = {"filter": clean["stages"]["filter"]}  # the report carries the version's records
    for stage, out in out_dirs.items():
        stages = json.loads((out / "lineage.json").read_text())["stages"]
        record = records[stage] = stages[stage]
        assert record["code_version"] == version, stage
        assert record["params"] == {k: param_value(params, k) for k in record["params"]}, stage
        assert set(record["params"]) <= set(SPECS[stage].params) | {"base"}, stage
        inputs = stage_inputs(stage, params, lay)
        assert set(record["inputs"]) <= set(inputs), stage
        assert record["inputs"] == {name: sha256_path(inputs[name]) for name in record["inputs"]}, stage
        for upstream, rec in stages.items():  # carried over as the upstream stage wrote it
            if upstream != stage:
                assert rec == records[upstream], (stage, upstream)
    assert set(records["download"]["params"]) == {"base", "download"}
    assert set(records["report"]["inputs"]) == {"raw", "embeddings", "scores", "flags", "clean"}
    for stage in ("train", "embed", "index", "score", "threshold"):
        assert set(records[stage]["inputs"]) >= set(SPECS[stage].inputs), stage
    # embed names the model it embedded with by the checkpoint's hash
    assert records["embed"]["model"]["checkpoint_sha256"] == sha256_file(lay.model / "checkpoint.pt")

    versioned = [n for n in type(params).model_fields if n not in REPORTING]
    assert clean["params"] == {n: params.section(n) for n in versioned}
    assert clean["params_hash"] == params.hash(*versioned) and clean["code_version"] == version
    assert clean["input_manifest_sha256"] == sha256_file(lay.raw / "manifest.parquet")
    assert clean["stages"]["filter"]["params"] == {"filter": params.section("filter")}
    assert clean["stages"]["filter"]["code_version"] == version
    assert clean["stages"]["filter"]["inputs"] == {n: sha256_path(getattr(lay, n)) for n in SPECS["filter"].inputs}
    assert clean["stages"] == {s: r for s, r in records.items() if s != "report"}
