"""Float64 parity of the pack's samplers + schedules with diffusers' schedulers (no ComfyUI needed)."""
import pytest

import parity_cases as pc

TOL = 1e-5  # final latents are unit scale, so this is also the relative bound
FLOAT32_TOL = 1e-6  # diffusers runs flow steps in float32


@pytest.mark.parametrize("steps", [n for n in pc.STEP_COUNTS if n != 3])
def test_pcm_equals_ddim_trailing(steps):
    assert pc.pcm_vs_ddim(steps) <= TOL


def test_ddim_trailing_quirk_at_three_steps_is_diffusers_not_ours():
    # DDIMScheduler lists 999/666/332 but steps to t − T//N = 333 before evaluating at 332; the pack follows
    # the listed timesteps, and equals TCDScheduler(γ=0) on them to float64 precision instead.
    assert pc.pcm_vs_ddim(3) > 1e-3
    assert pc.pcm_vs_tcd0(3) <= TOL


@pytest.mark.parametrize("steps", pc.STEP_COUNTS)
def test_pcm_trailing_equals_tcd_gamma0(steps):
    assert pc.pcm_vs_tcd0(steps) <= TOL


@pytest.mark.parametrize("steps", pc.STEP_COUNTS)
def test_pcm_phase_edges_equal_tcd_gamma0_on_the_edges(steps):
    assert pc.pcm_vs_tcd0(steps, phases=4, ddim_steps=50) <= TOL


@pytest.mark.parametrize("gamma", pc.TCD_GAMMAS)
@pytest.mark.parametrize("steps", pc.STEP_COUNTS)
def test_tcd_equals_tcd_scheduler(steps, gamma):
    assert pc.tcd_vs_tcd(steps, gamma) <= TOL


@pytest.mark.parametrize("steps", pc.STEP_COUNTS)
def test_sd3_flow_deterministic_equals_flow_match_euler(steps):
    assert pc.sd3_deterministic(steps) <= FLOAT32_TOL


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("steps", pc.STEP_COUNTS)
def test_ctm_gamma_equals_reference_loop(steps, gamma):
    assert pc.ctm_vs_reference(steps, gamma) <= TOL


def test_parity_fails_when_the_update_is_wrong():
    """The harness can fail: TCD with the wrong γ convention (1 − γ) is far from diffusers."""
    from diffusers import TCDScheduler
    import torch
    from fewstep.samplers import sample_tcd
    from fewstep.schedulers import lcm_sigmas

    scheduler = TCDScheduler(**pc.SD_BETAS)
    ms = pc._vp_table(scheduler)
    scheduler.set_timesteps(4)
    sigmas = lcm_sigmas(ms, 4, end="sigma_min")
    ours = pc._to_vp(pc._run_ours(sample_tcd, ms, sigmas, 0, gamma=0.7, noise_sampler=pc.ReplayNoise(1)), sigmas[-1])
    theirs = pc._diffusers_loop(scheduler, 0, {"eta": 0.3, "generator": torch.Generator().manual_seed(1)})
    assert (ours - theirs).abs().max().item() > 1e-2
