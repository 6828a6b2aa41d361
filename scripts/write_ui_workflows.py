"""Write workflows/<title>.json (UI format: drag-and-drop, and ComfyUI's template list) from workflows/api/<id>.json
(API format, the graphs the tests, the demo and headless users post to /prompt), with the title, the note and the
model files of tests/support/workflow_catalog.py (the Templates dialog titles a card by its file name only).

ComfyUI lists and serves the JSON files directly inside a pack's workflows/ folder as templates (not its
subfolders), so the API twins live in workflows/api/ and every template is a UI file that opens.
Starts ComfyUI headless with the pack to read /object_info (widget order) and the real frontend in Chromium (the
browser tier's, tests/support/browser.py) for each node's size, then lays each API prompt out as a litegraph
workflow: one column per link depth, nodes at the frontend's sizes, no two overlapping. tests/e2e and tests/browser check that each UI file converts back to its API twin.
Usage: python scripts/write_ui_workflows.py [id ...]   (default: every workflow in workflows/api/; a UI file left
from an id's earlier title is removed)
"""
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
UI_DIR, API_DIR = REPO_ROOT / "workflows", REPO_ROOT / "workflows" / "api"
sys.path.insert(0, str(REPO_ROOT / "tests"))

from support.browser import FrontendPage, chromium_missing  # noqa: E402
from support.pack_server import pack_server  # noqa: E402
from support.ui_format import api_to_ui  # noqa: E402
from support.workflow_catalog import WORKFLOWS, ui_file_name  # noqa: E402


def frontend_sizes(page, api, info):
    """{node key: (w, h)}: the size the frontend computes for each node once the graph is on its canvas."""
    keys = list(api)  # api_to_ui numbers nodes 1.. in this order
    page.drop_workflow(Path("sizing.json"), json.dumps(api_to_ui(api, info)))
    return {keys[node_id - 1]: tuple(round(v) for v in box["min"]) for node_id, box in page.node_boxes().items()}


def main(names):
    problem = chromium_missing()
    if problem:
        raise SystemExit(f"write_ui_workflows: the layout needs the real frontend: {problem}")
    server = pack_server()
    server.start()
    try:
        info = server.object_info()
        with FrontendPage.open(server) as page:
            for name in names:
                api = json.loads((API_DIR / f"{name}.json").read_text())
                entry = WORKFLOWS[name]
                ui = api_to_ui(api, info, frontend_sizes(page, api, info), note=entry.note,
                               models=[m.as_json() for m in entry.models], twin=name)
                for old in UI_DIR.glob("*.json"):  # this id's file under an earlier title
                    if json.loads(old.read_text()).get("extra", {}).get("fewstep_api_twin", old.stem) == name:
                        old.unlink()
                (UI_DIR / ui_file_name(name)).write_text(json.dumps(ui, indent=1, ensure_ascii=False) + "\n")
                print(f"wrote workflows/{ui_file_name(name)} ({len(ui['nodes'])} nodes, {len(ui['links'])} links)")
    finally:
        server.stop()
        server.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(p.stem for p in API_DIR.glob("*.json")))
