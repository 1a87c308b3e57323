"""Loading the embedding model: a misspelt name or tag suggests the closest, and hub weights that
cannot be fetched say so at once, in one line, with the way to pass them offline."""

from __future__ import annotations

import logging

import pytest

from clipscrub.errors import DataError, ParamError
from clipscrub.model import _first_line, load_model
from tests.conftest import free_port
from tests.test_sources import tiny_model  # noqa: F401 (fixture)


def _load(**kw):
    args = {"pretrained": None, "checkpoint": None, "model_config": None, "device": "cpu"} | kw
    return load_model(**args)


@pytest.mark.parametrize(("name", "expected"), [
    ("ViT-B32", "embed.model_name: unknown model 'ViT-B32'; did you mean 'ViT-B-32'? (open_clip.list_models() lists "
                "them; a model of your own needs its config JSON in embed.model_config)"),
    ("vit-b-32", "embed.model_name: unknown model 'vit-b-32'; did you mean 'ViT-B-32'?"),
    ("clipscrub-tiy", "embed.model_name: unknown model 'clipscrub-tiy'; did you mean 'clipscrub-tiny'? (clipscrub-tiny "
                      "is the demo's victim: set embed.model_config to its config JSON"),
])
def test_an_unknown_model_suggests_the_closest(name, expected):
    with pytest.raises(ParamError) as err:
        _load(model_name=name)
    assert str(err.value).startswith(expected), str(err.value)


def test_an_unknown_pretrained_tag_suggests_the_closest():
    with pytest.raises(ParamError) as err:
        _load(model_name="ViT-B-32", pretrained="laion2b_s34b_b80k")
    assert str(err.value) == (
        "embed.pretrained: model 'ViT-B-32' has no pretrained tag 'laion2b_s34b_b80k'; did you mean "
        "'laion2b_s34b_b79k'? (open_clip.list_pretrained_tags_by_model('ViT-B-32') lists them)")


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on: a proxy there refuses every connection at once."""
    return free_port()


def test_unreachable_hub_weights_fail_at_once_in_one_line(tmp_path, monkeypatch, caplog, closed_port):
    """Weights not in the (empty) cache and a hub that takes no connection: one attempt, no minute
    of retries, and a message naming the model, the tag, the file to fetch and embed.checkpoint."""
    for var in ("HF_HUB_OFFLINE", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    for var in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{closed_port}")
    with caplog.at_level(logging.WARNING), pytest.raises(DataError) as err:
        _load(model_name="ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))
    assert str(err.value) == (
        "embed.pretrained: could not fetch pretrained weights 'laion2b_s34b_b79k' for 'ViT-B-32': huggingface.co "
        f"cannot be reached through the proxy 127.0.0.1:{closed_port} (Connection refused) and they are not in the "
        "local cache; download https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K/resolve/main/"
        "open_clip_pytorch_model.bin where there is internet, then set embed.checkpoint to that file "
        "(with embed.model_name 'ViT-B-32')")
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]  # the hub client never ran


def test_cached_hub_weights_load_at_once_where_the_hub_is_unreachable(tmp_path, monkeypatch, caplog, closed_port,
                                                                      tiny_model):  # noqa: F811
    """Weights in the hub cache (as a cluster node's pre-filled HF_HOME) and a host that takes no
    connection: loaded from the cache, without the hub client's minute of retries asking the
    host for a newer revision; the hub client's offline switch is left as it was."""
    import open_clip
    import torch
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    for var in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{closed_port}")
    # a pretrained tag of the tiny model, published on the hub as open_clip's own tags are
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny",
                        {"cached": open_clip.pretrained._pcfg(hf_hub="clipscrub/tiny-test/")})
    weights = torch.load(tiny_model / "tiny.pt", weights_only=True)["state_dict"]
    repo = tmp_path / "models--clipscrub--tiny-test"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    torch.save(weights, repo / "snapshots" / commit / "open_clip_pytorch_model.bin")

    with caplog.at_level(logging.DEBUG):
        loaded = _load(model_name="tiny", pretrained="cached", cache_dir=str(tmp_path))
    assert all(torch.equal(v, weights[k]) for k, v in loaded.model.state_dict().items())
    assert loaded.info["pretrained"] == "cached"
    assert not [r for r in caplog.records if "Retry" in r.getMessage() or "Timeout" in r.getMessage()]
    assert constants.HF_HUB_OFFLINE is False


def test_hub_offline_mode_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        _load(model_name="RN50", pretrained="openai", cache_dir=str(tmp_path))
    msg = err.value.message
    assert msg.startswith("could not fetch pretrained weights 'openai' for 'RN50': HF_HUB_OFFLINE is set and they are "
                          "not in the local cache; download https://huggingface.co/timm/resnet50_clip.openai/")
    # OpenAI's weights were trained with QuickGELU: the architecture that loads them as a file
    assert msg.endswith("(with embed.model_name 'RN50-quickgelu')")


def test_a_long_error_is_cut_at_a_word():
    text = _first_line(RuntimeError("an error happened while trying to locate the file " * 20))
    assert len(text) <= 304 and text.endswith(" ..."), text
    assert text[:-4].split()[-1] in "an error happened while trying to locate the file".split()  # a whole word


def test_model_configs_share_one_folder_removed_as_the_process_exits(tmp_path):
    """Every registration of a process writes into one temporary folder (a run used to leave one
    folder per registration behind in /tmp), which goes when the process exits; a changed config
    under the same name replaces the old one."""
    import json
    import os
    import subprocess
    import sys

    code = """
import json, open_clip
from clipscrub.model import register_model_config, tiny_model_config
from clipscrub.params import parse_params
arch = parse_params({}).train.architecture
cfg = tiny_model_config(arch)
register_model_config("victim-a", cfg)
register_model_config("victim-a", cfg)
register_model_config("victim-b", {**cfg, "embed_dim": 32})
register_model_config("victim-b", {**cfg, "embed_dim": 48})
from clipscrub import model
print(json.dumps({"dir": str(model._config_dir), "files": sorted(p.name for p in model._config_dir.iterdir()),
                  "a": open_clip.get_model_config("victim-a")["embed_dim"],
                  "b": open_clip.get_model_config("victim-b")["embed_dim"]}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["files"] == ["victim-a.json", "victim-b.json"]
    assert (out["a"], out["b"]) == (64, 48)
    assert out["dir"].startswith(str(tmp_path))
    assert not any(tmp_path.iterdir())  # the folder went with the process


@pytest.mark.parametrize(("info", "words"), [
    ({"model_name": "ViT-B-32", "checkpoint": "w.pt", "checkpoint_sha256": "1a2b3c4d5e"},
     "model 'ViT-B-32' from checkpoint w.pt (sha256 1a2b3c4d)"),
    ({"model_name": "ViT-B-32", "model_config": "mine.json", "model_config_sha256": "9f8e7d6c5b", "checkpoint": "w.pt",
      "checkpoint_sha256": "1a2b3c4d5e"},
     "model 'ViT-B-32' (architecture from mine.json, sha256 9f8e7d6c) from checkpoint w.pt (sha256 1a2b3c4d)"),
    ({"model_name": "ViT-L-14", "precomputed": "/data/clip-retrieval"},
     "model 'ViT-L-14' (precomputed embeddings from /data/clip-retrieval)"),
])
def test_the_model_is_described_as_loaded(info, words):
    """A config of one's own under open_clip's name is said (the report said 'Model: ViT-B-32')."""
    from clipscrub.io import describe_model

    assert describe_model(info) == words
