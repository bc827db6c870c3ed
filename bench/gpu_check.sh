#!/usr/bin/env bash
# GPU check of hncse-dist: the branches that only run on CUDA and the throughput comparison on
# the GPU (the checks: BENCHMARKS.md), under 10 minutes on one GPU, one JSON report (default
# bench/results/gpu_check.json). Exit status: 0 all passed, 1 a check failed, 2 no CUDA GPU.
#
#   bash bench/gpu_check.sh [--output FILE] [--skip throughput,...]
#
# PYTHON selects the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c 'import torch' 2>/dev/null; then
    echo "gpu_check: $PY cannot import torch: set PYTHON to the environment where hncse-dist is installed" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False): run this on a GPU machine with the CUDA build of torch" >&2
    exit 2
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout --signal=TERM 570 "$PY" bench/gpu_check.py "$@"
