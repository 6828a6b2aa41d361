"""The nodes read the pack's vocabularies (the node-side half of tests/test_vocabulary.py)."""
from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from fewstep.schedulers import phases_problem


def node_class(comfy_host, node_id):
    return comfy_host.nodes.NODE_CLASS_MAPPINGS[node_id]


# ---------------------------------------------------------------- the phases ≤ K rule

@pytest.mark.parametrize("node_id", ["FewStepPCMScheduler", "FewStepSchedulePreview", "FewStepPCMDistill"])
def test_node_validation_gives_the_one_phases_message(comfy_host, node_id):
    cls = node_class(comfy_host, node_id)
    assert cls.validate_inputs(phases=12, ddim_timesteps=10) == phases_problem(12, 10)
    assert cls.validate_inputs(phases=10, ddim_timesteps=10) is True


def test_preview_phases_zero_draws_no_edges_and_is_valid(comfy_host):
    assert node_class(comfy_host, "FewStepSchedulePreview").validate_inputs(phases=0, ddim_timesteps=10) is True


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
