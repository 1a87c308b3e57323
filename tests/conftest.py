from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path


def _session_dir(prefix: str) -> str:
    """A temporary folder for this test session, removed as it ends."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


# Prefect: never talk to a server the developer has configured; keep its state out of ~/.prefect
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_HOME"] = _session_dir("clipscrub-prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# the cross-process hash cache of large files: never the developer's ~/.cache
os.environ["CLIPSCRUB_HASH_CACHE"] = _session_dir("clipscrub-hash-cache-")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from clipscrub.params import Params, apply_overrides, parse_params  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# Small enough to run the whole pipeline in well under a minute on two CPU cores.
TINY_OVERRIDES = [
    "download.shard_size=100",
    "download.synthetic.num_samples=400",
    "train.epochs=1",
    "train.batch_size=64",
    "train.heldout_samples=40",
    "train.architecture.vision_width=32",
    "train.architecture.text_width=32",
    "train.architecture.vision_layers=1",
    "train.architecture.text_layers=1",
    "train.architecture.heads=2",
    "train.architecture.embed_dim=16",
    "train.architecture.patch_size=8",
    "embed.batch_size=128",
    "index.k=20",
    "index.reference.sizes=[120]",
    "score.lid_k=20",
    "score.k=8",
    "score.iforest.n_estimators=20",
    "threshold.method=top_fraction",
    "threshold.fraction=0.05",
    "filter.shard_size=150",
]


def tiny_params_dict(extra: list[str] | None = None) -> dict:
    import yaml

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    return apply_overrides(data, TINY_OVERRIDES + (extra or []))


def tiny_params(extra: list[str] | None = None) -> Params:
    return parse_params(tiny_params_dict(extra))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Params]:
    """The whole pipeline run once on the tiny demo: (data root, params)."""
    from clipscrub.flows.pipeline import STAGES, run_stage

    root = tmp_path_factory.mktemp("tiny-run") / "data"
    params = tiny_params()
    for stage in STAGES:
        run_stage(stage, params, root)
    return root, params


def planted_params(src: Path, extra: list[str] | None = None) -> Params:
    """The default params (params.yaml) on a planted clip-retrieval source: no victim to train."""
    import yaml

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["train"]["enabled"] = False
    data["download"]["source"] = "embeddings"
    data["download"]["embeddings"]["path"] = str(src)
    # a precomputed source needs no model: a name open_clip does not know skips the dimension check
    data["embed"].update({"model_name": "planted-d32", "pretrained": None})
    return parse_params(apply_overrides(data, extra or []))


@pytest.fixture(scope="session")
def planted_run(tmp_path_factory) -> tuple[Path, Params, np.ndarray]:
    """The whole pipeline, default params, on planted embeddings where detection works
    (tests/planted.py: sparse and dense poison, a clean near-duplicate cluster): (data root,
    params, each sample's group (N,) by id)."""
    import polars as pl

    from clipscrub.flows.pipeline import STAGES, run_stage
    from tests.planted import write_planted

    base = tmp_path_factory.mktemp("planted-run")
    groups = write_planted(base / "src")
    params = planted_params(base / "src")
    root = base / "data"
    for stage in STAGES:
        run_stage(stage, params, root)
    ids = pl.read_parquet(root / "raw" / "manifest.parquet")["id"].to_numpy()
    assert np.array_equal(ids, np.arange(len(groups)))  # ids follow the source's order
    return root, params, groups


def output_hashes(root: Path) -> dict[str, str]:
    """sha256 of every output file under a data root, by relative path: not the data docs (they
    carry the validation's time), the root's lock or the flow's state and result cache."""
    from clipscrub.io import sha256_file
    from clipscrub.validation import VALIDATION_DIR

    skip = {VALIDATION_DIR, ".clipscrub", ".prefect"}
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and not skip & set(p.relative_to(root).parts)}


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (the OS's pick, released again): for a server a
    test starts, or a proxy that refuses every connection at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_embeddings(
    directory: Path, image: np.ndarray, text: np.ndarray, ids: np.ndarray | None = None, *, dtype: str = "float32"
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "image.npy", image.astype(dtype))
    np.save(directory / "text.npy", text.astype(dtype))
    np.save(directory / "ids.npy", np.arange(len(image)) if ids is None else ids)
    return directory


def make_dvc_project(proj: Path, params: dict) -> Path:
    """A git + DVC project holding this repo's pipeline files and code, with ``params``."""
    import shutil
    import subprocess

    import yaml

    proj.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, proj / name)
    for d in ("clipscrub", "stages", "flows", ".dvc"):
        shutil.copytree(REPO / d, proj / d, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    (proj / "data").mkdir(exist_ok=True)
    shutil.copy(REPO / "data" / ".gitignore", proj / "data" / ".gitignore")
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    return proj
