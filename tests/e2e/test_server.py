"""End to end: the pack inside a real ComfyUI server, driven over HTTP like the frontend does.

Checks what a user sees: the dropdowns and node docs in /object_info, every shipped workflow
producing an image, and clear errors (validation or execution) for bad input, after which the
server still runs the next good prompt.
"""
import copy
import hashlib
import json
import os
import uuid
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from support.server import execution_error, history_status
from support.workflow_catalog import DIGITS_CHECKPOINT, WORKFLOWS as CATALOG

WORKFLOWS_DIR = Path(__file__).resolve().parents[2] / "workflows" / "api"  # the API twins
WORKFLOWS = sorted(WORKFLOWS_DIR.glob("*.json"))

PACK_SAMPLERS = ["pcm", "tcd", "ctm_gamma"]
PACK_SCHEDULERS = ["pcm", "lcm", "hyper_sd_1step"]
PACK_NODES = [
    "FewStepPCMScheduler", "FewStepLCMScheduler", "FewStepHyperSD1StepScheduler",
    "FewStepTCDSampler", "FewStepCTMGammaSampler", "FewStepPCMSampler", "FewStepSchedulePreview",
    "FewStepLoraLoader", "FewStepHyperSD1StepUNetLoader", "FewStepFastSampler", "FewStepPresetToKSampler",
]
# node → the dropdowns on it that must offer the pack's names
DROPDOWNS = {
    "KSampler": {"sampler_name": PACK_SAMPLERS, "scheduler": PACK_SCHEDULERS},
    "KSamplerAdvanced": {"sampler_name": PACK_SAMPLERS, "scheduler": PACK_SCHEDULERS},
    "KSamplerSelect": {"sampler_name": PACK_SAMPLERS},
    "BasicScheduler": {"scheduler": PACK_SCHEDULERS},
}


def load_workflow(name):
    return json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())


# The plumbing stand-ins: the tiny random checkpoint and LoRAs named like the published files (tests only).
TINY_CHECKPOINT = "fewstep_tiny_sd15.safetensors"
PUBLISHED_NAME_LORAS = {"pcm_lora_fast_sampler": "pcm_sd15_smallcfg_4step_converted.safetensors",
                        "hyper_sd_lora_ksampler": "Hyper-SD15-4steps-lora.safetensors"}


def on_tiny_checkpoint(graph, lora_name=None):
    """The graph with every checkpoint loader on the tiny random checkpoint (and the LoRA loader on `lora_name`)."""
    for node in graph.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = TINY_CHECKPOINT
        if lora_name and node["class_type"] == "FewStepLoraLoader":
            node["inputs"]["lora_name"] = lora_name
    return graph


def nodes_of(graph, class_type):
    return [node_id for node_id, node in graph.items() if node["class_type"] == class_type]


def only_node(graph, class_type):
    ids = nodes_of(graph, class_type)
    assert len(ids) == 1, f"expected one {class_type} in the graph, found {ids}"
    return ids[0]


def input_spec(info, node, name):
    """(type, options) of an input in /object_info, legacy `[[options], {...}]` or V3 `["COMBO", {"options"}]`."""
    inputs = info[node]["input"]
    spec = {**inputs.get("required", {}), **inputs.get("optional", {})}[name]
    kind, extra = spec[0], (spec[1] if len(spec) > 1 else {})
    return kind, extra


def combo_options(info, node, name):
    kind, extra = input_spec(info, node, name)
    return kind if isinstance(kind, list) else extra.get("options", [])


def expected_size(graph):
    """(width, height) the SaveImage of a shipped workflow must have: the latent's size, or the plot's."""
    if nodes_of(graph, "FewStepSchedulePreview"):
        inputs = graph[only_node(graph, "FewStepSchedulePreview")]["inputs"]
        return inputs["width"], inputs["height"]
    inputs = graph[only_node(graph, "EmptyLatentImage")]["inputs"]
    return inputs["width"], inputs["height"]


def with_unique_prefix(graph):
    """A copy whose SaveImage prefix (and any noise seed) is unique, so nothing can come from the cache."""
    graph = copy.deepcopy(graph)
    tag = uuid.uuid4().hex[:8]
    seed = int(tag, 16)
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "SaveImage":
            inputs["filename_prefix"] = f"{inputs['filename_prefix']}_{tag}"
        if "noise_seed" in inputs:
            inputs["noise_seed"] = seed
        if node["class_type"] in ("KSampler",):
            inputs["seed"] = seed
    return graph


def assert_good_prompt_runs(server):
    """The server still answers: a fresh one-step workflow runs to a saved, non-constant 64×64 PNG."""
    graph = with_unique_prefix(load_workflow("hyper_sd_1step"))
    entry = server.run(graph, timeout=120)
    assert history_status(entry) == "success", execution_error(entry)
    files = server.output_files(entry)
    assert len(files) == 1 and files[0].is_file(), files
    pixels = np.asarray(Image.open(files[0]))
    assert pixels.shape[:2] == (64, 64)
    assert pixels.std() > 0


# -- /object_info ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


@pytest.mark.parametrize("node,dropdown", [(n, d) for n, ds in DROPDOWNS.items() for d in ds])
def test_dropdowns_list_pack_names(object_info, node, dropdown):
    options = combo_options(object_info, node, dropdown)
    assert options, f"{node}.{dropdown} has no options"
    missing = [name for name in DROPDOWNS[node][dropdown] if name not in options]
    assert not missing, f"{node}.{dropdown} lacks {missing}"
    # The host's own entries are still there (the pack appended, it did not replace).
    assert ("euler" if dropdown == "sampler_name" else "simple") in options


@pytest.mark.parametrize("node", PACK_NODES)
def test_pack_nodes_documented(object_info, node):
    assert node in object_info, f"{node} is not registered"
    entry = object_info[node]
    assert entry["python_module"].startswith("custom_nodes."), entry["python_module"]
    assert len(entry.get("description", "").strip()) >= 20, f"{node} has no useful description"
    assert entry.get("display_name"), f"{node} has no display name"
    inputs = entry["input"]
    for section in ("required", "optional"):
        for name, spec in inputs.get(section, {}).items():
            extra = spec[1] if len(spec) > 1 else {}
            assert extra.get("tooltip", "").strip(), f"{node}.{name} has no tooltip"
    assert len(entry["output_tooltips"]) == len(entry["output"]), entry["output_tooltips"]
    for name, tooltip in zip(entry["output_name"], entry["output_tooltips"]):
        assert (tooltip or "").strip(), f"{node} output {name} has no tooltip"


def help_urls(entry, locale):
    """The URLs the frontend (NodeHelpService.fetchCustomNodeHelp, comfyui_frontend_package 1.32.9) fetches a
    custom node's help page from, in its order: the locale's page, then (when that is not ok) the plain one. The
    pack's name is the second part of the node's python_module, as the frontend's extractCustomNodeName reads it."""
    pack = entry["python_module"].split(".")[1].split("@")[0]
    return f"/extensions/{pack}/docs/{entry['name']}/{locale}.md", f"/extensions/{pack}/docs/{entry['name']}.md"


def test_every_pack_node_has_a_help_page(server, object_info):
    """Each node's page is web/docs/<node>/en.md, served at the first URL the frontend tries in English; other
    locales get a 404 there and the fallback web/docs/<node>.md, a relative symlink to the same page (ComfyUI's
    static route serves links that stay inside web/)."""
    docs = Path(__file__).resolve().parents[2] / "web" / "docs"
    pack_nodes = sorted(n for n, e in object_info.items() if e["python_module"] == "custom_nodes.fewstep")
    assert set(PACK_NODES) <= set(pack_nodes)
    for node in pack_nodes:
        first, fallback = help_urls(object_info[node], "en")
        status, served = server.get_text(first)
        assert status == 200, f"GET {first}, the frontend's first try, answered HTTP {status}"
        page = docs / node / "en.md"
        assert served == page.read_text(encoding="utf-8"), f"GET {first} is not {page}"
        assert served.lstrip().startswith("#"), f"{page} does not start with a heading"
        other_first, other_fallback = help_urls(object_info[node], "fr")
        assert other_fallback == fallback and server.get_text(other_first)[0] == 404
        assert server.get_text(fallback) == (200, served), f"GET {fallback}"
        assert os.readlink(docs / f"{node}.md") == f"{node}/en.md"  # a link, not a copy that can drift
    assert sorted(p.name for p in docs.iterdir() if p.is_dir()) == pack_nodes


# -- shipped workflows -------------------------------------------------------------------------

EXPECTED_WORKFLOWS = {"pcm_ksampler", "pcm_phased_custom", "tcd", "lcm", "ctm_gamma", "hyper_sd_1step",
                      "schedule_preview", "pcm_lora_fast_sampler", "hyper_sd_lora_ksampler", "hyper_sdxl_1step_unet",
                      "pcm_distill_train"}


def test_workflow_set_is_complete():
    names = {p.stem for p in WORKFLOWS}
    assert EXPECTED_WORKFLOWS <= names, f"missing workflows: {EXPECTED_WORKFLOWS - names}"
    assert names == set(CATALOG), f"API twins and the catalog differ: {names ^ set(CATALOG)}"
    prefixes = []
    for path in WORKFLOWS:
        graph = json.loads(path.read_text())
        save = only_node(graph, "SaveImage")
        prefixes.append(graph[save]["inputs"]["filename_prefix"])
        public = {m.name for m in CATALOG[path.stem].models}  # a real file it names (the SDXL workflow's base)
        for ckpt in nodes_of(graph, "CheckpointLoaderSimple"):
            assert graph[ckpt]["inputs"]["ckpt_name"] in {DIGITS_CHECKPOINT} | public, path.name
    assert len(set(prefixes)) == len(prefixes), f"filename prefixes collide: {prefixes}"


def test_every_pack_node_is_in_a_shipped_workflow(server):
    """All the pack's nodes appear in at least one shipped workflow (a user finds each one in a template)."""
    from support.server import PACK_NAME

    ours = {name for name, info in server.object_info().items()
            if info.get("python_module", "").split(".")[-1] == PACK_NAME or name.startswith("FewStep")}
    used = {node["class_type"] for path in WORKFLOWS for node in json.loads(path.read_text()).values()}
    assert len(ours) >= 12 and not ours - used, f"in no shipped workflow: {sorted(ours - used)}"


_digests = {}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs_to_an_image(server, path):
    graph = json.loads(path.read_text())
    for node in graph.values():
        if node["class_type"] == "FewStepPCMDistill":  # plumbing: a few steps (test_digits_quality scores the LoRA)
            node["inputs"].update(steps=3, batch_size=2, output_name=f"e2e_{uuid.uuid4().hex[:8]}")
    prefix = graph[only_node(graph, "SaveImage")]["inputs"]["filename_prefix"]
    submitted = server.post_prompt(graph)
    assert submitted.ok, f"{path.name} rejected (HTTP {submitted.status}):\n{submitted.messages()}"
    # the training graph also encodes its 100 prompts and images: minutes on a loaded 2-core machine
    entry = server.wait(submitted.prompt_id, timeout=600 if path.stem == "pcm_distill_train" else 120)
    assert history_status(entry) == "success", f"{path.name} failed: {execution_error(entry)}"
    files = server.output_files(entry)
    assert len(files) == 1, files
    image_path = files[0]
    assert image_path.is_file(), f"{image_path} was reported but not written"
    assert image_path.parent == server.output_dir
    assert image_path.name.startswith(prefix) and image_path.suffix == ".png"
    image = Image.open(image_path)
    assert image.format == "PNG"
    assert image.size == expected_size(graph)
    pixels = np.asarray(image.convert("RGB")).astype(np.float64)
    assert np.isfinite(pixels).all()
    assert pixels.std() > 1.0, f"{image_path.name} is (nearly) constant"
    if path.stem != "schedule_preview":
        _digests[path.stem] = hashlib.sha256(pixels.tobytes()).hexdigest()


def test_methods_give_different_images():
    """Each sampling workflow computed its own image (no two identical): run after the workflow tests."""
    if len(_digests) < 2:
        pytest.skip("the workflow tests did not run in this session")
    by_digest = {}
    for name, digest in _digests.items():
        by_digest.setdefault(digest, []).append(name)
    same = [names for names in by_digest.values() if len(names) > 1]
    assert not same, f"identical images from different workflows: {same}"


# -- bad input: rejected by /prompt with a message that names the problem ------------------------

def _set(graph, class_type, **values):
    graph[only_node(graph, class_type)]["inputs"].update(values)
    return graph


VALIDATION_CASES = {
    "unknown_sampler": (lambda: _set(load_workflow("pcm_ksampler"), "KSampler", sampler_name="no_such_sampler"),
                        ["sampler_name", "no_such_sampler"]),
    "unknown_scheduler": (lambda: _set(load_workflow("pcm_ksampler"), "KSampler", scheduler="no_such_scheduler"),
                          ["scheduler", "no_such_scheduler"]),
    "tcd_gamma_above_1": (lambda: _set(load_workflow("tcd"), "FewStepTCDSampler", gamma=1.5), ["gamma", "1.5"]),
    "tcd_gamma_below_0": (lambda: _set(load_workflow("tcd"), "FewStepTCDSampler", gamma=-0.1), ["gamma", "-0.1"]),
    "ctm_gamma_above_1": (lambda: _set(load_workflow("ctm_gamma"), "FewStepCTMGammaSampler", gamma=2.0), ["gamma"]),
    "pcm_phases_exceed_ddim_timesteps": (
        lambda: _set(load_workflow("pcm_phased_custom"), "FewStepPCMScheduler", phases=8, ddim_timesteps=4),
        ["phases", "8", "ddim_timesteps", "4"]),
    "lcm_steps_exceed_grid": (lambda: _set(load_workflow("tcd"), "FewStepLCMScheduler", steps=40, denoise=0.5),
                              ["steps", "40"]),
    "ksampler_steps_0": (lambda: _set(load_workflow("pcm_ksampler"), "KSampler", steps=0), ["steps", "min"]),
    "basic_scheduler_steps_0": (lambda: _set(load_workflow("ctm_gamma"), "BasicScheduler", steps=0), ["steps", "min"]),
    "hyper_sd_steps_0": (lambda: _set(load_workflow("hyper_sd_1step"), "FewStepHyperSD1StepScheduler", steps=0),
                         ["steps", "min"]),
}

# ComfyUI 0.3.75 skips its min/max checks for every input of a node whose validate_inputs takes **kwargs
# (execution.py, validate_inputs: `x not in validate_function_inputs and not validate_has_kwargs`).
# A validate_inputs(**kwargs) signature makes ComfyUI skip min/max checks for every input of a node;
# these cases keep the pack's scheduler nodes honest about their ranges.
RANGE_CASES = {
    "pcm_scheduler_steps_0": (lambda: _set(load_workflow("pcm_phased_custom"), "FewStepPCMScheduler", steps=0),
                              ["steps"]),
    "lcm_scheduler_steps_0": (lambda: _set(load_workflow("tcd"), "FewStepLCMScheduler", steps=0), ["steps"]),
    "pcm_scheduler_steps_5000": (lambda: _set(load_workflow("pcm_phased_custom"), "FewStepPCMScheduler", steps=5000),
                                 ["steps"]),
    "pcm_scheduler_phases_0": (lambda: _set(load_workflow("pcm_phased_custom"), "FewStepPCMScheduler", phases=0),
                               ["phases"]),
    "pcm_scheduler_denoise_1.5": (lambda: _set(load_workflow("pcm_phased_custom"), "FewStepPCMScheduler", denoise=1.5),
                                  ["denoise"]),
}


def _check_rejected(server, graph, words):
    submitted = server.post_prompt(graph)
    if submitted.ok:  # let it finish so the queue is free for the next test
        entry = server.wait(submitted.prompt_id, timeout=120)
        pytest.fail(f"/prompt accepted the graph (run ended: {history_status(entry)}, "
                    f"{(execution_error(entry) or {}).get('exception_message')})")
    assert submitted.status == 400, submitted
    assert submitted.body.get("node_errors"), f"no node_errors in {submitted.body}"
    text = submitted.messages()
    for word in words:
        assert word in text, f"{word!r} not in the error:\n{text}"
    assert_good_prompt_runs(server)


@pytest.mark.parametrize("case", list(VALIDATION_CASES))
def test_bad_input_is_a_validation_error(server, case):
    build, words = VALIDATION_CASES[case]
    _check_rejected(server, build(), words)


@pytest.mark.parametrize("case", list(RANGE_CASES))
def test_out_of_range_inputs_of_pack_schedulers_are_validation_errors(server, case):
    build, words = RANGE_CASES[case]
    _check_rejected(server, build(), words)


# Values ComfyUI's own checks let through or turn into raw errors (NaN passes every min/max test; bool("false") is
# True): refused at /prompt by the pack's screen (host/input_checks.py, hooked in by host/registration.py).
NAN = float("nan")  # the test client's json.dumps writes NaN, and the server's JSON reader accepts it
def _sampler_only(graph):
    """The graph without its text previews: the sampler's branch is then its only output (else ComfyUI runs the
    valid outputs and reports the refused node in node_errors: test_a_refused_value_in_one_branch_...)."""
    return {k: v for k, v in graph.items() if v["class_type"] != "PreviewAny"}


SCREEN_CASES = {
    "fast_sampler_cfg_nan": (lambda: _set(_sampler_only(load_workflow("pcm_lora_fast_sampler")), "FewStepFastSampler",
                                          cfg=NAN), ["cfg is NaN"]),
    "fast_sampler_denoise_nan": (lambda: _set(_sampler_only(load_workflow("pcm_lora_fast_sampler")),
                                              "FewStepFastSampler", denoise=NAN), ["denoise is NaN"]),
    "pcm_scheduler_denoise_nan": (lambda: _set(load_workflow("pcm_phased_custom"), "FewStepPCMScheduler",
                                               denoise=NAN), ["denoise is NaN"]),
    "hyper_sd_denoise_nan": (lambda: _set(load_workflow("hyper_sd_1step"), "FewStepHyperSD1StepScheduler",
                                          denoise=NAN), ["denoise is NaN"]),
    "train_resume_string": (lambda: _set(load_workflow("pcm_distill_train"), "FewStepPCMDistill", resume="false"),
                            ["resume must be true or false"]),
    "train_w_max_huge": (lambda: _set(load_workflow("pcm_distill_train"), "FewStepPCMDistill", w_max=1e6),
                         ["Value 1000000.0 bigger than max of 30", "w_max"]),
    "train_phases_negative": (lambda: _set(load_workflow("pcm_distill_train"), "FewStepPCMDistill", phases=-1),
                              ["Value -1 smaller than min of 1", "phases"]),
    "train_alpha_nan": (lambda: _set(load_workflow("pcm_distill_train"), "FewStepPCMDistill", alpha=NAN),
                        ["alpha is NaN"]),
    "train_steps_text": (lambda: _set(load_workflow("pcm_distill_train"), "FewStepPCMDistill", steps="many"),
                         ["steps must be a whole number, got 'many'"]),
    "lora_strength_inf": (lambda: _set(_sampler_only(load_workflow("pcm_lora_fast_sampler")), "FewStepLoraLoader",
                                       strength_clip=float("inf")), ["Value inf bigger than max of 10.0"]),
}


@pytest.mark.parametrize("case", list(SCREEN_CASES))
def test_values_comfyui_lets_through_are_refused_at_prompt(server, case):
    build, words = SCREEN_CASES[case]
    _check_rejected(server, build(), words)


def test_a_refused_value_in_one_branch_lets_the_other_outputs_run(server):
    """ComfyUI runs the outputs that validate and reports the others: the refused Fast Sampler value is named in
    node_errors, the loader's summary preview runs, and the queued prompt (which carries the refused value in a node
    it does not run) is copied and stored without harm: the server answers the next prompt."""
    graph = with_unique_prefix(_set(load_workflow("pcm_lora_fast_sampler"), "FewStepFastSampler", cfg=NAN))
    submitted = server.post_prompt(graph)
    assert submitted.ok, submitted.messages()
    assert "cfg is NaN" in json.dumps(submitted.body.get("node_errors")), submitted.body
    entry = server.wait(submitted.prompt_id, timeout=120)
    assert history_status(entry) == "success", execution_error(entry)
    assert not server.output_files(entry)  # the sampler's branch did not run
    assert_good_prompt_runs(server)


def test_a_validation_message_is_given_once(server):
    graph = _set(load_workflow("pcm_distill_train"), "FewStepPCMDistill", output_name="x" * 300, w_min=9.0, w_max=8.0)
    submitted = server.post_prompt(graph)
    assert submitted.status == 400, submitted
    errors = submitted.body["node_errors"][only_node(graph, "FewStepPCMDistill")]["errors"]
    details = [e["details"] for e in errors]
    assert len(details) == 2 and len(set(details)) == 2, details
    assert sorted(e["extra_info"]["input_name"] for e in errors) == ["output_name", "w_min"], errors
    assert_good_prompt_runs(server)


def test_unknown_sampler_error_names_the_node(server):
    graph = _set(load_workflow("pcm_ksampler"), "KSampler", sampler_name="no_such_sampler")
    submitted = server.post_prompt(graph)
    assert submitted.status == 400
    node_id = only_node(graph, "KSampler")
    errors = submitted.body["node_errors"][node_id]["errors"]
    assert errors[0]["type"] == "value_not_in_list"
    assert errors[0]["extra_info"]["input_name"] == "sampler_name"


# -- bad input found only while running: an execution error in /history -------------------------

def test_increasing_sigmas_is_an_execution_error(server):
    graph = with_unique_prefix(load_workflow("pcm_phased_custom"))
    scheduler = only_node(graph, "FewStepPCMScheduler")
    graph["90"] = {"class_type": "FlipSigmas", "inputs": {"sigmas": [scheduler, 0]}}
    sampler_node = only_node(graph, "SamplerCustomAdvanced")
    graph[sampler_node]["inputs"]["sigmas"] = ["90", 0]
    submitted = server.post_prompt(graph)
    assert submitted.ok, submitted.messages()  # types are fine; the values are not
    entry = server.wait(submitted.prompt_id, timeout=120)
    assert history_status(entry) == "error"
    assert entry["status"]["completed"] is False
    error = execution_error(entry)
    assert error is not None, entry["status"]
    assert error["node_id"] == sampler_node and error["node_type"] == "SamplerCustomAdvanced"
    assert "sigmas must be decreasing" in error["exception_message"], error["exception_message"]
    assert not server.output_files(entry)
    assert_good_prompt_runs(server)


def test_templates_list_each_workflow_once_and_open(server):
    """ComfyUI's Templates dialog: GET /workflow_templates names a pack's workflow files, and
    /api/workflow_templates/<pack>/<name>.json serves them (from ONE folder: a name listed from a second folder
    would be served from the first, or not at all). Every shipped UI workflow is listed once and opens as a graph."""
    from support.server import PACK_NAME

    listed = server.get_json("/workflow_templates").get(PACK_NAME, [])
    ui_names = sorted(p.stem for p in WORKFLOWS_DIR.parent.glob("*.json"))
    assert sorted(listed) == ui_names and len(set(listed)) == len(listed), listed
    # the card's title is the file name (frontend 1.32.9): the catalog's titles, no snake_case ids
    assert sorted(listed) == sorted(w.title for w in CATALOG.values()), listed
    for name in listed:
        graph = server.get_json(f"/api/workflow_templates/{PACK_NAME}/{quote(name)}.json")
        assert graph.get("nodes") and graph.get("links") is not None, f"{name} is not a UI workflow"
        assert graph == json.loads((WORKFLOWS_DIR.parent / f"{name}.json").read_text())


def test_every_template_has_its_card_image(server):
    """The Templates dialog shows /api/workflow_templates/<pack>/<name>.jpg on each card: scripts/write_thumbnails.py
    makes it from the workflow's own output (64×64 digits scaled up, the schedule plot scaled down)."""
    import io

    from support.server import PACK_NAME

    for name in server.get_json("/workflow_templates")[PACK_NAME]:
        status, kind, body = server.get_bytes(f"/api/workflow_templates/{PACK_NAME}/{quote(name)}.jpg")
        assert status == 200 and kind == "image/jpeg", (name, status, kind)
        image = Image.open(io.BytesIO(body))
        assert image.format == "JPEG" and image.width == 256 and image.height >= 128, (name, image.size)
        pixels = np.asarray(image.convert("L")).astype(np.float64)
        assert pixels.std() > 1.0, f"{name}.jpg is (nearly) constant"


def test_server_alive_at_the_end(server):
    assert server.alive()
    stats = server.get_json("/system_stats")
    assert "system" in stats
