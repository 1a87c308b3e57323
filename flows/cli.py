"""``clipscrub <stage>``: a thin command-line front end over the stage functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from clipscrub.errors import ClipscrubError
from clipscrub.params import load_params
from flows.pipeline import STAGES, run_stage

STAGE_HELP = {
    "download": "materialise the dataset as webdataset shards + manifest.parquet",
    "train": "train the demo's tiny victim CLIP (demo only; a no-op record when train.enabled is false)",
    "embed": "image and caption embeddings with an open_clip model",
    "index": "draw reference sets and find each sample's k nearest references (faiss)",
    "score": "k-distance, SLOF, DAO, LID, isolation forest and CLIP score per sample",
    "threshold": "flag samples from one detector's scores",
    "filter": "write the cleaned dataset, removed.parquet and lineage.json",
    "evaluate": "AUROC / PR-AUC / FPR@TPR per detector against known poison (DVC metrics and plots)",
    "report": "one self-contained HTML page: histograms, ROC/PR, top flagged samples, clusters, lineage",
}


# an override worth knowing for each stage, shown in its --help example
STAGE_EXAMPLE = {
    "download": "-S download.synthetic.num_samples=2000",
    "train": "-S train.epochs=5",
    "embed": "-S embed.batch_size=128",
    "index": "-S index.reference.draws=3",
    "score": "-S \"score.detectors=[kdist, dao]\"",
    "threshold": "-S threshold.fraction=0.02",
    "filter": "-S filter.shard_size=5000",
    "evaluate": "-S evaluate.tpr=0.9",
    "report": "-S report.top_n=96",
}


def stage_description(name: str) -> str:
    """A stage's --help text: what it does, what it reads and writes under --root, the params
    sections it depends on, and an example; from the stage graph, so it cannot drift."""
    from flows.pipeline import SPECS, Layout

    lay = Layout(Path("ROOT"))
    spec = SPECS[name]

    def paths(attrs: tuple[str, ...]) -> str:
        return ", ".join(f"{getattr(lay, a).as_posix()}{'' if '.' in getattr(lay, a).name else '/'}" for a in attrs)

    return "\n".join([
        STAGE_HELP[name] + ".",
        "",
        f"reads:   {paths(spec.inputs) or 'your source (download.source)'}",
        f"writes:  {paths(spec.outputs)}",
        f"params:  {', '.join(spec.params)} (sections or keys of the params file)",
        "",
        "example:",
        f"  clipscrub {name} -p params.yaml --root data {STAGE_EXAMPLE[name]}",
        "",
        "A missing input names the stage to run first; a changed input stops with the stage to rerun.",
    ])


def build_parser() -> argparse.ArgumentParser:
    from clipscrub import __version__

    parser = argparse.ArgumentParser(prog="clipscrub", description=__doc__)
    parser.add_argument("--version", action="version", version=f"clipscrub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for name in STAGES:
        sp = sub.add_parser(name, help=STAGE_HELP[name], description=stage_description(name),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("-p", "--params", default="params.yaml", help="params file (default: params.yaml)")
        sp.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a key that exists in the params file (repeatable)")
        sp.add_argument("--root", default="data", help="data directory holding every stage's outputs (default: data)")
    sp = sub.add_parser("run", help="run the whole pipeline as a Prefect flow into OUTDIR (no DVC needed)",
                        description="Run every stage as a cached Prefect flow: a rerun with unchanged params "
                        "completes from cache; a changed section reruns that stage and what follows.")
    sp.add_argument("-p", "--params", default="params.yaml", help="params file (default: params.yaml)")
    sp.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a key that exists in the params file (repeatable)")
    sp.add_argument("-o", "--out", required=True, help="run directory: the same layout as data/ in the DVC pipeline")
    sp.add_argument("--result-storage", default=None,
                    help="where Prefect persists task results: a path or fsspec URL (default: OUTDIR/.prefect/results)")
    sp.add_argument("--cluster", default=None, metavar="local:N|tcp://HOST:PORT",
                    help="run the tasks on a Dask cluster: a LocalCluster of N worker processes, or an existing "
                    "scheduler (every worker must reach OUTDIR, e.g. on a shared filesystem); default: in-process")
    sp = sub.add_parser("diff", help="compare two cleaned versions: params, counts, removed ids, metric deltas",
                        description="A and B: directories (a data root, a run directory, or a cleaned version), "
                        "or git revisions / DVC experiment names of the DVC project at --project.")
    sp.add_argument("a", metavar="A")
    sp.add_argument("b", metavar="B")
    sp.add_argument("--project", default=".", help="DVC project that revisions and experiments belong to (default: .)")
    sp.add_argument("--format", choices=("table", "json"), default="table")
    sp.add_argument("--ids-out", default="clipscrub-diff.parquet",
                    help="parquet of the ids removed in only one version (default: clipscrub-diff.parquet)")
    sp = sub.add_parser("poison", help="red-teaming: write a copy of ROOT/raw with the attacks of poison.attacks applied",
                        description="Apply the attacks listed under poison.attacks to a copy of a downloaded dataset "
                        "(ROOT/raw, any source) and write it to OUTDIR (shards/, manifest.parquet with is_poison and "
                        "attack, lineage.json). Run the pipeline on it with download.source: shards and "
                        "download.shards.path: OUTDIR/shards. Not a pipeline stage.")
    sp.add_argument("-p", "--params", default="params.yaml", help="params file (default: params.yaml)")
    sp.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a key that exists in the params file (repeatable)")
    sp.add_argument("--root", default="data", help="data directory whose raw/ is poisoned (default: data)")
    sp.add_argument("-o", "--out", required=True, metavar="OUTDIR",
                    help="the poisoned copy: a new raw directory (shards/, manifest.parquet)")
    sp = sub.add_parser("show", help="print a run's counts, victim metrics and per-detector figures")
    sp.add_argument("--root", default="data", help="data directory of the run (default: data)")
    return parser


def show_run(root: str) -> str:
    """A compact text summary of a finished run under ``root``."""
    from pathlib import Path

    from flows.pipeline import Layout

    lay = Layout(Path(root))
    lines = []
    if lay.train_metrics.is_file():
        t = json.loads(lay.train_metrics.read_text())
        if t.get("trained"):
            rates = ", ".join(f"{name.split(':', 1)[1]} {v:.3f}" for name, v in (t.get("attack_success_rates") or {}).items())
            lines.append(
                f"victim: zero-shot accuracy {t['zero_shot_accuracy']:.3f}, "
                f"attack success rate {rates or 'n/a (no attack)'} ({t['train_samples']} samples)"
            )
    lineage = lay.clean / "lineage.json"
    if lineage.is_file():
        c = json.loads(lineage.read_text())["counts"]
        lines.append(
            f"cleaned: kept {c['kept']} of {c['input']} input samples; {c['failed']} failed at download, "
            f"{c['removed']} removed by the detectors ({lay.clean})"
        )
    if lay.applied_metrics.is_file():
        from clipscrub.metrics import applied_sentence, read_applied

        lines.append(f"applied: {applied_sentence(read_applied(lay.applied_metrics))}")
    if lay.detection_metrics.is_file():
        m = json.loads(lay.detection_metrics.read_text())
        if m.get("ground_truth"):
            tpr = int(round(m["tpr_target"] * 100))
            lines.append(f"detection of {m['poisoned']} known poisoned samples among {m['samples']}:")
            lines.append(f"  {'detector':<9}{'AUROC':>8}{'PR-AUC':>8}{f'FPR@{tpr}%TPR':>13}{'precision':>11}{'recall':>8}")
            for d, v in sorted(m["detectors"].items(), key=lambda kv: -kv[1]["auroc"]):
                lines.append(
                    f"  {d:<9}{v['auroc']:>8.4f}{v['pr_auc']:>8.4f}{v['fpr_at_tpr']:>13.4f}"
                    f"{v['precision_at_threshold']:>11.3f}{v['recall_at_threshold']:>8.3f}"
                )
            th = m["threshold"]
            lines.append(f"  (precision / recall: the threshold rule '{th['method']}' applied to each detector)")
    if (lay.report / "index.html").is_file():
        lines.append(f"report: {lay.report / 'index.html'} (open it in a browser)")
    if not lines:
        raise ClipscrubError(f"no finished run under {root}", param="--root")
    return "\n".join(lines)


def check_writable_dir(path: str, param: str) -> None:
    """Prove that ``path`` (or its nearest existing parent) takes new files, creating nothing."""
    import os
    import tempfile
    from pathlib import Path

    target = Path(path)
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ClipscrubError(f"{path} is not writable ({existing} does not accept new files)", param=param)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ClipscrubError(f"{path} is not writable: {exc.strerror}", param=param) from None


def check_prefect_server_imports() -> None:
    """Refuse to start Prefect's ephemeral server where it would crash on import.

    img2dataset depends on the ``dataclasses`` backport, whose ``dataclasses.py`` lands in
    site-packages; Prefect starts its temporary server with ``--app-dir <site-packages>``, which
    puts that file ahead of the standard library and the server dies inside pydantic.
    """
    import prefect
    from prefect.settings import Settings

    shadow = Path(prefect.__file__).resolve().parent.parent / "dataclasses.py"
    # a fresh Settings() reads the environment and profile as `clipscrub run` will see them
    if shadow.exists() and not Settings().api.url:
        raise ClipscrubError(
            f"{shadow} (the 'dataclasses' backport img2dataset pulls in) shadows the standard library "
            "in Prefect's temporary server: run `pip uninstall -y dataclasses`, or set PREFECT_API_URL "
            "to a running `prefect server start`"
        )


def run_flow(args: argparse.Namespace) -> int:
    try:
        params = load_params(args.params, args.overrides)
        check_writable_dir(args.out, "--out")
        check_prefect_server_imports()
    except ClipscrubError as exc:
        print(f"clipscrub: error: {exc}", file=sys.stderr)
        return 2
    from flows.clean import clean_dataset, private_prefect, task_runner_for

    try:
        runner = task_runner_for(args.cluster)
        flow = clean_dataset.with_options(task_runner=runner) if runner is not None else clean_dataset
        # analytics off, and a temporary server that outlives the run's events and logs
        with private_prefect():
            result = flow(
                params=params.model_dump(mode="json", by_alias=True),
                out_dir=str(Path(args.out).resolve()),
                result_storage=args.result_storage,
                cluster=args.cluster,
            )
    except ClipscrubError as exc:
        print(f"clipscrub: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"run": str(Path(args.out).resolve()), "states": result["states"],
                      **({"pieces": result["pieces"]} if "pieces" in result else {})}, sort_keys=True))
    try:
        print(show_run(args.out))
    except ClipscrubError:
        pass
    return 0


def run_diff(args: argparse.Namespace) -> int:
    from clipscrub.diff import diff_versions, differing_ids, format_table, load_version
    from clipscrub.io import atomic_file

    try:
        a = load_version(args.a, project=args.project, label="A")
        b = load_version(args.b, project=args.project, label="B")
        result = diff_versions(a, b)
        ids = differing_ids(a, b)
        with atomic_file(args.ids_out, param="--ids-out") as tmp:
            ids.write_parquet(tmp)
    except ClipscrubError as exc:
        print(f"clipscrub: error: {exc}", file=sys.stderr)
        return 2
    result["ids_out"] = str(args.ids_out)
    print(json.dumps(result, indent=2, sort_keys=True) if args.format == "json" else
          format_table(result) + f"\n\n{ids.height} differing ids written to {args.ids_out}")
    return 0


def run_poison(args: argparse.Namespace) -> int:
    from flows.pipeline import Layout
    from stages.poison import poison_dataset

    try:
        params = load_params(args.params, args.overrides)
        summary = poison_dataset(raw_dir=Layout(Path(args.root)).raw, out_dir=args.out, attacks=params.poison.attacks,
                                 seed=params.base.seed, shard_size=params.download.shard_size)
    except ClipscrubError as exc:
        print(f"clipscrub: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"command": "poison", "out": str(args.out), **summary}, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "diff":
        return run_diff(args)
    if args.command == "show":
        try:
            print(show_run(args.root))
        except ClipscrubError as exc:
            print(f"clipscrub: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "run":
        return run_flow(args)
    if args.command == "poison":
        return run_poison(args)
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
