"""σ schedules for few-step models (pure torch; no ComfyUI import)."""
from .common import END_CONVENTIONS, apply_denoise, sigmas_from_timesteps
from .hyper_sd import hyper_sd_1step_sigmas, hyper_sd_timesteps
from .lcm import lcm_sigmas, lcm_timesteps
from .pcm import (check_phases, ddim_timesteps, pcm_phase_edges, pcm_sigmas, pcm_timesteps, phases_problem,
                  trailing_timesteps)

__all__ = [
    "END_CONVENTIONS", "apply_denoise", "sigmas_from_timesteps", "hyper_sd_1step_sigmas", "hyper_sd_timesteps",
    "lcm_sigmas", "lcm_timesteps", "check_phases", "ddim_timesteps", "pcm_phase_edges", "pcm_sigmas", "pcm_timesteps",
    "phases_problem", "trailing_timesteps",
]
