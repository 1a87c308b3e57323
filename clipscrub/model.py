"""Loading open_clip models: hub name + pretrained tag, or a local checkpoint (+ config JSON)."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import open_clip
import torch

from clipscrub.errors import DataError, ParamError
from clipscrub.io import sha256_file
from clipscrub.params import TinyModelSettings


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


def register_model_config(model_name: str, config: dict[str, Any]) -> None:
    """Make ``model_name`` known to open_clip (its registry keys configs by file stem)."""
    config = config.get("model_cfg", config)  # accept open_clip_config.json's wrapper too
    if "vision_cfg" not in config or "text_cfg" not in config:
        raise ParamError("model config JSON needs 'vision_cfg' and 'text_cfg'", param="embed.model_config")
    # a persistent temporary dir: open_clip rescans every registered path on each registration
    d = Path(tempfile.mkdtemp(prefix="clipscrub-cfg-"))
    (d / f"{model_name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(d / f"{model_name}.json")


def _first_line(exc: BaseException) -> str:
    """The first informative line: load_state_dict's errors open with a bare heading."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"[:300]
    return (lines[0] if lines else "")[:300]


@contextlib.contextmanager
def _no_random_init_warning() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" while it builds a
    model whose checkpoint is loaded next: false and alarming there. Its other messages pass."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")

    root = logging.getLogger()  # open_clip logs through the root logger
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def describe_model(info: dict[str, Any]) -> str:
    """What ``load_model`` loaded, in a few words: ``model 'ViT-B-32' from checkpoint ckpt.pt
    (sha256 1a2b3c4d)``, ``model 'ViT-B-32' pretrained 'laion2b_s34b_b79k'``, or random weights."""
    head = f"model {info['model_name']!r}"
    if info.get("checkpoint"):
        return f"{head} from checkpoint {info['checkpoint']} (sha256 {str(info['checkpoint_sha256'])[:8]})"
    if info.get("pretrained"):
        return f"{head} pretrained {info['pretrained']!r}"
    return f"{head} with random weights (no embed.checkpoint, no embed.pretrained)"


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
) -> LoadedModel:
    """Load an open_clip model in eval mode.

    ``checkpoint`` is a local file as written by open_clip's training code (a dict with
    ``state_dict``, keys with or without ``module.``) or a plain state dict; ``model_config`` an
    optional JSON for architectures open_clip does not ship. Otherwise ``pretrained`` is an
    open_clip pretrained tag fetched from the hub.
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
        info["model_config_sha256"] = sha256_file(cfg_path)
    if open_clip.get_model_config(model_name) is None and not model_name.startswith(("hf-hub:", "local-dir:")):
        raise ParamError(
            f"unknown open_clip model {model_name!r}: give a name from open_clip.list_models() "
            "or a config JSON with embed.model_config",
            param="embed.model_name",
        )
    dev_kwargs = {"device": dev}
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
        with _no_random_init_warning():
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, **dev_kwargs)
        try:
            open_clip.load_checkpoint(model, str(ckpt))
        except RuntimeError as exc:
            raise ParamError(
                f"checkpoint {ckpt} does not fit model {model_name!r}: {_first_line(exc)}", param="embed.checkpoint"
            ) from None
    else:
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, **dev_kwargs)
        except Exception as exc:  # hub clients raise their own types when offline
            raise DataError(
                f"could not fetch pretrained weights {pretrained!r} for {model_name!r} "
                f"({type(exc).__name__}: {_first_line(exc)}); where there is no internet, download the "
                "weights elsewhere and pass the file with embed.checkpoint",
                param="embed.pretrained",
            ) from None
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    return LoadedModel(model=model, preprocess=preprocess, tokenizer=tokenizer, device=dev, info=info)
