"""Schedules: the phase-edge table of docs/algorithms.md ("PCM: phase edges"), diffusers' timesteps for every N,
and the denoise rule."""
import math

import numpy as np
import pytest
import torch

from fewstep.schedulers import (apply_denoise, hyper_sd_1step_sigmas, hyper_sd_timesteps, lcm_sigmas, lcm_timesteps,
                                pcm_phase_edges, pcm_sigmas, pcm_timesteps, trailing_timesteps)
from support.model_sampling import DiscreteVPSampling, FlowSampling, scaled_linear_alphas_cumprod

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize("phases, k, edges", [
    (4, 50, [999, 739, 499, 239, 0]),
    (4, 40, [999, 749, 499, 249, 0]),
    (8, 50, [999, 859, 739, 619, 499, 359, 239, 119, 0]),
])
def test_phase_edge_table(phases, k, edges):
    assert pcm_phase_edges(phases, k) == edges


@pytest.mark.parametrize("k", [1, 7, 25, 40, 50, 64, 100, 333])
def test_phase_edges_follow_the_training_scripts_linspace_rule(k):
    for m in range(1, min(k, 40) + 1):
        grid = [(j + 1) * (1000 // k) - 1 for j in range(k)]
        starts = np.floor(np.linspace(0, k, m, endpoint=False)).astype(int)
        expected = [grid[-1]] + [grid[s - 1] for s in starts[1:]][::-1] + [0]
        assert pcm_phase_edges(m, k) == expected


def test_edges_equal_trailing_iff_k_multiple_of_phases():
    assert pcm_phase_edges(4, 40)[:-1] == trailing_timesteps(4)
    assert pcm_phase_edges(4, 50)[:-1] != trailing_timesteps(4)  # PCM upstream issue #14


@pytest.mark.parametrize("steps", range(1, 51))
def test_trailing_equals_diffusers_ddim_trailing(steps):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**SD, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    assert pcm_timesteps(steps) == scheduler.timesteps.tolist()


@pytest.mark.parametrize("strength", [1.0, 0.75, 0.5, 0.3])
def test_lcm_grid_equals_lcm_and_tcd_schedulers(strength):
    from diffusers import LCMScheduler, TCDScheduler

    lcm, tcd = LCMScheduler(**SD), TCDScheduler(**SD)
    for steps in range(1, int(50 * strength) + 1):
        lcm.set_timesteps(steps, strength=strength)
        tcd.set_timesteps(steps, strength=strength)
        assert lcm_timesteps(steps, strength) == lcm.timesteps.tolist() == tcd.timesteps.tolist()


def test_substeps_stay_inside_their_phase_and_keep_every_edge():
    edges = pcm_phase_edges(4, 50)
    for n in range(4, 33):
        ts = pcm_timesteps(n, 4, 50)
        assert len(ts) == n and ts == sorted(ts, reverse=True) and len(set(ts)) == n
        assert set(edges[:-1]) <= set(ts)
        counts = [sum(edges[p] >= t > edges[p + 1] for t in ts) for p in range(4)]
        assert max(counts) - min(counts) <= 1


def test_fewer_steps_than_phases_jump_across_edges():
    assert pcm_timesteps(2, 4, 50) == [999, 499]
    assert pcm_timesteps(1, 8, 50) == [999]
    assert set(pcm_timesteps(3, 8, 50)) <= set(pcm_phase_edges(8, 50))


def test_sigmas_read_the_models_table_and_end_conventions():
    ms = DiscreteVPSampling()
    s = pcm_sigmas(ms, 4, 4, 50)
    assert torch.equal(s[:-1], ms.sigmas[[999, 739, 499, 239]]) and s[-1] == 0
    assert pcm_sigmas(ms, 4, 4, 50, end="sigma_min")[-1] == ms.sigmas[0]
    flow = FlowSampling(shift=3.0)
    assert float(pcm_sigmas(flow, 4)[0]) == 1.0  # flow table: σ(999) = shift(1.0) = 1


def test_scaled_linear_table_matches_diffusers():
    from diffusers import DDIMScheduler

    ours = scaled_linear_alphas_cumprod()
    theirs = DDIMScheduler(**SD).alphas_cumprod.double()
    assert (ours - theirs).abs().max() < 1e-6  # diffusers builds it in float32
    ms = DiscreteVPSampling()
    assert abs(float(ms.sigmas[999]) - 14.6146) < 1e-3 and abs(float(ms.sigmas[800]) - 5.111) < 1e-3
    assert abs(float(ms.sigmas[0]) - 0.0292) < 1e-4


def test_hyper_sd_one_step_is_sigma_800_to_zero():
    ms = DiscreteVPSampling()
    assert hyper_sd_timesteps(1) == [800]
    s = hyper_sd_1step_sigmas(ms, 1)
    assert s.tolist() == [float(ms.sigmas[800]), 0.0]
    assert float(s[0]) < float(ms.sigma_max)  # so ComfyUI scales the start noise by σ(800), not √(1+σ²)


class _DistilledTable:
    """A 50-entry σ table of every 20th training timestep (19, 39, …, 999), as core's "lcm" model sampling keeps."""

    def __init__(self, with_sigma=True):
        self.full = DiscreteVPSampling().sigmas
        self.sigmas = self.full[19::20]
        self.num_timesteps = 1000
        if with_sigma:
            self.sigma = self._sigma

    def _sigma(self, timestep):  # log-linear between the table's entries, table index i = timestep 20·i + 19
        i = ((torch.as_tensor(timestep, dtype=torch.float64) - 19) / 20).clamp(0, 49)
        low, high, w = i.floor().long(), i.ceil().long(), i.frac()
        return ((1 - w) * self.sigmas[low].log() + w * self.sigmas[high].log()).exp()


def test_hyper_sd_follows_the_models_own_sigma_on_a_distilled_table():
    ms = _DistilledTable()
    assert len(ms.sigmas) == 50 and ms.num_timesteps == 1000
    s = hyper_sd_1step_sigmas(ms, 1)
    # t = 800 lies 1/20 of the way from the entry of timestep 799 to that of 819
    expected = math.exp(0.95 * math.log(float(ms.full[799])) + 0.05 * math.log(float(ms.full[819])))
    assert s[-1] == 0 and math.isclose(float(s[0]), expected, rel_tol=1e-12)
    assert hyper_sd_1step_sigmas(ms, 1, end="sigma_min")[-1] == ms.sigmas[0] == ms.full[19]
    two = hyper_sd_1step_sigmas(ms, 2)  # t = 800, 400: 400 is between the entries of 399 and 419 as well
    assert math.isclose(float(two[1]), float(ms._sigma(400)), rel_tol=1e-12) and len(two) == 3


def test_hyper_sd_without_a_sigma_function_on_a_short_table_names_the_problem_and_the_fix():
    with pytest.raises(ValueError, match=r"timestep 800.*50-entry σ table.*no sigma\(timestep\).*simple, sgm_uniform"):
        hyper_sd_1step_sigmas(_DistilledTable(with_sigma=False), 1)


def test_denoise_keeps_the_tail_like_basic_scheduler():
    ms = DiscreteVPSampling()
    full8 = pcm_sigmas(ms, 8)
    half = apply_denoise(lambda n: pcm_sigmas(ms, n), 4, 0.5)
    assert torch.equal(half, full8[-5:])
    assert apply_denoise(lambda n: pcm_sigmas(ms, n), 4, 1.0).tolist() == pcm_sigmas(ms, 4).tolist()
    assert len(apply_denoise(lambda n: pcm_sigmas(ms, n), 4, 0.0)) == 0
    one = apply_denoise(lambda n: hyper_sd_1step_sigmas(ms, n), 1, 0.5)
    assert one.tolist() == [float(ms.sigmas[400]), 0.0]
    # LCM follows diffusers' strength: the grid shrinks instead.
    assert lcm_sigmas(ms, 4, denoise=0.5)[0] == ms.sigmas[499]


@pytest.mark.parametrize("call, message", [
    (lambda: pcm_phase_edges(8, 4), "phases"),
    (lambda: pcm_timesteps(0), "steps"),
    (lambda: lcm_timesteps(51), "steps must be ≤ 50"),
    (lambda: lcm_timesteps(30, 0.5), "raise denoise"),
    (lambda: hyper_sd_timesteps(0), "steps"),
    (lambda: apply_denoise(lambda n: None, 0, 1.0), "steps"),
    (lambda: pcm_sigmas(DiscreteVPSampling(), 4, end="one"), "end must be one of"),
])
def test_bad_schedule_input_names_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()
