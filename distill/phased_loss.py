"""One PCM training step's loss in ComfyUI's σ-space: ε/v models on a discrete VP schedule (x = x0 + σ·ε) and
flow models (SD3, FLUX: x = (1 − σ)·x0 + σ·ε, where the DDIM step is exactly the Euler step of the flow ODE).

Models are callables `denoise(x, sigma, cond) -> x0_hat` (ComfyUI's D). Per sample, with K DDIM timesteps and
M phases (docs/algorithms.md, "PCM: one training step"):

    j ~ U{0..K−1}, t = ddim_ts[j], t_n = max(t − T/K, 0), e = the edge of j's phase
    x_t   = x0 noised to σ_t with ε
    pred  = DDIM jump of x_t to σ_e with the student's D            (gradient flows here only)
    x_n   = DDIM step of x_t to σ_{t_n} with the CFG teacher, D_u + (1 + w)(D_c − D_u)
    tgt   = x_n if j starts its phase, else the DDIM jump of x_n to σ_e with the student's D (stop-grad)
    loss  = pseudo-Huber(pred, tgt) on the network's input scale at σ_e (`calculate_input`: the VP sample
            x/√(1 + σ_e²) for ε/v models, as the reference computes it; the sample itself for flow models)

Noising and DDIM moves are the samplers' (`samplers.forward_process`, through the model's `model_sampling`): a
DDIM jump keeps x̂0 and the predicted noise ε̂ and puts them at σ'. The target model is the student under
no_grad (the reference LoRA script has no EMA; the engine can swap EMA weights in).

The same step serves the engine's other two methods (docs/algorithms.md, "TCD" and "Hyper-SD: TSCD"); only the
timesteps and the solver that makes x_n change:

    TCD   the edge is a per-sample end point s below t_n instead of a phase edge (`sample_tcd_targets`): the
          student's DDIM jump to s is TCD's first-order semi-linear consistency function (its exponential-integrator
          form σ_s/σ_t·x_t − α_s(e^{−h} − 1)·x̂0 with h = λ_s − λ_t, λ = log(α/σ), is exactly the DDIM jump).
    TSCD  stage 1 is PCM with phases = the first number of segments; a later stage jumps to the edges of its fewer
          segments, and x_n is the previous stage's student's jump from x_t to ITS segment edge
          (`sample_segment_targets`, `jump_solver`), a skipping-step solver, so its edges must nest in the older ones.
"""
from dataclasses import dataclass

import torch

from ..samplers.forward_process import ddim_step, noised
from ..schedulers.pcm import ddim_timesteps


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


def sample_tcd_targets(index, end_index, ddim_steps, num_train_timesteps=1000):
    """TCD's timesteps: t = ddim_ts[j], t_n = t − T/K, and the end point s = ddim_ts[i] − T/K (clamped at 0) for
    end indices i in 0..j (`end_index`; the engine draws i uniformly). i = j gives s = t_n (the teacher step alone)."""
    if (end_index > index).any() or (end_index < 0).any():
        raise ValueError("TCD end indices must lie in 0..j (s at or below the teacher's next point).")
    grid = torch.tensor(ddim_timesteps(ddim_steps, num_train_timesteps))
    stride = num_train_timesteps // ddim_steps
    t = grid[index]
    t_next = (t - stride).clamp_min(0)
    end = (grid[end_index] - stride).clamp_min(0)
    return PhasedTargets(t, t_next, end, end_index == index)


def sample_segment_targets(index, previous_segments, segments, ddim_steps, num_train_timesteps=1000):
    """A later TSCD stage's timesteps: t = ddim_ts[j], t_n = the previous stage's segment edge below t (where its
    student jumps), edge = this stage's segment edge. The segments must divide the previous ones (nested edges)."""
    if segments >= previous_segments or previous_segments % segments:
        raise ValueError(f"TSCD segments must shrink by whole factors, each dividing the one before: {segments} "
                         f"after {previous_segments}.")
    before = sample_phased_targets(index, previous_segments, ddim_steps, num_train_timesteps)
    now = sample_phased_targets(index, segments, ddim_steps, num_train_timesteps)
    return PhasedTargets(now.t, before.edge, now.edge, before.edge == now.edge)


def jump_solver(model, model_sampling):
    """A solver that moves x from σ to σ_to by the DDIM jump with `model`'s D (a distilled student: no CFG, which
    it learnt in); `solver(x, s, s_to, cond, uncond, w)` as `pcm_samples` calls it."""
    def solve(x, s, s_to, cond, uncond, w):
        return ddim_step(model_sampling, x, s, s_to, model(x, s.reshape(-1), cond))
    return solve


def teacher_step(teacher, model_sampling, x_t, s_t, s_n, cond, uncond, w):
    """The CFG-augmented teacher's DDIM (flow: Euler) step from σ_t to σ_n; uncond None = CFG solver off."""
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    d_c = teacher(x_t, s_t.reshape(-1), cond)
    d_guided = d_c if uncond is None else d_c + w.reshape(shape) * (d_c - teacher(x_t, s_t.reshape(-1), uncond))
    return ddim_step(model_sampling, x_t, s_t, s_n, d_guided)


@dataclass
class PhasedSamples:
    pred: torch.Tensor          # the student's jump of x_t to the edge (with its graph)
    target: torch.Tensor        # the stop-grad target at the edge
    sigma_edge: torch.Tensor    # σ_e per sample, [B, 1, …]


def pcm_samples(student, teacher, model_sampling, x0, noise, cond, uncond, sigmas, targets: PhasedTargets, w,
                target_model=None, solver=None) -> PhasedSamples:
    """pred and target of one phased consistency step (see the module docstring).

    sigmas: the model's σ table indexed by training timestep; w: per-sample guidance (ComfyUI cfg = 1 + w),
    w = 0 and uncond = None for the "normal CFG" mode (CFG solver off). Models get σ as a [B] tensor.
    target_model: the stop-grad model for the target jump (default: the student under no_grad).
    solver: `solver(x_t, σ_t, σ_n, cond, uncond, w) -> x_n` (default: the CFG teacher's DDIM step, `teacher_step`).
    """
    shape = (-1,) + (1,) * (x0.ndim - 1)
    s_t, s_n, s_e = (sigmas[i].to(x0.dtype).reshape(shape) for i in (targets.t, targets.t_next, targets.edge))
    x_t = noised(model_sampling, x0, noise, s_t)
    with torch.no_grad():  # first, so that nothing (LoRA switch, EMA swap) changes between forward and backward
        x_n = solver(x_t, s_t, s_n, cond, uncond, w) if solver is not None else \
            teacher_step(teacher, model_sampling, x_t, s_t, s_n, cond, uncond, w)
        target = ddim_step(model_sampling, x_n, s_n, s_e, (target_model or student)(x_n, s_n.reshape(-1), cond))
        target = torch.where(targets.starts_phase.reshape(shape), x_n, target)
    pred = ddim_step(model_sampling, x_t, s_t, s_e, student(x_t, s_t.reshape(-1), cond))
    return PhasedSamples(pred, target, s_e)


def phased_distance(model_sampling, samples: PhasedSamples, huber_c=0.001):
    """Per-sample pseudo-Huber distance of pred and target, in float32 (or wider) whatever the forwards' precision."""
    wide = torch.promote_types(samples.pred.dtype, torch.float32)
    sigma = samples.sigma_edge.to(wide)
    return pseudo_huber(model_sampling.calculate_input(sigma, samples.pred.to(wide)),
                        model_sampling.calculate_input(sigma, samples.target.to(wide)), huber_c)


def pcm_loss(student, teacher, model_sampling, x0, noise, cond, uncond, sigmas, targets: PhasedTargets, w,
             huber_c=0.001, target_model=None, solver=None):
    """Per-sample pseudo-Huber loss of one phased consistency step (`pcm_samples`, then `phased_distance`)."""
    samples = pcm_samples(student, teacher, model_sampling, x0, noise, cond, uncond, sigmas, targets, w, target_model,
                          solver)
    return phased_distance(model_sampling, samples, huber_c)
