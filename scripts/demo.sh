#!/usr/bin/env bash
# Install, then run the whole pipeline on the built-in poisoned demo with `dvc repro`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
start=$(date +%s)
dvc repro
# HEAD becomes the baseline: `dvc metrics diff`, `dvc plots diff` and `dvc exp show` compare with it
bash scripts/lib/commit_results.sh
echo
echo "== results (dvc metrics show prints every figure) =="
clipscrub show --root data
echo "demo pipeline wall time: $(( $(date +%s) - start )) s"
echo "next: dvc exp run -S threshold.method=top_fraction; dvc metrics diff; dvc plots diff (dvc_plots/index.html, offline)"
