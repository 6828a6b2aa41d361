"""The PCM training loss against an exact case: Gaussian data, whose denoiser is known in closed form.

A student that returns, for any x_t, the x̂0 whose DDIM jump lands where the (guided) teacher's own DDIM chain
on the K-grid lands at the phase edge is the fixed point of phased consistency distillation: its loss is zero
at every grid index and phase, to float64 precision. A perturbed student's is not. The same holds for flow
models (x = (1 − σ)·x0 + σ·ε, Euler = DDIM steps) on SD3's shifted σ table.
"""
import pytest
import torch

from fewstep.distill.phased_loss import pcm_loss, pseudo_huber, sample_phased_targets
from fewstep.samplers.forward_process import ddim_step
from support.model_sampling import DiscreteVPSampling, FlowSampling
from fewstep.schedulers.pcm import ddim_timesteps, pcm_phase_edges

VP, FLOW = DiscreteVPSampling(), FlowSampling(shift=3.0)  # float64: the SD table, SD3's shifted flow table
SIGMAS, FLOW_SIGMAS = VP.sigmas, FLOW.sigmas
DATA_STD = 0.7
MEANS = {"cat": 0.5, "": -0.2}  # class-conditional means; "" is the empty prompt


def teacher(x, sigma, cond, flow=False):
    """Exact denoiser of x0 ~ N(μ_c, s²) seen at x = a·x0 + σ·ε (a = 1, or 1 − σ for flow):
    E[x0 | x] = μ + a·s²/(a²·s² + σ²)·(x − a·μ)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    mu = torch.tensor([MEANS[c] for c in cond], dtype=x.dtype).reshape(shape)
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(shape)
    a = 1.0 - sigma if flow else torch.ones_like(sigma)
    return mu + a * DATA_STD ** 2 / (a ** 2 * DATA_STD ** 2 + sigma ** 2) * (x - a * mu)


def guided(x, sigma, w, flow=False):
    d_c, d_u = teacher(x, sigma, ["cat"] * len(x), flow), teacher(x, sigma, [""] * len(x), flow)
    return d_c + w * (d_c - d_u)


def chain_student(phases, k, w, perturb=0.0, flow=False):
    """D(x, σ) whose DDIM jump to the phase edge lands where the guided teacher's DDIM chain from σ lands."""
    grid, sigmas = ddim_timesteps(k), FLOW_SIGMAS if flow else SIGMAS

    def student(x, sigma, cond):
        out = []
        for xi, si in zip(x, sigma.reshape(-1)):
            t = int((sigmas - si).abs().argmin())
            if t not in grid:  # t = 0: evaluated for a phase-start target, which uses x_n instead
                out.append(xi)
                continue
            j = grid.index(t)
            tg = sample_phased_targets(torch.tensor([j]), phases, k)
            edge, cur, x_cur = int(tg.edge), t, xi[None]
            while cur > edge:
                nxt = max(cur - 1000 // k, 0)
                x_cur = ddim_step(FLOW if flow else VP, x_cur, sigmas[cur], sigmas[nxt], guided(x_cur, sigmas[cur], w, flow))
                cur = nxt
            # invert the jump x' = c_d·D + r·x for D (VP: c_d = 1 − r; flow: c_d = (1 − σ_e) − r·(1 − σ))
            s_e = sigmas[edge]
            r = s_e / si
            c_d = (1 - s_e) - r * (1 - si) if flow else 1 - r
            out.append((x_cur[0] - r * xi) / c_d + perturb)
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


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
@pytest.mark.parametrize("phases,k", [(4, 50), (1, 50), (2, 20)])
def test_teacher_chain_student_has_zero_loss(phases, k, flow):
    torch.manual_seed(0)
    w, sigmas = 3.0, FLOW_SIGMAS if flow else SIGMAS
    j = torch.arange(k)
    x0, noise = torch.randn(k, 2, 3, dtype=torch.float64), torch.randn(k, 2, 3, dtype=torch.float64)
    targets = sample_phased_targets(j, phases, k)
    exact = (lambda x, s, c: teacher(x, s, c, True)) if flow else teacher

    def loss_of(student, w_used):
        return pcm_loss(student, exact, FLOW if flow else VP, x0, noise, ["cat"] * k, [""] * k, sigmas, targets,
                        torch.full((k,), w_used), huber_c=0.0)

    loss = loss_of(chain_student(phases, k, w, flow=flow), w)
    assert loss.max().item() < 1e-12, loss.max().item()
    off = loss_of(chain_student(phases, k, w, perturb=1e-2, flow=flow), w)
    # only the phase-start indices compare a student jump with the teacher step; elsewhere both sides shift
    assert (off[targets.starts_phase] > 1e-4).all()
    assert loss_of(chain_student(phases, k, w, flow=flow), 1.0).max().item() > 1e-4  # the wrong guidance


def test_pseudo_huber_limits():
    a, b = torch.zeros(1, 4), torch.full((1, 4), 3.0)
    assert pseudo_huber(a, b, c=0.0).item() == pytest.approx(3.0)  # c → 0: L1
    small = pseudo_huber(a, torch.full((1, 4), 1e-6), c=1.0).item()
    assert small == pytest.approx(0.5e-12, rel=1e-3)  # |d| ≪ c: d²/(2c)


def test_flow_ddim_jump_is_the_euler_step():
    x, d = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    s, s_to = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    velocity = (x - d) / s  # x = (1 − σ)·x0 + σ·ε  ⇒  dx/dσ = ε − x0 = (x − D)/σ
    torch.testing.assert_close(ddim_step(FLOW, x, s, s_to, d), x + (s_to - s) * velocity, rtol=0, atol=1e-15)
