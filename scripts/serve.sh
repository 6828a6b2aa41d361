#!/usr/bin/env bash
# Starts the pinned ComfyUI headless on 127.0.0.1 with this pack loaded (Ctrl-C stops it).
# The base directory .serve/ (git-ignored) holds models/, input/, output/, user/ and custom_nodes/fewstep -> repo.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${1:-8188}"
ROOT="$(pwd)"
COMFY="${COMFYUI_PATH:-$ROOT/.comfyui}"
BASE="$ROOT/.serve"
mkdir -p "$BASE/custom_nodes" "$BASE/models/checkpoints" "$BASE/models/loras" "$BASE/input" "$BASE/output" "$BASE/user"
ln -sfn "$ROOT" "$BASE/custom_nodes/fewstep"
if [ ! -e "$BASE/models/checkpoints/fewstep_tiny_sd15.safetensors" ]; then
    echo "serve: writing the tiny test checkpoint to .serve/models/checkpoints (random weights, for trying the nodes)"
    "$ROOT/.venv/bin/python" tests/support/tiny_checkpoint.py "$BASE/models/checkpoints/fewstep_tiny_sd15.safetensors"
fi
echo "serve: ComfyUI on http://127.0.0.1:$PORT (base directory $BASE)"
cd "$COMFY"
exec "$ROOT/.venv/bin/python" main.py --cpu --listen 127.0.0.1 --port "$PORT" --disable-auto-launch \
    --base-directory "$BASE" --disable-api-nodes --preview-method none
