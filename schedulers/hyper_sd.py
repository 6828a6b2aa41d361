"""Hyper-SD's one-step schedule (Ren et al. 2024): the 1-step UNet is sampled from t = 800.

diffusers' pipeline uses LCMScheduler(timesteps=[800]). In ComfyUI that is σ(800) → 0; because
σ(800) < σ_max, ComfyUI's max_denoise rule scales the initial noise by σ(800), not √(1 + σ²)
(diffusers' unit-variance start), a 1.9 % smaller noise amplitude; ByteDance's own node does the same.
More steps walk evenly from t = 800 down (trailing), which is what denoise < 1 uses.

σ(t) is the model's own: its σ table at index t when the table holds one σ per training timestep (every
1000-entry table, ε, v and flow alike), else the model_sampling's `sigma(timestep)`. The second case is a
distilled table of 50 σ's (core ModelSamplingDiscrete with sampling "lcm", ComfyUI-TCD's MODEL output), whose
`sigma(t)` interpolates log σ between its entries; ByteDance's reference node reads σ(800) that way too.
"""
import torch

from .common import final_sigma, sigmas_from_timesteps

HYPER_SD_START = 800


def hyper_sd_timesteps(steps, start=HYPER_SD_START):
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    return [round(start * (steps - i) / steps) for i in range(steps)]


def _table_is_per_timestep(model_sampling, timesteps):
    """True when σ table index t is training timestep t for these timesteps (not a shortened, distilled table)."""
    table = model_sampling.sigmas
    per_timestep = getattr(model_sampling, "num_timesteps", len(table)) == len(table)
    return per_timestep and all(0 <= t < len(table) for t in timesteps)


def hyper_sd_1step_sigmas(model_sampling, steps=1, end="zero"):
    timesteps = hyper_sd_timesteps(steps)
    if _table_is_per_timestep(model_sampling, timesteps):
        return sigmas_from_timesteps(model_sampling, timesteps, end)
    final = final_sigma(model_sampling, end)
    table = model_sampling.sigmas
    sigma_of = getattr(model_sampling, "sigma", None)
    if not callable(sigma_of):
        raise ValueError(
            f"hyper_sd_1step needs σ at training timestep {timesteps[0]}, but this model's sampling has a "
            f"{len(table)}-entry σ table that does not reach it and no sigma(timestep) to compute it. Sample the "
            "model without the patch that shortened its σ table, or use a scheduler that walks the table itself "
            "(simple, sgm_uniform).")
    sigmas = sigma_of(torch.tensor(timesteps, dtype=torch.float32, device=table.device)).reshape(-1)
    if sigmas.shape[0] != len(timesteps) or not bool(torch.isfinite(sigmas).all()) or bool((sigmas <= 0).any()):
        raise ValueError(f"hyper_sd_1step: this model's sigma(timestep) gives no usable σ at timesteps {timesteps} "
                         f"(got {sigmas.tolist()}). Use a scheduler that walks the model's σ table (simple, sgm_uniform).")
    return torch.cat([sigmas.to(table.dtype), final.to(sigmas.device)]).cpu()
