"""The PCM training loss against an exact case: Gaussian data, whose denoiser is known in closed form.

A student that returns, for any x_t, the x̂0 whose DDIM jump lands where the (guided) teacher's own DDIM chain
on the K-grid lands at the phase edge is the fixed point of phased consistency distillation: its loss is zero
at every grid index and phase, to float64 precision. A perturbed student's is not.
"""
import pytest
import torch

from fewstep.distill.phased_loss import ddim_jump, pcm_loss, pseudo_huber, sample_phased_targets
from fewstep.schedulers.noise_schedules import DiscreteVPSampling
from fewstep.schedulers.pcm import ddim_timesteps, pcm_phase_edges

SIGMAS = DiscreteVPSampling().sigmas  # float64 SD table
DATA_STD = 0.7
MEANS = {"cat": 0.5, "": -0.2}  # class-conditional means; "" is the empty prompt


def teacher(x, sigma, cond):
    """Exact denoiser of x0 ~ N(μ_c, s²): E[x0 | x] = μ + s²/(s² + σ²)·(x − μ)."""
    mu = torch.tensor([MEANS[c] for c in cond], dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return mu + DATA_STD ** 2 / (DATA_STD ** 2 + sigma ** 2) * (x - mu)


def guided(x, sigma, w):
    d_c, d_u = teacher(x, sigma, ["cat"] * len(x)), teacher(x, sigma, [""] * len(x))
    return d_c + w * (d_c - d_u)


def chain_student(phases, k, w, perturb=0.0):
    """D(x, σ) such that D + σ_e·(x − D)/σ = the guided teacher's DDIM chain from σ down to the phase edge."""
    grid = ddim_timesteps(k)

    def student(x, sigma, cond):
        out = []
        for xi, si in zip(x, sigma.reshape(-1)):
            t = int((SIGMAS - si).abs().argmin())
            if t not in grid:  # t = 0: evaluated for a phase-start target, which uses x_n instead
                out.append(xi)
                continue
            j = grid.index(t)
            tg = sample_phased_targets(torch.tensor([j]), phases, k)
            edge, cur, x_cur = int(tg.edge), t, xi[None]
            while cur > edge:
                nxt = max(cur - 1000 // k, 0)
                x_cur = ddim_jump(x_cur, SIGMAS[cur], SIGMAS[nxt], guided(x_cur, SIGMAS[cur], w))
                cur = nxt
            r = SIGMAS[edge] / si
            out.append((x_cur[0] - r * xi) / (1 - r) + perturb)
        return torch.stack(out)

    return student


def test_phase_bookkeeping_matches_the_edge_table():
    for k, m in [(50, 4), (40, 4), (50, 8), (50, 1), (20, 3)]:
        j = torch.arange(k)
        tg = sample_phased_targets(j, m, k)
        edges = sorted(set(pcm_phase_edges(m, k)[1:]))  # the M edges the student may jump to
        assert sorted(set(tg.edge.tolist())) == edges
        assert (tg.edge < tg.t).all() and (tg.t_next >= tg.edge).all()
        assert torch.equal(tg.starts_phase, tg.t_next == tg.edge)
        assert int(tg.starts_phase.sum()) == m


@pytest.mark.parametrize("phases,k", [(4, 50), (1, 50), (2, 20)])
def test_teacher_chain_student_has_zero_loss(phases, k):
    torch.manual_seed(0)
    w = 3.0
    j = torch.arange(k)
    x0, noise = torch.randn(k, 2, 3, dtype=torch.float64), torch.randn(k, 2, 3, dtype=torch.float64)
    targets = sample_phased_targets(j, phases, k)
    student = chain_student(phases, k, w)
    loss = pcm_loss(student, teacher, x0, noise, ["cat"] * k, [""] * k, SIGMAS, targets, torch.full((k,), w),
                    huber_c=0.0)
    assert loss.max().item() < 1e-12, loss.max().item()

    off = pcm_loss(chain_student(phases, k, w, perturb=1e-2), teacher, x0, noise, ["cat"] * k, [""] * k, SIGMAS,
                   targets, torch.full((k,), w), huber_c=0.0)
    # only the phase-start indices compare a student jump with the teacher step; elsewhere both sides shift
    assert (off[targets.starts_phase] > 1e-4).all()
    wrong_w = pcm_loss(student, teacher, x0, noise, ["cat"] * k, [""] * k, SIGMAS, targets, torch.full((k,), 1.0),
                       huber_c=0.0)
    assert wrong_w.max().item() > 1e-4


def test_pseudo_huber_limits():
    a, b = torch.zeros(1, 4), torch.full((1, 4), 3.0)
    assert pseudo_huber(a, b, c=0.0).item() == pytest.approx(3.0)  # c → 0: L1
    small = pseudo_huber(a, torch.full((1, 4), 1e-6), c=1.0).item()
    assert small == pytest.approx(0.5e-12, rel=1e-3)  # |d| ≪ c: d²/(2c)
