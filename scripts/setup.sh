#!/usr/bin/env bash
# Create .venv and install clipscrub with its test extras. Idempotent; needs only python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.clipscrub-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/constraints.txt -nt "$stamp" ]; then
    echo "installing clipscrub and its dependencies into .venv (a few minutes the first time)..." >&2
    # torch's CUDA build alone is 5.5 GB of the ~8.5 GB: say so before pip runs out of room midway
    free_kb=$(df -Pk .venv | awk 'NR == 2 {print $4}')
    if [ "${free_kb:-0}" -lt $((9 * 1024 * 1024)) ] && [ ! -d .venv/lib/python3*/site-packages/torch ]; then
        echo "warning: $((free_kb / 1024)) MB free on $(df -P .venv | awk 'NR == 2 {print $6}'), and the environment" \
             "takes about 8.5 GB (torch's CUDA build: 5.5 GB): the install may fail with 'No space left on device'" >&2
    fi
    # --no-cache-dir: a second copy of every downloaded wheel in ~/.cache/pip would only cost disk;
    # some machines list local package folders that do not exist: pip warns per package
    # the exact torch builds of scripts/constraints.txt (pyproject.toml declares ranges)
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-cache-dir -c scripts/constraints.txt -e '.[dev]' 2>&1 \
        | { grep -v "^WARNING: Location 'file://" || true; } >&2
    # img2dataset requires the Python 3.6 'dataclasses' backport, dead weight on 3.10+: its
    # dataclasses.py in site-packages would shadow the standard library under `prefect server
    # start` (uvicorn --app-dir site-packages); clipscrub's own temporary server is immune to it
    .venv/bin/python -m pip uninstall -q -y --disable-pip-version-check dataclasses 2>/dev/null || true
    touch "$stamp"
fi
# DVC needs a git repository (a tarball of the project has none)
if [ ! -d .git ]; then
    git init -q && git add -A && git -c user.name=clipscrub -c user.email=clipscrub@localhost commit -qm "clipscrub"
fi
