"""PCM's phased schedule (Wang et al. 2024; G-U-N/Phased-Consistency-Model training script).

K DDIM timesteps ddim_ts[j] = (j+1)·⌊T/K⌋ − 1 are split into M phases starting at
⌊linspace(0, K, M, endpoint=False)⌋; each phase ends at the DDIM timestep just below its start
(the first phase at t = 0). A PCM LoRA jumps from anywhere in a phase to that edge.

With N sampling steps: N = M walks the edges; N > M adds sub-steps inside phases (first phases
first), evenly spaced in t, which a consistent model re-targets to the same edge; N < M visits the
edges nearest to i·M/N, i.e. jumps across phases (extrapolation: the LoRA was not trained for it).
"""
import numpy as np

from .common import sigmas_from_timesteps


def ddim_timesteps(ddim_steps, num_train_timesteps=1000):
    """The K-point DDIM grid of PCM's training, ascending."""
    stride = num_train_timesteps // ddim_steps
    return [(j + 1) * stride - 1 for j in range(ddim_steps)]


def phases_problem(phases, ddim_timesteps):
    """The rule 1 ≤ phases M ≤ ddim_timesteps K (a phase needs at least one DDIM timestep): its one message, or None.

    The scheduler, the engine, the preset table, the trainer-metadata reader and the nodes' validation all use it.
    """
    if 1 <= phases <= ddim_timesteps:
        return None
    return (f"phases ({phases}) must be between 1 and ddim_timesteps K ({ddim_timesteps}): a phase needs at least one "
            f"DDIM timestep, so phases cannot exceed ddim_timesteps ({ddim_timesteps}). Lower phases or raise "
            "ddim_timesteps.")


def check_phases(phases, ddim_timesteps):
    """Raise ValueError with `phases_problem`'s message when phases M and ddim_timesteps K do not fit."""
    problem = phases_problem(phases, ddim_timesteps)
    if problem is not None:
        raise ValueError(problem)


def pcm_phase_edges(phases, ddim_steps, num_train_timesteps=1000):
    """[top, e_{M−1}, ..., e_1, 0]: the M + 1 phase boundaries in training timesteps, descending."""
    if ddim_steps < 1 or ddim_steps > num_train_timesteps:
        raise ValueError(f"ddim_steps (K) must be in 1..{num_train_timesteps}, got {ddim_steps}.")
    check_phases(phases, ddim_steps)
    grid = ddim_timesteps(ddim_steps, num_train_timesteps)
    starts = [(i * ddim_steps) // phases for i in range(phases)]
    edges = [grid[start - 1] for start in starts[1:]]
    return [grid[-1]] + edges[::-1] + [0]


def trailing_timesteps(steps, num_train_timesteps=1000):
    """diffusers' "trailing" spacing: round(T − i·T/N) − 1, i = 0..N−1 (999/749/499/249 for N = 4).

    Built with np.arange over the float step exactly as diffusers does: its accumulated rounding moves
    a few exact halves down (N = 48: 936, not 937), and DDIM parity needs the same integers.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    spaced = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)).astype(np.int64) - 1
    return [int(t) for t in spaced[:steps]]


def pcm_timesteps(steps, phases=None, ddim_steps=None, num_train_timesteps=1000):
    """The N sampling timesteps (descending, without the final end point).

    phases=None is the dropdown default: M = N phases with trailing edges, which is PCM's edge
    formula whenever K is a multiple of N dividing T (K = 40 for N = 4, as in the SDXL LoRAs).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    if phases is None:
        return trailing_timesteps(steps, num_train_timesteps)
    bounds = pcm_phase_edges(phases, ddim_steps, num_train_timesteps)
    if steps <= phases:
        picks = [(2 * i * phases + steps) // (2 * steps) for i in range(steps)]  # round(i·M/N)
        return [bounds[p] for p in picks]
    out = []
    for p in range(phases):
        n_p = steps // phases + (1 if p < steps % phases else 0)
        top, bottom = bounds[p], bounds[p + 1]
        out += [top - ((2 * i * (top - bottom) + n_p) // (2 * n_p)) for i in range(n_p)]
    return out


def pcm_sigmas(model_sampling, steps, phases=None, ddim_steps=None, end="zero"):
    """σ schedule for `sample_pcm`: N + 1 values, ending at 0 or at the smallest training σ (see `end`)."""
    timesteps = pcm_timesteps(steps, phases, ddim_steps, len(model_sampling.sigmas))
    return sigmas_from_timesteps(model_sampling, timesteps, end)
