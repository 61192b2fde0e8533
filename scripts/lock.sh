#!/usr/bin/env bash
# Refresh scripts/lock.txt: resolve nestling[dev] from pyproject's ranges (and the deliberate pins of
# scripts/lock-pins.txt) in a fresh venv and pin what it got.
#   bash scripts/lock.sh           # then run the tests, and commit scripts/lock.txt with the result
# The venv is thrown away; the pip cache is reused. torch is resolved as setup.sh does (NESTLING_TORCH) but not
# written into the lock, so the GPU path (NESTLING_TORCH=torch) keeps the rest of the set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${NESTLING_TORCH:-torch==2.13.0}
VENV=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$VENV")"' EXIT

$PY -m venv "$VENV"
"$VENV/bin/python" -m pip install --progress-bar off -q -c scripts/lock-pins.txt "$TORCH" ".[dev]"
{
    sed -n '/^#/p' scripts/lock.txt
    "$VENV/bin/python" -m pip freeze --all --exclude-editable | grep -v -i -E '^(nestling|torch|pip)( |=|@)'
} > scripts/lock.txt.new
mv scripts/lock.txt.new scripts/lock.txt
echo "scripts/lock.txt: $(grep -vc '^#' scripts/lock.txt) packages pinned"
