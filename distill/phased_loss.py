"""One PCM training step's loss, in ComfyUI's σ-space (x = x0 + σ·ε), for ε/v models on a discrete VP schedule.

Models are callables `denoise(x, sigma, cond) -> x0_hat` (ComfyUI's D). Per sample, with K DDIM timesteps and
M phases (algorithms.md, "PCM: one training step"):

    j ~ U{0..K−1}, t = ddim_ts[j], t_n = max(t − T/K, 0), e = the edge of j's phase
    x_t   = x0 + σ_t·ε
    pred  = DDIM jump of x_t to σ_e with the student's D            (gradient flows here only)
    x_n   = DDIM step of x_t to σ_{t_n} with the CFG teacher, D_u + (1 + w)(D_c − D_u)
    tgt   = x_n if j starts its phase, else the DDIM jump of x_n to σ_e with the student's D (stop-grad)
    loss  = pseudo-Huber(pred, tgt) on VP samples (x/√(1 + σ_e²)), as the reference computes it

A DDIM jump in σ-space is x' = D + σ'·(x − D)/σ. The target model is the student itself under no_grad
(no EMA), as the reference LoRA script does.
"""
from dataclasses import dataclass

import torch

from ..schedulers.pcm import ddim_timesteps


def ddim_jump(x, sigma, sigma_to, denoised):
    return denoised + (sigma_to / sigma) * (x - denoised)


def pseudo_huber(a, b, c=0.001):
    """mean(√((a − b)² + c²) − c) per sample."""
    return (torch.sqrt((a - b) ** 2 + c * c) - c).flatten(1).mean(dim=1)


@dataclass
class PhasedTargets:
    t: torch.Tensor       # training timestep of x_t
    t_next: torch.Tensor  # one DDIM step below
    edge: torch.Tensor    # the phase edge the student jumps to
    starts_phase: torch.Tensor  # bool: t_next is the edge (the teacher step alone reaches it)


def sample_phased_targets(index, phases, ddim_steps, num_train_timesteps=1000):
    """Timesteps t, t_n, edge for DDIM-grid indices `index` (LongTensor of j in 0..K−1)."""
    grid = torch.tensor(ddim_timesteps(ddim_steps, num_train_timesteps))
    starts = torch.tensor([(i * ddim_steps) // phases for i in range(phases)])
    start = starts[(starts[None, :] <= index[:, None]).sum(dim=1) - 1]  # the largest phase start ≤ j
    edge = torch.where(start > 0, grid[(start - 1).clamp_min(0)], torch.zeros_like(start))
    t = grid[index]
    t_next = (t - num_train_timesteps // ddim_steps).clamp_min(0)
    return PhasedTargets(t, t_next, edge, index == start)


def pcm_loss(student, teacher, x0, noise, cond, uncond, sigmas, targets: PhasedTargets, w, huber_c=0.001):
    """Per-sample pseudo-Huber loss of one phased consistency step (see the module docstring).

    sigmas: the model's σ table indexed by training timestep; w: per-sample guidance (ComfyUI cfg = 1 + w),
    w = 0 and uncond = None for the "normal CFG" mode (CFG solver off).
    """
    shape = (-1,) + (1,) * (x0.ndim - 1)
    s_t, s_n, s_e = (sigmas[i].to(x0.dtype).reshape(shape) for i in (targets.t, targets.t_next, targets.edge))
    x_t = x0 + s_t * noise
    pred = ddim_jump(x_t, s_t, s_e, student(x_t, s_t, cond))
    with torch.no_grad():
        d_c = teacher(x_t, s_t, cond)
        d_guided = d_c if uncond is None else d_c + w.reshape(shape) * (d_c - teacher(x_t, s_t, uncond))
        x_n = ddim_jump(x_t, s_t, s_n, d_guided)
        target = ddim_jump(x_n, s_n, s_e, student(x_n, s_n, cond))
        target = torch.where(targets.starts_phase.reshape(shape), x_n, target)
    to_vp = 1.0 / torch.sqrt(1.0 + s_e ** 2)
    return pseudo_huber(pred * to_vp, target * to_vp, huber_c)
