#!/usr/bin/env bash
# The GPU check of issue 14 in one command: every CUDA-only test, the GPU speed table (--fast, --compile),
# MFU of DeepLabv3-ResNet-101 and the dense CRF on the GPU vs pydensecrf, in at most 8 minutes on one
# H100/H200, writing gpu_*.json (benchmarks/gpu_check.py says what each step does).
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # here, with the package index: the peers into .whl/
#   bash benchmarks/gpu_check.sh [--out DIR]      # on the GPU machine; nothing is downloaded there
#   bash benchmarks/gpu_check.sh --dry-run        # on a CPU: every step checked, the tiny ones run
#
# Python: $PYTHON, else this clone's .venv, else python3 (on the GPU machine the python3 that holds torch).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" && -x "$root/.venv/bin/python" ]]; then
    py="$root/.venv/bin/python"
fi
py="${py:-$(command -v python3 || true)}"
if [[ -z "$py" ]]; then
    echo "gpu_check.sh: error: no python3 on PATH; set PYTHON=/path/to/python" >&2
    exit 2
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # pixelwise from this clone, installed or not
export PYTHONUNBUFFERED=1
exec "$py" "$root/benchmarks/gpu_check.py" "$@"
