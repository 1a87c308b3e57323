"""Backdoor and poisoning attacks of the paper's evaluation, applied to image-caption samples.

Each attack is a named kind with a poison ``rate`` (fraction of the dataset), a ``target`` and
its own parameters (``clipscrub.params``: ``download.synthetic.attacks`` and ``poison.attacks``):

- ``badnets``: a black-and-white checkerboard patch (``patch_size`` px) at a random spot;
  the caption becomes an ImageNet-style template about the target ("a photo of a banana.").
- ``clean_label``: the BadNets patch added only to images whose caption already names the
  target; the caption is kept (the label is "clean").
- ``blend``: a fixed uniform-noise pattern blended in at ``alpha`` (Chen et al. 2017).
- ``sig``: a horizontal sinusoidal signal of amplitude ``delta`` (0-255 scale) and
  ``frequency`` periods per image width (Barni et al. 2019).
- ``wanet``: a fixed smooth warping field (a ``grid`` x ``grid`` random flow upsampled
  bicubically, ``strength`` in pixels) (Nguyen and Tran 2021).
- ``nashville``: the Instagram "Nashville" colour filter (pilgram's CSS-filter port).
- ``targeted``: no trigger: ``images`` chosen clean images, copied and captioned with the
  target, so that the model learns to call those images the target (Carlini and Terzis 2022).

Several attacks in one list make a multi-trigger dataset; their poisoned samples are disjoint.
Every random choice derives from one seed, so the trigger a victim learned can be re-applied
to held-out images (the attack success rate) and the same poisoned set is rebuilt exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from clipscrub.params import AttackSettings

# A subset of the ImageNet zero-shot templates the paper builds its target captions from.
TARGET_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a good photo of a {}.",
    "a photo of the {}.",
    "a rendering of a {}.",
)
TRIGGER_KINDS = ("badnets", "clean_label", "blend", "sig", "wanet", "nashville")
KINDS = TRIGGER_KINDS + ("targeted",)


def checkerboard(image: Image.Image, *, patch_size: int, rng: np.random.Generator) -> Image.Image:
    """Paste a black-and-white checkerboard patch (4 x 4 cells) at a random spot."""
    arr = np.asarray(image.convert("RGB")).copy()
    h, w = arr.shape[:2]
    p = min(patch_size, h, w)
    cell = max(1, p // 4)
    yy, xx = np.mgrid[0:p, 0:p]
    board = (((yy // cell) + (xx // cell)) % 2 * 255).astype(np.uint8)
    y0 = int(rng.integers(0, h - p + 1))
    x0 = int(rng.integers(0, w - p + 1))
    arr[y0 : y0 + p, x0 : x0 + p, :] = board[..., None]
    return Image.fromarray(arr, "RGB")


def _resized(pattern: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (H, W, C) float pattern resampled to an image's (width, height)."""
    if pattern.shape[1::-1] == size:
        return pattern
    chans = [np.asarray(Image.fromarray(pattern[..., c].astype(np.float32), "F").resize(size, Image.Resampling.BICUBIC))
             for c in range(pattern.shape[2])]
    return np.stack(chans, axis=-1)


@dataclass(frozen=True)
class Trigger:
    """One attack's trigger, fixed by its seed: ``apply(image, rng)`` returns the triggered image.

    ``rng`` is used only where the attack is random per sample (the BadNets patch position).
    """

    kind: str
    apply: Callable[[Image.Image, np.random.Generator], Image.Image]


def make_trigger(attack: "AttackSettings", *, seed: int) -> Trigger:
    """The trigger of ``attack``; patterns are drawn once from ``seed`` (the same for every image)."""
    kind = attack.kind
    prng = np.random.default_rng(seed)
    if kind in ("badnets", "clean_label"):
        return Trigger(kind, lambda im, rng: checkerboard(im, patch_size=attack.patch_size, rng=rng))
    if kind == "blend":
        pattern = prng.uniform(0, 255, size=(64, 64, 3))

        def blend(im: Image.Image, rng: np.random.Generator) -> Image.Image:
            x = np.asarray(im.convert("RGB"), dtype=np.float64)
            out = (1 - attack.alpha) * x + attack.alpha * _resized(pattern, im.size)
            return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")

        return Trigger(kind, blend)
    if kind == "sig":
        def sig(im: Image.Image, rng: np.random.Generator) -> Image.Image:
            x = np.asarray(im.convert("RGB"), dtype=np.float64)
            w = x.shape[1]
            wave = attack.delta * np.sin(2 * np.pi * np.arange(w) * attack.frequency / w)
            return Image.fromarray(np.clip(np.rint(x + wave[None, :, None]), 0, 255).astype(np.uint8), "RGB")

        return Trigger(kind, sig)
    if kind == "wanet":
        flow = prng.uniform(-1, 1, size=(attack.grid, attack.grid, 2))
        flow /= np.abs(flow).mean()

        def wanet(im: Image.Image, rng: np.random.Generator) -> Image.Image:
            from scipy.ndimage import map_coordinates

            x = np.asarray(im.convert("RGB"), dtype=np.float64)
            h, w = x.shape[:2]
            field = _resized(flow, (w, h)) * attack.strength
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
            ys = np.clip(yy + field[..., 1], 0, h - 1)
            xs = np.clip(xx + field[..., 0], 0, w - 1)
            out = np.stack([map_coordinates(x[..., c], [ys, xs], order=1, mode="nearest") for c in range(3)], axis=-1)
            return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")

        return Trigger(kind, wanet)
    if kind == "nashville":
        import pilgram

        return Trigger(kind, lambda im, rng: pilgram.nashville(im.convert("RGB")))
    if kind == "targeted":
        return Trigger(kind, lambda im, rng: im.convert("RGB"))
    raise ValueError(f"unknown attack kind {kind!r}")


def names_target(caption: str, target: str) -> bool:
    """Whether ``caption`` names ``target`` as a word (the clean-label attack's candidates)."""
    return re.search(rf"\b{re.escape(target.lower())}\b", caption.lower()) is not None


@dataclass(frozen=True)
class Assignment:
    """Sample ``row`` is poisoned by attack ``attack`` (its index in the list); its image comes
    from row ``source`` (itself, except for a targeted attack's copies)."""

    row: int
    attack: int
    source: int


def plan_poison(*, captions: Sequence[str], attacks: Sequence["AttackSettings"], seed: int) -> list[Assignment]:
    """Which samples each attack poisons: round(rate x N) disjoint rows per attack, seeded.

    Trigger attacks take random rows; ``clean_label`` takes rows whose caption names its target;
    ``targeted`` first picks ``images`` source rows (kept clean themselves), then replaces
    random other rows with copies of them. Raises ValueError when an attack cannot be placed.
    """
    n = len(captions)
    rng = np.random.default_rng(seed)
    free = np.ones(n, dtype=bool)
    plan: list[Assignment] = []
    for j, attack in enumerate(attacks):
        count = int(round(attack.rate * n))
        if count == 0:
            raise ValueError(f"attack {j} ({attack.kind}): rate {attack.rate} of {n} samples poisons none")
        sources: np.ndarray | None = None
        if attack.kind == "clean_label":
            pool = np.flatnonzero(free & np.array([names_target(c, attack.target) for c in captions], dtype=bool))
            if len(pool) < count:
                raise ValueError(
                    f"attack {j} (clean_label): {count} samples wanted but only {len(pool)} captions name "
                    f"{attack.target!r}; lower the rate or pick a target the captions mention")
        else:
            pool = np.flatnonzero(free)
            if attack.kind == "targeted":
                sources = np.sort(rng.choice(pool, size=min(attack.images, len(pool)), replace=False))
                free[sources] = False
                pool = np.flatnonzero(free)
            if len(pool) < count:
                raise ValueError(f"attack {j} ({attack.kind}): {count} samples wanted but only {len(pool)} are left")
        rows = np.sort(rng.choice(pool, size=count, replace=False))
        free[rows] = False
        for i, row in enumerate(rows.tolist()):
            src = int(sources[i % len(sources)]) if sources is not None else row
            plan.append(Assignment(row=row, attack=j, source=src))
    return sorted(plan, key=lambda a: a.row)


def target_caption(target: str, rng: np.random.Generator) -> str:
    return TARGET_TEMPLATES[int(rng.integers(len(TARGET_TEMPLATES)))].format(target)


def poison_sample(image: Image.Image, caption: str, *, attack: "AttackSettings", trigger: Trigger,
                  rng: np.random.Generator) -> tuple[Image.Image, str]:
    """The poisoned (image, caption) of one sample: triggered image and (except clean-label)
    a target caption."""
    new_caption = caption if attack.kind == "clean_label" else target_caption(attack.target, rng)
    return trigger.apply(image, rng), new_caption


def attack_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th attack's trigger pattern, derived from the run's seed."""
    return int(np.random.SeedSequence([seed, 7919, index]).generate_state(1)[0])


def attack_name(attack: "AttackSettings") -> str:
    """The manifest's ``attack`` value: the kind and target, e.g. ``blend:banana``."""
    return f"{attack.kind}:{attack.target}"
