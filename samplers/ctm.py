"""γ-sampling of Consistency Trajectory Models (Kim et al. 2024, sony/ctm), for denoiser models.

Each step jumps deterministically from σ_i to s = √(1 − γ²)·(σ_{i+1} − σ_end) + σ_end and then
forward-diffuses from s up to σ_{i+1}. With a denoiser D the CTM jump G(x, σ, s) is the DDIM move
D + s·ε̂. σ_end is the schedule's last σ (CTM's σ_min; 0 in ComfyUI), so the last step lands exactly.
γ = 0: deterministic jumps (DDIM); γ = 1: consistency-model multistep sampling (jump to the end, re-noise).
"""
import math

import torch

from .common import jump_and_renoise

DEFAULT_GAMMA = 0.5  # what the `ctm_gamma` dropdown entry runs with (samplers.registry)


def ctm_intermediate_sigma(sigma_next, sigma_end, gamma):
    if gamma == 0.0:  # exactly σ_next: rounding in the formula must not turn γ = 0 into a (tiny) noise draw
        return float(sigma_next)
    return math.sqrt(1.0 - gamma * gamma) * (float(sigma_next) - float(sigma_end)) + float(sigma_end)


@torch.no_grad()
def sample_ctm_gamma(model, x, sigmas, extra_args=None, callback=None, disable=None, gamma=DEFAULT_GAMMA,
                     noise_sampler=None):
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"CTM gamma must be in [0, 1] (0 = deterministic, 1 = consistency multistep), got {gamma}.")
    sigma_end = sigmas[-1]  # converted to a number only after jump_and_renoise has checked the list
    return jump_and_renoise(model, x, sigmas, extra_args, callback,
                            lambda sampling, sigma_next: ctm_intermediate_sigma(sigma_next, sigma_end, gamma), noise_sampler)
