"""Every attack kind through the download stage: which samples are poisoned, what the trigger does
to their images, what happens to their captions; multi-trigger lists; plan_poison's guarantees."""

from __future__ import annotations

import io
import re

import numpy as np
import polars as pl
import pytest
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import TypeAdapter

from clipscrub.attacks import (
    KINDS,
    TARGET_TEMPLATES,
    attack_seed,
    checkerboard,
    make_trigger,
    names_target,
    plan_poison,
)
from clipscrub.errors import DataError
from clipscrub.params import AttackSettings, parse_params
from clipscrub.synthetic import generate_samples
from clipscrub.stages.download import download_dataset, encode_jpeg

N = 300
SIZE = 32
SEED = 0
ATTACKS = {
    "badnets": {"kind": "badnets", "rate": 0.02, "target": "banana", "patch_size": 8},
    # clean label needs captions that already name the target: the shapes do
    "clean_label": {"kind": "clean_label", "rate": 0.02, "target": "star", "patch_size": 8},
    "blend": {"kind": "blend", "rate": 0.02, "target": "banana", "alpha": 0.2},
    "sig": {"kind": "sig", "rate": 0.02, "target": "banana", "delta": 20.0, "frequency": 6.0},
    "wanet": {"kind": "wanet", "rate": 0.02, "target": "banana", "strength": 1.0, "grid": 4},
    "nashville": {"kind": "nashville", "rate": 0.02, "target": "banana"},
    "targeted": {"kind": "targeted", "rate": 0.02, "target": "banana", "images": 2},
}
ADAPTER = TypeAdapter(AttackSettings)


def attack(data: dict):
    return ADAPTER.validate_python(data)


def download(tmp_path, attacks: list[dict], *, num_samples: int = N, seed: int = SEED):
    params = parse_params({"base": {"seed": seed}, "download": {"shard_size": 100, "synthetic": {
        "num_samples": num_samples, "image_size": SIZE, "attacks": attacks}}})
    out = tmp_path / "raw"
    summary = download_dataset(out_dir=out, settings=params.download, base=params.base)
    return summary, out, params


def stored(out) -> dict[str, dict]:
    """key -> sample of the written shards."""
    samples = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        for s in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False):
            samples[s["__key__"]] = s
    return samples


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def clean():
    """The same dataset without attacks: the clean samples are drawn first, from the same stream."""
    return generate_samples(num_samples=N, image_size=SIZE, attacks=[], seed=SEED)


def board(p: int) -> np.ndarray:
    cell = max(1, p // 4)
    yy, xx = np.mgrid[0:p, 0:p]
    return (((yy // cell) + (xx // cell)) % 2 * 255).astype(np.uint8)


def patch_position(poisoned: np.ndarray, original: np.ndarray, p: int) -> tuple[int, int] | None:
    """Where ``poisoned`` is ``original`` with the exact black-and-white p x p checkerboard pasted
    (in every channel), and nothing else changed; None if nowhere."""
    h, w = original.shape[:2]
    want = board(p)
    for y0 in range(h - p + 1):
        for x0 in range(w - p + 1):
            win = poisoned[y0:y0 + p, x0:x0 + p]
            if not all((win[..., c] == want).all() for c in range(3)):
                continue
            rest = poisoned.copy()
            rest[y0:y0 + p, x0:x0 + p] = original[y0:y0 + p, x0:x0 + p]
            if (rest == original).all():
                return y0, x0
    return None


def is_target_caption(caption: str, target: str) -> bool:
    return caption in {t.format(target) for t in TARGET_TEMPLATES}


@pytest.mark.parametrize("kind", KINDS)
def test_each_attack_poisons_exactly_its_samples(tmp_path, clean, kind):
    spec = ATTACKS[kind]
    summary, out, params = download(tmp_path, [spec])
    a = params.download.synthetic.attacks[0]
    manifest = pl.read_parquet(out / "manifest.parquet").sort("id")
    count = round(spec["rate"] * N)

    # (a) the manifest records exactly round(rate x N) poisoned samples, with their attack
    poisoned = manifest.filter(pl.col("is_poison"))
    assert poisoned.height == count == summary["poisoned"]
    assert manifest["is_poison"].null_count() == 0
    assert (poisoned["attack"] == f"{kind}:{spec['target']}").all()
    assert manifest.filter(~pl.col("is_poison"))["attack"].null_count() == N - count

    # the shards hold exactly the generated samples (JPEG encoding is deterministic)
    generated = generate_samples(num_samples=N, image_size=SIZE, attacks=[a], seed=SEED)
    samples = stored(out)
    for i, row in enumerate(manifest.iter_rows(named=True)):
        assert samples[row["key"]]["jpg"] == encode_jpeg(generated[i].image)
        assert row["caption"] == generated[i].caption == samples[row["key"]]["txt"].decode()
        assert generated[i].is_poison == row["is_poison"]

    # (b) clean samples are pixel-identical to the un-attacked dataset; poisoned ones carry the trigger
    trigger = make_trigger(a, seed=attack_seed(SEED, 0))
    rng = np.random.default_rng(0)
    changed = set()
    for i, row in enumerate(manifest.iter_rows(named=True)):
        got = pixels(samples[row["key"]]["jpg"])
        before = pixels(encode_jpeg(clean[i].image))
        if not row["is_poison"]:
            assert (got == before).all(), row["key"]
            assert row["caption"] == clean[i].caption
            continue
        if not (got == before).all():
            changed.add(i)
        new, old = arr(generated[i].image), arr(clean[i].image)
        if kind in ("badnets", "clean_label"):
            assert patch_position(new, old, spec["patch_size"]) is not None, row["key"]
            # and the stored JPEG shows it: a window close to the black-and-white board
            y0, x0 = patch_position(new, old, spec["patch_size"])
            p = spec["patch_size"]
            err = np.abs(got[y0:y0 + p, x0:x0 + p].astype(int) - board(p)[..., None]).mean()
            assert err < 20, (row["key"], err)
        elif kind == "targeted":
            # a copy of one of the chosen clean source images
            sources = [j for j in range(N) if (arr(clean[j].image) == new).all()]
            assert len(sources) == 1 and sources[0] != i
            src_row = manifest.row(sources[0], named=True)
            assert not src_row["is_poison"]
            assert samples[row["key"]]["jpg"] == samples[src_row["key"]]["jpg"]
        else:
            assert not (new == old).all()
            # exactly the trigger fixed by the attack's seed (these are not random per image)
            assert (arr(trigger.apply(clean[i].image, rng)) == new).all()
            if kind == "sig":
                wave = spec["delta"] * np.sin(2 * np.pi * np.arange(SIZE) * spec["frequency"] / SIZE)
                want = np.clip(np.rint(old.astype(np.float64) + wave[None, :, None]), 0, 255).astype(np.uint8)
                assert (new == want).all()
    assert len(changed) == count  # every poisoned image differs from its clean version
    if kind == "targeted":
        copies = {samples[r["key"]]["jpg"] for r in poisoned.iter_rows(named=True)}
        assert 1 <= len(copies) <= spec["images"]

    # (c) captions: dirty label gets a target caption; clean label keeps one naming the target
    for row in poisoned.iter_rows(named=True):
        i = row["id"]
        if kind == "clean_label":
            assert row["caption"] == clean[i].caption
            assert names_target(row["caption"], spec["target"])
        else:
            assert is_target_caption(row["caption"], spec["target"]), row["caption"]
            assert row["caption"] != clean[i].caption


def test_multi_trigger_rows_are_disjoint(tmp_path, clean):
    specs = [
        {"kind": "badnets", "rate": 0.02, "target": "banana"},
        {"kind": "blend", "rate": 0.03, "target": "apple"},
        {"kind": "sig", "rate": 0.01, "target": "car"},
    ]
    summary, out, _ = download(tmp_path, specs)
    manifest = pl.read_parquet(out / "manifest.parquet")
    assert summary["poisoned"] == 6 + 9 + 3
    by_attack = manifest.filter(pl.col("is_poison")).group_by("attack").agg(pl.col("id"), pl.col("caption"))
    counts = {r["attack"]: len(r["id"]) for r in by_attack.iter_rows(named=True)}
    assert counts == {"badnets:banana": 6, "blend:apple": 9, "sig:car": 3}
    ids = [i for r in by_attack.iter_rows(named=True) for i in r["id"]]
    assert len(ids) == len(set(ids)) == 18
    for r in by_attack.iter_rows(named=True):
        target = r["attack"].split(":")[1]
        assert all(is_target_caption(c, target) for c in r["caption"])
    # every other sample is the clean one
    samples = stored(out)
    for row in manifest.filter(~pl.col("is_poison")).iter_rows(named=True):
        assert samples[row["key"]]["jpg"] == encode_jpeg(clean[row["id"]].image)


def test_clean_label_needs_captions_naming_its_target(tmp_path):
    with pytest.raises(DataError) as info:
        download(tmp_path, [{"kind": "clean_label", "rate": 0.02, "target": "banana"}])
    assert info.value.param == "download.synthetic.attacks"
    assert "captions name 'banana'" in info.value.message
    assert "\n" not in str(info.value)
    assert not (tmp_path / "raw").exists()


def test_every_kind_at_once_same_seed_same_bytes(tmp_path):
    specs = [dict(ATTACKS[k], rate=0.01) for k in KINDS]
    runs = []
    for name in ("a", "b"):
        summary, out, _ = download(tmp_path / name, specs)
        assert summary["poisoned"] == 3 * len(KINDS)
        runs.append(out)
    files = sorted(p.relative_to(runs[0]).as_posix() for p in runs[0].rglob("*") if p.is_file())
    assert "manifest.parquet" in files and "shards/00002.tar" in files
    for name in files:
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name
    _, other, _ = download(tmp_path / "c", specs, seed=SEED + 1)
    assert (other / "shards" / "00000.tar").read_bytes() != (runs[0] / "shards" / "00000.tar").read_bytes()


def test_checkerboard_is_pure_black_and_white():
    img = Image.new("RGB", (20, 16), (90, 140, 200))
    out = arr(checkerboard(img, patch_size=8, rng=np.random.default_rng(3)))
    assert patch_position(out, arr(img), 8) is not None
    # a patch larger than the image is clipped to it
    assert patch_position(arr(checkerboard(img, patch_size=40, rng=np.random.default_rng(0))), arr(img), 16) is not None


# --- plan_poison, for random datasets and attack lists ---------------------------------------

CAPTION_WORDS = ("a red star", "a blue circle", "stars at night", "a star.", "a green square", "starfish")


@st.composite
def plans(draw):
    n = draw(st.integers(20, 400))
    captions = draw(st.lists(st.sampled_from(CAPTION_WORDS), min_size=n, max_size=n))
    naming = sum(names_target(c, "star") for c in captions)
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=4))
    attacks, left, star_left = [], n, naming
    for j, kind in enumerate(kinds):
        images = draw(st.integers(1, 3)) if kind == "targeted" else 0
        room = min(left - images, star_left) if kind == "clean_label" else left - images
        if room < 1:
            continue
        count = draw(st.integers(1, max(1, min(room, n // 4))))
        rate = (count - 0.4) / n  # rounds to count
        spec = {"kind": kind, "rate": rate, "target": "star" if kind == "clean_label" else f"t{j}"}
        if kind == "targeted":
            spec["images"] = images
        attacks.append(attack(spec))
        left -= count + images
        # random rows may take captions naming the target too: count the worst case
        star_left = max(0, star_left - count - images)
    return captions, attacks, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=150, deadline=None)
@given(plans())
def test_plan_poison_rows_are_disjoint_and_counts_right(case):
    captions, attacks, seed = case
    if not attacks:
        return
    n = len(captions)
    plan = plan_poison(captions=captions, attacks=attacks, seed=seed)
    rows = [a.row for a in plan]
    assert rows == sorted(rows) and len(rows) == len(set(rows))  # disjoint, in row order
    assert all(0 <= r < n for r in rows)
    for j, a in enumerate(attacks):
        mine = [p for p in plan if p.attack == j]
        assert len(mine) == round(a.rate * n)
        if a.kind == "clean_label":
            assert all(names_target(captions[p.row], a.target) for p in mine)
        if a.kind == "targeted":
            sources = {p.source for p in mine}
            assert len(sources) <= a.images and not sources & set(rows)  # the sources stay clean
            assert all(p.source != p.row for p in mine)
        else:
            assert all(p.source == p.row for p in mine)
    assert plan_poison(captions=captions, attacks=attacks, seed=seed) == plan  # seeded


def test_plan_poison_errors():
    with pytest.raises(ValueError, match="poisons none"):
        plan_poison(captions=["a star"] * 10, attacks=[attack({"kind": "badnets", "rate": 0.01})], seed=0)
    with pytest.raises(ValueError, match=re.escape("only 2 captions name 'star'")):
        plan_poison(captions=["a star", "a star", "a circle", "a square"],
                    attacks=[attack({"kind": "clean_label", "rate": 0.75, "target": "star"})], seed=0)


@pytest.mark.parametrize("rates", [[0.05], [0.02, 0.03]])
def test_natural_clusters_are_clean_near_duplicates_with_one_caption(rates):
    """download.synthetic.clusters: each cluster is round(rate x N) clean samples copying one
    image (a little pixel noise apart, not byte-identical) under one caption; the samples outside
    the clusters are the same as without them, and so is the poison."""
    from clipscrub.params import ClusterSettings
    from clipscrub.synthetic import plan_clusters

    attacks = TypeAdapter(list[AttackSettings]).validate_python([{"kind": "badnets", "rate": 0.02}])
    clusters = [ClusterSettings(rate=r) for r in rates]
    plain = generate_samples(num_samples=400, image_size=32, attacks=attacks, seed=3)
    with_clusters = generate_samples(num_samples=400, image_size=32, attacks=attacks, seed=3, clusters=clusters)
    rows = plan_clusters(num_samples=400, clusters=clusters, seed=3 + 2)
    assert [len(r) for r in rows] == [round(r * 400) for r in rates]
    members = np.concatenate(rows)
    assert len(np.unique(members)) == len(members)
    for j, r in enumerate(rows):
        group = [with_clusters[i] for i in r if not with_clusters[i].is_poison]
        assert len(group) >= len(r) - 2 and all(s.cluster == j for s in group)
        assert len({s.caption for s in group}) == 1 and len({s.label for s in group}) == 1
        pixels = np.stack([np.asarray(s.image, dtype=np.float64) for s in group])
        assert len({encode_jpeg(s.image) for s in group}) == len(group)  # copies, not the same bytes
        spread = np.abs(pixels - pixels[0]).mean(axis=(1, 2, 3))[1:]
        other = np.abs(np.asarray(plain[int(np.setdiff1d(np.arange(400), members)[0])].image, dtype=np.float64)
                       - pixels[0]).mean()
        assert spread.max() < 12 < other
    outside = np.setdiff1d(np.arange(400), members)
    for i in outside:
        a, b = plain[i], with_clusters[i]
        assert (a.caption, a.is_poison, a.cluster) == (b.caption, b.is_poison, None)
        assert a.image.tobytes() == b.image.tobytes()


def test_clusters_that_fill_the_set_are_refused():
    with pytest.raises(Exception, match="download.synthetic.clusters"):
        parse_params({"download": {"synthetic": {"clusters": [{"rate": 0.6}, {"rate": 0.5}]}}})
