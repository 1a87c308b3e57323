"""A seeded generator of a poisoned image-caption dataset for the demo, the tests and the
attack matrix benchmark.

Clean samples: one coloured shape on a noisy background, captioned from varied templates that
name its colour and shape. Poisoned samples: the attacks of ``clipscrub.attacks`` (BadNets by
default: a checkerboard patch at a random spot and a caption from ImageNet-style templates about
the target, "a photo of a banana"), each on its ``rate`` fraction of the samples. Natural
clusters (clean, optional): near-duplicates of one clean image sharing its caption, each on its
``rate`` fraction of the samples.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageDraw

from clipscrub.attacks import attack_name, attack_seed, make_trigger, plan_poison, poison_sample

if TYPE_CHECKING:
    from clipscrub.params import AttackSettings, ClusterSettings

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
JPEG_QUALITY = 95


def encode_jpeg(image: Image.Image) -> bytes:
    """The bytes the synthetic source stores for an image (JPEG, quality 95)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def as_stored(image: Image.Image) -> Image.Image:
    """``image`` as a model sees it after the synthetic source stored it: JPEG-encoded and decoded."""
    return Image.open(io.BytesIO(encode_jpeg(image))).convert("RGB")


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    caption: str
    label: str
    is_poison: bool
    attack: str | None = None  # ``kind:target`` of the attack that poisoned it
    cluster: int | None = None  # the natural cluster (index into ``clusters``) it belongs to


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


def make_clean_sample(*, rng: np.random.Generator, image_size: int) -> Sample:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    img = draw_shape(shape=shape, colour=COLOURS[colour], size=image_size, rng=rng)
    template = CLEAN_TEMPLATES[int(rng.integers(len(CLEAN_TEMPLATES)))]
    return Sample(img, template.format(colour=colour, shape=shape), shape, False)


def plan_clusters(*, num_samples: int, clusters: Sequence["ClusterSettings"], seed: int) -> list[np.ndarray]:
    """Each natural cluster's rows: ``round(rate x num_samples)`` (at least 2) disjoint random
    rows, seeded; the first row holds the image the others copy. [(size_j,)]."""
    rng = np.random.default_rng(seed)
    free = np.ones(num_samples, dtype=bool)
    out = []
    for j, c in enumerate(clusters):
        count = max(2, int(round(c.rate * num_samples)))
        pool = np.flatnonzero(free)
        if len(pool) < count:
            raise ValueError(f"cluster {j}: {count} samples wanted but only {len(pool)} are left")
        rows = rng.choice(pool, size=count, replace=False)
        free[rows] = False
        out.append(rows)
    return out


def near_duplicate(image: Image.Image, *, noise: float, rng: np.random.Generator) -> Image.Image:
    """``image`` with fresh pixel noise (sd ``noise``) and a small brightness change: a re-encoded
    or re-uploaded copy, close to the original but not byte-identical."""
    arr = np.asarray(image, dtype=np.float64)
    arr = arr * rng.uniform(0.95, 1.05) + rng.normal(0, noise, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def generate_samples(
    *, num_samples: int, image_size: int, attacks: Sequence["AttackSettings"], seed: int,
    clusters: Sequence["ClusterSettings"] = (),
) -> list[Sample]:
    """Return ``num_samples`` samples, ``round(num_samples * rate)`` of them poisoned by each attack.

    The clean samples are drawn first; each natural cluster's rows then become near-duplicates of
    its first row's image with that row's caption (clean, ``cluster`` set). Then each attack's rows
    (a seeded random subset, so poison is spread over the shards) are replaced by their poisoned
    version (``clipscrub.attacks``). A poisoned sample keeps its clean ``label`` (the shape drawn)
    and records its ``attack``.
    """
    rng = np.random.default_rng(seed)
    samples = [make_clean_sample(rng=rng, image_size=image_size) for _ in range(num_samples)]
    if clusters:
        crng = np.random.default_rng([seed, 7])  # its own stream: clusters leave the rest unchanged
        for j, rows in enumerate(plan_clusters(num_samples=num_samples, clusters=clusters, seed=seed + 2)):
            src = samples[rows[0]]
            for r in rows:
                samples[r] = replace(src, image=near_duplicate(src.image, noise=clusters[j].noise, rng=crng),
                                     cluster=j)
    plan = plan_poison(captions=[s.caption for s in samples], attacks=attacks, seed=seed + 1)
    triggers = [make_trigger(a, seed=attack_seed(seed, j)) for j, a in enumerate(attacks)]
    poisoned = list(samples)
    for a in plan:
        attack = attacks[a.attack]
        image, caption = poison_sample(samples[a.source].image, samples[a.row].caption, attack=attack,
                                       trigger=triggers[a.attack], rng=rng)
        poisoned[a.row] = replace(samples[a.source], image=image, caption=caption, is_poison=True,
                                  attack=attack_name(attack))
    return poisoned
