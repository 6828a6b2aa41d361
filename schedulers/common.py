"""Turning training timesteps into a σ list, and the denoise (img2img) rule shared by all schedules."""
import torch

END_CONVENTIONS = ("zero", "sigma_min")


def sigmas_from_timesteps(model_sampling, timesteps, end="zero"):
    """σ's of the given training timesteps (0..T−1, descending), plus the final σ.

    σ(t) is read from the model's own σ table (`model_sampling.sigmas[t]`), the convention of
    ComfyUI's `simple` scheduler, so the same timesteps serve ε, v and flow models.
    end="zero" appends σ = 0 (a clean x̂0, ComfyUI's convention); end="sigma_min" appends the
    smallest training σ (t = 0), where diffusers' pipelines end: DDIMScheduler with set_alpha_to_one=False (PCM's
    validation), and TCDScheduler, whose last step goes to timestep 0 itself.
    """
    final = final_sigma(model_sampling, end)
    table = model_sampling.sigmas
    if any(t < 0 or t >= len(table) for t in timesteps):
        raise ValueError(f"timesteps {timesteps} fall outside the model's {len(table)} training timesteps.")
    index = torch.tensor(list(timesteps), dtype=torch.long, device=table.device)
    return torch.cat([table[index], final]).cpu()


def final_sigma(model_sampling, end):
    """The σ a schedule ends on, as a 1-element tensor: 0 (end="zero") or the smallest training σ ("sigma_min")."""
    if end not in END_CONVENTIONS:
        raise ValueError(f"end must be one of {END_CONVENTIONS}, got {end!r}.")
    table = model_sampling.sigmas
    return table[:1] if end == "sigma_min" else torch.zeros_like(table[:1])


def apply_denoise(schedule, steps, denoise):
    """ComfyUI's img2img rule (KSampler, BasicScheduler): build int(steps/denoise) steps, keep the last `steps`.

    `schedule(n)` returns n + 1 σ's. denoise ≤ 0 gives an empty list (nothing to sample).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    if denoise >= 0.9999:
        return schedule(steps)
    if denoise <= 0.0:
        return torch.zeros((0,))
    total = int(steps / denoise)
    return schedule(total)[-(steps + 1):]
