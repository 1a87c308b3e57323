"""Loading open_clip models: hub name + pretrained tag, or a local checkpoint (+ config JSON)."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import open_clip
import torch

from clipscrub.errors import DataError, ParamError
from clipscrub.io import sha256_file
from clipscrub.params import TinyModelSettings, did_you_mean, unknown_model_message


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ParamError("'cuda' was asked for but no CUDA device is available", param="base.device")
    return torch.device(device)


def tiny_model_config(arch: TinyModelSettings) -> dict[str, Any]:
    """An open_clip model config (the JSON format of open_clip/model_configs) for a tiny ViT CLIP."""
    return {
        "embed_dim": arch.embed_dim,
        "vision_cfg": {
            "image_size": arch.image_size,
            "layers": arch.vision_layers,
            "width": arch.vision_width,
            "head_width": arch.vision_width // arch.heads,
            "patch_size": arch.patch_size,
        },
        "text_cfg": {
            "context_length": arch.context_length,
            "vocab_size": 49408,
            "width": arch.text_width,
            "heads": arch.heads,
            "layers": arch.text_layers,
        },
    }


# open_clip reads registered configs from files, and rereads every registered path at each
# registration: one folder per process, kept while it lives (not one per call, left behind)
_config_dir: Path | None = None


def _model_config_dir() -> Path:
    global _config_dir
    if _config_dir is None or not _config_dir.is_dir():
        _config_dir = Path(tempfile.mkdtemp(prefix="clipscrub-cfg-"))
        atexit.register(shutil.rmtree, _config_dir, True)
    return _config_dir


def register_model_config(model_name: str, config: dict[str, Any]) -> None:
    """Make ``model_name`` known to open_clip (its registry keys configs by file stem)."""
    config = config.get("model_cfg", config)  # accept open_clip_config.json's wrapper too
    if "vision_cfg" not in config or "text_cfg" not in config:
        raise ParamError("model config JSON needs 'vision_cfg' and 'text_cfg'", param="embed.model_config")
    path = _model_config_dir() / f"{model_name}.json"
    if open_clip.get_model_config(model_name) == config and path.is_file():
        return  # registered already, as it is: each registration lengthens open_clip's list of paths
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)


def _clip_words(text: str, limit: int = 300) -> str:
    """``text`` cut to about ``limit`` characters at a word boundary, marked with an ellipsis."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " ..."


def _first_line(exc: BaseException) -> str:
    """The first informative line: load_state_dict's errors open with a bare heading."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return _clip_words(f"{lines[0]} {lines[1]}")
    return _clip_words(lines[0] if lines else "")


# seconds to wait for a TCP connection to the weights' host before calling it unreachable
CONNECT_TIMEOUT = 3.0


def _weights_location(cfg: dict[str, Any]) -> tuple[str | None, str, str]:
    """(hub repo or None, url, file name) of a pretrained tag's weights, as open_clip fetches
    them (``open_clip.pretrained.download_pretrained``: the hub first)."""
    from open_clip.constants import HF_WEIGHTS_NAME
    from open_clip.pretrained import has_hf_hub

    if cfg.get("hf_hub") and has_hf_hub():
        from huggingface_hub import constants

        repo, name = os.path.split(cfg["hf_hub"])  # 'org/model/' names the default file
        name = name or HF_WEIGHTS_NAME
        return repo, f"{constants.ENDPOINT.rstrip('/')}/{repo}/resolve/main/{name}", name
    return None, cfg["url"], os.path.basename(cfg["url"])


def _cached_weights(cfg: dict[str, Any], cache_dir: str | None) -> bool:
    """Whether open_clip would find the tag's weights without the network."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo, _, name = _weights_location(cfg)
    if repo is None:
        return (Path(cache_dir or os.path.expanduser("~/.cache/clip")) / name).is_file()
    from huggingface_hub import try_to_load_from_cache

    # open_clip tries a .safetensors twin first
    names = [name, HF_SAFE_WEIGHTS_NAME if name == HF_WEIGHTS_NAME else os.path.splitext(name)[0] + ".safetensors"]
    return any(isinstance(try_to_load_from_cache(repo, n, cache_dir=cache_dir), str) for n in names)


def _unreachable(url: str) -> str | None:
    """Why ``url``'s host (or the proxy the environment names for it) takes no connection; None
    when it does. One connection attempt: the hub client would otherwise retry for about a minute."""
    from huggingface_hub import constants

    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    parts = urllib.parse.urlsplit(url)
    target = parts
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        target = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            return None
    except OSError as exc:
        via = f" through the proxy {host}:{port}" if target is not parts else ""
        return f"{parts.hostname} cannot be reached{via} ({exc.strerror or type(exc).__name__})"


def _check_pretrained(model_name: str, pretrained: str, cache_dir: str | None) -> bool:
    """Stop at once, in one line, where the tag is unknown or its weights cannot be fetched;
    whether to load them from the cache alone (cached, and their host takes no connection)."""
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        if Path(pretrained).expanduser().is_file():
            return False  # open_clip also takes a weights file as the tag
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        listed = (f"open_clip.list_pretrained_tags_by_model({model_name!r}) lists them" if tags else
                  "open_clip has no pretrained weights for it: set embed.checkpoint, or embed.pretrained: null")
        raise ParamError(f"model {model_name!r} has no pretrained tag {pretrained!r}{did_you_mean(pretrained, tags)} "
                         f"({listed})", param="embed.pretrained")
    _, url, _ = _weights_location(cfg)
    why = _unreachable(url)
    if _cached_weights(cfg, cache_dir):
        # the hub client would ask the host for a newer revision first, for a minute of retries
        return why is not None
    if why:
        # weights trained with QuickGELU load into the '-quickgelu' variant of the architecture
        quick = f"{model_name}-quickgelu"
        name = quick if cfg.get("quick_gelu") and open_clip.get_model_config(quick) is not None else model_name
        raise DataError(
            f"could not fetch pretrained weights {pretrained!r} for {model_name!r}: {why} and they are not in the "
            f"local cache; download {url} where there is internet, then set embed.checkpoint to that file "
            f"(with embed.model_name {name!r})",
            param="embed.pretrained",
        )
    return False


@contextlib.contextmanager
def hub_offline(offline: bool = True) -> Iterator[None]:
    """The Hugging Face hub client in offline mode (``HF_HUB_OFFLINE``, read by it at each call):
    cached files only, no request. Process-wide while it lasts."""
    from huggingface_hub import constants

    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline or was
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


@contextlib.contextmanager
def no_random_init_warning() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" while it builds a
    model whose checkpoint is loaded next (false there) or one trained from scratch (random on
    purpose): alarming either way. Its other messages pass."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")

    root = logging.getLogger()  # open_clip logs through the root logger
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    device: torch.device
    info: dict[str, Any]


def load_model(
    *,
    model_name: str,
    pretrained: str | None,
    checkpoint: str | None,
    model_config: str | None,
    device: str = "auto",
    cache_dir: str | None = None,
) -> LoadedModel:
    """Load an open_clip model in eval mode.

    ``checkpoint`` is a local file as written by open_clip's training code (a dict with
    ``state_dict``, keys with or without ``module.``) or a plain state dict; ``model_config`` an
    optional JSON for architectures open_clip does not ship. Otherwise ``pretrained`` is an
    open_clip pretrained tag fetched from the hub (into ``cache_dir``, default: the hub's cache);
    where the weights are not cached and their host takes no connection, that is said at once
    rather than after the hub client's minute of retries, and cached weights whose host takes no
    connection load from the cache at once.
    """
    dev = resolve_device(device)
    info: dict[str, Any] = {"model_name": model_name, "pretrained": pretrained, "checkpoint": None, "checkpoint_sha256": None}
    if model_config:
        cfg_path = Path(model_config)
        if not cfg_path.is_file():
            raise DataError(f"model config file not found: {cfg_path}", param="embed.model_config")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise ParamError(f"{cfg_path} is not valid JSON: {exc}", param="embed.model_config") from None
        register_model_config(model_name, cfg)
        info["model_config"] = cfg_path.name  # its name, not its place: the same config gives the same bytes
        info["model_config_sha256"] = sha256_file(cfg_path)
    if open_clip.get_model_config(model_name) is None and not model_name.startswith(("hf-hub:", "local-dir:")):
        raise ParamError(unknown_model_message(model_name, open_clip.list_models()), param="embed.model_name")
    dev_kwargs = {"device": dev}
    offline = False
    if checkpoint:
        ckpt = Path(checkpoint)
        if not ckpt.is_file():
            raise DataError(f"checkpoint file not found: {ckpt}", param="embed.checkpoint")
        info["checkpoint"] = str(ckpt)
        info["checkpoint_sha256"] = sha256_file(ckpt)
        try:
            open_clip.factory.load_state_dict(str(ckpt))
        except Exception as exc:  # torch.load raises many types for a corrupt or foreign file
            raise DataError(
                f"cannot read checkpoint {ckpt}: {type(exc).__name__}: {_first_line(exc)}", param="embed.checkpoint"
            ) from None
        with no_random_init_warning():
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, **dev_kwargs)
        try:
            open_clip.load_checkpoint(model, str(ckpt))
        # load_state_dict's size mismatch is a RuntimeError; open_clip asserts on a text width first
        except (RuntimeError, AssertionError, ValueError, KeyError) as exc:
            raise ParamError(
                f"checkpoint {ckpt} does not fit model {model_name!r}: {_first_line(exc)}", param="embed.checkpoint"
            ) from None
    else:
        if pretrained and not model_name.startswith(("hf-hub:", "local-dir:")):
            offline = _check_pretrained(model_name, pretrained, cache_dir)
        try:
            with hub_offline(offline):
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=pretrained, cache_dir=cache_dir, **dev_kwargs)
        except Exception as exc:  # hub clients raise their own types when offline
            raise DataError(
                f"could not fetch pretrained weights {pretrained!r} for {model_name!r} "
                f"({type(exc).__name__}: {_first_line(exc)}); where there is no internet, download the "
                "weights elsewhere and pass the file with embed.checkpoint",
                param="embed.pretrained",
            ) from None
    model.eval()
    with hub_offline(offline):  # a hub tokenizer (SigLIP's, XLM-R's) is fetched like the weights
        tokenizer = open_clip.get_tokenizer(model_name)
    return LoadedModel(model=model, preprocess=preprocess, tokenizer=tokenizer, device=dev, info=info)
