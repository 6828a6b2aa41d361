"""Another pack that registers `tcd` (licyk/ComfyUI-TCD-Sampler, imitated by tests/support/other_tcd_pack), loaded
by ComfyUI's own nodes.load_custom_node before or after fewstep registers: one warning that says what the `tcd`
entry runs and which node runs ours, no name listed twice, and our nodes still on our own functions.

Every test restores the host's registries (the lists in place, sample_tcd, the scheduler handlers) afterwards.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import types
from dataclasses import replace

import pytest

from fewstep.loras import presets

STAND_IN = __import__("pathlib").Path(__file__).resolve().parents[1] / "support" / "other_tcd_pack"
PACK_DIR_NAME = "ComfyUI-TCD-Sampler"


def expected_warning(pack_dir):
    return (f"fewstep: the sampler 'tcd' in KSampler's dropdowns runs sample_tcd from ComfyUI-TCD-Sampler "
            f"({pack_dir / 'tcd_sampling.py'}), another custom node pack's, not fewstep's. For fewstep's, use the node "
            "'TCD Sampler (gamma)' (FewStepTCDSampler) with SamplerCustom or SamplerCustomAdvanced; fewstep's own "
            "nodes always run fewstep's.")


@pytest.fixture
def pack(comfy_host):
    """The pack as the host imported it (its own module objects), and the host's registries, restored afterwards."""
    import comfy.k_diffusion.sampling as k_sampling
    import comfy.samplers

    prefix = comfy_host.nodes.NODE_CLASS_MAPPINGS["FewStepTCDSampler"].__module__.rsplit(".nodes.", 1)[0]
    ns = types.SimpleNamespace(registration=sys.modules[prefix + ".host.registration"],
                               samplers=sys.modules[prefix + ".samplers.registry"].SAMPLERS,
                               k_sampling=k_sampling, cs=comfy.samplers)
    ours = ns.samplers["tcd"].function
    assert k_sampling.sample_tcd is ours and comfy.samplers.SAMPLER_NAMES.count("tcd") == 1  # a clean start
    lists = [(names, list(names)) for names in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES,
                                                comfy.samplers.SCHEDULER_NAMES)]
    handlers = dict(comfy.samplers.SCHEDULER_HANDLERS)
    told = set(ns.registration._told)
    modules = set(sys.modules)
    try:
        yield ns
    finally:
        for names, saved in lists:
            names[:] = saved
        k_sampling.sample_tcd = ours
        if hasattr(k_sampling, "sample_tcd_euler_a"):
            del k_sampling.sample_tcd_euler_a
        comfy.samplers.SCHEDULER_HANDLERS.clear()
        comfy.samplers.SCHEDULER_HANDLERS.update(handlers)
        ns.registration._told.clear()
        ns.registration._told.update(told)
        for name in set(sys.modules) - modules:
            if PACK_DIR_NAME in name:
                del sys.modules[name]


def load_other_pack(comfy_host, tmp_path):
    """Copy the stand-in to <tmp>/custom_nodes/ComfyUI-TCD-Sampler and load it as ComfyUI loads any custom node."""
    target = tmp_path / "custom_nodes" / PACK_DIR_NAME
    shutil.copytree(STAND_IN, target, ignore=shutil.ignore_patterns("__pycache__"))
    assert asyncio.run(comfy_host.nodes.load_custom_node(str(target)))
    return target


def fewstep_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "fewstep" and r.levelno == logging.WARNING]


def dropdown_options(comfy_host):
    nodes = comfy_host.nodes
    select = nodes.NODE_CLASS_MAPPINGS["KSamplerSelect"].INPUT_TYPES()["required"]["sampler_name"]
    basic = nodes.NODE_CLASS_MAPPINGS["BasicScheduler"].INPUT_TYPES()["required"]["scheduler"]
    ksampler = nodes.KSampler.INPUT_TYPES()["required"]
    return [ksampler["sampler_name"][0], ksampler["scheduler"][0],
            select[0] if isinstance(select[0], list) else select[1]["options"],
            basic[0] if isinstance(basic[0], list) else basic[1]["options"]]


def assert_our_nodes_run_ours(pack, run_node):
    for node_id, name, inputs in (("FewStepTCDSampler", "tcd", {"gamma": 0.3}),
                                  ("FewStepCTMGammaSampler", "ctm_gamma", {"gamma": 0.5}),
                                  ("FewStepPCMSampler", "pcm", {})):
        (sampler,) = run_node(node_id, **inputs)
        assert sampler.sampler_function is pack.samplers[name].function, node_id


def fast_tcd(run_node, tiny_models, conds):
    """The Fast Sampler on a TCD preset: it builds its sampler from our registry, never from the dropdown."""
    tcd = next(p for p in presets.all_presets().values() if p.sampler == "tcd")
    (latent,) = run_node("EmptyLatentImage", width=64, height=64, batch_size=1)
    (out,) = run_node("FewStepFastSampler", model=tiny_models.model, preset=replace(tcd, steps=2, cfg=1.0),
                      positive=conds[0], negative=conds[1], latent_image=latent, seed=9, steps=0, cfg=0.0, gamma=-1.0,
                      denoise=1.0)
    return out["samples"]


def test_other_pack_loaded_after_ours(pack, comfy_host, run_node, tiny_models, conds, tmp_path, caplog):
    before = fast_tcd(run_node, tiny_models, conds)
    target = load_other_pack(comfy_host, tmp_path)
    theirs = pack.k_sampling.sample_tcd
    assert theirs is not pack.samplers["tcd"].function
    assert pack.cs.SAMPLER_NAMES.count("tcd") == 2  # what the pack does to the list: the defect to repair

    with caplog.at_level(logging.WARNING, logger="fewstep"):
        said = pack.registration.check_foreign_overrides()  # what the first prompt runs
        again = pack.registration.check_foreign_overrides()  # and every later one
    assert said == [expected_warning(target)] and again == []
    assert fewstep_warnings(caplog) == [expected_warning(target)]
    for names in dropdown_options(comfy_host):
        assert len(names) == len(set(names)), names
    assert "tcd" in pack.cs.SAMPLER_NAMES and "tcd_euler_a" in pack.cs.SAMPLER_NAMES  # theirs stays listed
    assert pack.cs.ksampler("tcd").sampler_function is theirs  # what the warning says the dropdown runs
    assert_our_nodes_run_ours(pack, run_node)
    assert (fast_tcd(run_node, tiny_models, conds) == before).all()


def test_other_pack_loaded_before_ours(pack, comfy_host, run_node, tmp_path, caplog):
    # Back to a host fewstep has not registered `tcd` into yet, then the other pack, then our registration.
    del pack.k_sampling.sample_tcd
    for names in (pack.cs.KSAMPLER_NAMES, pack.cs.SAMPLER_NAMES):
        names.remove("tcd")
    target = load_other_pack(comfy_host, tmp_path)
    theirs = pack.k_sampling.sample_tcd

    with caplog.at_level(logging.WARNING, logger="fewstep"):
        pack.registration.register_all()
        pack.registration.register_all()  # idempotent
        later = pack.registration.check_foreign_overrides()  # the first prompt: already said
    assert fewstep_warnings(caplog) == [expected_warning(target)] and later == []
    assert pack.k_sampling.sample_tcd is theirs  # theirs kept
    assert pack.cs.SAMPLER_NAMES.count("tcd") == 1 and "tcd" not in pack.cs.KSAMPLER_NAMES
    for names in dropdown_options(comfy_host):
        assert len(names) == len(set(names)), names
    assert_our_nodes_run_ours(pack, run_node)


def test_the_check_runs_on_every_prompt_through_the_servers_hook(pack, comfy_host, tmp_path, caplog):
    """register_foreign_override_check adds one on-prompt handler (ComfyUI's PromptServer methods, on a bare
    state object: no server runs in-process), and the server's trigger_on_prompt then runs the check."""
    from server import PromptServer

    state = types.SimpleNamespace(on_prompt_handlers=[])
    state.add_on_prompt_handler = lambda handler: PromptServer.add_on_prompt_handler(state, handler)
    assert pack.registration.register_foreign_override_check(state)
    assert pack.registration.register_foreign_override_check(state)
    assert len(state.on_prompt_handlers) == 1
    target = load_other_pack(comfy_host, tmp_path)
    body = {"prompt": {}, "client_id": "x"}
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        assert PromptServer.trigger_on_prompt(state, body) is body
        PromptServer.trigger_on_prompt(state, body)
    assert fewstep_warnings(caplog) == [expected_warning(target)]
    assert pack.cs.SAMPLER_NAMES.count("tcd") == 1


def test_the_nodes_a_warning_names_exist_and_run_ours(pack, comfy_host, run_node):
    mappings = comfy_host.nodes.NODE_CLASS_MAPPINGS
    from fewstep.samplers.registry import SAMPLERS
    from fewstep.schedulers.registry import SCHEDULERS

    for kind, table in (("sampler", SAMPLERS), ("scheduler", SCHEDULERS)):
        for name, entry in table.items():
            label = mappings[entry.node].define_schema().display_name
            assert f"'{label}' ({entry.node})" in pack.registration.foreign_override_message(kind, name, print)
    assert_our_nodes_run_ours(pack, run_node)
