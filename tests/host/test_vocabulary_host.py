"""The nodes read the pack's vocabularies (the node-side half of tests/test_vocabulary.py)."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import replace

import pytest

from fewstep.samplers.registry import SAMPLERS
from fewstep.schedulers import phases_problem
from fewstep.schedulers.registry import SCHEDULERS


def node_class(comfy_host, node_id):
    return comfy_host.nodes.NODE_CLASS_MAPPINGS[node_id]


def widget_default(comfy_host, node_id, name):
    return next(i for i in node_class(comfy_host, node_id).define_schema().inputs if i.id == name).default


# ---------------------------------------------------------------- dropdown samplers and schedulers

def test_registered_dropdown_entries_are_the_registries(comfy_host):
    import comfy.k_diffusion.sampling as k_sampling
    import comfy.samplers

    def same_function(registered, ours):  # the host imported the pack under its own package name
        return (registered.__qualname__, registered.__module__.split(".")[-2:]) == \
            (ours.__qualname__, ours.__module__.split(".")[-2:])

    for name, entry in SAMPLERS.items():
        assert same_function(getattr(k_sampling, "sample_" + name), entry.function), name
        assert name in comfy.samplers.KSampler.SAMPLERS and name in comfy.samplers.SAMPLER_NAMES
    for name, entry in SCHEDULERS.items():
        assert same_function(comfy.samplers.SCHEDULER_HANDLERS[name].handler, entry.function), name
        assert name in comfy.samplers.KSampler.SCHEDULERS


def test_sampler_and_scheduler_widgets_default_to_the_dropdowns_options(comfy_host):
    assert widget_default(comfy_host, "FewStepTCDSampler", "gamma") == SAMPLERS["tcd"].options["gamma"]
    assert widget_default(comfy_host, "FewStepCTMGammaSampler", "gamma") == SAMPLERS["ctm_gamma"].options["gamma"]
    lcm = SCHEDULERS["lcm"].defaults
    assert widget_default(comfy_host, "FewStepLCMScheduler", "original_steps") == lcm["original_steps"]
    assert widget_default(comfy_host, "FewStepLCMScheduler", "end") == lcm["end"]
    assert widget_default(comfy_host, "FewStepPCMScheduler", "end") == SCHEDULERS["pcm"].defaults["end"]


def test_preset_to_ksampler_notes_gamma_against_the_dropdowns(run_node):
    from fewstep.loras import presets

    tcd = next(p for p in presets.all_presets().values() if p.sampler == "tcd")
    dropdown = SAMPLERS["tcd"].options["gamma"]
    *_, same = run_node("FewStepPresetToKSampler", preset=replace(tcd, gamma=dropdown))
    *_, other = run_node("FewStepPresetToKSampler", preset=replace(tcd, gamma=1.0))
    assert "γ" not in same.replace(tcd.message, "")
    assert f"KSampler's tcd uses γ {dropdown:g}; this preset wants γ 1" in other


# ---------------------------------------------------------------- the phases ≤ K rule

@pytest.mark.parametrize("node_id", ["FewStepPCMScheduler", "FewStepSchedulePreview", "FewStepPCMDistill"])
def test_node_validation_gives_the_one_phases_message(comfy_host, node_id):
    cls = node_class(comfy_host, node_id)
    assert cls.cross_checks({"phases": 12, "ddim_timesteps": 10}) == {"phases": phases_problem(12, 10)}
    assert cls.cross_checks({"phases": 10, "ddim_timesteps": 10}) == {}


def test_preview_phases_zero_draws_no_edges_and_is_valid(comfy_host):
    assert node_class(comfy_host, "FewStepSchedulePreview").cross_checks({"phases": 0, "ddim_timesteps": 10}) == {}


def test_fast_sampler_says_when_a_presets_phases_exceed_its_k(run_node, tiny_models, conds, caplog):
    """A PCM SDXL file named …_48step asks for 48 phases on K = 40: sampled on the trailing schedule, and said."""
    from fewstep.loras import presets

    base = next(p for p in presets.all_presets().values() if p.family == "pcm" and p.sampler == "pcm")
    too_many = replace(base, phases=48, ddim_timesteps=40, steps=4, cfg=1.0)
    trailing = replace(base, phases=None, ddim_timesteps=None, steps=4, cfg=1.0)
    (latent,) = run_node("EmptyLatentImage", width=64, height=64, batch_size=1)

    def fast(preset):
        (out,) = run_node("FewStepFastSampler", model=tiny_models.model, preset=preset, positive=conds[0],
                          negative=conds[1], latent_image=latent, seed=7, steps=0, cfg=0.0, gamma=-1.0, denoise=1.0)
        return out["samples"]

    with caplog.at_level(logging.WARNING, logger="fewstep"):
        got = fast(too_many)
    assert phases_problem(48, 40) in caplog.text and "trailing" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        expected = fast(trailing)
    assert caplog.text == ""
    assert (got == expected).all()


# ---------------------------------------------------------------- training defaults

def test_training_node_widgets_default_to_distill_config(comfy_host):
    from fewstep.distill.engine import DistillConfig
    from fewstep.distill.lora import DEFAULT_ALPHA, DEFAULT_RANK

    config = dataclasses.asdict(DistillConfig())
    inputs = {i.id: i for i in node_class(comfy_host, "FewStepPCMDistill").define_schema().inputs}
    shared = sorted(set(inputs) & set(config))
    assert len(shared) == 19, shared  # 15 training settings + method and its three TSCD settings
    assert {k: inputs[k].default for k in shared} == {k: config[k] for k in shared}
    assert (inputs["rank"].default, inputs["alpha"].default) == (DEFAULT_RANK, DEFAULT_ALPHA)


def test_cli_clip_types_are_comfyuis(comfy_host):
    """The CLI's --clip-type choices (kept in host/distill_cli.py so --help needs no ComfyUI) are exactly the pinned
    ComfyUI's CLIPType members, as CLIPLoader names them."""
    import comfy.sd

    from fewstep.host.distill_cli import CLIP_TYPES

    assert list(CLIP_TYPES) == [member.name.lower() for member in comfy.sd.CLIPType]
