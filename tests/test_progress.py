"""Progress of the long stages (clipscrub.progress): a bar on a terminal, plain lines elsewhere,
the run logger's records inside Prefect; and the stages that report it."""

from __future__ import annotations

import io
import logging
import re

import numpy as np
import pytest

from clipscrub.errors import ParamError
from clipscrub.params import parse_params
from clipscrub.progress import EVERY_ENV, Progress, track
from tests.conftest import tiny_params_dict
from tests.test_sources import tiny_model  # noqa: F401 (fixture)


class Clock:
    """Seconds the test sets by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def err_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "\r" not in err
    return err.splitlines()


def test_lines_off_a_terminal_have_counts_and_no_carriage_return(capsys):
    clock = Clock()
    progress = Progress(range(3), desc="embed", unit="shards", every_s=0, clock=clock)
    for _ in progress:
        clock.now += 2
        progress.count(400, "images")
    assert err_lines(capsys) == [
        "embed: 0/3 shards (0%), 0:00:00 elapsed",
        "embed: 0/3 shards (0%), 400 images, 200 images/s, 0:00:02 elapsed",
        "embed: 1/3 shards (33%), 400 images, 200 images/s, 0:00:02 elapsed, eta 0:00:04",
        "embed: 1/3 shards (33%), 800 images, 200 images/s, 0:00:04 elapsed, eta 0:00:08",
        "embed: 2/3 shards (66%), 800 images, 200 images/s, 0:00:04 elapsed, eta 0:00:02",
        "embed: 2/3 shards (66%), 1200 images, 200 images/s, 0:00:06 elapsed, eta 0:00:03",
        "embed: done, 3/3 shards (100%), 1200 images, 200 images/s, 0:00:06 elapsed",
    ]


def test_lines_come_at_most_every_every_s_plus_a_first_and_a_last(capsys):
    clock = Clock()
    progress = Progress(range(4), desc="score", unit="chunks", every_s=30, clock=clock)
    for step in progress:
        clock.now = [10, 31, 40, 45][step]  # the end of step `step`: only 31 is 30 s after the last line
    assert err_lines(capsys) == [
        "score: 0/4 chunks (0%), 0:00:00 elapsed",
        "score: 2/4 chunks (50%), 15.5 s/chunk, 0:00:31 elapsed, eta 0:00:31",
        "score: done, 4/4 chunks (100%), 11.2 s/chunk, 0:00:45 elapsed",
    ]


def test_a_loop_left_by_an_error_says_where_it_stopped(capsys):
    with pytest.raises(KeyError):
        for item in track(["a", "b", "c"], desc="index", unit="chunks", every_s=3600):
            if item == "b":
                raise KeyError(item)
    lines = err_lines(capsys)
    assert lines[0] == "index: 0/3 chunks (0%), 0:00:00 elapsed"
    assert lines[1].startswith("index: stopped at 1/3 chunks (33%), ") and len(lines) == 2


def test_a_generator_counts_without_a_total(capsys):
    for _ in track((i for i in range(5)), desc="download", unit="samples", every_s=3600):
        pass
    lines = err_lines(capsys)
    assert lines[0] == "download: 0 samples, 0:00:00 elapsed"
    assert lines[-1].startswith("download: done, 5 samples, ") and len(lines) == 2


def test_the_interval_comes_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv(EVERY_ENV, "0")
    assert list(track(range(2), desc="index", unit="chunks")) == [0, 1]
    assert len(err_lines(capsys)) == 3  # first, after step 1, last (done: after step 2)
    monkeypatch.setenv(EVERY_ENV, "soon")
    with pytest.raises(ParamError) as exc:
        track(range(2), desc="index")
    assert str(exc.value) == ("CLIPSCRUB_PROGRESS_EVERY: expected the seconds between progress lines "
                              "(a number >= 0), got 'soon'")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_not_lines():
    term = Terminal()
    progress = Progress(range(3), desc="embed", unit="shards", every_s=0, stream=term)
    for _ in progress:
        progress.count(10, "images")
    out = term.getvalue()
    assert "\r" in out and "3/3" in out and "30 images" in out  # tqdm redraws its bar in place
    assert "embed: 0/3" not in out and "embed: done" not in out


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_inside_a_prefect_task_the_lines_are_its_run_logs(harness):
    # no capsys here: Prefect's console handler would keep its stream, closed after the test
    from prefect import flow, task
    from prefect.context import TaskRunContext

    @task
    def chunks() -> str:
        for _ in track(range(2), desc="index", unit="chunks", every_s=0):
            pass
        return str(TaskRunContext.get().task_run.id)

    @flow
    def run() -> str:
        return chunks()

    logger = logging.getLogger("prefect.task_runs")
    records, level = Records(), logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)  # tests/conftest.py quiets Prefect to WARNING
    try:
        task_run_id = run()
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    ours = [r for r in records.records if r.getMessage().startswith("index: ")]
    assert [r.getMessage().split(",")[0] for r in ours] == [
        "index: 0/2 chunks (0%)", "index: 1/2 chunks (50%)", "index: done"]
    assert {str(r.task_run_id) for r in ours} == {task_run_id}
    assert "\r" not in "".join(r.getMessage() for r in ours)


def test_download_counts_the_samples_it_writes(tmp_path, monkeypatch, capsys):
    from clipscrub.stages.download import download_dataset

    monkeypatch.setenv(EVERY_ENV, "0")
    params = parse_params({"download": {"shard_size": 10, "synthetic": {"num_samples": 30, "attacks": []}}})
    download_dataset(out_dir=tmp_path / "raw", settings=params.download, base=params.base)
    lines = [line for line in err_lines(capsys) if line.startswith("download: ")]
    assert lines[0] == "download: 0/30 samples (0%), 0:00:00 elapsed"
    assert [line.split(" (")[0] for line in lines[1:-1]] == [f"download: {i}/30 samples" for i in range(1, 30)]
    assert lines[-1].startswith("download: done, 30/30 samples (100%), ")


def test_embed_counts_images_within_shards(tiny_model, tmp_path, monkeypatch, capsys):  # noqa: F811
    from clipscrub.stages.download import download_dataset
    from clipscrub.stages.embed import embed_dataset

    data = tiny_params_dict(["download.synthetic.num_samples=20", "download.shard_size=10",
                             "download.synthetic.attacks=[]", "embed.batch_size=4"])
    data["embed"].update({"model_name": "tiny", "pretrained": None, "checkpoint": str(tiny_model / "tiny.pt"),
                          "model_config": str(tiny_model / "tiny.json")})
    params = parse_params(data)
    download_dataset(out_dir=tmp_path / "raw", settings=params.download, base=params.base)
    capsys.readouterr()
    monkeypatch.setenv(EVERY_ENV, "0")
    embed_dataset(raw_dir=tmp_path / "raw", out_dir=tmp_path / "emb", settings=params.embed, base=params.base)
    lines = [line for line in err_lines(capsys) if re.match(r"embed: (done, )?\d+/", line)]
    counts = [re.match(r"embed: (?:done, )?(\d+/2) shards \(\d+%\)(?:, (\d+) images)?", line).groups() for line in lines]
    # batches of 4 within shards of 10: 4, 8, 10 images, then the shard is done
    assert counts == [("0/2", None), ("0/2", "4"), ("0/2", "8"), ("0/2", "10"), ("1/2", "10"),
                      ("1/2", "14"), ("1/2", "18"), ("1/2", "20"), ("2/2", "20")]
    assert lines[-1].startswith("embed: done, 2/2 shards (100%), 20 images, ")


def test_training_says_each_epoch_with_its_loss(tmp_path, monkeypatch, capsys, caplog):
    from clipscrub.stages.download import download_dataset
    from clipscrub.stages.train import train_model

    monkeypatch.setenv(EVERY_ENV, "3600")  # train's epoch lines do not wait for it
    params = parse_params(tiny_params_dict(["download.synthetic.num_samples=80", "download.shard_size=40",
                                            "train.epochs=3", "train.batch_size=32", "train.heldout_samples=10"]))
    download_dataset(out_dir=tmp_path / "raw", settings=params.download, base=params.base)
    capsys.readouterr()
    train_model(raw_dir=tmp_path / "raw", out_dir=tmp_path / "model", metrics_path=tmp_path / "train.json",
                settings=params.train, download=params.download, base=params.base)
    lines = err_lines(capsys)
    assert lines[0] == "train (decoding): 0/2 shards (0%), 0:00:00 elapsed"
    epochs = [line for line in lines if line.startswith("train: ")]
    assert epochs[0] == "train: 0/3 epochs (0%), 0:00:00 elapsed"
    # one line per epoch, the last one the "done" line
    for i, line in enumerate(epochs[1:], start=1):
        done = "done, " if i == 3 else ""
        assert re.fullmatch(rf"train: {done}{i}/3 epochs \(\d+%\), loss \d+\.\d{{4}}, .*\d:\d\d:\d\d elapsed.*", line), line
    assert len(epochs) == 4
    # a victim trained from scratch starts random on purpose: no open_clip warning saying so
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def test_index_and_score_count_their_chunks(tmp_path, monkeypatch, capsys):
    from clipscrub.stages.index import build_index
    from clipscrub.stages.score import score_samples
    from tests.conftest import write_embeddings

    rng = np.random.default_rng(0)
    image = rng.normal(size=(250, 8)).astype(np.float32)
    emb = write_embeddings(tmp_path, image, image + 0.1, np.arange(250))
    params = parse_params({"index": {"k": 4, "chunk_size": 100, "reference": {"sizes": [32]}},
                           "score": {"k": 4, "lid_k": 4, "detectors": ["kdist", "clip"]}})
    monkeypatch.setenv(EVERY_ENV, "0")
    build_index(embeddings_dir=emb, out_dir=tmp_path / "index", settings=params.index, base=params.base)
    score_samples(embeddings_dir=emb, index_dir=tmp_path / "index", out_dir=tmp_path / "scores",
                  settings=params.score, index=params.index, base=params.base)
    lines = err_lines(capsys)
    for stage, unit in (("index", "queries"), ("score", "samples")):
        mine = [line for line in lines if line.startswith(f"{stage}: ")]
        counts = [re.match(rf"{stage}: (?:done, )?(\d/3) chunks \(\d+%\)(?:, (\d+) {unit})?", line).groups()
                  for line in mine]
        # a chunk's rows are counted with the chunk, on one line: never the rows of a chunk not yet done
        assert counts == [("0/3", None), ("1/3", "100"), ("2/3", "200"), ("3/3", "250")], mine
        assert mine[-1].startswith(f"{stage}: done, 3/3 chunks (100%), 250 {unit}, ")
