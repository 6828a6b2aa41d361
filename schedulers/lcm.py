"""The 50-point grid of LCMScheduler and TCDScheduler (diffusers), with their strength rule for img2img.

The distilled grid is t_k = (k+1)·⌊T/50⌋ − 1, k = 0..⌊50·strength⌋−1; N steps take its reversed
points at ⌊linspace(0, len, N, endpoint=False)⌋ (999/759/499/259 for N = 4).
"""
from .common import sigmas_from_timesteps

ORIGINAL_STEPS = 50


def lcm_timesteps(steps, strength=1.0, original_steps=ORIGINAL_STEPS, num_train_timesteps=1000):
    grid_size = int(original_steps * strength)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    if steps > grid_size:
        raise ValueError(
            f"the LCM/TCD grid has {grid_size} timesteps at strength/denoise {strength:g}, so steps must be ≤ {grid_size} "
            f"(got {steps}; for img2img, KSampler asks for int(steps/denoise) steps); lower steps or raise denoise."
        )
    stride = num_train_timesteps // original_steps
    grid = [(k + 1) * stride - 1 for k in range(grid_size)][::-1]
    return [grid[(i * grid_size) // steps] for i in range(steps)]


def lcm_sigmas(model_sampling, steps, denoise=1.0, end="zero", original_steps=ORIGINAL_STEPS):
    """σ's of the LCM/TCD grid. denoise < 1 follows diffusers' `strength`: the grid shrinks to its lower part."""
    if denoise <= 0.0:
        raise ValueError("denoise must be > 0 for the LCM grid.")
    timesteps = lcm_timesteps(steps, min(denoise, 1.0), original_steps, len(model_sampling.sigmas))
    return sigmas_from_timesteps(model_sampling, timesteps, end)
