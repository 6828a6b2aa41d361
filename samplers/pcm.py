"""Deterministic phased sampling for PCM (Phased Consistency Models, Wang et al. 2024).

A PCM LoRA maps any point of a phase to that phase's lower edge with one DDIM (η = 0) jump, so
sampling is DDIM to the σ's of the schedule: the phase edges (`schedulers.pcm`), or sub-steps inside
phases, which a consistent model re-targets to the same edge. The schedule decides the end
convention: σ = 0 gives a clean x̂0 (ComfyUI); ending at the model's smallest training σ is
diffusers' DDIMScheduler(set_alpha_to_one=False) validation setting.
"""
import torch

from .common import check_sigmas, ddim_jump, model_sampling_of, predicted_noise


@torch.no_grad()
def sample_pcm(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """x_{i+1} = D + σ_{i+1}·ε̂ (through the model's own forward process for flow models)."""
    extra_args = {} if extra_args is None else extra_args
    check_sigmas(sigmas)
    sampling = model_sampling_of(model)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        eps = predicted_noise(sampling, x, denoised, sigmas[i])
        x = ddim_jump(sampling, denoised, eps, sigmas[i + 1])
    return x
