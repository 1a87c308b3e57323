"""``clipscrub <stage>``: a thin command-line front end over the stage functions."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from clipscrub.errors import ClipscrubError
from clipscrub.io import check_writable_dir
from clipscrub.params import load_params, packaged_model_names
from clipscrub.flows.pipeline import STAGES, run_stage


def stage_description(name: str) -> str:
    """A stage's --help text: what it does, what it reads and writes under --root, the params
    sections it depends on, and an example; from the stage graph, so it cannot drift."""
    from clipscrub.flows.pipeline import Layout

    lay = Layout(Path("ROOT"))
    spec = STAGES[name]

    def paths(attrs: tuple[str, ...]) -> str:
        return ", ".join(f"{getattr(lay, a).as_posix()}{'' if '.' in getattr(lay, a).name else '/'}" for a in attrs)

    return "\n".join([
        spec.help + ".",
        "",
        f"reads:   {paths(spec.inputs) or 'your source (download.source)'}",
        f"writes:  {paths(spec.outputs)}",
        f"params:  {', '.join(spec.params)} (sections or keys of the params file)",
        *([f"files:   those {', '.join(spec.files)} name (dependencies too)"] if spec.files else []),
        "",
        "example:",
        f"  clipscrub {name} -p params.yaml --root data {spec.example}",
        "",
        "A missing input names the stage to run first; a changed input stops with the stage to rerun.",
    ])


def _n(x: Any) -> str:
    """A count with thousands separators (``2,000``); anything else as it is."""
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else str(x)


def _plural(count: int, word: str) -> str:
    return f"{_n(count)} {word}{'' if count == 1 else 's'}"


def _f3(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "n/a"


def _download_words(s: dict[str, Any]) -> list[str]:
    line = f"{_plural(s['samples'], 'sample')} from source {s.get('source', '?')}: {_n(s['ok'])} ok, {_n(s['failed'])} failed"
    if s.get("poisoned") is not None:
        line += f", {_n(s['poisoned'])} known poisoned"
    lines = [line + f", {_plural(s.get('shards', 0), 'shard')}"]
    if s.get("errors"):
        lines.append("failures: " + ", ".join(f"{reason} x{_n(c)}" for reason, c in s["errors"].items()))
    if s.get("warning"):
        lines.append(f"warning: {s['warning']}")
    return lines


def _train_words(s: dict[str, Any]) -> list[str]:
    if not s.get("trained"):
        return ["skipped (train.enabled is false): embed uses the model its own section names"]
    rates = ", ".join(f"{name.split(':', 1)[-1]} {_f3(v)}" for name, v in (s.get("attack_success_rates") or {}).items())
    secs = f" in {s['train_seconds']} s" if "train_seconds" in s else ""
    return [f"victim CLIP trained on {_plural(s['train_samples'], 'sample')}, {_plural(s['steps'], 'step')}{secs}, "
            f"final loss {_f3(s.get('final_loss'))}",
            f"zero-shot accuracy {_f3(s.get('zero_shot_accuracy'))}; attack success rate {rates or 'n/a (no attack)'}"]


def _embed_words(s: dict[str, Any]) -> list[str]:
    a = s.get("alignment")
    extra = ([f"image-caption alignment: a sample's own caption outranks {a['percentile']:.1%} of the others "
              f"(chance 50%, {_n(a['samples'])} samples)"] if a else []) + \
        ([f"warning: {s['warning']}"] if s.get("warning") else [])
    if s.get("device") == "none":
        return [f"{_plural(s['samples'], 'sample')}, dimension {s['dim']}: precomputed embeddings copied", *extra]
    resumed = s.get("shards_resumed") or 0
    line = f"{_plural(s['samples'], 'sample')}, dimension {s['dim']}, on {s.get('device', '?')}"
    if "shards" in s:
        line += f", {_plural(s['shards'], 'shard')}" + (f" ({_n(resumed)} resumed from an interrupted run)" if resumed else "")
    return [line] + ([str(s["model"])] if s.get("model") else []) + extra


def _index_words(s: dict[str, Any]) -> list[str]:
    sets = s.get("reference_sets") or []
    capped = s.get("sizes_capped") or []
    return [f"{_plural(s['samples'], 'sample')}, {_plural(len(sets), 'reference set')} ({', '.join(sets)}), "
            f"{_plural(s['draws'], 'draw')} in all ({_n(s.get('reference_entries'))} entries), k={s['k']}, "
            f"{'/'.join(s.get('search') or ['?'])} search, recall@k {_f3(s.get('recall_at_k'))}"] + (
        [f"index.reference.sizes {', '.join(map(str, capped))} exceed the {_n(s['samples'])} samples: capped to "
         f"all of them (m{s['samples']}, one draw)"] if capped else [])


def _score_words(s: dict[str, Any]) -> list[str]:
    sets = s.get("reference_sets") or []
    line = (f"{_plural(s['samples'], 'sample')} scored by {', '.join(s['detectors'])} against "
            f"{'reference set' if len(sets) == 1 else 'reference sets'} {', '.join(sets)}")
    if s.get("fusion"):
        line += f", fused by {s['fusion']}"
    bad = {d: c for d, c in (s.get("non_finite") or {}).items() if c}
    lines = [line]
    if s.get("copies") is not None:
        lines.append(f"{_plural(s['copies'], 'sample')} in groups of copies, judged by caption")
    if bad:
        lines.append("non-finite scores (flagged by threshold): " + ", ".join(f"{d} {_n(c)}" for d, c in bad.items()))
    return lines


def _threshold_words(s: dict[str, Any]) -> list[str]:
    cut = f": {s['detector']} score {s.get('direction', 'beyond')} {s['cut']:.4g}" if isinstance(s.get("cut"), (int, float)) else ""
    line = f"flagged {_n(s['flagged'])} of {_plural(s['samples'], 'sample')} by {s['detector']}, {s['method']}{cut}"
    lines = [line]
    if s.get("non_finite"):
        lines.append(f"{_n(s['non_finite'])} of them for a non-finite score")
    if s.get("warning"):
        lines.append(f"warning: {s['warning']}")
    return lines


def _filter_words(s: dict[str, Any]) -> list[str]:
    from clipscrub.metrics import removal_words

    return [f"kept {_n(s['kept'])} of {_plural(s['input'], 'input sample')}: {_n(s['removed'])} removed, "
            f"{_n(s['failed'])} failed at download",
            f"removed: {removal_words(s)}"]


def _evaluate_words(s: dict[str, Any]) -> list[str]:
    from clipscrub.metrics import applied_sentence

    if not s.get("ground_truth"):
        lines = [f"{_plural(s['samples'], 'sample')}, no ground truth (no is_poison in the manifest, no evaluate.truth): "
                 "no detection metrics"]
    else:
        per = s.get("detectors") or {}
        best = max(per, key=lambda d: per[d]["auroc"], default=None)
        th = (s.get("threshold") or {}).get("detector")
        line = f"{_n(s['poisoned'])} known poisoned among {_plural(s['samples'], 'sample')}"
        if best:
            line += f"; best AUROC {best} {_f3(per[best]['auroc'])}"
        if th in per and th != best:
            line += f", threshold detector {th} {_f3(per[th]['auroc'])}"
        lines = [line]
    if s.get("applied"):
        lines.append(f"applied: {applied_sentence(s['applied'])}")
    return lines


def _report_words(s: dict[str, Any]) -> list[str]:
    lines = [f"{_n(s['flagged'])} flagged, the top {_n(s['gallery'])} shown; "
             f"{_plural(s['clusters'], 'cluster')} of flagged samples sharing a caption or an image "
             f"({_n(s['clustered_samples'])} samples)"]
    words = s.get("caption_words") or []
    if words:
        shown = ", ".join(f"'{w['word']}' ({_n(w['flagged'])} flagged, in {_n(w['captions'])} captions in all)"
                          for w in words[:3])
        lines.append(f"caption words over-represented among the flagged: {shown}"
                     + (f" and {_n(len(words) - 3)} more" if len(words) > 3 else ""))
    if s.get("limit"):  # report.flagged_limit left flagged samples off the gallery pages and clusters
        lines.append(s["limit"])
    return lines


def _poison_words(s: dict[str, Any]) -> list[str]:
    attacks = s.get("attacks") or {}
    listed = ", ".join(f"{name} {_n(c)}" for name, c in attacks.items())
    failed = f", {_n(s['failed'])} failed at download left as they are" if s.get("failed") else ""
    return [f"{_n(s['poisoned'])} of {_plural(s['samples'], 'sample')} now poisoned, {_n(sum(attacks.values()))} by "
            f"these attacks ({listed or 'none'}){failed}, {_plural(s['shards'], 'shard')}"]


def _save_references_words(s: dict[str, Any]) -> list[str]:
    lines = [f"{_plural(len(s['sets']), 'reference set')} ({', '.join(s['sets'])}) of {_plural(s['samples'], 'sample')}, "
             f"{_n(s['draws'])} draws, {_n(s['entries'])} entries"]
    t = s.get("threshold")
    if t and t.get("cut") is not None:  # what an increment sets to cut as this version did
        lines.append(f"this version's cut: -S threshold.method=score -S threshold.score={t['cut']!r} "
                     f"(threshold.detector {t['detector']}, found by method {t['method']})")
    return lines


SUMMARY_WORDS = {
    "download": _download_words, "train": _train_words, "embed": _embed_words, "index": _index_words,
    "score": _score_words, "threshold": _threshold_words, "filter": _filter_words, "evaluate": _evaluate_words,
    "report": _report_words, "poison": _poison_words, "save-references": _save_references_words,
}


def summary_text(stage: str, summary: dict[str, Any], *, wrote: list[Path]) -> str:
    """A stage's summary as a few lines for a person: ``<stage>: ...`` then indented details and
    the paths it wrote. A key a formatter does not know falls back to ``key=value``."""
    try:
        lines = SUMMARY_WORDS[stage](summary)
    except (KeyError, TypeError, ValueError, AttributeError):
        # a summary of another shape (a stage changed since): all of it, plainly, not a traceback
        lines = [", ".join(f"{k}={v}" for k, v in sorted(summary.items()))]
    lines.append("wrote " + ", ".join(p.as_posix() + ("" if p.suffix else "/") for p in wrote)
                 + (" (open it in a browser)" if stage == "report" else ""))
    return "\n".join([f"{stage}: {lines[0]}"] + [f"  {line}" for line in lines[1:]])


def stage_outputs(stage: str, root: str) -> list[Path]:
    """What a stage wrote under ``root``; the report's page itself, the one file to open."""
    from clipscrub.flows.pipeline import Layout

    lay = Layout(Path(root))
    if stage == "report":
        return [lay.report / "index.html"]
    return [getattr(lay, a) for a in STAGES[stage].outputs]


def run_text(result: dict[str, Any], out: str) -> str:
    """``clipscrub run``'s lines: the stages' states, then ``show``'s summary of the run."""
    states = result["states"]
    cached = [s for s, st in states.items() if st == "Cached"]
    line = f"run: {_plural(len(states), 'stage')} completed into {Path(out).resolve()}"
    line += f" ({', '.join(cached)} from cache)" if 0 < len(cached) < len(states) else \
        (" (all from cache: nothing changed)" if cached else "")
    reused = [s for s, st in states.items() if st == "Reused"]
    if reused:
        line += f" ({', '.join(reused)} reused from another run: linked, not recomputed)"
    lines = [line]
    if result.get("pieces"):
        lines.append("  cluster pieces: " + ", ".join(f"{s} {_n(c)}" for s, c in result["pieces"].items()))
    with contextlib.suppress(ClipscrubError):
        lines.append(show_run(out))
    return "\n".join(lines)


def _fill(text: str) -> str:
    """A description wrapped for RawDescriptionHelpFormatter (kept as given, for the examples)."""
    import textwrap

    return textwrap.fill(text, width=100)


JSON_HELP = "print the summary as one JSON object on stdout (for scripts) instead of lines for a person"


def build_parser() -> argparse.ArgumentParser:
    from clipscrub import __version__

    parser = argparse.ArgumentParser(prog="clipscrub", description=__doc__)
    parser.add_argument("--version", action="version", version=f"clipscrub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for name in STAGES:
        sp = sub.add_parser(name, help=STAGES[name].help, description=stage_description(name),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("-p", "--params", default="params.yaml", help="params file (default: params.yaml)")
        sp.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a key that exists in the params file (repeatable)")
        sp.add_argument("--root", default="data", help="data directory holding every stage's outputs (default: data)")
        sp.add_argument("--json", action="store_true", help=JSON_HELP)
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
    sp.add_argument("--reuse", default=None, metavar="RUNDIR",
                    help="another `clipscrub run` directory: its stages whose code, params and inputs are unchanged "
                    "are linked in, not run again (a second version from other threshold or filter params shares "
                    "the first one's embeddings, index and scores); compare the two with clipscrub diff")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
    sp = sub.add_parser("diff", help="compare two cleaned versions: params, counts, removed ids, metric deltas",
                        description=_fill("Compare two cleaned versions: the params that differ, the counts, the ids "
                                          "removed in only one of them, and each detector's metric deltas."),
                        epilog="examples:\n  clipscrub diff data run            two directories\n"
                        "  clipscrub diff HEAD~1 HEAD         two git revisions of the DVC project in .\n"
                        "  clipscrub diff HEAD exp-1a2b3 --format json   a commit and a `dvc exp run` experiment",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    version_help = ("a directory (a data root such as data/, a `clipscrub run` OUTDIR, or a cleaned version "
                    "such as data/clean/), or a git revision or DVC experiment name of the project at --project")
    sp.add_argument("a", metavar="A", help=f"the first version: {version_help}")
    sp.add_argument("b", metavar="B", help="the second version, the same kinds as A")
    sp.add_argument("--project", default=".", help="DVC project that revisions and experiments belong to (default: .)")
    sp.add_argument("--format", choices=("table", "json"), default="table",
                    help="table: lines for a person (default); json: one JSON object")
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
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
    sp = sub.add_parser("save-references", help="keep a scored version's reference sets, to score shards added later",
                        description="Write a bundle of the reference sets ROOT's index drew, with their embeddings, "
                        "their own neighbours and the fusion scales ROOT's score took, into OUTDIR. A run with "
                        "index.reference.mode: saved and index.reference.path: OUTDIR scores its samples against "
                        "them (README: Adding shards). Not a pipeline stage.",
                        epilog="examples:\n  clipscrub save-references -o refs/v1               the DVC pipeline's data/\n"
                        "  clipscrub save-references --root run -o refs/v1    a `clipscrub run -o run` directory\n"
                        "  clipscrub run -S download.shards.path=new/ -S index.reference.mode=saved \\\n"
                        "      -S index.reference.path=refs/v1 -o run-new     the added shards, scored against them",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("--root", default="data", help="data directory of the scored version (default: data)")
    sp.add_argument("-o", "--out", required=True, metavar="OUTDIR", help="the bundle's folder (replaced)")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
    sp = sub.add_parser("show", help="print a run's counts, victim metrics and per-detector figures",
                        description=_fill(
                            "Print what a finished run found, from the files its stages wrote under ROOT: the "
                            "victim's metrics (metrics/train.json), the cleaned counts (clean/lineage.json), the "
                            "applied threshold (metrics/applied.json), each detector's AUROC / PR-AUC / FPR / "
                            "precision / recall (metrics/detection.json) and the report's path. Runs nothing."),
                        epilog="examples:\n  clipscrub show                 the DVC pipeline's data/\n"
                        "  clipscrub show --root run      a `clipscrub run -o run` directory",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("--root", default="data",
                    help="data directory of the run: a data root or a `clipscrub run` OUTDIR (default: data)")
    add_init_parser(sub)
    sp = sub.add_parser("dvc-yaml", help="write dvc.yaml for a params file: every stage, with the files its params name",
                        description=_fill(
                            "Write the DVC pipeline for a params file (dvc.yaml beside it): one stage per stage "
                            "that runs for these params, each `clipscrub <stage>` with its upstream outputs, the "
                            "files its params name (source data, review lists, checkpoint, truth) and its code as "
                            "dependencies. Run it again after changing a path in the params: a stage run by DVC "
                            "stops when dvc.yaml lacks a file its params name."),
                        epilog="examples:\n  clipscrub dvc-yaml                  dvc.yaml for params.yaml, here\n"
                        "  clipscrub dvc-yaml --check          exit 1 if dvc.yaml is not what it would write",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("-p", "--params", default="params.yaml", help="params file (default: params.yaml)")
    sp.add_argument("--root", default="data", help="data directory, relative to the project (default: data)")
    sp.add_argument("-o", "--out", default=None, help="the file to write (default: dvc.yaml beside the params file)")
    sp.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file differs")
    sp = sub.add_parser("code", help="write the installed clipscrub's code version per stage (dvc.yaml's clipscrub-code stage)",
                        description="Write OUT/<stage>.txt: the code version of each stage (clipscrub's version and a "
                        "hash of the modules the stage imports). dvc.yaml's stages depend on these files, so "
                        "upgrading clipscrub reruns the stages whose code changed.")
    sp.add_argument("--out", default=".clipscrub/code", help="folder to write (default: .clipscrub/code)")
    return parser


def show_run(root: str) -> str:
    """A compact text summary of a finished run under ``root``."""
    from pathlib import Path

    from clipscrub.flows.pipeline import Layout

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
    from clipscrub.metrics import applied_sentence, read_applied, removal_words

    lineage = lay.clean / "lineage.json"
    counts = json.loads(lineage.read_text())["counts"] if lineage.is_file() else None
    if counts:
        lines.append(
            f"cleaned: kept {counts['kept']} of {counts['input']} input samples; {counts['failed']} failed at "
            f"download; {counts['removed']} removed: {removal_words(counts)} ({lay.clean})"
        )
    applied = read_applied(lay.applied_metrics)
    if applied:
        lines.append(f"applied: {applied_sentence(applied)}")
        if counts and (stale := applied_mismatch(applied, counts)):
            lines.append(f"warning: {lay.applied_metrics} does not describe {lay.clean} ({stale}): they come from "
                         "different runs; rerun evaluate (clipscrub evaluate, or dvc repro)")
    for stage, folder in (("download", lay.raw), ("embed", lay.embeddings)):
        if (warning := stage_warning(folder, stage)) is not None:
            lines.append(f"warning ({stage}): {warning}")
    if (warning := stage_warning(lay.flags, "threshold")) is not None:
        lines.append(f"warning: {warning}")
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


def applied_mismatch(applied: dict[str, Any], counts: dict[str, Any]) -> str | None:
    """Where the evaluate stage's applied block and the cleaned version's counts disagree (one
    was rerun without the other), the first count that differs, in words; else None."""
    for key in ("removed", "flagged", "kept_by_review", "removed_by_review"):
        mine, theirs = applied.get(key), counts.get(key, 0 if key != "flagged" else counts.get("removed"))
        if mine is not None and theirs is not None and mine != theirs:
            return f"{key.replace('_', ' ')} {mine} there, {theirs} in the cleaned version"
    return None


def stage_warning(folder: Path, stage: str) -> str | None:
    """What ``stage`` warned of in its output ``folder`` (its lineage's summary), if it did:
    download, that most samples failed; embed, that the model does not look trained on the data;
    threshold, that the rule flags nothing or more than half."""
    path = Path(folder) / "lineage.json"
    if not path.is_file():
        return None
    with contextlib.suppress(ValueError, OSError, KeyError, TypeError, AttributeError):
        return json.loads(path.read_text())["stages"][stage]["summary"].get("warning")
    return None


INIT_TEMPLATE = Path(__file__).with_name("init_template.yaml")
# the review lists clipscrub init writes (empty) beside the params file, so that dvc.yaml lists them from the start
REVIEW_LISTS = {"keep_ids": "review/keep_ids.txt", "remove_ids": "review/remove_ids.txt"}
REVIEW_HEADER = {
    "keep_ids": "# Samples to keep although a detector flagged them, one per line: a key, file name, url or id,\n"
                "# as the report's cards show them (its review-keep.txt lists every flagged sample). Edit, then\n"
                "# dvc repro: filter onward reruns.\n",
    "remove_ids": "# Samples to remove although no detector flagged them, one per line: a key, file name, url or id\n"
                  "# (the report's review-remove.txt lists those just under the cut). Edit, then dvc repro: filter\n"
                  "# onward reruns.\n",
}
INIT_SOURCES = ("shards", "urls", "folder", "embeddings")


def add_init_parser(sub: Any) -> None:
    sp = sub.add_parser(
        "init", help="write a commented params file for your own data (source and model), checked as it is written",
        description=_fill(
            "Write a params file for your own data: every key of params.yaml with its comment, train.enabled "
            "false, the source you name and the model that embeds it. The file is read back with clipscrub's "
            "own params loader before it is put in place. Paths you give (relative to the working directory) "
            "are written relative to the new file's folder, the way it is read."),
        epilog="examples:\n"
        "  clipscrub init --source shards --path /data/shards --model ViT-B-32 --pretrained laion2b_s34b_b79k\n"
        "  clipscrub init --source urls --path urls.parquet\n"
        "  clipscrub init --source folder --path images --captions captions.csv\n"
        "  clipscrub init --source embeddings --path clip-retrieval-out --model ViT-L-14 --pretrained openai\n"
        "  clipscrub init --source shards --path shards --model ViT-B-32 --checkpoint weights/open_clip_model.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("--source", required=True, choices=INIT_SOURCES,
                    help="shards: webdataset .tar files read in place; urls: a url + caption table fetched with "
                    "img2dataset; folder: images plus a captions file; embeddings: clip-retrieval output")
    sp.add_argument("--path", required=True,
                    help="the source: a .tar, a folder of .tar or a brace pattern (shards); a .parquet/.csv/.tsv "
                    "(urls); a folder of images (folder); clip-retrieval's output folder (embeddings)")
    sp.add_argument("--captions", default=None, help="folder only: .csv/.tsv/.jsonl mapping file names to captions")
    sp.add_argument("--model", default="ViT-B-32", help="open_clip model name (default: ViT-B-32)")
    sp.add_argument("--pretrained", default=None,
                    help="open_clip pretrained tag, fetched from the hub (default: laion2b_s34b_b79k for ViT-B-32 "
                    "without --checkpoint)")
    sp.add_argument("--checkpoint", default=None, help="local weights file instead of a hub download (offline)")
    sp.add_argument("--model-config", default=None, help="open_clip model config JSON, for a model open_clip lacks")
    sp.add_argument("--name", default=None, help="dataset name recorded in lineage.json (default: the source's name)")
    sp.add_argument("-o", "--out", default="params.yaml", help="the params file to write (default: params.yaml)")
    sp.add_argument("--force", action="store_true", help="overwrite an existing file")


def _yaml_value(value: str | None) -> str:
    """A YAML scalar for the template: null, or the string double-quoted (JSON is YAML)."""
    return "null" if value is None else json.dumps(value)


def _relative_to(path: str | None, folder: Path) -> str | None:
    """``path`` (relative to the working directory, as typed) as the params file at ``folder`` reads
    it: relative to that folder. Absolute and ``~`` paths stay as given."""
    import os

    if path is None or Path(path).expanduser().is_absolute() or path.startswith("~"):
        return path
    return Path(os.path.relpath(Path(path).absolute(), folder.absolute())).as_posix()


def init_params_text(args: argparse.Namespace) -> str:
    """The params file ``clipscrub init`` writes for ``args`` (not yet checked)."""
    import shlex
    import string

    out = Path(args.out)
    folder = out.parent
    if args.captions and args.source != "folder":
        raise ClipscrubError("only the folder source takes a captions file", param="--captions")
    if args.source == "folder" and not args.captions:
        raise ClipscrubError("the folder source needs a captions file mapping file names to captions", param="--captions")
    pretrained = args.pretrained
    if pretrained is None and not args.checkpoint and args.model == "ViT-B-32":
        pretrained = "laion2b_s34b_b79k"
    if (pretrained is None and not args.checkpoint and args.source != "embeddings"
            and args.model in packaged_model_names()):  # an unknown name: the params loader says so below
        # random weights embed nothing worth scoring (precomputed embeddings only name their model)
        raise ClipscrubError(f"name the weights of {args.model!r}: --pretrained TAG (open_clip."
                             f"list_pretrained_tags_by_model({args.model!r})) or --checkpoint FILE", param="--model")
    src = _relative_to(args.path, folder)
    values = {f"{kind}_path": _yaml_value(src if kind == args.source else None) for kind in INIT_SOURCES}
    name = args.name or Path(args.path.split("{")[0].rstrip("/") or "data").stem or "data"
    values.update(
        command=shlex.join(["clipscrub", *getattr(args, "argv", ["init"])]).replace("\n", " "),
        params=shlex.quote(out.as_posix()), name=_yaml_value(name), source=args.source,
        captions=_yaml_value(_relative_to(args.captions, folder)), model_name=_yaml_value(args.model),
        pretrained=_yaml_value(pretrained), checkpoint=_yaml_value(_relative_to(args.checkpoint, folder)),
        model_config=_yaml_value(_relative_to(args.model_config, folder)),
        keep_ids=_yaml_value(REVIEW_LISTS["keep_ids"]), remove_ids=_yaml_value(REVIEW_LISTS["remove_ids"]),
    )
    return string.Template(INIT_TEMPLATE.read_text()).substitute(values)


def check_init_checkpoint(params: Any) -> None:
    """Load the checkpoint params name into their model, as embed will, so that weights of another
    architecture are refused by init rather than by embed (a file not there yet is left to embed)."""
    e = params.embed
    if e.checkpoint and Path(e.checkpoint).expanduser().is_file():
        from clipscrub.model import load_model

        load_model(model_name=e.model_name, pretrained=None, checkpoint=str(Path(e.checkpoint).expanduser()),
                   model_config=e.model_config_path, device="cpu")


def run_init(args: argparse.Namespace) -> int:
    from clipscrub.io import atomic_file

    from clipscrub.flows.pipeline import dvc_yaml_text

    out = Path(args.out)
    dvc_yaml = out.parent / "dvc.yaml"
    try:
        if out.is_dir():
            raise ClipscrubError(f"{out} is a directory: name the params file to write", param="--out")
        for path in (out, dvc_yaml):
            if path.exists() and not args.force:
                raise ClipscrubError(f"{path} exists: pass --force to overwrite it", param="--out")
        text = init_params_text(args)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out, param="--out") as tmp:
            Path(tmp).write_text(text)
            # read back as every command will read it (its folder resolves the relative paths)
            params = load_params(Path(tmp))
            check_init_checkpoint(params)
            pipeline = dvc_yaml_text(params, folder=out.parent, params_file=out.name)
        with atomic_file(dvc_yaml, param="--out") as tmp:
            Path(tmp).write_text(pipeline)
        for key, rel in REVIEW_LISTS.items():  # empty lists, so that dvc.yaml depends on them from the start
            path = out.parent / rel
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(REVIEW_HEADER[key])
    except ClipscrubError as exc:
        print(f"clipscrub: error: {exc}", file=sys.stderr)
        return 2
    e = params.embed
    where = getattr(params.download, params.download.source).path  # as read: from the working directory
    weights = (f"weights from {args.checkpoint}" if e.checkpoint else f"pretrained {e.pretrained!r}" if e.pretrained
               else "(the model that made the embeddings)")
    print(f"init: wrote {out}: source {params.download.source} at {args.path}, model {e.model_name!r} {weights}")
    if not Path(where.split("{")[0]).expanduser().exists():
        print(f"  note: {args.path} does not exist yet")
    print(f"  wrote {dvc_yaml} (the DVC pipeline) and the empty review lists {', '.join(REVIEW_LISTS.values())}")
    cd = "" if out.parent.resolve() == Path.cwd().resolve() else f"cd {out.parent} && "
    print(f"  next: {cd}git init && dvc init && dvc repro   (or without DVC: clipscrub run -p {out} -o run)")
    return 0


def run_dvc_yaml(args: argparse.Namespace) -> int:
    import os

    from clipscrub.flows.pipeline import dvc_yaml_text
    from clipscrub.io import atomic_file

    params_path = Path(args.params)
    out = Path(args.out) if args.out else params_path.parent / "dvc.yaml"
    try:
        params = load_params(params_path)
        rel = Path(os.path.relpath(params_path.absolute(), out.parent.absolute())).as_posix()
        text = dvc_yaml_text(params, folder=out.parent, params_file=rel, root=args.root)
        if args.check:
            same = out.is_file() and out.read_text() == text
            print(f"dvc-yaml: {out} {'is up to date' if same else 'differs from what clipscrub dvc-yaml writes'}")
            return 0 if same else 1
        with atomic_file(out, param="--out") as tmp:
            Path(tmp).write_text(text)
    except ClipscrubError as exc:
        print(f"clipscrub: error: {exc}", file=sys.stderr)
        return 2
    print(f"dvc-yaml: wrote {out} for {params_path} (data under {args.root}/); run `dvc repro` there")
    return 0


def interrupted_text(out: str, signum: int, *, command: Sequence[str]) -> str:
    """One line: which stages the interrupted run finished, and how to resume it."""
    import shlex

    from clipscrub.flows.clean import PROGRESS

    progress = PROGRESS.get(str(Path(out).resolve()), {})
    finished, running = progress.get("finished", []), progress.get("running")
    done = f"{', '.join(finished)} finished" if finished else "no stage finished"
    if running:
        done += f", {running} did not"
    again = "rerun to resume" + (f" from {running}" if running else "")
    return (f"clipscrub: interrupted ({signal.Signals(signum).name}): {done}; {again} "
            f"(finished stages are reused): clipscrub {shlex.join(command)}")


@contextlib.contextmanager
def stop_on_signals(message: Any, *, grace: float = 5.0) -> Iterator[dict[str, int]]:
    """SIGINT (Ctrl-C) and SIGTERM stop the run: the first raises KeyboardInterrupt where the run
    is, so that it unwinds (Prefect records the run as crashed, the root lock and the temporary
    server are released); if the process has not ended ``grace`` seconds later (a library that
    swallowed the interrupt, a cluster slow to close), or at a second signal, it prints
    ``message(signum)`` (unless the caller set "said") and exits at once: the kernel drops the
    lock, and the server and the cluster's workers follow their parent. Yields {"signal": the
    first signal's number or 0, "said": 0}.
    """
    import threading

    caught = {"signal": 0, "said": 0}

    def leave(signum: int) -> None:
        if not caught["said"]:
            sys.stderr.write(message(signum) + "\n")
            sys.stderr.flush()
        os._exit(128 + signum)

    def handle(signum: int, frame: Any) -> None:
        if caught["signal"]:
            leave(caught["signal"])
        caught["signal"] = signum
        timer = threading.Timer(grace, leave, args=(signum,))
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    # a signal the caller ignores (SIGINT of a `nohup` or `&` job) stays ignored
    saved = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)
             if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield caught
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def run_flow(args: argparse.Namespace) -> int:
    try:
        params = load_params(args.params, args.overrides)
        check_writable_dir(args.out, param="--out")
        if args.reuse is not None:
            if not (Path(args.reuse) / ".clipscrub" / "state.json").is_file():
                raise ClipscrubError(f"{args.reuse} is not a clipscrub run directory (no .clipscrub/state.json)",
                                     param="--reuse")
            if Path(args.reuse).resolve() == Path(args.out).resolve():
                raise ClipscrubError("is the run directory itself: name another run's directory", param="--reuse")
    except ClipscrubError as exc:
        print(f"clipscrub: error: {exc}", file=sys.stderr)
        return 2
    import warnings

    # prefect warns at import when it cannot create PREFECT_HOME; private_prefect says it in one line
    warnings.filterwarnings("ignore", message="Failed to create the Prefect home directory")
    from clipscrub.flows.clean import clean_dataset, private_prefect, task_runner_for

    def stopped(signum: int) -> str:
        return interrupted_text(args.out, signum, command=args.argv)

    with stop_on_signals(stopped) as caught:
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
                    params_dir=params.params_dir,
                    reuse=str(Path(args.reuse).resolve()) if args.reuse else None,
                )
        except ClipscrubError as exc:
            print(f"clipscrub: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            signum = caught["signal"] or signal.SIGINT
            print(stopped(signum), file=sys.stderr)
            caught["said"] = 1
            return 128 + signum
    if args.json:
        print(json.dumps({"run": str(Path(args.out).resolve()), "states": result["states"],
                          "seconds": result.get("seconds", {}),
                          **({"pieces": result["pieces"]} if "pieces" in result else {})}, sort_keys=True))
    else:
        print(run_text(result, args.out))
        if (home := temporary_server_home()) is not None:  # the log's "View at" link died with the server
            print(f"prefect: the run's temporary server has stopped; its runs stay in {home}: `prefect server start` "
                  "(with the same PREFECT_HOME) shows them at http://127.0.0.1:4200")
    return 0


def temporary_server_home() -> Path | None:
    """PREFECT_HOME, where `clipscrub run` started a temporary Prefect server (no PREFECT_API_URL); else None."""
    import prefect.settings as ps

    return None if ps.get_current_settings().api.url else Path(ps.PREFECT_HOME.value())


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


def _run_command(command: str, args: argparse.Namespace, call: Callable[[], dict[str, Any]]) -> int:
    """A command that is no pipeline stage writing ``args.out``: its summary in words or as JSON,
    or its error in one line (exit 2)."""
    try:
        summary = call()
    except ClipscrubError as exc:
        print(f"clipscrub: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"command": command, "out": str(args.out), **summary}, sort_keys=True))
    else:
        print(summary_text(command, summary, wrote=[Path(args.out)]))
    return 0


def run_poison(args: argparse.Namespace) -> int:
    from clipscrub.flows.pipeline import Layout
    from clipscrub.stages.poison import poison_dataset

    def call() -> dict[str, Any]:
        params = load_params(args.params, args.overrides)
        return poison_dataset(raw_dir=Layout(Path(args.root)).raw, out_dir=args.out, attacks=params.poison.attacks,
                              seed=params.base.seed, shard_size=params.download.shard_size)

    return _run_command("poison", args, call)


def run_save_references(args: argparse.Namespace) -> int:
    from clipscrub.flows.pipeline import Layout
    from clipscrub.stages.save_references import save_references

    layout = Layout(Path(args.root))
    return _run_command("save-references", args, lambda: save_references(
        embeddings_dir=layout.embeddings, index_dir=layout.index, score_dir=layout.scores, threshold_dir=layout.flags,
        out_dir=args.out))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
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
    if args.command == "save-references":
        return run_save_references(args)
    if args.command == "init":
        return run_init(args)
    if args.command == "dvc-yaml":
        return run_dvc_yaml(args)
    if args.command == "code":
        from clipscrub.flows.pipeline import write_code_stamps

        versions = write_code_stamps(Path(args.out))
        print(f"code: {len(versions)} stages' code versions in {args.out}/ (clipscrub {next(iter(versions.values()))})")
        return 0
    try:
        params = load_params(args.params, args.overrides)
        if os.environ.get("DVC_STAGE", "").rpartition(":")[2] == args.command:
            from clipscrub.flows.pipeline import check_dvc_deps

            check_dvc_deps(args.command, params, Path("dvc.yaml"))
        summary = run_stage(args.command, params, args.root)
    except ClipscrubError as exc:
        print(f"clipscrub: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"stage": args.command, **summary}, sort_keys=True))
    else:
        print(summary_text(args.command, summary, wrote=stage_outputs(args.command, args.root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
