"""The shipped drag-and-drop files against their one table (tests/support/workflow_catalog.py), without ComfyUI:
one UI file per API twin, named by a title a person reads (the Templates dialog shows the file name), each with its
note, and the public model files placed where the frontend's missing-models check reads them."""
import json
import re
from pathlib import Path

import pytest

from support.workflow_catalog import WORKFLOWS, ui_file_name

REPO = Path(__file__).resolve().parents[1]
UI_DIR, API_DIR = REPO / "workflows", REPO / "workflows" / "api"
UI_FILES = sorted(UI_DIR.glob("*.json"))
# the folders ComfyUI 0.3.75's folder_paths knows that a public file here may go to
MODEL_FOLDERS = {"checkpoints", "loras", "diffusion_models", "vae", "text_encoders", "clip"}


def _ui(workflow_id):
    return json.loads((UI_DIR / ui_file_name(workflow_id)).read_text(encoding="utf-8"))


def test_one_ui_file_per_api_twin_and_nothing_else():
    twins = {p.stem for p in API_DIR.glob("*.json")}
    assert twins == set(WORKFLOWS), f"API twins and the catalog differ: {twins ^ set(WORKFLOWS)}"
    assert sorted(p.name for p in UI_FILES) == sorted(ui_file_name(i) for i in WORKFLOWS)
    for workflow_id in WORKFLOWS:
        assert _ui(workflow_id)["extra"]["fewstep_api_twin"] == workflow_id
        assert (UI_DIR / f"{WORKFLOWS[workflow_id].title}.jpg").is_file(), f"{workflow_id}: no card image"


def test_titles_are_readable():
    """Words and spaces (the dialog shows the name as is and its description with '-' and '_' as spaces), short,
    distinct, and safe as a file name on every system."""
    titles = [w.title for w in WORKFLOWS.values()]
    for title in titles:
        assert re.fullmatch(r"[A-Z][A-Za-z0-9 ()\-]{3,47}", title), title
        assert "_" not in title and "  " not in title and title == title.strip()
    assert len({t.lower() for t in titles}) == len(titles)


@pytest.mark.parametrize("workflow_id", sorted(WORKFLOWS))
def test_each_file_carries_its_note(workflow_id):
    notes = [n for n in _ui(workflow_id)["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert len(notes) == 1, f"{workflow_id}: {len(notes)} notes"
    assert notes[0]["widgets_values"] == [WORKFLOWS[workflow_id].note]
    text = WORKFLOWS[workflow_id].note
    assert len(text) > 150 and "**" in text  # a heading line and more than one sentence
    if WORKFLOWS[workflow_id].runs_on_digits and workflow_id not in ("schedule_preview", "pcm_distill_train"):
        assert "digits model" in text and "own SD1.5 checkpoint" in text  # how to run it as shipped, how on yours


@pytest.mark.parametrize("workflow_id", sorted(WORKFLOWS))
def test_public_models_are_where_the_frontend_looks(workflow_id):
    """Frontend 1.32.9 (app.loadGraphData): a node's properties.models entry counts when one of the node's widget
    values is that file name; the workflow's top-level models always count; an entry needs a url; the download
    button takes huggingface.co / civitai.com URLs of .safetensors files."""
    ui = _ui(workflow_id)
    expected = {m.name: m.as_json() for m in WORKFLOWS[workflow_id].models}
    found = {}
    for node in ui["nodes"]:
        for model in node.get("properties", {}).get("models", []):
            assert model["name"] in node["widgets_values"], f"{node['type']}: {model['name']} is no widget value"
            found[model["name"]] = model
    for model in ui.get("models", []):
        found[model["name"]] = model
    assert found == expected
    for model in found.values():
        assert model["directory"] in MODEL_FOLDERS, model
        assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith("/" + model["name"])
        assert model["name"].endswith(".safetensors")


def test_the_sdxl_unet_workflow_names_both_of_its_files():
    ui = _ui("hyper_sdxl_1step_unet")
    loader = next(n for n in ui["nodes"] if n["type"] == "FewStepHyperSD1StepUNetLoader")
    top = {m["name"]: m["directory"] for m in ui["models"]}
    folder, _, name = loader["widgets_values"][0].partition("/")
    assert top.get(name) == folder == "diffusion_models"  # the loader's value carries the folder: top-level entry
