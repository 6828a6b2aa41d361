"""Write workflows/<name>.jpg, the Templates dialog's card image of each shipped workflow, from that workflow's own
output: each API twin in workflows/api/ is run as shipped on a headless ComfyUI with the embedded digits model (the
training workflow trains its 400 steps: a few CPU minutes), and the image it saves is scaled up (the digits are
64×64) and written as JPEG. The frontend asks for /api/workflow_templates/<pack>/<name>.jpg.
Usage: python scripts/write_thumbnails.py [name ...]   (default: every workflow in workflows/api/)
"""
import json
import sys
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
UI_DIR, API_DIR = REPO_ROOT / "workflows", REPO_ROOT / "workflows" / "api"
THUMBNAIL_WIDTH = 256
sys.path.insert(0, str(REPO_ROOT / "tests"))

from support.pack_server import pack_server  # noqa: E402
from support.server import execution_error, history_status  # noqa: E402


def thumbnail(image: Image.Image) -> Image.Image:
    scale = max(1, THUMBNAIL_WIDTH // image.width)
    if scale > 1:  # small pictures: whole pixels, no blur
        return image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    height = round(image.height * THUMBNAIL_WIDTH / image.width)
    return image.resize((THUMBNAIL_WIDTH, height), Image.LANCZOS)


def main(names):
    server = pack_server()
    server.start()
    try:
        for name in names:
            graph = json.loads((API_DIR / f"{name}.json").read_text())
            submitted = server.post_prompt(graph)
            if not submitted.ok:
                raise SystemExit(f"{name}: /prompt refused it: {submitted.messages()}")
            entry = server.wait(submitted.prompt_id, timeout=1800)
            if history_status(entry) != "success":
                raise SystemExit(f"{name}: {execution_error(entry)}")
            (image_path,) = server.output_files(entry)
            card = thumbnail(Image.open(image_path).convert("RGB"))
            card.save(UI_DIR / f"{name}.jpg", quality=90)
            print(f"wrote workflows/{name}.jpg ({card.width}×{card.height}) from {image_path.name}", flush=True)
    finally:
        server.stop()
        server.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(p.stem for p in API_DIR.glob("*.json")))
