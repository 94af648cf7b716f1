#!/usr/bin/env bash
# The GPU check, in one command on a machine with one NVIDIA GPU (about 8 minutes, no network):
#   bash scripts/gpu_check.sh [--dry-run] [--out DIR] [--skip kernels,exact,attention,kv,decode,fp8]
# Native kernel tests, greedy tokens against transformers, decode attention against SDPA, the decode step per
# token at 135M/1B/8B shapes (random bf16 weights; eager and captured, batch 1 and 64) against the weight-read
# floor, KV transfer GB/s GPU to GPU, prefill at 8B (1k-8k tokens, chunked, MFU), speculative verification,
# the 8B step with fp8 weights, and `serve` colocated and 1P+1D with `splitserve bench` and `plan --quick`: one
# table (scripts/gpu_check.py says what each row means); exits non-zero when a check fails. With every section
# it runs past 8 minutes: skip some (--skip) to fit a short lease.
# --dry-run runs without a GPU (CI does): it checks that the script parses and finds its inputs.
#
# Python: ./.venv where it exists (this project's set-up), else python3. Packages the GPU machine lacks travel
# as wheels in ./.whl (see ../shared/gpu-kit/fetch-wheels.sh), installed here into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
# (Not for --dry-run: that runs in this project's own environment, CI's, which has them all.)
if compgen -G ".whl/*.whl" >/dev/null && [[ " $* " != *" --dry-run "* ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
