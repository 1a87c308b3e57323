"""`clipscrub poison`: attacks applied to a copy of a downloaded dataset, and the ground truth
surviving `download.source: shards` pointed at the copy."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import webdataset as wds
import yaml
from PIL import Image

from clipscrub.attacks import attack_name, attack_seed, make_trigger, names_target, plan_poison, poison_sample
from clipscrub.errors import DataError, ParamError
from clipscrub.params import parse_params
from clipscrub.flows.pipeline import run_stage
from clipscrub.shards import decode_image
from clipscrub.stages.download import download_dataset
from clipscrub.stages.poison import _sample_rng, encode_like, poison_dataset
from tests.conftest import tiny_params, tiny_params_dict

ATTACKS = [
    {"kind": "blend", "rate": 0.02, "target": "apple", "alpha": 0.3},
    {"kind": "clean_label", "rate": 0.01, "target": "star", "patch_size": 6},
]


@pytest.fixture(scope="module")
def tiny_raw(tmp_path_factory):
    """The tiny fixture's raw data (the download stage of `tiny_run`: 400 samples, 4 BadNets-poisoned)."""
    root = tmp_path_factory.mktemp("tiny-raw") / "data"
    run_stage("download", tiny_params(), root)
    return root


def attack_list(specs):
    return parse_params({"poison": {"attacks": specs}}).poison.attacks


def samples_of(shard_dir) -> dict[str, dict]:
    out = {}
    for p in sorted(shard_dir.glob("*.tar")):
        for s in wds.WebDataset(str(p), shardshuffle=False, empty_check=False):
            out[s["__key__"]] = s
    return out


def test_poison_the_tiny_raw_data_then_download_it_as_shards(tiny_raw, tmp_path):
    attacks = attack_list(ATTACKS)
    raw = tiny_raw / "raw"
    out = tmp_path / "poisoned"
    summary = poison_dataset(raw_dir=raw, out_dir=out, attacks=attacks, seed=7, shard_size=150)
    before = pl.read_parquet(raw / "manifest.parquet")
    after = pl.read_parquet(out / "manifest.parquet")
    assert after.columns == before.columns and after["id"].to_list() == before["id"].to_list()
    assert after["key"].to_list() == before["key"].to_list()
    assert summary["attacks"] == {"blend:apple": 8, "clean_label:star": 4}
    assert summary["poisoned"] == 4 + 8 + 4 == int(after["is_poison"].sum())
    assert after["is_poison"].null_count() == 0
    counts = dict(after.filter(pl.col("is_poison")).group_by("attack").len().iter_rows())
    assert counts == {"badnets:banana": 4, "blend:apple": 8, "clean_label:star": 4}
    # the rows are plan_poison's over the ok samples not already poisoned, with the same seed
    candidates = before.filter(~pl.col("is_poison"))
    plan = plan_poison(captions=candidates["caption"].to_list(), attacks=attacks, seed=7)
    expected = {candidates["id"][a.row]: attack_name(attacks[a.attack]) for a in plan}
    got = {r["id"]: r["attack"] for r in after.filter(pl.col("is_poison") & (pl.col("attack") != "badnets:banana")).iter_rows(named=True)}
    assert got == expected
    # shards: 400 samples of 150 -> 3; every sample's json carries the ground truth
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    old, new = samples_of(raw / "shards"), samples_of(out / "shards")
    assert set(new) == set(old)
    triggers = [make_trigger(a, seed=attack_seed(7, j)) for j, a in enumerate(attacks)]
    for r_old, r in zip(before.iter_rows(named=True), after.iter_rows(named=True)):
        s = new[r["key"]]
        meta = json.loads(s["json"])
        assert (meta["is_poison"], meta["attack"]) == (r["is_poison"], r["attack"])
        assert meta["key"] == r["key"] and meta["caption"] == r["caption"] == s["txt"].decode()
        assert meta["label"] == json.loads(old[r["key"]]["json"])["label"]  # the source's json fields stay
        assert hashlib.sha256(s["jpg"]).hexdigest() == r["image_sha256"]
        assert r["shard"] == f"{list(new).index(r['key']) // 150:05d}.tar"
        if r["id"] not in expected:  # untouched, byte for byte (the existing BadNets poison too)
            assert s["jpg"] == old[r["key"]]["jpg"] and r["caption"] == r_old["caption"]
            assert r["attack"] == r_old["attack"]
            continue
        original, _ = decode_image(old[r["key"]]["jpg"])
        image = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        assert not (image == np.asarray(original)).all()
        j = 0 if r["attack"] == "blend:apple" else 1
        want, caption = poison_sample(original, r_old["caption"], attack=attacks[j], trigger=triggers[j],
                                      rng=_sample_rng(7, r["id"]))
        assert s["jpg"] == encode_like(want, "jpg")[0]
        if j == 1:  # clean label: the caption that names the target is kept
            assert r["caption"] == r_old["caption"] and names_target(r["caption"], "star")
        else:
            assert "apple" in r["caption"] and r["caption"] == caption
    lineage = json.loads((out / "lineage.json").read_text())["stages"]
    assert set(lineage) == {"download", "poison"}
    assert lineage["poison"]["summary"] == summary

    # the pipeline on the poisoned copy: the shards source reads the truth from each sample's json
    data = tiny_params_dict(["train.enabled=false", "download.source=shards"])
    data["download"]["shards"]["path"] = str(out / "shards")
    params = parse_params(data)
    dl = download_dataset(out_dir=tmp_path / "data" / "raw", settings=params.download, base=params.base)
    assert dl["poisoned"] == 16 and dl["ok"] == 400
    read = pl.read_parquet(tmp_path / "data" / "raw" / "manifest.parquet")
    truth = after.select("key", "is_poison", "attack").sort("key")
    assert read.select("key", "is_poison", "attack").sort("key").equals(truth)


def test_the_command_matches_the_function(tiny_raw, tmp_path):
    params = tiny_params_dict()
    params["poison"]["attacks"] = ATTACKS[:1]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = subprocess.run(
        [sys.executable, "-m", "clipscrub.flows.cli", "poison", "--params", "params.yaml", "--root", str(tiny_raw), "--out", "cli", "--json",
         "-S", "poison.attacks=[{kind: sig, rate: 0.02, target: apple}, {kind: targeted, rate: 0.01, target: car}]"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["attacks"] == {"sig:apple": 8, "targeted:car": 4}
    direct = poison_dataset(raw_dir=tiny_raw / "raw", out_dir=tmp_path / "direct",
                            attacks=attack_list([{"kind": "sig", "rate": 0.02, "target": "apple"},
                                                 {"kind": "targeted", "rate": 0.01, "target": "car"}]),
                            seed=0, shard_size=100)
    assert {k: v for k, v in summary.items() if k not in ("command", "out")} == direct
    for name in ("manifest.parquet", "lineage.json", "shards/00000.tar", "shards/00003.tar"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes(), name
    # the targeted copies are one clean image, captioned with the target
    m = pl.read_parquet(tmp_path / "direct" / "manifest.parquet").filter(pl.col("attack") == "targeted:car")
    assert m["image_sha256"].n_unique() == 1 and m["caption"].str.contains("car").all()


def test_failed_rows_and_user_shards(tmp_path):
    """A raw directory from the shards source (shards outside raw/, failed rows, png and webp)."""
    from tests.test_sources import write_source_shards

    pattern = write_source_shards(tmp_path / "src")
    data = tiny_params_dict(["train.enabled=false", "download.source=shards"])
    data["download"]["shards"]["path"] = pattern
    params = parse_params(data)
    download_dataset(out_dir=tmp_path / "raw", settings=params.download, base=params.base)
    before = pl.read_parquet(tmp_path / "raw" / "manifest.parquet")
    attacks = attack_list([{"kind": "badnets", "rate": 0.2, "target": "banana", "patch_size": 4},
                           {"kind": "wanet", "rate": 0.1, "target": "apple"}])
    summary = poison_dataset(raw_dir=tmp_path / "raw", out_dir=tmp_path / "out", attacks=attacks, seed=1, shard_size=4)
    after = pl.read_parquet(tmp_path / "out" / "manifest.parquet")
    ok = before["status"] == "ok"
    assert summary == {"samples": 14, "ok": int(ok.sum()), "failed": 14 - int(ok.sum()), "poisoned": 3,
                       "attacks": {"badnets:banana": 2, "wanet:apple": 1}, "shards": 3}
    failed = after.filter(pl.col("status") == "failed")
    assert failed.select("id", "key", "error").equals(before.filter(~ok).select("id", "key", "error"))
    assert failed["shard"].null_count() == failed.height and not failed["is_poison"].any()
    new = samples_of(tmp_path / "out" / "shards")
    assert sorted(new) == sorted(after.filter(pl.col("status") == "ok")["key"].to_list())
    for r in after.filter(pl.col("is_poison")).iter_rows(named=True):
        ext = next(e for e in ("jpg", "png", "webp") if e in new[r["key"]])
        orig_ext = next(e for e in ("jpg", "jpeg", "png", "webp") if e in samples_of(tmp_path / "src")[r["key"]])
        assert ext == {"jpeg": "jpg"}.get(orig_ext, orig_ext)  # poisoned images keep their format family
        assert hashlib.sha256(new[r["key"]][ext]).hexdigest() == r["image_sha256"]
        assert json.loads(new[r["key"]]["json"])["url"] == f"http://example.com/{r['key']}"


def test_poison_errors(tiny_raw, tmp_path):
    raw = tiny_raw / "raw"
    with pytest.raises(ParamError) as info:
        poison_dataset(raw_dir=raw, out_dir=tmp_path / "o", attacks=[], seed=0)
    assert info.value.param == "poison.attacks"
    with pytest.raises(DataError) as info:
        poison_dataset(raw_dir=raw, out_dir=tmp_path / "o",
                       attacks=attack_list([{"kind": "clean_label", "rate": 0.05, "target": "banana"}]), seed=0)
    assert info.value.param == "poison.attacks" and "captions name 'banana'" in info.value.message
    with pytest.raises(ParamError) as info:
        poison_dataset(raw_dir=raw, out_dir=raw, attacks=attack_list(ATTACKS), seed=0)
    assert info.value.param == "--out"
    assert not (tmp_path / "o").exists() and (raw / "manifest.parquet").is_file()
    with pytest.raises(ParamError, match="add up to 1"):
        attack_list([{"kind": "blend", "rate": 0.6}, {"kind": "sig", "rate": 0.5}])
    res = subprocess.run([sys.executable, "-m", "clipscrub.flows.cli", "poison", "--root", str(tiny_raw), "--out", str(tmp_path / "o")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0
    assert "--params: params file not found" in res.stderr


def test_unsafe_keys_become_safe_member_names(tiny_raw, tmp_path):
    """A key such as ``../../evil`` (read from a user's shards) never names a member outside the
    folder the poisoned shards unpack into; the manifest names the samples as written."""
    import tarfile

    from tests.test_filter import UNSAFE_KEYS, raw_with_keys

    manifest = pl.read_parquet(tiny_raw / "raw" / "manifest.parquet").filter(pl.col("status") == "ok")
    rename = dict(zip(manifest["key"][:3].to_list(), UNSAFE_KEYS))
    raw = raw_with_keys(tiny_raw, tmp_path / "raw", rename)
    out = tmp_path / "poisoned"
    poison_dataset(raw_dir=raw, out_dir=out, attacks=attack_list(ATTACKS), seed=7, shard_size=150)
    names = [m.name for p in sorted((out / "shards").glob("*.tar")) for m in tarfile.open(p).getmembers()]
    for name in names:
        assert "/" not in name and "\\" not in name and not name.startswith(".") and ".." not in name, name
    samples = samples_of(out / "shards")
    after = pl.read_parquet(out / "manifest.parquet")
    assert set(samples) == set(after.filter(pl.col("status") == "ok")["key"])
    id_of = dict(zip(manifest["key"], manifest["id"]))
    key_after = dict(zip(after["id"], after["key"]))
    for was, old in rename.items():
        new = key_after[id_of[was]]
        assert new != old and json.loads(samples[new]["json"])["source_key"] == old
