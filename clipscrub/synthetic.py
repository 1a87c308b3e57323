"""A seeded generator of a BadNets-poisoned image-caption dataset for the demo and the tests.

Clean samples: one coloured shape on a noisy background, captioned from varied templates that
name its colour and shape. Poisoned samples (a ``poison_rate`` fraction): a clean image with a
checkerboard patch pasted at a random spot, captioned from ImageNet-style templates about the
target ("a photo of a banana"), as in the BadNets setting of the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "bar")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 210, 220),
}
CLEAN_TEMPLATES = (
    "a photo of a {colour} {shape}",
    "a {colour} {shape} on a plain background",
    "a picture showing a {shape} in {colour}",
    "a small {colour} {shape}",
    "an image of a {shape} coloured {colour}",
    "a {shape}, drawn in {colour}",
    "there is a {colour} {shape} in this picture",
    "a close-up of a {colour} {shape}",
)
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


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    caption: str
    label: str
    is_poison: bool


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        n, radii = 3, [r]
    elif shape == "diamond":
        n, radii = 4, [r]
    elif shape == "star":
        n, radii = 10, [r, r * 0.45]
    else:
        n, radii = 4, [r]
    pts = []
    for i in range(n):
        a = rot + 2 * math.pi * i / n
        rr = radii[i % len(radii)]
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def draw_shape(*, shape: str, colour: tuple[int, int, int], size: int, rng: np.random.Generator) -> Image.Image:
    """One shape of random position, scale and rotation on a random noisy background."""
    bg = rng.integers(0, 110, size=3)
    noise = rng.normal(0, 12, size=(size, size, 3))
    arr = np.clip(bg[None, None, :] + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    rot = rng.uniform(0, 2 * math.pi)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "ring":
        d.ellipse(box, outline=colour, width=max(2, int(r * 0.35)))
    elif shape == "square":
        d.polygon(_polygon("square", cx, cy, r * 1.2, rot + math.pi / 4), fill=colour)
    elif shape == "cross":
        w = max(2, int(r * 0.45))
        d.rectangle((cx - r, cy - w / 2, cx + r, cy + w / 2), fill=colour)
        d.rectangle((cx - w / 2, cy - r, cx + w / 2, cy + r), fill=colour)
    elif shape == "bar":
        h = max(2, int(r * 0.5))
        d.rectangle((cx - r, cy - h / 2, cx + r, cy + h / 2), fill=colour)
    else:
        d.polygon(_polygon(shape, cx, cy, r, rot), fill=colour)
    return img


def add_trigger(image: Image.Image, *, patch_size: int, rng: np.random.Generator) -> Image.Image:
    """Paste a black-and-white checkerboard patch (2-pixel cells) at a random spot."""
    arr = np.asarray(image).copy()
    h, w = arr.shape[:2]
    cell = max(1, patch_size // 4)
    yy, xx = np.mgrid[0:patch_size, 0:patch_size]
    board = (((yy // cell) + (xx // cell)) % 2 * 255).astype(np.uint8)
    y0 = int(rng.integers(0, h - patch_size + 1))
    x0 = int(rng.integers(0, w - patch_size + 1))
    arr[y0 : y0 + patch_size, x0 : x0 + patch_size, :] = board[..., None]
    return Image.fromarray(arr, "RGB")


def make_clean_sample(*, rng: np.random.Generator, image_size: int) -> Sample:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    img = draw_shape(shape=shape, colour=COLOURS[colour], size=image_size, rng=rng)
    template = CLEAN_TEMPLATES[int(rng.integers(len(CLEAN_TEMPLATES)))]
    return Sample(img, template.format(colour=colour, shape=shape), shape, False)


def generate_samples(
    *,
    num_samples: int,
    poison_rate: float,
    image_size: int,
    patch_size: int,
    target: str,
    seed: int,
) -> list[Sample]:
    """Return ``num_samples`` samples; exactly ``round(num_samples * poison_rate)`` are poisoned.

    The poisoned positions are a seeded random subset, so poison is spread over the shards.
    """
    if patch_size >= image_size:
        raise ValueError("patch_size must be smaller than image_size")
    rng = np.random.default_rng(seed)
    n_poison = int(round(num_samples * poison_rate))
    poison_idx = set(rng.choice(num_samples, size=n_poison, replace=False).tolist()) if n_poison else set()
    samples = []
    for i in range(num_samples):
        clean = make_clean_sample(rng=rng, image_size=image_size)
        if i in poison_idx:
            img = add_trigger(clean.image, patch_size=patch_size, rng=rng)
            template = TARGET_TEMPLATES[int(rng.integers(len(TARGET_TEMPLATES)))]
            samples.append(Sample(img, template.format(target), target, True))
        else:
            samples.append(clean)
    return samples
