#!/usr/bin/env bash
# Install, then run the test suite (tiny configs, CPU only, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the report test opens the HTML report in a real headless Chromium (Debian's package)
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing chromium (apt-get) for the report test..." >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
    else
        echo "warning: no chromium on PATH and not root: the report test will fail; install chromium" >&2
    fi
fi
export PATH="$PWD/.venv/bin:$PATH"
exec python -m pytest "$@"
