#!/usr/bin/env bash
# Creates .venv (or uses $IHGRPO_PYTHON's environment) and installs ihgrpo with its test extras.
# torch: if the environment has no torch, install torch==$TORCH_VERSION (default 2.13.0) *first*,
# so that the `torch>=2.4` requirement is already met and pip does not pull a multi-GB CUDA build.
# GPU users: install your own torch into the environment beforehand (or set IHGRPO_SKIP_TORCH=1).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${IHGRPO_VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ "${IHGRPO_SKIP_TORCH:-0}" != "1" ] && ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[install] no torch in $VENV: installing torch==$TORCH_VERSION first"
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
fi
"$PY" -m pip install -q -e ".[test]"
# The sandbox isolates model code with bubblewrap; without it, it falls back loudly to rlimits only.
if ! command -v bwrap >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "[install] installing bubblewrap (sandbox isolation)"
        (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1 \
            || echo "[install] WARNING: could not install bubblewrap; the sandbox will run without namespaces"
    else
        echo "[install] WARNING: bubblewrap (bwrap) not found: install it (e.g. 'sudo apt-get install bubblewrap')" \
             "or the sandbox runs model code without namespace isolation"
    fi
fi
echo "[install] done: $("$PY" -c 'import torch, ihgrpo; print("ihgrpo", ihgrpo.__version__, "torch", torch.__version__)')"
