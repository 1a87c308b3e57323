"""Embed throughput against its floor: what the stage adds to decoding, preprocessing and the model.

In one process, on the demo's synthetic dataset (``download`` with params.yaml's defaults) and the
demo's victim architecture (``train.architecture``, random weights: speed does not depend on them):

    a. read + decode:       the shards' image bytes (tarfile) decoded to RGB by PIL
    b. + preprocess:        the model's open_clip transform, stacked into batches of embed.batch_size
    c. floor:               b + tokenize the captions + image and text towers, the same batches
    d. stage:               ``stages.embed.embed_dataset`` end to end (model load, shards, parts,
                            assembly, validation, lineage)

and the same for open_clip's ViT-B-32 at 224 px (random weights, no hub) on a smaller dataset.
c and d alternate, so a machine shared with other work slows both alike; each figure is the median
of ``--repeats`` runs after one warm-up. The ViT-B-32 stage runs include building its random
weights (a few seconds; a real checkpoint's load takes its place). Target (issue 15): d >= 90% of c.

    python benchmarks/embed_floor.py          # writes benchmarks/results/embed_floor.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

CACHE = REPO / "benchmarks" / ".cache" / "embed_floor"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def dataset(params, root: Path) -> Path:
    """``root/raw``: the synthetic download of ``params``, made once and reused."""
    from clipscrub.flows.pipeline import run_stage

    raw = root / "raw"
    if not (raw / "manifest.parquet").is_file():
        run_stage("download", params, root)
    return raw


def victim(params, root: Path) -> Path:
    """``root/model``: the train stage's output layout (checkpoint.pt + model_config.json) for the
    demo's architecture with seeded random weights, made once and reused."""
    import open_clip

    from clipscrub.io import write_json
    from clipscrub.model import register_model_config, tiny_model_config

    model_dir = root / "model"
    if not (model_dir / "checkpoint.pt").is_file():
        config = tiny_model_config(params.train.architecture)
        register_model_config(params.train.model_name, config)
        torch.manual_seed(params.base.seed)
        model = open_clip.create_model(params.train.model_name, pretrained=None)
        model_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": 0, "name": params.train.model_name, "state_dict": model.state_dict()}, model_dir / "checkpoint.pt")
        write_json(model_dir / "model_config.json", config)
    return model_dir


def read_samples(raw: Path):
    """(image bytes, caption) of every sample, shard by shard, with nothing but tarfile."""
    for shard in sorted((raw / "shards").glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.isfile():
                    key, _, ext = m.name.partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for fields in members.values():
            ext = next((e for e in IMAGE_EXTS if e in fields), None)
            if ext is not None and "txt" in fields:
                yield fields[ext], fields["txt"].decode("utf-8")


def batches(raw: Path, batch_size: int, preprocess=None):
    """Decoded (and, with ``preprocess``, transformed and stacked) batches with their captions."""
    images, captions = [], []
    for data, caption in read_samples(raw):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        images.append(preprocess(img) if preprocess else img)
        captions.append(caption)
        if len(images) == batch_size:
            yield (torch.stack(images) if preprocess else images), captions
            images, captions = [], []
    if images:
        yield (torch.stack(images) if preprocess else images), captions


def floor(raw: Path, loaded, batch_size: int, stage: str) -> int:
    """Run stage ``decode``, ``preprocess`` or ``forward`` of the bare loop; return the samples seen."""
    n = 0
    with torch.no_grad():
        for imgs, caps in batches(raw, batch_size, loaded.preprocess if stage != "decode" else None):
            if stage == "forward":
                loaded.model.encode_image(imgs.to(loaded.device), normalize=False).float().cpu().numpy()
                loaded.model.encode_text(loaded.tokenizer(caps).to(loaded.device), normalize=False).float().cpu().numpy()
            n += len(caps)
    return n


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(name: str, *, raw: Path, loaded, stage_fns: dict, batch_size: int, repeats: int, samples: int) -> dict:
    """a, b once per repeat; c and each stage run (``stage_fns``: name -> run) back to back, in an
    order that rotates each repeat; medians in images/s."""
    runs = {"floor": lambda: floor(raw, loaded, batch_size, "forward"), **stage_fns}
    times: dict[str, list[float]] = {"decode": [], "preprocess": [], **{k: [] for k in runs}}
    # warm-up, one stage run: page cache, allocator, lazy imports, the forward's kernel selection
    next(iter(stage_fns.values()))()
    names = list(runs)
    for r in range(repeats):
        times["decode"].append(timed(lambda: floor(raw, loaded, batch_size, "decode")))
        times["preprocess"].append(timed(lambda: floor(raw, loaded, batch_size, "preprocess")))
        for what in names[r % len(names):] + names[:r % len(names)]:  # a drift in load favours none
            times[what].append(timed(runs[what]))
        print(f"{name} repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
              file=sys.stderr)
    median = {k: statistics.median(v) for k, v in times.items()}
    # stage/floor per repeat (they ran back to back), then its median: steadier than a ratio of medians
    ratios = {k: [f / s for f, s in zip(times["floor"], times[k])] for k in stage_fns}
    return {
        "samples": samples,
        "batch_size": batch_size,
        "images_per_s": {k: round(samples / v, 1) for k, v in median.items()},
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "stage_over_floor": {k: round(statistics.median(v), 3) for k, v in ratios.items()},
        "stage_over_floor_per_repeat": {k: [round(x, 3) for x in v] for k, v in ratios.items()},
        # the share of the floor's time that reading + decoding, and that plus preprocessing, take
        "decode_share_of_floor": round(median["decode"] / median["floor"], 3),
        "preprocess_share_of_floor": round(median["preprocess"] / median["floor"], 3),
    }


def stage_runner(*, raw: Path, settings, base, model_dir: Path | None, model_name: str | None, workers: int):
    """``embed_dataset`` into a fresh directory, with ``workers`` loader threads."""
    import clipscrub.stages.embed as embed

    threaded = settings.model_copy(update={"loader_workers": workers})

    def run() -> None:
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            embed.embed_dataset(raw_dir=raw, out_dir=Path(tmp) / "embeddings", settings=threaded, base=base,
                                model_dir=model_dir, model_name=model_name)
    return run


def main() -> None:
    from clipscrub.model import load_model
    from clipscrub.params import load_params

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vit-samples", type=int, default=512, help="dataset size for ViT-B-32 (0: skip it)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader threads of the stage runs")
    ap.add_argument("--vit-workers", type=int, nargs="+", default=[0, 1], help="loader threads, ViT-B-32 runs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="params.yaml override, as the CLI's --set (e.g. embed.batch_size=64)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "embed_floor.json"))
    args = ap.parse_args()

    params = load_params(REPO / "params.yaml", ["base.device=cpu", *args.set])
    CACHE.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
        "torch": {"version": torch.__version__, "threads": torch.get_num_threads()},
        "embed": params.embed.model_dump(mode="json", by_alias=True),
        "runs": {},
    }

    # the demo: its dataset and victim architecture, embedded as the pipeline embeds it
    demo_root = CACHE / f"demo-{params.download.synthetic.num_samples}-{params.download.synthetic.image_size}px"
    raw = dataset(params, demo_root)
    model_dir = victim(params, demo_root)
    loaded = load_model(model_name=params.train.model_name, pretrained=None, checkpoint=str(model_dir / "checkpoint.pt"),
                        model_config=str(model_dir / "model_config.json"), device="cpu")
    samples = floor(raw, loaded, params.embed.batch_size, "decode")
    runs = {f"stage_workers_{w}": stage_runner(raw=raw, settings=params.embed, base=params.base, model_dir=model_dir,
                                               model_name=params.train.model_name, workers=w) for w in args.workers}
    arch = params.train.architecture
    result["runs"]["demo"] = {
        "model": f"{params.train.model_name} (ViT {arch.vision_layers} layers x {arch.vision_width}, "
                 f"text {arch.text_layers} x {arch.text_width}, random weights)",
        "image_px": params.download.synthetic.image_size, "model_input_px": arch.image_size,
        **measure("demo", raw=raw, loaded=loaded, stage_fns=runs, batch_size=params.embed.batch_size,
                  repeats=args.repeats, samples=samples),
    }

    if args.vit_samples:
        vit_params = load_params(REPO / "params.yaml", ["base.device=cpu", *args.set,
                                                       f"download.synthetic.num_samples={args.vit_samples}"])
        vit_root = CACHE / f"vit-{args.vit_samples}-{vit_params.download.synthetic.image_size}px"
        vit_raw = dataset(vit_params, vit_root)
        settings = vit_params.embed.model_copy(update={"model_name": "ViT-B-32", "pretrained": None, "checkpoint": None,
                                                       "model_config_path": None})
        vit = load_model(model_name="ViT-B-32", pretrained=None, checkpoint=None, model_config=None, device="cpu")
        vit_samples = floor(vit_raw, vit, settings.batch_size, "decode")
        runs = {f"stage_workers_{w}": stage_runner(raw=vit_raw, settings=settings, base=vit_params.base, model_dir=None,
                                                   model_name=None, workers=w) for w in args.vit_workers}
        result["runs"]["vit_b_32"] = {
            "model": "ViT-B-32 (open_clip, random weights)",
            "image_px": vit_params.download.synthetic.image_size, "model_input_px": 224,
            **measure("ViT-B-32", raw=vit_raw, loaded=vit, stage_fns=runs, batch_size=settings.batch_size,
                      repeats=args.repeats, samples=vit_samples),
        }

    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: {m: v[m] for m in ("images_per_s", "stage_over_floor")} for k, v in result["runs"].items()}))


if __name__ == "__main__":
    main()
