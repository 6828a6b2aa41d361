"""Strategic Stochastic Sampling of TCD (Zheng et al. 2024), as diffusers' TCDScheduler.step.

γ ∈ [0, 1] (diffusers and ComfyUI-TCD call it `eta`; it is the same number, not 1 − γ):
from x at σ_i, predict (x̂0, ε̂), go deterministically to the earlier point s = ⌊(1 − γ)·t_{i+1}⌋ on the
model's training timesteps, then forward-diffuse from s back up to σ_{i+1} with fresh noise.
γ = 0 is DDIM (deterministic); γ = 1 jumps to x̂0 and re-noises every step.
"""
import math

import torch

from .common import jump_and_renoise

DEFAULT_GAMMA = 0.3  # diffusers' TCDScheduler eta default; what the `tcd` dropdown entry runs with (samplers.registry)


def tcd_intermediate_sigma(model_sampling, sigma_next, gamma):
    """σ_s of TCD's intermediate point for the step that ends at σ_next.

    Models with integer training timesteps (SD1.5/SDXL ε and v) use diffusers' rule
    s = floor((1 − γ)·t(σ_next)); continuous-time models (flow: timestep ∝ σ) use σ_s = (1 − γ)·σ_next.
    """
    sigma_next = float(sigma_next)
    if sigma_next <= 0.0 or gamma == 0.0:
        return sigma_next
    timesteps = getattr(model_sampling, "num_timesteps", None)
    if timesteps is not None:
        t_next = float(model_sampling.timestep(torch.tensor(sigma_next, dtype=model_sampling.sigmas.dtype)))
        if t_next == round(t_next):
            # The tiny slack keeps floor((1 − γ)·t) exact when the product is an integer in exact arithmetic.
            t_s = math.floor((1.0 - gamma) * t_next + 1e-9)
            return float(model_sampling.sigma(torch.tensor(float(t_s), dtype=model_sampling.sigmas.dtype)))
    return (1.0 - gamma) * sigma_next


@torch.no_grad()
def sample_tcd(model, x, sigmas, extra_args=None, callback=None, disable=None, gamma=DEFAULT_GAMMA,
               noise_sampler=None):
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"TCD gamma must be in [0, 1] (0 = deterministic DDIM, 1 = fully stochastic), got {gamma}.")
    return jump_and_renoise(model, x, sigmas, extra_args, callback,
                            lambda sampling, sigma_next: tcd_intermediate_sigma(sampling, sigma_next, gamma), noise_sampler)
