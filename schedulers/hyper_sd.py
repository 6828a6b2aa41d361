"""Hyper-SD's one-step schedule (Ren et al. 2024): the 1-step UNet is sampled from t = 800.

diffusers' pipeline uses LCMScheduler(timesteps=[800]). In ComfyUI that is σ(800) → 0; because
σ(800) < σ_max, ComfyUI's max_denoise rule scales the initial noise by σ(800), not √(1 + σ²)
(diffusers' unit-variance start), a 1.9 % smaller noise amplitude; ByteDance's own node does the same.
More steps walk evenly from t = 800 down (trailing), which is what denoise < 1 uses.
"""
from .common import sigmas_from_timesteps

HYPER_SD_START = 800


def hyper_sd_timesteps(steps, start=HYPER_SD_START):
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    return [round(start * (steps - i) / steps) for i in range(steps)]


def hyper_sd_1step_sigmas(model_sampling, steps=1, end="zero"):
    return sigmas_from_timesteps(model_sampling, hyper_sd_timesteps(steps), end)
