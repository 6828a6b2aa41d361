"""Write example_workflows/<name>.json (UI format, drag-and-drop) from workflows/<name>.json (API format).

Starts ComfyUI headless with the pack to read /object_info (widget order), then lays each API prompt out as
a litegraph workflow. tests/e2e checks that each UI file converts back to its API twin.
Usage: python scripts/write_ui_workflows.py [name ...]   (default: the LoRA and training workflows)
"""
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from support.server import ComfyServer  # noqa: E402
from support.ui_format import api_to_ui  # noqa: E402

DEFAULT = ["pcm_lora_fast_sampler", "hyper_sd_lora_ksampler", "pcm_distill_train"]


def main(names):
    server = ComfyServer()
    server.start()
    try:
        info = server.object_info()
    finally:
        server.stop()
        server.cleanup()
    out_dir = REPO_ROOT / "example_workflows"
    out_dir.mkdir(exist_ok=True)
    for name in names:
        api = json.loads((REPO_ROOT / "workflows" / f"{name}.json").read_text())
        ui = api_to_ui(api, info)
        (out_dir / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
        print(f"wrote example_workflows/{name}.json ({len(ui['nodes'])} nodes, {len(ui['links'])} links)")


if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT)
