#!/usr/bin/env bash
# Commit what `dvc repro` left for git (dvc.lock, the metrics and plots files), and only those, so
# that HEAD is the baseline `dvc metrics diff`, `dvc plots diff` and `dvc exp show` compare with.
# Run from the project root after `dvc repro`. Commits nothing when the pipeline's definition or
# code has uncommitted changes: dvc.lock would then record a run that HEAD cannot reproduce.
set -euo pipefail
# dvc.yaml's metrics and plots (cache: false, so git keeps them) and what DVC itself writes
results=(dvc.lock data/.gitignore data/metrics data/plots)
pipeline=(dvc.yaml params.yaml clipscrub stages flows)

if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    echo "not a git repository: dvc.lock and the metrics stay uncommitted" >&2
    exit 0
fi
if [ -n "$(git status --porcelain -- "${pipeline[@]}")" ]; then
    echo "not committing dvc.lock and the metrics: ${pipeline[*]} have uncommitted changes;" \
         "commit them with: git add ${pipeline[*]} ${results[*]} && git commit" >&2
    exit 0
fi
present=()
for p in "${results[@]}"; do [ -e "$p" ] && present+=("$p"); done
git add -- "${present[@]}"
if git diff --cached --quiet -- "${present[@]}"; then
    echo "dvc.lock and the metrics are already committed" >&2
    exit 0
fi
# the user's own name when git has one; --only: whatever else is staged stays staged, uncommitted
id=()
git config user.email >/dev/null || id=(-c user.name=clipscrub -c user.email=clipscrub@localhost)
git "${id[@]}" commit -q --only -m "clipscrub demo: dvc.lock, metrics and plots of dvc repro" -- "${present[@]}"
echo "committed $(git rev-parse --short HEAD): ${present[*]} (the baseline for dvc metrics diff, dvc plots diff, dvc exp show)" >&2
