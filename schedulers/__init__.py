"""σ schedules for few-step models (pure torch; no ComfyUI import)."""
from .common import END_CONVENTIONS, apply_denoise, sigmas_from_timesteps
from .hyper_sd import hyper_sd_1step_sigmas, hyper_sd_timesteps
from .lcm import lcm_sigmas, lcm_timesteps
from .pcm import ddim_timesteps, pcm_phase_edges, pcm_sigmas, pcm_timesteps, trailing_timesteps

__all__ = [
    "END_CONVENTIONS", "apply_denoise", "sigmas_from_timesteps", "hyper_sd_1step_sigmas", "hyper_sd_timesteps",
    "lcm_sigmas", "lcm_timesteps", "ddim_timesteps", "pcm_phase_edges", "pcm_sigmas", "pcm_timesteps",
    "trailing_timesteps",
]
