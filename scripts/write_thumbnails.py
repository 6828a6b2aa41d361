"""Write workflows/<title>.jpg, the Templates dialog's card image of each shipped workflow, from that workflow's own
output: each API twin in workflows/api/ is run as shipped on a headless ComfyUI with the embedded digits model (the
training workflow trains its 400 steps: a few CPU minutes), and the image it saves is scaled up (the digits are
64×64) and written as JPEG next to the workflow's UI file (tests/support/workflow_catalog.py's title). The frontend
asks for /api/workflow_templates/<pack>/<title>.jpg. A workflow whose real models do not ship (runs_on_digits False
in the catalog: its output on the tests' random stand-ins is noise) gets a picture of its graph on the real frontend's
canvas instead (needs the browser tier's Chromium).
Usage: python scripts/write_thumbnails.py [id ...]   (default: every workflow in workflows/api/)
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
from support.workflow_catalog import WORKFLOWS  # noqa: E402


def thumbnail(image: Image.Image) -> Image.Image:
    scale = max(1, THUMBNAIL_WIDTH // image.width)
    if scale > 1:  # small pictures: whole pixels, no blur
        return image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    height = round(image.height * THUMBNAIL_WIDTH / image.width)
    return image.resize((THUMBNAIL_WIDTH, height), Image.LANCZOS)


def graph_card(server, name) -> Image.Image:
    """The workflow's UI file on the canvas, fitted to the view, as a 256 px wide picture."""
    import base64
    import io

    from support.browser import FrontendPage

    with FrontendPage.open(server) as page:
        page.drop_workflow(UI_DIR / f"{WORKFLOWS[name].title}.json")
        # fit the graph's bounding box into the canvas, draw, and read the canvas' own pixels (no page overlays)
        data_url = page.evaluate("""() => {
            const canvas = window.app.canvas, nodes = window.app.graph.nodes;
            const x0 = Math.min(...nodes.map((n) => n.pos[0])) - 20, y0 = Math.min(...nodes.map((n) => n.pos[1])) - 50;
            const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + 20;
            const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 20;
            const el = canvas.canvas, side = Math.max(x1 - x0, y1 - y0);
            const scale = Math.min(el.width, el.height) / side / (window.devicePixelRatio || 1);
            canvas.ds.scale = scale;
            canvas.ds.offset = [-x0 + (side - (x1 - x0)) / 2, -y0 + (side - (y1 - y0)) / 2];
            canvas.show_info = false;  // the corner's frame-rate text
            canvas.setDirty(true, true);
            canvas.draw(true, true);
            return el.toDataURL("image/png");
        }""")
        shot = base64.b64decode(data_url.split(",", 1)[1])
    image = Image.open(io.BytesIO(shot)).convert("RGB")
    side = min(image.size)  # the card is square: the graph was fitted into the canvas' top-left square
    return image.crop((0, 0, side, side)).resize((THUMBNAIL_WIDTH, THUMBNAIL_WIDTH), Image.LANCZOS)


def output_card(server, name):
    """(card, what it was made from): the image the workflow's API twin saves, run as shipped, scaled."""
    graph = json.loads((API_DIR / f"{name}.json").read_text())
    submitted = server.post_prompt(graph)
    if not submitted.ok:
        raise SystemExit(f"{name}: /prompt refused it: {submitted.messages()}")
    entry = server.wait(submitted.prompt_id, timeout=1800)
    if history_status(entry) != "success":
        raise SystemExit(f"{name}: {execution_error(entry)}")
    (image_path,) = server.output_files(entry)
    return thumbnail(Image.open(image_path).convert("RGB")), image_path.name


def main(names):
    server = pack_server()
    server.start()
    try:
        for name in names:
            if WORKFLOWS[name].runs_on_digits:
                card, source = output_card(server, name)
            else:
                card, source = graph_card(server, name), "its graph"
            title = WORKFLOWS[name].title
            card.save(UI_DIR / f"{title}.jpg", quality=90)
            print(f"wrote workflows/{title}.jpg ({card.width}×{card.height}) from {source}", flush=True)
    finally:
        server.stop()
        server.cleanup()

if __name__ == "__main__":
    main(sys.argv[1:] or sorted(p.stem for p in API_DIR.glob("*.json")))
