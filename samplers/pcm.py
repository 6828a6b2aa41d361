"""Deterministic phased sampling for PCM (Phased Consistency Models, Wang et al. 2024).

A PCM LoRA maps any point of a phase to that phase's lower edge with one DDIM (η = 0) jump, so
sampling is DDIM to the σ's of the schedule: the phase edges (`schedulers.pcm`), or sub-steps inside
phases, which a consistent model re-targets to the same edge. The schedule decides the end
convention: σ = 0 gives a clean x̂0 (ComfyUI); ending at the model's smallest training σ is
diffusers' DDIMScheduler(set_alpha_to_one=False) validation setting.
"""
import torch

from .common import jump_and_renoise


@torch.no_grad()
def sample_pcm(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """x_{i+1} = D + σ_{i+1}·ε̂ (through the model's own forward process for flow models)."""
    return jump_and_renoise(model, x, sigmas, extra_args, callback, lambda sampling, sigma_next: sigma_next)
