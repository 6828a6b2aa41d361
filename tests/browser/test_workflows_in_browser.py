"""The shipped drag-and-drop workflows in the real frontend: dropped on the canvas they show what the file holds,
the frontend turns them into their API twins, and the Run button runs the sampling ones to an image."""
import json
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from support.server import execution_error, history_status
from support.ui_format import renumbered
from support.workflow_catalog import WORKFLOWS, ui_file_name
from tests.e2e.test_server import expected_size

REPO = Path(__file__).resolve().parents[2]
UI_WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))  # the templates ComfyUI lists
TRAINING = {"pcm_distill_train"}  # minutes of training as shipped: run below with its steps turned down


def _twin(path):
    """The API twin's id a UI file was written from (write_ui_workflows keeps it in extra)."""
    return json.loads(path.read_text()).get("extra", {}).get("fewstep_api_twin")


SAMPLING = [p for p in UI_WORKFLOWS if _twin(p) not in TRAINING]


def _ids(paths):
    return [_twin(p) or p.stem for p in paths]


def _api(path):
    return renumbered(json.loads((REPO / "workflows" / "api" / f"{_twin(path)}.json").read_text()))


# Inputs the frontend adds to a node's prompt entry for a widget of its own (core PreviewAny's text display,
# "preview": ""); the server ignores them, and the API twins leave them out.
FRONTEND_ONLY_INPUTS = {"PreviewAny": {"preview"}}


def _inputs_only(prompt):
    return {key: {"class_type": node["class_type"],
                  "inputs": {k: v for k, v in node["inputs"].items()
                             if k not in FRONTEND_ONLY_INPUTS.get(node["class_type"], ())}}
            for key, node in prompt.items()}


def test_every_ui_workflow_has_an_api_twin():
    assert UI_WORKFLOWS, "no workflows/*.json"
    for path in UI_WORKFLOWS:
        twin = _twin(path)
        assert twin and (REPO / "workflows" / "api" / f"{twin}.json").is_file(), f"{path.name} has no workflows/api/ twin"


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=_ids(UI_WORKFLOWS))
def test_dropped_workflow_shows_what_the_file_holds(frontend, path):
    ui = json.loads(path.read_text())
    graph = frontend.drop_workflow(path)
    dialog = frontend.missing_nodes_dialog()
    if dialog:
        frontend.close_dialogs()
    assert dialog is None, f"the frontend reports missing nodes: {dialog}"
    assert len(graph["nodes"]) == len(ui["nodes"]), [n["type"] for n in graph["nodes"]]
    shown = {node["id"]: node for node in graph["nodes"]}
    for node in ui["nodes"]:
        got = shown.get(node["id"])
        assert got is not None and got["type"] == node["type"], f"node {node['id']} ({node['type']}): shown {got}"
        assert got["widgets"] == node["widgets_values"], (
            f"{node['type']} #{node['id']}: the canvas shows {got['widgets']}, the file holds {node['widgets_values']}")
    input_names = {i["link"]: i["name"] for node in ui["nodes"] for i in node.get("inputs", []) if i.get("link")}
    assert sorted(graph["links"]) == sorted(link[:4] + [input_names[link[0]]] for link in ui["links"])


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=_ids(UI_WORKFLOWS))
def test_nodes_are_big_enough_and_do_not_overlap(frontend, path):
    """On the canvas, every node is at least the size the frontend computes for its slots and widgets (nothing
    spills out), and no two nodes' boxes (title bar included) overlap."""
    from support.ui_format import TITLE_HEIGHT

    frontend.drop_workflow(path)
    boxes = frontend.node_boxes()
    small = {i: (b["size"], b["min"]) for i, b in boxes.items()
             if b["size"][0] < b["min"][0] - 1 or b["size"][1] < b["min"][1] - 1}
    assert not small, f"nodes smaller than their content (size, needed): {small}"
    rects = {i: (b["pos"][0], b["pos"][1] - TITLE_HEIGHT, b["pos"][0] + b["size"][0], b["pos"][1] + b["size"][1])
             for i, b in boxes.items()}
    overlaps = [(a, b) for a in rects for b in rects if a < b and rects[a][0] < rects[b][2] and rects[b][0] < rects[a][2]
                and rects[a][1] < rects[b][3] and rects[b][1] < rects[a][3]]
    assert not overlaps, f"overlapping nodes (ids): {overlaps}"


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=_ids(UI_WORKFLOWS))
def test_frontend_turns_the_workflow_into_its_api_twin(frontend, path):
    frontend.drop_workflow(path)
    prompt = frontend.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert _inputs_only(prompt) == _inputs_only(_api(path))


@pytest.mark.parametrize("path", SAMPLING, ids=_ids(SAMPLING))
def test_run_button_runs_the_workflow_to_an_image(frontend, server, path):
    frontend.drop_workflow(path)
    prompt_id = frontend.press_run()
    entry = server.wait(prompt_id, timeout=180)
    assert history_status(entry) == "success", execution_error(entry)
    files = server.output_files(entry)
    assert len(files) == 1 and files[0].is_file(), files
    pixels = np.asarray(Image.open(files[0]).convert("RGB")).astype(np.float64)
    width, height = expected_size(_api(path))
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 1.0, f"{files[0].name} is (nearly) constant"


def test_run_button_trains_with_the_training_workflow(frontend, server):
    """The training template, run from the canvas as a user would after turning its steps down (400 steps are
    minutes here; tests/e2e and make demo train the full run): the node trains, the student is sampled and saved."""
    import uuid

    path = REPO / "workflows" / ui_file_name("pcm_distill_train")
    frontend.drop_workflow(path)
    name = f"browser_{uuid.uuid4().hex[:8]}"
    frontend.evaluate("""(name) => {
        const node = window.app.graph.nodes.find((n) => n.type === "FewStepPCMDistill");
        const set = (widget, value) => { node.widgets.find((w) => w.name === widget).value = value; };
        set("steps", 3); set("batch_size", 2); set("output_name", name);
    }""", name)
    entry = server.wait(frontend.press_run(), timeout=600)
    assert history_status(entry) == "success", execution_error(entry)
    assert (server.base_dir / "models" / "loras" / f"{name}.safetensors").is_file()
    files = server.output_files(entry)
    assert len(files) == 1 and files[0].name.startswith("fewstep_pcm_distill_train"), files
    pixels = np.asarray(Image.open(files[0]).convert("RGB")).astype(np.float64)
    assert pixels.shape[:2] == (64, 64) and pixels.std() > 1.0


def test_new_training_node_seed_control_starts_fixed(frontend):
    """A PCM Distillation node added to the canvas keeps its seed (web/fewstep.js); core's KSampler still randomizes."""
    modes = frontend.evaluate("""() => {
        const control = (type) => window.LiteGraph.createNode(type).widgets
            .find((w) => w.name === "control_after_generate")?.value;
        return [control("FewStepPCMDistill"), control("KSampler")];
    }""")
    assert modes == ["fixed", "randomize"]


def test_training_progress_message_is_handled(frontend, console):
    """The training node's "fewstep.train" message reaches web/fewstep.js's listener (the node shows step and loss)
    instead of the frontend's "Unknown message type" warning. The message (nodes/train.py's keys) comes in through
    the page's own websocket handler: a real training prompt takes ~100 s on a busy 2-core CPU, too long here."""
    frontend.drop_workflow(REPO / "workflows" / ui_file_name("pcm_distill_train"))
    status = frontend.evaluate("""() => {
        const node = window.app.graph.nodes.find((n) => n.type === "FewStepPCMDistill");
        const message = {type: "fewstep.train", data: {node: String(node.id), step: 3, total: 400, loss: 0.0123456, eta_s: 60}};
        window.comfyAPI.api.api.socket.dispatchEvent(new MessageEvent("message", {data: JSON.stringify(message)}));
        return node.fewstepStatus ?? null;
    }""")
    assert status == "step 3/400  loss 0.01235", status
    unknown = [m for m in console.messages() if "fewstep.train" in m or "Unknown message type" in m]
    assert not unknown, unknown


def test_templates_dialog_lists_each_workflow_once_and_opens_it(frontend):
    """Workflow → Browse Templates → EXTENSIONS → fewstep: one card per shipped workflow, and clicking it opens that
    workflow's graph."""
    from support.server import PACK_NAME

    page = frontend.page
    for path in UI_WORKFLOWS:
        frontend.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        page.wait_for_selector('[data-testid="template-workflows-content"]')
        page.locator(".p-dialog").get_by_text(PACK_NAME, exact=True).click()  # EXTENSIONS → the pack's category
        cards = page.locator(f'[data-testid="template-workflow-{path.stem}"]')
        cards.first.wait_for(state="attached")
        assert cards.count() == 1, f"{path.stem}: {cards.count()} cards"
        assert path.stem in cards.first.inner_text(), f"the card shows {cards.first.inner_text()!r}"
        loads = frontend.evaluate("() => window.__fewstepLoads ?? 0")
        with page.expect_response(lambda r: "/workflow_templates/" in r.url
                                  and unquote(r.url).endswith(f"/{path.stem}.json")) as info:
            cards.first.click()
        assert info.value.status == 200
        page.wait_for_function("(n) => (window.__fewstepLoads ?? 0) > n || !document.querySelector("
                               "'[data-testid=\"template-workflows-content\"]')", arg=loads)
        page.wait_for_function("(n) => window.app.graph.nodes.length === n", arg=len(json.loads(path.read_text())["nodes"]))
        frontend.close_dialogs()


def test_ksampler_lists_the_packs_samplers_and_schedulers(frontend):
    from fewstep.samplers.registry import SAMPLERS
    from fewstep.schedulers.registry import SCHEDULERS

    options = frontend.evaluate("""() => {
        const node = window.LiteGraph.createNode("KSampler");
        const values = (name) => node.widgets.find((w) => w.name === name).options.values;
        return [values("sampler_name"), values("scheduler")];
    }""")
    assert set(SAMPLERS) <= set(options[0]) and set(SCHEDULERS) <= set(options[1]), options
    assert all(options[0].count(n) == 1 for n in SAMPLERS) and all(options[1].count(n) == 1 for n in SCHEDULERS)


@pytest.mark.parametrize("name", ["pcm_lora_fast_sampler", "hyper_sd_lora_ksampler"])
def test_the_lora_workflows_show_what_the_loader_recognised(frontend, server, name):
    """After Run, the graph itself shows the Fast LoRA Loader's summary (and, with KSampler, the preset's note)."""
    frontend.drop_workflow(REPO / "workflows" / ui_file_name(name))
    entry = server.wait(frontend.press_run(), timeout=180)
    assert history_status(entry) == "success", execution_error(entry)
    shown = frontend.evaluate("""() => window.app.graph.nodes.filter((n) => n.type === "PreviewAny")
        .map((n) => [n.title, (n.widgets || []).map((w) => String(w.value ?? "")).join(" ")])""")
    texts = dict(shown)
    assert "keys missed" in texts.get("What the LoRA loader recognised", ""), shown
    if name == "hyper_sd_lora_ksampler":
        assert texts.get("What KSampler cannot express", "").strip(), shown


@pytest.mark.parametrize("name", ["hyper_sd_lora_ksampler", "hyper_sdxl_1step_unet"])
def test_missing_public_models_are_named_before_run(frontend, server, name):
    """A user without the published files the workflow loads is told on drop, not at Run: the frontend's "missing
    models" dialog lists each (folder / file) with a download it allows. The files are taken out of the server's
    model folders for the test (the page reloaded before each drop: the frontend keeps folder listings it has read);
    with them present, no dialog."""
    path = REPO / "workflows" / ui_file_name(name)
    expected = sorted(f"{m.directory} / {m.name}" for m in WORKFLOWS[name].models)
    links = [server.base_dir / "models" / m.directory / m.name for m in WORKFLOWS[name].models]
    moved = [link.with_name(link.name + ".away") for link in links]
    for link, away in zip(links, moved):
        link.rename(away)
    try:
        frontend.reload()
        frontend.drop_workflow(path)
        rows = frontend.missing_models()
        frontend.close_dialogs()
    finally:
        for link, away in zip(links, moved):
            away.rename(link)
    assert rows is not None, "no missing-models dialog"
    shown = sorted(row.splitlines()[0].strip() for row in rows)
    assert shown == expected, rows
    assert not any("not allowed" in row or "Only allowed" in row for row in rows), rows
    frontend.reload()
    frontend.drop_workflow(path)
    assert frontend.missing_models(timeout_ms=2_000) is None
