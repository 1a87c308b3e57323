#!/usr/bin/env bash
# Install, then run the test suite (tiny configs, CPU only, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec python -m pytest "$@"
