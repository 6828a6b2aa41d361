"""The loop the samplers share, written against ComfyUI's `model_sampling` hooks only.

Every update goes through the model's forward process (`forward_process`: x = a(σ)·n + b(σ)·x0), so one
sampler serves ε, v and flow models alike. Nothing here imports ComfyUI.
"""
import math

import torch

from .forward_process import EpsSigmaSpace, ddim_jump, forward_noise, predicted_noise


def model_sampling_of(model):
    """The `model_sampling` behind a k-diffusion denoiser.

    ComfyUI hands samplers a wrapper (KSamplerX0Inpaint → CFGGuider → BaseModel); this is the one
    place that walks that chain, so samplers never reach into `inner_model.inner_model` themselves.
    """
    node = model
    for _ in range(4):
        if node is None:
            break
        sampling = getattr(node, "model_sampling", None)
        if sampling is not None:
            return sampling
        node = getattr(node, "inner_model", None)
    return EpsSigmaSpace()


def seeded_noise_sampler(x, seed=None):
    """noise_sampler(σ, σ_next) drawing N(0, I) like x from one generator (k-diffusion convention)."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(int(seed))

    def sample(sigma, sigma_next):
        return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return sample


def jump_and_renoise(model, x, sigmas, extra_args, callback, intermediate_sigma, noise_sampler=None):
    """The loop the pack's samplers share: from σ_i, DDIM-jump to σ_s = intermediate_sigma(model_sampling, σ_{i+1})
    (capped at σ_{i+1}), then forward-diffuse up to σ_{i+1} with fresh noise when σ_s is below it.

    A rule that returns σ_{i+1} itself is deterministic DDIM and draws no noise.
    """
    extra_args = {} if extra_args is None else extra_args
    check_sigmas(sigmas)
    sampling = model_sampling_of(model)
    if noise_sampler is None:
        noise_sampler = seeded_noise_sampler(x, extra_args.get("seed", None))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        eps = predicted_noise(sampling, x, denoised, sigmas[i])
        sigma_next = float(sigmas[i + 1])
        sigma_s = min(intermediate_sigma(sampling, sigma_next), sigma_next)
        x = ddim_jump(sampling, denoised, eps, sigma_s)
        if sigma_next > sigma_s:
            x = forward_noise(sampling, x, sigma_s, sigmas[i + 1], noise_sampler(sigmas[i], sigmas[i + 1]))
    return x


def check_sigmas(sigmas):
    """Refuse a σ list the samplers cannot walk, with a message that says how to fix it."""
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D list of noise levels, got shape {tuple(sigmas.shape)}.")
    values = [float(s) for s in sigmas]
    for i, value in enumerate(values):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"sigmas[{i}] = {value} is not a finite noise level ≥ 0; check the SIGMAS input.")
    for i in range(len(values) - 1):
        if values[i + 1] > values[i]:
            raise ValueError(
                f"sigmas must be decreasing, but sigmas[{i + 1}] = {values[i + 1]:.6g} > sigmas[{i}] = {values[i]:.6g}. "
                "Feed the sampler a scheduler's output (or flip the list with FlipSigmas)."
            )
    for i, value in enumerate(values[:-1]):
        if value == 0:
            raise ValueError(f"sigmas[{i}] = 0 before the end of the list; only the last noise level may be 0.")
