"""γ-sampling of Consistency Trajectory Models (Kim et al. 2024, sony/ctm), for denoiser models.

Each step jumps deterministically from σ_i to s = √(1 − γ²)·(σ_{i+1} − σ_end) + σ_end and then
forward-diffuses from s up to σ_{i+1}. With a denoiser D the CTM jump G(x, σ, s) is the DDIM move
D + s·ε̂. σ_end is the schedule's last σ (CTM's σ_min; 0 in ComfyUI), so the last step lands exactly.
γ = 0: deterministic jumps (DDIM); γ = 1: consistency-model multistep sampling (jump to the end, re-noise).
"""
import math

import torch

from .common import (check_sigmas, ddim_jump, forward_noise, model_sampling_of, predicted_noise,
                     seeded_noise_sampler)


def ctm_intermediate_sigma(sigma_next, sigma_end, gamma):
    return math.sqrt(1.0 - gamma * gamma) * (float(sigma_next) - float(sigma_end)) + float(sigma_end)


@torch.no_grad()
def sample_ctm_gamma(model, x, sigmas, extra_args=None, callback=None, disable=None, gamma=0.5, noise_sampler=None):
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"CTM gamma must be in [0, 1] (0 = deterministic, 1 = consistency multistep), got {gamma}.")
    extra_args = {} if extra_args is None else extra_args
    check_sigmas(sigmas)
    sampling = model_sampling_of(model)
    if noise_sampler is None:
        noise_sampler = seeded_noise_sampler(x, extra_args.get("seed", None))
    sigma_end = sigmas[-1]
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        eps = predicted_noise(sampling, x, denoised, sigmas[i])
        sigma_s = ctm_intermediate_sigma(sigmas[i + 1], sigma_end, gamma)
        x = ddim_jump(sampling, denoised, eps, sigma_s)
        if gamma > 0 and float(sigmas[i + 1]) > sigma_s:
            x = forward_noise(sampling, x, sigma_s, sigmas[i + 1], noise_sampler(sigmas[i], sigmas[i + 1]))
    return x
