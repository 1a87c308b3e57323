"""dvc.yaml, the CLI and the Prefect flow describe the same stage graph (flows.pipeline)."""

from __future__ import annotations

import itertools
import json

import yaml

from flows.pipeline import SPECS, STAGES, Layout
from tests.conftest import REPO, output_hashes


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
    from flows.pipeline import Layout, stage_inputs

    ids = tmp_path / "clean_ids.txt"
    params = parse_params({"index": {"reference": {"mode": "trusted", "path": str(ids)}}})
    assert stage_inputs("index", params, Layout(tmp_path))["trusted"] == ids
    assert "trusted" not in stage_inputs("index", parse_params({}), Layout(tmp_path))


def test_two_runs_write_identical_bytes(tiny_run, tmp_path):
    """Same params, fresh directory: every output file of every stage has the same sha256."""
    from flows.pipeline import STAGES, run_stage

    first, params = tiny_run
    second = tmp_path / "data"
    for stage in STAGES:
        run_stage(stage, params, second)

    a, b = output_hashes(first), output_hashes(second)
    assert len(a) > 20 and a.keys() == b.keys()
    assert {name for name in a if a[name] != b[name]} == set()


def test_every_stage_records_its_lineage(tiny_run):
    """Each stage's lineage.json: the params it was given, the sha256 of each upstream output it
    read (as they are now: nothing downstream rewrites them), this code's version, and its upstream
    stages' records unchanged. Filter's record is the version's: params, hash, input manifest."""
    from clipscrub.io import code_version, sha256_file, sha256_path
    from flows.pipeline import Layout, param_value, stage_inputs
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


# --- detection works at all (issue 14 item 21) ------------------------------------------------

def _poison_removed(root) -> tuple[int, int, float, float]:
    """(poisoned in the input, poisoned the filter removed, poisoned fraction in, out)."""
    import polars as pl

    lay = Layout(root)
    raw = pl.read_parquet(lay.raw / "manifest.parquet")
    kept = raw.join(pl.read_parquet(lay.clean / "manifest.parquet").select("id"), on="id")
    poisoned, left = int(raw["is_poison"].sum()), int(kept["is_poison"].sum())
    return poisoned, poisoned - left, poisoned / raw.height, left / kept.height


def write_planted_poison(d, *, seed: int = 0, clean: int = 2000, poison: int = 20, concepts: int = 20,
                         dim: int = 32, parts: int = 2):
    """clip-retrieval output (img_emb/ text_emb/ metadata/ with is_poison) of clean pairs from
    Gaussian concept clusters (caption = image + a modality offset + noise) and a planted poison
    cluster: images collapsed near one point (the trigger), captions near one target caption."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(concepts, dim))
    concept = rng.integers(concepts, size=clean)
    image = centres[concept] + 0.3 * rng.normal(size=(clean, dim))
    text = image + 0.5 * rng.normal(size=dim) + 0.3 * rng.normal(size=(clean, dim))
    trigger, target = rng.normal(size=dim), rng.normal(size=dim)
    image = np.concatenate([image, trigger + 0.02 * rng.normal(size=(poison, dim))])
    text = np.concatenate([text, target + 0.02 * rng.normal(size=(poison, dim))])
    captions = [f"a photo of concept {c}" for c in concept] + ["a photo of a banana"] * poison
    is_poison = np.arange(clean + poison) >= clean
    order = rng.permutation(clean + poison)  # poison scattered through the parts
    for sub in ("img_emb", "text_emb", "metadata"):
        (d / sub).mkdir(parents=True)
    bounds = np.linspace(0, clean + poison, parts + 1).astype(int)
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        rows = order[lo:hi]
        np.save(d / "img_emb" / f"img_emb_{i}.npy", image[rows].astype(np.float16))
        np.save(d / "text_emb" / f"text_emb_{i}.npy", text[rows].astype(np.float16))
        pl.DataFrame({"caption": [captions[r] for r in rows], "is_poison": is_poison[rows]}).write_parquet(
            d / "metadata" / f"metadata_{i}.parquet")
    return d


def test_detection_chain_finds_a_planted_poison_cluster(tmp_path):
    """Precomputed embeddings with 20 planted poison pairs among 2,000 clean ones (1%): the default
    detector (kdist, default index/score/threshold settings) ranks them first and filter removes
    them. Measured (generator seeds 0-4): kdist AUROC 1.0 and all 20 removed by the default 1% cut,
    every seed. Bounds leave room for a change of ranking detail, not for detection breaking
    (a flipped orientation or lost poison gives AUROC near 0 or 0.5)."""
    from clipscrub.params import parse_params
    from flows.pipeline import run_stage

    src = write_planted_poison(tmp_path / "src")
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["train"]["enabled"] = False
    data["download"]["source"] = "embeddings"
    data["download"]["embeddings"]["path"] = str(src)
    # a precomputed source needs no model: a name open_clip does not know skips the dimension check
    data["embed"].update({"model_name": "planted-d32", "pretrained": None})
    params = parse_params(data)
    root = tmp_path / "data"
    for stage in ("download", "embed", "index", "score", "threshold", "filter", "evaluate"):
        run_stage(stage, params, root)

    metrics = json.loads(Layout(root).detection_metrics.read_text())
    assert metrics["ground_truth"] and metrics["poisoned"] == 20
    assert params.threshold.detector == "kdist"
    assert metrics["detectors"]["kdist"]["auroc"] >= 0.95
    poisoned, removed, before, after = _poison_removed(root)
    assert poisoned == 20 and removed >= 16
    assert after < before / 4


# The README's demo (params.yaml: 6,000 samples, 1% BadNets, a 10-epoch tiny ViT victim) cut to
# about a minute on two busy CPU cores: a third of the samples (still 1% poison: 20 pairs) and a
# narrower victim. One training thread: on a loaded two-core machine two torch threads spin and
# ran 5-12x slower per step (measured).
SMALL_DEMO_OVERRIDES = [
    "download.synthetic.num_samples=2000",
    "download.shard_size=500",
    "train.threads=1",
    "train.heldout_samples=100",
    "train.architecture.vision_width=64",
    "train.architecture.text_width=64",
    "train.architecture.heads=2",
]


def test_detection_works_end_to_end_on_a_small_demo(tmp_path):
    """The README's promise on a trained victim, through every stage: the default detector ranks the
    BadNets poison well above chance and filter removes a share of it. Measured with
    SMALL_DEMO_OVERRIDES, base.seed 0 / 1 / 2: kdist AUROC 0.943 / 0.877 / 0.908, the default 1% cut
    removes 14 / 13 / 12 of the 20 poisoned pairs, 59-74 s for the whole run on two shared cores (a
    victim with context_length 16: AUROC 0.847 / 0.936 / 0.916, 9 / 14 / 5 removed). The test runs
    seed 0; the bounds sit below every measured seed, since training is not bit-identical across CPUs.
    The tiny_run fixture cannot show this: its 1-epoch victim learns nothing (AUROC 0.41)."""
    import torch

    from clipscrub.params import apply_overrides, parse_params
    from flows.pipeline import run_stage

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    params = parse_params(apply_overrides(data, SMALL_DEMO_OVERRIDES))
    root = tmp_path / "data"
    threads = torch.get_num_threads()
    for stage in ("download", "train", "embed", "index", "score", "threshold", "filter", "evaluate"):
        run_stage(stage, params, root)
    assert torch.get_num_threads() == threads  # train's train.threads does not outlive the stage

    metrics = json.loads(Layout(root).detection_metrics.read_text())
    assert metrics["ground_truth"] and metrics["poisoned"] == 20
    assert metrics["threshold"]["detector"] == params.threshold.detector == "kdist"
    assert metrics["detectors"]["kdist"]["auroc"] >= 0.75
    poisoned, removed, before, after = _poison_removed(root)
    assert poisoned == 20 and removed >= 6
    assert after < before
