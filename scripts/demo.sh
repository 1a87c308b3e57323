#!/usr/bin/env bash
# Install, then run the whole pipeline on the built-in poisoned demo with `dvc repro`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
start=$(date +%s)
dvc repro
echo
echo "== victim (data/metrics/train.json) and detection (data/metrics/detection.json) =="
dvc metrics show
echo "demo pipeline wall time: $(( $(date +%s) - start )) s"
