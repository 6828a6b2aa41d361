"""One PCM training step's loss in ComfyUI's σ-space: ε/v models on a discrete VP schedule (x = x0 + σ·ε) and
flow models (SD3, FLUX: x = (1 − σ)·x0 + σ·ε, where the DDIM step is exactly the Euler step of the flow ODE).

Models are callables `denoise(x, sigma, cond) -> x0_hat` (ComfyUI's D). Per sample, with K DDIM timesteps and
M phases (docs/algorithms.md, "PCM: one training step"):

    j ~ U{0..K−1}, t = ddim_ts[j], t_n = max(t − T/K, 0), e = the edge of j's phase
    x_t   = x0 + σ_t·ε
    pred  = DDIM jump of x_t to σ_e with the student's D            (gradient flows here only)
    x_n   = DDIM step of x_t to σ_{t_n} with the CFG teacher, D_u + (1 + w)(D_c − D_u)
    tgt   = x_n if j starts its phase, else the DDIM jump of x_n to σ_e with the student's D (stop-grad)
    loss  = pseudo-Huber(pred, tgt) on VP samples (x/√(1 + σ_e²)), as the reference computes it

A DDIM jump keeps the predicted noise ε̂ and moves to σ': VP x' = D + σ'·(x − D)/σ; flow
x' = (1 − σ')·D + σ'·ε̂ with ε̂ = (x − (1 − σ)·D)/σ. The target model is the student under no_grad (the
reference LoRA script has no EMA; the engine can swap EMA weights in).
"""
from dataclasses import dataclass

import torch

from ..schedulers.pcm import ddim_timesteps


def ddim_jump(x, sigma, sigma_to, denoised, flow=False):
    if flow:
        eps = (x - (1.0 - sigma) * denoised) / sigma
        return (1.0 - sigma_to) * denoised + sigma_to * eps
    return denoised + (sigma_to / sigma) * (x - denoised)


def noised(x0, noise, sigma, flow=False):
    return (1.0 - sigma) * x0 + sigma * noise if flow else x0 + sigma * noise


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


def teacher_step(teacher, x_t, s_t, s_n, cond, uncond, w, flow=False):
    """The CFG-augmented teacher's DDIM (flow: Euler) step from σ_t to σ_n; uncond None = CFG solver off."""
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    d_c = teacher(x_t, s_t.reshape(-1), cond)
    d_guided = d_c if uncond is None else d_c + w.reshape(shape) * (d_c - teacher(x_t, s_t.reshape(-1), uncond))
    return ddim_jump(x_t, s_t, s_n, d_guided, flow)


def pcm_loss(student, teacher, x0, noise, cond, uncond, sigmas, targets: PhasedTargets, w, huber_c=0.001,
             flow=False, target_model=None):
    """Per-sample pseudo-Huber loss of one phased consistency step (see the module docstring).

    sigmas: the model's σ table indexed by training timestep; w: per-sample guidance (ComfyUI cfg = 1 + w),
    w = 0 and uncond = None for the "normal CFG" mode (CFG solver off). Models get σ as a [B] tensor.
    target_model: the stop-grad model for the target jump (default: the student under no_grad).
    """
    shape = (-1,) + (1,) * (x0.ndim - 1)
    s_t, s_n, s_e = (sigmas[i].to(x0.dtype).reshape(shape) for i in (targets.t, targets.t_next, targets.edge))
    x_t = noised(x0, noise, s_t, flow)
    with torch.no_grad():  # first, so that nothing (LoRA switch, EMA swap) changes between forward and backward
        x_n = teacher_step(teacher, x_t, s_t, s_n, cond, uncond, w, flow)
        target = ddim_jump(x_n, s_n, s_e, (target_model or student)(x_n, s_n.reshape(-1), cond), flow)
        target = torch.where(targets.starts_phase.reshape(shape), x_n, target)
    pred = ddim_jump(x_t, s_t, s_e, student(x_t, s_t.reshape(-1), cond), flow)
    # The reference measures the distance on VP samples √ᾱ·x = x/√(1 + σ²); flow samples are already unit scale.
    scale = 1.0 if flow else 1.0 / torch.sqrt(1.0 + s_e ** 2)
    wide = torch.promote_types(pred.dtype, torch.float32)  # half-precision forwards, float32 (or wider) loss
    return pseudo_huber(pred.to(wide) * scale, target.to(wide) * scale, huber_c)
