"""Serve ``clean-dataset`` as a Prefect deployment whose parameters are a params file's values.

    python -m clipscrub.flows.serve -p params.yaml -o runs/nightly --name nightly [--cron "0 3 * * *"]

Runs are then started from the Prefect UI (or `prefect deployment run clean-dataset/nightly`),
with any parameter editable there. Needs PREFECT_API_URL pointing at a running server.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipscrub.errors import ClipscrubError
from clipscrub.params import load_params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clipscrub.flows.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("-p", "--params", default="params.yaml")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("-o", "--out", required=True, help="run directory each deployment run writes into")
    ap.add_argument("--name", default="clipscrub", help="deployment name")
    ap.add_argument("--cron", default=None, help="optional cron schedule")
    ap.add_argument("--result-storage", default=None, help="path or fsspec URL for task results")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params, args.overrides)
    except ClipscrubError as exc:
        print(f"clipscrub: error: {exc}", file=sys.stderr)
        return 2
    from clipscrub.flows.clean import clean_dataset, private_prefect

    with private_prefect():  # no analytics from this client either
        clean_dataset.serve(
            name=args.name,
            parameters={
                "params": params.model_dump(mode="json", by_alias=True),
                "out_dir": str(Path(args.out).resolve()),
                "result_storage": args.result_storage,
                "params_dir": params.params_dir,
            },
            cron=args.cron,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
