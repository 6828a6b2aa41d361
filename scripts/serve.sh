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
echo "serve: the embedded digits model (models/checkpoints), its PCM LoRA (models/loras), its training image (input)"
"$ROOT/.venv/bin/python" - "$BASE" <<'PY'
import pathlib, shutil, sys
sys.path.insert(0, "tests")
from support import digits_model
base = pathlib.Path(sys.argv[1])
links = {base / "models/checkpoints" / digits_model.CHECKPOINT_NAME: digits_model.cached_digits_sd15(),
         base / "models/loras" / digits_model.PCM_LORA_PATH.name: digits_model.PCM_LORA_PATH,
         base / "input" / digits_model.TRAINING_IMAGES:
             digits_model.write_training_images(pathlib.Path(".cache") / digits_model.TRAINING_IMAGES)}
for link, target in links.items():
    if link.exists() or link.is_symlink():
        continue
    if link.parent.name == "loras":  # a copy: the training node refuses to write through a link
        shutil.copyfile(target, link)
    else:
        link.symlink_to(pathlib.Path(target).resolve())
PY
echo "serve: ComfyUI on http://127.0.0.1:$PORT (base directory $BASE)"
cd "$COMFY"
exec "$ROOT/.venv/bin/python" main.py --cpu --listen 127.0.0.1 --port "$PORT" --disable-auto-launch \
    --base-directory "$BASE" --disable-api-nodes --preview-method none
