"""The PCM Distillation node over HTTP: the shipped training workflow, Cancel + resume, and bad inputs.

The shipped workflow trains the embedded digits model on its 100-digit image (tests/e2e/test_digits_quality.py
checks what that LoRA draws); these plumbing tests run the same graph on the tiny random SD1.5 checkpoint with
short settings (PLUMBING), a few steps per prompt. Each test trains under its own output_name so no result can
come from the cache or from another test's file.
"""
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from support.server import execution_error, history_status
from support.ui_format import renumbered, ui_to_api
from support.workflow_catalog import ui_file_name
from tests.e2e.test_server import (assert_good_prompt_runs, load_workflow, on_tiny_checkpoint, only_node,
                                   with_unique_prefix)

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = "pcm_distill_train"
NODE = "FewStepPCMDistill"
# seconds per training prompt: ~7 s on a quiet 2-core CPU, but CPU training slows >10x beside another busy process
TIMEOUT = 300
PLUMBING = {"steps": 20, "batch_size": 2, "ddim_timesteps": 10, "rank": 4, "alpha": 4.0, "learning_rate": 1e-4,
            "w_min": 4.0, "w_max": 5.0, "gradient_checkpointing": True, "warmup_steps": 0}


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


def training_graph(name, **changes):
    graph = on_tiny_checkpoint(with_unique_prefix(load_workflow(WORKFLOW)))
    graph[only_node(graph, NODE)]["inputs"].update(PLUMBING, output_name=name, **changes)
    return graph


def unique(stem):
    return f"{stem}_{uuid.uuid4().hex[:8]}"


def lora_path(server, name):
    return server.base_dir / "models" / "loras" / f"{name}.safetensors"


def state_path(server, name):
    return server.output_dir / "fewstep_training" / name / "state.safetensors"


def metadata(path):
    with safe_open(str(path), "pt") as handle:
        return handle.metadata() or {}


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64)


def message_names(entry):
    return [name for name, _ in (entry.get("status") or {}).get("messages", [])]


def test_ui_workflow_is_the_api_workflow(object_info):
    ui = json.loads((REPO / "workflows" / ui_file_name(WORKFLOW)).read_text())
    assert ui_to_api(ui, object_info) == renumbered(load_workflow(WORKFLOW))


def test_workflow_trains_a_lora_that_core_loads(server):
    name = unique("e2e_pcm")
    graph = training_graph(name)
    entry = server.run(graph, timeout=TIMEOUT)
    assert history_status(entry) == "success", execution_error(entry)
    saved = server.output_files(entry)
    assert len(saved) == 1 and saved[0].is_file(), saved
    # loss curve and the 1/2/4-step validation strip come back as preview images
    for title, count in (("Loss curve", 1), ("Validation (1, 2, 4 steps)", 3)):
        node = next(k for k, n in graph.items() if n.get("_meta", {}).get("title") == title)
        previews = entry["outputs"][node]["images"]
        assert len(previews) == count, previews
        assert all((server.base_dir / "temp" / p["subfolder"] / p["filename"]).is_file() for p in previews)

    path = lora_path(server, name)
    assert path.is_file(), f"no LoRA at {path}"
    meta = metadata(path)
    inputs = graph[only_node(graph, NODE)]["inputs"]
    assert meta["fewstep.method"] == "pcm" and meta["fewstep.base_arch"] == "sd15", meta
    assert meta["fewstep.phases"] == str(inputs["phases"]) and meta["fewstep.ddim_timesteps"] == str(
        inputs["ddim_timesteps"]), meta
    assert meta["fewstep.steps_trained"] == str(inputs["steps"]), meta

    # core's own loader applies every key, and reproduces the node's student on the same seed
    graph["30"] = {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"model": ["1", 0], "lora_name": path.name, "strength_model": 1.0}}
    sampler = only_node(graph, "KSampler")
    graph[sampler]["inputs"]["model"] = ["30", 0]
    for key in [k for k, n in graph.items() if n["class_type"] in (NODE, "PreviewImage")]:
        del graph[key]
    save = only_node(graph, "SaveImage")
    graph[save]["inputs"]["filename_prefix"] += "_core"
    log_start = len(server.log_text())
    core = server.run(graph, timeout=TIMEOUT)
    assert history_status(core) == "success", execution_error(core)
    log = server.log_text()[log_start:]
    assert "lora key not loaded" not in log, log
    # the teacher alone draws something else, so the match above is the LoRA's doing
    graph[sampler]["inputs"]["model"] = ["1", 0]
    graph[save]["inputs"]["filename_prefix"] += "_teacher"
    teacher = server.run(graph, timeout=TIMEOUT)
    assert history_status(teacher) == "success", execution_error(teacher)
    ours, core_image, teacher_image = (pixels(e) for e in (saved[0], *server.output_files(core),
                                                          *server.output_files(teacher)))
    assert np.abs(ours - core_image).mean() < 1.0, np.abs(ours - core_image).mean()
    assert np.abs(ours - teacher_image).mean() > 2.0, np.abs(ours - teacher_image).mean()


def _wait_for(path, server, prompt_id, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            return
        entry = server.get_json(f"/history/{prompt_id}").get(prompt_id)
        if entry and (entry.get("status") or {}).get("completed") is not None:
            pytest.fail(f"the training ended before {path} appeared: {history_status(entry)} {execution_error(entry)}")
        time.sleep(0.05)
    pytest.fail(f"{path} did not appear within {timeout:.0f} s")


def test_cancel_keeps_a_resumable_state_and_resume_finishes(server):
    name = unique("e2e_cancel")
    submitted = server.post_prompt(training_graph(name, steps=2000, save_every=1))
    assert submitted.ok, submitted.messages()
    state = state_path(server, name)
    _wait_for(state, server, submitted.prompt_id)
    status, _ = server._request("POST", "/interrupt", {})
    assert status == 200
    entry = server.wait(submitted.prompt_id, timeout=TIMEOUT)
    assert history_status(entry) != "success"
    assert "execution_interrupted" in message_names(entry), entry["status"]
    saved_step = int(metadata(state)["step"])
    assert 1 <= saved_step < 2000
    lora = lora_path(server, name)
    assert load_file(str(lora)), "the LoRA written before Cancel is empty"
    assert int(metadata(lora)["fewstep.steps_trained"]) >= saved_step
    assert_good_prompt_runs(server)

    target = saved_step + 2
    resumed = server.run(training_graph(name, steps=target, save_every=1, resume=True), timeout=TIMEOUT)
    assert history_status(resumed) == "success", execution_error(resumed)
    assert metadata(lora)["fewstep.steps_trained"] == str(target)
    assert int(metadata(state)["step"]) == target


def test_cancel_without_save_every_still_saves(server):
    # The interrupt is raised inside the step (comfy.ops checks it in every layer's forward, the server's progress
    # hook in job.progress), not only between steps: the node must save on that path too.
    name = unique("e2e_cancel0")
    submitted = server.post_prompt(training_graph(name, steps=2000))
    assert submitted.ok, submitted.messages()
    deadline = time.monotonic() + TIMEOUT
    while f"{name}.safetensors: step 2/2000" not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    server._request("POST", "/interrupt", {})
    entry = server.wait(submitted.prompt_id, timeout=TIMEOUT)
    assert "execution_interrupted" in message_names(entry), entry["status"]
    state, lora = state_path(server, name), lora_path(server, name)
    assert state.is_file() and lora.is_file(), "Cancel with save_every 0 saved nothing"
    step = int(metadata(state)["step"])
    assert 2 <= step < 2000 and metadata(lora)["fewstep.steps_trained"] == str(step)


@pytest.mark.parametrize("changes,words", [
    ({"phases": 12, "ddim_timesteps": 10}, ["phases (12)", "ddim_timesteps (10)"]),
    ({"output_name": "../x"}, ["output_name", "'../x'"]),
])
def test_bad_settings_are_validation_errors(server, changes, words):
    graph = with_unique_prefix(load_workflow(WORKFLOW))
    graph[only_node(graph, NODE)]["inputs"].update(changes)
    submitted = server.post_prompt(graph)
    if submitted.ok:
        entry = server.wait(submitted.prompt_id, timeout=TIMEOUT)
        pytest.fail(f"accepted: {history_status(entry)} {execution_error(entry)}")
    assert submitted.status == 400
    assert only_node(graph, NODE) in submitted.body.get("node_errors", {}), submitted.body
    text = submitted.messages()
    for word in words:
        assert word in text, text
    assert not (server.base_dir / "models" / "x.safetensors").exists()
    assert_good_prompt_runs(server)


def test_batch_larger_than_the_data_is_an_execution_error(server):
    name = unique("e2e_batch")
    submitted = server.post_prompt(training_graph(name, batch_size=101))
    assert submitted.ok, submitted.messages()
    entry = server.wait(submitted.prompt_id, timeout=TIMEOUT)
    assert history_status(entry) == "error"
    error = execution_error(entry)
    assert error["node_type"] == NODE, error
    assert "batch_size (101)" in error["exception_message"] and "100 latents" in error["exception_message"], error
    assert not server.output_files(entry)
    assert not lora_path(server, name).exists()
    assert_good_prompt_runs(server)
