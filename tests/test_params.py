from __future__ import annotations

from pathlib import Path

import pytest

from clipscrub.errors import ParamError
from clipscrub.params import Params, apply_overrides, load_params, parse_params
from tests.conftest import REPO


def test_params_yaml_holds_every_default():
    """params.yaml spells out every key, so `dvc exp run -S` can set any of them."""
    assert load_params(REPO / "params.yaml").model_dump() == Params().model_dump()
    import yaml

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(data) == set(Params.model_fields)


@pytest.mark.parametrize(
    ("data", "param", "fragment"),
    [
        ({"threshold": {"fractoin": 0.1}}, "threshold.fractoin", "unknown key"),
        ({"tresholds": {}}, "tresholds", "unknown key"),
        ({"threshold": {"fraction": 0.0}}, "threshold.fraction", "greater than 0"),
        ({"threshold": {"fraction": 1.5}}, "threshold.fraction", "less than 1"),
        ({"download": {"urls": {"max_aspect_ratio": 100}}}, "download.urls.max_aspect_ratio", "less than or equal to 50"),
        ({"threshold": {"fraction": "0.1"}}, "threshold.fraction", "valid number"),
        ({"index": {"k": 1000, "reference": {"sizes": [1000, 4000]}}}, "index.k", "must be smaller than the smallest index.reference.sizes"),
        ({"score": {"detectors": ["dao", "lof"]}}, "score.detectors", "unknown detector 'lof'"),
        ({"threshold": {"detector": "lof"}}, "threshold.detector", "unknown detector 'lof'"),
        ({"score": {"k": 100}}, "score.k", "exceeds index.k"),
        ({"score": {"detectors": ["kdist"]}, "threshold": {"detector": "dao"}}, "threshold.detector", "not among score.detectors"),
        ({"threshold": {"method": "score"}}, "threshold.score", "must be set"),
        ({"base": {"seed": 1.5}}, "base.seed", "valid integer"),
        ({"index": {"modality": "audio"}}, "index.modality", "image_text"),
        ({"index": {"reference": {"mode": "trusted"}}}, "index.reference.path", "required with index.reference.mode: trusted"),
        ({"index": {"search": {"method": "annoy"}}}, "index.search.method", "hnsw"),
        ({"index": {"search": {"ef_serach": 64}}}, "index.search.ef_serach", "unknown key"),
        ({"embed": {"dtype": "bfloat16"}}, "embed.dtype", "float16"),
        ({"filter": {"output": "shards"}}, "filter.output", "'reshard' or 'ids'"),
        ({"filter": {"keep_ids": ""}}, "filter.keep_ids", "at least 1 character"),
        ({"filter": {"remove_ids": 7}}, "filter.remove_ids", "valid string"),
        ({"filter": {"keep_ids": "review/ids.txt", "remove_ids": "review/ids.txt"}}, "filter.remove_ids",
         "is the same file as filter.keep_ids"),
    ],
)
def test_bad_params_name_the_key(data, param, fragment):
    with pytest.raises(ParamError) as info:
        parse_params(data)
    assert info.value.param == param
    assert fragment in info.value.message
    assert "\n" not in str(info.value)


def test_overrides_use_existing_keys_only():
    data = {"threshold": {"fraction": 0.01}}
    assert apply_overrides(data, ["threshold.fraction=0.05"])["threshold"]["fraction"] == 0.05
    assert data["threshold"]["fraction"] == 0.01  # the input is not mutated
    with pytest.raises(ParamError, match="unknown key"):
        apply_overrides(data, ["threshold.fractoin=0.05"])
    with pytest.raises(ParamError, match="section.key=value"):
        apply_overrides(data, ["threshold.fraction"])


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamError) as info:
        load_params(tmp_path / "nope.yaml")
    assert info.value.param == "--params"


def test_params_hash_tracks_sections():
    a, b = Params(), parse_params({"threshold": {"fraction": 0.02}})
    assert a.hash("index") == b.hash("index")
    assert a.hash("threshold") != b.hash("threshold")
    assert a.hash() != b.hash()


@pytest.mark.parametrize("value", ["no", "off", "yes", "on", "n", "y"])
def test_documented_strings_stay_strings(tmp_path, value):
    """YAML 1.1 reads no/off/yes as booleans; params files and -S overrides use YAML 1.2's
    booleans (true/false), as DVC's parser does, so `resize_mode: no` stays the string."""
    import yaml

    from clipscrub.params import load_yaml

    assert load_yaml(f"a: {value}") == {"a": value}
    assert load_yaml("a: true\nb: False") == {"a": True, "b": False}
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "p.yaml").write_text((REPO / "params.yaml").read_text().replace("resize_mode: keep_ratio", "resize_mode: no"))
    assert load_params(tmp_path / "p.yaml").download.urls.resize_mode == "no"
    assert apply_overrides(data, ["download.urls.resize_mode=no"])["download"]["urls"]["resize_mode"] == "no"
    assert load_params(REPO / "params.yaml", ["download.urls.resize_mode=no"]).download.urls.resize_mode == "no"


def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    """Nine levels of nine aliases: 9^9 values from a 1 KB file. Refused by its measured size."""
    import time

    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(8):
        prev, name = chr(97 + i), chr(98 + i)
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    assert (tmp_path / "bomb.yaml").stat().st_size < 1024
    t0 = time.perf_counter()
    with pytest.raises(ParamError, match="aliases expand to more than 100,000 values") as err:
        load_params(tmp_path / "bomb.yaml")
    assert time.perf_counter() - t0 < 5  # measured, not built (a bound, not a timing target)
    assert err.value.param == "--params"


def test_small_aliases_still_work(tmp_path):
    text = (REPO / "params.yaml").read_text()
    assert text.count("  hist_bins: 40") == 2  # evaluate's, then report's
    text = text.replace("  hist_bins: 40", "  hist_bins: &bins 40", 1)
    i = text.rindex("  hist_bins: 40")
    (tmp_path / "p.yaml").write_text(text[:i] + "  hist_bins: *bins" + text[i + len("  hist_bins: 40"):])
    p = load_params(tmp_path / "p.yaml")
    assert p.evaluate.hist_bins == p.report.hist_bins == 40


@pytest.mark.parametrize(("data", "overrides", "expected"), [
    ({"threshold": {"fractoin": 0.1}}, [], "threshold.fractoin: unknown key; did you mean 'fraction'?"),
    ({"index": {"reference": {"sizs": [3]}}}, [], "index.reference.sizs: unknown key; did you mean 'sizes'?"),
    ({"tresholds": {}}, [], "tresholds: unknown key; did you mean 'threshold'?"),
    ({"embed": {"model_confg": None}}, [], "embed.model_confg: unknown key; did you mean 'model_config'?"),
    ({"threshold": {"zzz": 1}}, [], "threshold.zzz: unknown key (check the spelling"),
    ({}, ["threshold.fractoin=0.2"], "threshold.fractoin: unknown key in override; did you mean 'fraction'?"),
    ({}, ["idx.k=3"], "idx.k: unknown key in override; did you mean 'index'?"),
])
def test_an_unknown_key_suggests_the_closest(data, overrides, expected):
    import yaml

    from tests.conftest import REPO

    base = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in data.items():
        base.setdefault(section, {})
        for key, value in values.items():
            if isinstance(value, dict):
                base[section].setdefault(key, {}).update(value)
            else:
                base[section][key] = value
    with pytest.raises(ParamError) as err:
        parse_params(apply_overrides(base, overrides))
    assert str(err.value).startswith(expected), str(err.value)


def test_an_unknown_model_is_caught_as_params_load():
    """Before download runs (hours, for a url list), not when embed loads the model."""
    import yaml

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    with pytest.raises(ParamError) as err:
        parse_params(apply_overrides(data, ["train.enabled=false", "embed.model_name=ViT-B32"]))
    assert str(err.value).startswith("embed.model_name: unknown model 'ViT-B32'; did you mean 'ViT-B-32'? "
                                     "(open_clip.list_models() lists them"), str(err.value)
    # names embed does not load through open_clip's list: the demo's victim, a model_config's model,
    # precomputed embeddings (the name only labels them)
    parse_params(apply_overrides(data, ["embed.model_name=ViT-B32"]))
    parse_params(apply_overrides(data, ["train.enabled=false", "embed.model_name=mine", "embed.model_config=mine.json"]))
    parse_params(apply_overrides(data, ["train.enabled=false", "embed.model_name=planted", "download.source=embeddings",
                                        "download.embeddings.path=emb"]))


def test_relative_paths_are_relative_to_the_params_file(tmp_path, monkeypatch):
    """Every path key of a params file in another folder means the same files from any working
    directory; -S paths are relative to the working directory; absolute and ~ paths stay."""
    import yaml

    from clipscrub.params import PATH_KEYS

    conf = tmp_path / "project" / "conf"
    conf.mkdir(parents=True)
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    values = {key: f"rel/{key.replace('.', '_')}" for key in PATH_KEYS}
    values["download.folder.path"] = "../images"
    values["filter.remove_ids"] = "/abs/remove.txt"
    values["evaluate.truth"] = "~/truth.csv"
    sets = [f"{k}={v}" for k, v in values.items()] + ["train.enabled=false", "download.source=folder",
                                                     "index.reference.mode=trusted"]
    (conf / "params.yaml").write_text(yaml.safe_dump(apply_overrides(data, sets)))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    p = load_params("../project/conf/params.yaml", ["download.folder.captions=typed/caps.csv"])
    dump = p.model_dump(mode="json", by_alias=True)  # as the file means them: the params hash, the lineage

    def value(key, node=dump):
        for part in key.split("."):
            node = node[part]
        return node

    def usable(key):  # what the stages open, from the working directory
        from clipscrub.dag import settings_value

        return settings_value(p, key)

    assert usable("download.folder.path") == "../project/conf/../images"
    assert (tmp_path / "elsewhere" / usable("download.folder.path")).resolve() == tmp_path / "project" / "images"
    assert usable("embed.checkpoint") == "../project/conf/rel/embed_checkpoint"
    # -S: typed from the working directory, recorded relative to the file's folder
    assert (tmp_path / "elsewhere" / usable("download.folder.captions")).resolve() == \
        tmp_path / "elsewhere" / "typed" / "caps.csv"
    assert value("download.folder.captions") == "../../elsewhere/typed/caps.csv"
    assert value("download.folder.path") == "../images" and value("embed.checkpoint") == "rel/embed_checkpoint"
    assert usable("filter.remove_ids") == value("filter.remove_ids") == "/abs/remove.txt"
    assert usable("evaluate.truth") == value("evaluate.truth") == "~/truth.csv"
    for key in set(PATH_KEYS) - {"download.folder.path", "download.folder.captions", "filter.remove_ids",
                                 "evaluate.truth"}:
        assert usable(key) == f"../project/conf/rel/{key.replace('.', '_')}", key
        assert value(key) == f"rel/{key.replace('.', '_')}", key
    # dvc.yaml's `-p params.yaml` from the file's own folder: the values exactly as written
    monkeypatch.chdir(conf)
    assert load_params("params.yaml").embed.checkpoint == "rel/embed_checkpoint"


def test_the_params_mean_the_same_however_the_file_is_named(tmp_path, monkeypatch):
    """The same params file named by a relative or an absolute path, or read from another working
    directory: the same params hash, sections (what every stage records in its lineage) and
    files; a -S path typed from elsewhere that names the same file too; and a worker that gets
    the written-out params and the file's folder resolves the same files."""
    import json

    import yaml

    proj = tmp_path / "proj"
    (proj / "review").mkdir(parents=True)
    (proj / "review" / "keep.txt").write_text("")
    (tmp_path / "other").mkdir()
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["filter"]["keep_ids"] = "./review//keep.txt"
    data["evaluate"]["truth"] = str(tmp_path / "truth.csv")
    (proj / "params.yaml").write_text(yaml.safe_dump(data))
    seen = set()
    for cwd, name in [(proj, "params.yaml"), (proj, "./params.yaml"), (tmp_path, "proj/params.yaml"),
                      (tmp_path / "other", "../proj/params.yaml"), (tmp_path / "other", str(proj / "params.yaml"))]:
        monkeypatch.chdir(cwd)
        p = load_params(name)
        assert Path(p.filter.keep_ids).resolve() == proj / "review" / "keep.txt", name
        seen.add((p.hash(), json.dumps([p.section(s) for s in type(p).model_fields], sort_keys=True),
                  json.dumps(p.filter.model_dump(mode="json"), sort_keys=True)))
    assert len(seen) == 1
    p = load_params(str(proj / "params.yaml"))
    assert p.section("filter")["keep_ids"] == "review/keep.txt"  # as the file means it
    assert p.section("evaluate")["truth"] == str(tmp_path / "truth.csv")  # absolute stays absolute
    monkeypatch.chdir(tmp_path / "other")
    typed = load_params("../proj/params.yaml", ["filter.keep_ids=../proj/review/keep.txt"])
    assert typed.hash() == p.hash()
    worker = parse_params(typed.model_dump(mode="json", by_alias=True), base=typed.params_dir)
    assert worker.hash() == p.hash() and Path(worker.filter.keep_ids).resolve() == proj / "review" / "keep.txt"


@pytest.mark.parametrize(("text", "value"), [("1e-9", 1e-9), ("2.5E3", 2500.0), ("-1e-2", -0.01), ("7", 7), ("1e9x", "1e9x")])
def test_numbers_in_yaml_1_2_notation_are_numbers(text, value):
    """`-S threshold.fraction=1e-9` (and the same in a params file) is a float, as DVC reads it."""
    from clipscrub.params import load_yaml

    got = load_yaml(text)
    assert got == value and type(got) is type(value)
    assert parse_params(apply_overrides({"threshold": {"fraction": 0.01}}, ["threshold.fraction=1e-9"])).threshold.fraction == 1e-9


@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf"])
def test_no_param_is_nan_or_infinite(bad):
    with pytest.raises(ParamError, match="threshold.score: Input should be a finite number"):
        parse_params(apply_overrides({"threshold": {"score": None}}, [f"threshold.score={bad}"]))
