"""Each vocabulary has one source, and the places that use it read it (pure: no ComfyUI).

The node-side halves (widget defaults, validate_inputs) are in tests/host/test_vocabulary_host.py.
"""
import copy
import json

import pytest

from fewstep.distill.engine import DistillConfig
from fewstep.loras import presets
from fewstep.schedulers import check_phases, pcm_phase_edges, pcm_sigmas, phases_problem
from fewstep.schedulers.noise_schedules import DiscreteVPSampling

# ---------------------------------------------------------------- the phases ≤ K rule


@pytest.mark.parametrize("phases,k", [(4, 50), (1, 1), (40, 40), (1, 1000)])
def test_phases_within_k_pass_everywhere(phases, k):
    assert phases_problem(phases, k) is None
    check_phases(phases, k)
    DistillConfig(phases=phases, ddim_timesteps=k).check()
    assert len(pcm_phase_edges(phases, k)) == phases + 1


@pytest.mark.parametrize("phases,k", [(11, 10), (48, 40), (0, 50)])
def test_phases_beyond_k_give_one_message_in_scheduler_engine_and_presets(phases, k):
    message = phases_problem(phases, k)
    assert message.startswith(f"phases ({phases}) must be between 1 and ddim_timesteps K ({k})")
    for refused in (lambda: check_phases(phases, k), lambda: pcm_phase_edges(phases, k),
                    lambda: pcm_sigmas(DiscreteVPSampling(), 4, phases, k),
                    lambda: DistillConfig(phases=phases, ddim_timesteps=k).check()):
        with pytest.raises(ValueError) as error:
            refused()
        assert str(error.value) == message


def test_phases_beyond_k_in_the_preset_table_and_trainer_metadata_give_the_message():
    with open(presets.TABLE_PATH, encoding="utf-8") as handle:
        table = json.load(handle)
    broken = copy.deepcopy(table)
    broken["families"]["pcm_sdxl_smallcfg"].update(phases=48)  # K = 40
    with pytest.raises(ValueError) as error:
        presets.validate_table(broken)
    assert str(error.value) == f"preset 'pcm_sdxl_smallcfg': {phases_problem(48, 40)}"

    metadata = {presets.META_METHOD: "pcm", presets.META_PHASES: "12", presets.META_DDIM_TIMESTEPS: "10",
                presets.META_BASE_ARCH: "sd15"}
    with pytest.raises(ValueError) as error:
        presets.preset_from_metadata(metadata)
    assert str(error.value).endswith(phases_problem(12, 10))
    found = presets.preset_for("mine.safetensors", metadata, "sd15")
    assert found.source == "structure" and phases_problem(12, 10) in found.message
