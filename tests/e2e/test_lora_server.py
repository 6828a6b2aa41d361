"""The LoRA nodes over HTTP: the shipped LoRA workflows (UI and API format), and bad LoRA files.

Every bad file gives a validation error (HTTP 400) or an execution error that names the problem, nothing
is saved, and the server answers the next good prompt.
"""
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from support.server import execution_error, history_status
from support.ui_format import renumbered, ui_to_api
from support.workflow_catalog import ui_file_name
from tests.e2e.test_server import (PUBLISHED_NAME_LORAS, assert_good_prompt_runs, load_workflow, on_tiny_checkpoint,
                                   only_node, with_unique_prefix)

REPO = Path(__file__).resolve().parents[2]
LORA_WORKFLOWS = ["pcm_lora_fast_sampler", "hyper_sd_lora_ksampler"]


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


@pytest.mark.parametrize("name", LORA_WORKFLOWS)
def test_ui_workflow_is_the_api_workflow(name, object_info):
    ui = json.loads((REPO / "workflows" / ui_file_name(name)).read_text())
    api = load_workflow(name)
    assert ui_to_api(ui, object_info) == renumbered(api)


@pytest.mark.parametrize("name", LORA_WORKFLOWS)
def test_lora_workflow_summary_and_preset(name, server):
    """The shipped graph shows the loader's summary (core PreviewAny on its summary output): zero missed keys and the
    recognised family, for a LoRA under the published file name (a random stand-in on the tiny checkpoint)."""
    graph = on_tiny_checkpoint(with_unique_prefix(load_workflow(name)), PUBLISHED_NAME_LORAS[name])
    loader = only_node(graph, "FewStepLoraLoader")
    shown = [k for k, v in graph.items() if v["class_type"] == "PreviewAny" and v["inputs"]["source"] == [loader, 3]]
    assert len(shown) == 1, "the workflow does not show the loader's summary"
    submitted = server.post_prompt(graph)
    assert submitted.ok, submitted.messages()
    entry = server.wait(submitted.prompt_id, timeout=120)
    assert history_status(entry) == "success", execution_error(entry)
    text = json.dumps(entry["outputs"].get(shown[0], {}))
    assert "0 keys missed" in text and "69 model + 72 text-encoder layers patched" in text, text
    family = "PCM" if name.startswith("pcm") else "Hyper-SD"
    assert family in text and "file name" in text, text


def _loras_dir(server):
    return server.base_dir / "models" / "loras"


def _bad_files(folder):
    n = "lora_unet_input_blocks_1_1_proj_in"
    good = {n + ".lora_down.weight": torch.ones(4, 320), n + ".lora_up.weight": torch.ones(320, 4, 1, 1)}
    save_file(good, str(folder / "e2e_cut_me.safetensors"))
    data = (folder / "e2e_cut_me.safetensors").read_bytes()
    (folder / "e2e_truncated.safetensors").write_bytes(data[:-100])
    (folder / "e2e_empty.safetensors").write_bytes(b"")
    (folder / "e2e_pickle.ckpt").write_bytes(b"\x80\x04\x95cos\nsystem\n(S'echo owned'\ntR.")
    save_file({n + ".lora_down.weight": torch.full((4, 320), float("nan")), n + ".lora_up.weight": torch.ones(320, 4, 1, 1)},
              str(folder / "e2e_nan.safetensors"))
    save_file({n + ".lora_down.weight": torch.zeros(4096, 1), n + ".lora_up.weight": torch.zeros(1, 4096)},
              str(folder / "e2e_rank.safetensors"))
    xl = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({xl + ".lora_down.weight": torch.ones(4, 2048), xl + ".lora_up.weight": torch.ones(640, 4)},
              str(folder / "e2e_sdxl.safetensors"))


def _graph_with(lora_name):
    graph = on_tiny_checkpoint(with_unique_prefix(load_workflow("pcm_lora_fast_sampler")), lora_name)
    return graph


@pytest.mark.parametrize("name,words", [
    ("e2e_truncated.safetensors", ["lora_name", "truncated"]),
    ("e2e_empty.safetensors", ["empty"]),
    ("e2e_pickle.ckpt", ["never unpickled"]),
    ("../../checkpoints/fewstep_tiny_sd15.safetensors", ["lora_name"]),
])
def test_bad_lora_file_is_a_validation_error(name, words, server):
    _bad_files(_loras_dir(server))
    submitted = server.post_prompt(_graph_with(name))
    if submitted.ok:
        entry = server.wait(submitted.prompt_id, timeout=120)
        pytest.fail(f"accepted: {history_status(entry)} {execution_error(entry)}")
    assert submitted.status == 400
    text = submitted.messages()
    for word in words:
        assert word in text, text
    assert_good_prompt_runs(server)


# A NaN/Inf value in the model's tensors is found where they are first read, when sampling loads the model
# (host/lora_patches.py ValuesCheck): the sampling node fails, naming the file.
@pytest.mark.parametrize("name,words,node_type", [
    ("e2e_nan.safetensors", ["e2e_nan.safetensors", "NaN or Inf"], "FewStepFastSampler"),
    ("e2e_rank.safetensors", ["rank 4096"], "FewStepLoraLoader"),
    ("e2e_sdxl.safetensors", ["for SDXL", "the model is SD1.5"], "FewStepLoraLoader"),
])
def test_bad_lora_content_is_an_execution_error(name, words, node_type, server):
    _bad_files(_loras_dir(server))
    submitted = server.post_prompt(_graph_with(name))
    assert submitted.ok, submitted.messages()
    entry = server.wait(submitted.prompt_id, timeout=120)
    assert history_status(entry) == "error"
    error = execution_error(entry)
    assert error["node_type"] == node_type
    for word in words:
        assert word in error["exception_message"], error["exception_message"]
    assert not server.output_files(entry)
    assert_good_prompt_runs(server)
