"""``clipscrub <stage>``: a thin command-line front end over the stage functions."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from clipscrub.errors import ClipscrubError
from clipscrub.params import load_params
from clipscrub.pipeline import STAGES, run_stage

STAGE_HELP = {
    "download": "materialise the dataset as webdataset shards + manifest.parquet",
    "train": "train the demo's tiny victim CLIP (demo only; a no-op record when train.enabled is false)",
    "embed": "image and caption embeddings with an open_clip model",
    "index": "draw reference sets and find each sample's k nearest references (faiss)",
    "score": "k-distance, SLOF, DAO, LID, isolation forest and CLIP score per sample",
    "threshold": "flag samples from one detector's scores",
    "filter": "write the cleaned dataset, removed.parquet and lineage.json",
    "evaluate": "AUROC / PR-AUC / FPR@TPR per detector against known poison (DVC metrics and plots)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipscrub", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for name in STAGES:
        sp = sub.add_parser(name, help=STAGE_HELP[name], description=STAGE_HELP[name])
        sp.add_argument("-p", "--params", default="params.yaml", help="params file (default: params.yaml)")
        sp.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a key that exists in the params file (repeatable)")
        sp.add_argument("--root", default="data", help="data directory holding every stage's outputs (default: data)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params, args.overrides)
        summary = run_stage(args.command, params, args.root)
    except ClipscrubError as exc:
        print(f"clipscrub: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"stage": args.command, **summary}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
