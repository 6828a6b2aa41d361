"""TCD and TSCD (Hyper-SD) targets of the distillation engine against exact cases, and their stage schedule.

The teacher is the exact denoiser of Gaussian data (tests/test_distill_loss.py). A student whose DDIM jump from x_t
lands where the teacher's own solver chain from x_t lands (at TCD's end point s, at a TSCD stage's segment edge) has
zero loss; so it has with the closed-form probability-flow ODE map as the solver, which is checked on its own
against a fine Euler integration. A perturbed student, or a perturbed previous stage, does not. A later TSCD stage's
target comes from the previous stage's frozen LoRA and not from the teacher; stage boundaries resume exactly.
Each of these holds for an ε model on the SD table and for a flow model (x = (1 − σ)·x0 + σ·ε) on SD3's shifted table.
"""
import pytest
import torch

from fewstep.distill import Distiller
from fewstep.distill.io import load_safetensors, save_safetensors_atomic
from fewstep.distill.phased_loss import (jump_solver, pcm_loss, sample_phased_targets, sample_segment_targets,
                                         sample_tcd_targets)
from fewstep.samplers.forward_process import ddim_step
from fewstep.schedulers.pcm import ddim_timesteps
from support.model_sampling import FlowSampling
from support.toy_distill import VP as TOY_VP, make_setup, run_steps, vp_denoise
from test_distill_loss import DATA_STD, FLOW, FLOW_SIGMAS, MEANS, SIGMAS, VP, guided, teacher

K = 20
TOY_FLOW = FlowSampling(dtype=torch.float32)


def chain(x, t_from, t_to, w, flow):
    """The guided teacher's DDIM (flow: Euler) chain on the K-grid, stride T/K, from timestep t_from down to t_to."""
    sigmas, ms, cur = FLOW_SIGMAS if flow else SIGMAS, FLOW if flow else VP, t_from
    while cur > t_to:
        nxt = max(cur - 1000 // K, 0)
        x = ddim_step(ms, x, sigmas[cur], sigmas[nxt], guided(x, sigmas[cur], w, flow))
        cur = nxt
    assert cur == t_to, "the end point must lie on the chain"
    return x


def exact_map(x, sigma, sigma_to, cond, flow=False):
    """Closed-form PF-ODE map of x0 ~ N(μ, s²) at x = a·x0 + σ·ε (a = 1, or 1 − σ for flow): (x − a·μ)/√(a²·s² + σ²)
    is constant along it."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    mu = torch.tensor([MEANS[c] for c in cond], dtype=x.dtype).reshape(shape)
    s2 = DATA_STD ** 2
    a, a_to = (1 - sigma, 1 - sigma_to) if flow else (1.0, 1.0)
    return a_to * mu + (x - a * mu) * torch.sqrt((a_to ** 2 * s2 + sigma_to ** 2) / (a ** 2 * s2 + sigma ** 2))


def mapping_student(edges, mapper, flow=False, perturb=0.0):
    """D(x, σ) per row whose DDIM jump to the row's edge timestep lands at mapper(x, t, edge)."""
    sigmas = FLOW_SIGMAS if flow else SIGMAS

    def student(x, sigma, cond):
        out = []
        for row, (xi, si) in enumerate(zip(x, sigma.reshape(-1))):
            t, edge = int((sigmas - si).abs().argmin()), int(edges[row])
            if t == edge:  # a target evaluated where the jump is the identity: torch.where takes x_n there
                out.append(xi)
                continue
            landed = mapper(xi[None], t, edge, cond[row])[0]
            s_e = sigmas[edge]
            r = s_e / si  # invert x' = c_d·D + r·x (VP: c_d = 1 − r; flow: (1 − σ_e) − r·(1 − σ))
            c_d = (1 - s_e) - r * (1 - si) if flow else 1 - r
            out.append((landed - r * xi) / c_d + perturb)
        return torch.stack(out)

    return student


def loss_of(targets, student, flow=False, solver=None, w=3.0, exact_teacher=teacher):
    torch.manual_seed(0)
    n = len(targets.t)
    x0, noise = torch.randn(n, 2, 3, dtype=torch.float64), torch.randn(n, 2, 3, dtype=torch.float64)
    exact = (lambda x, s, c: exact_teacher(x, s, c, True)) if flow else exact_teacher
    return pcm_loss(student, exact, FLOW if flow else VP, x0, noise, ["cat"] * n, [""] * n,
                    FLOW_SIGMAS if flow else SIGMAS, targets, torch.full((n,), w), huber_c=0.0, solver=solver)


def all_tcd_pairs():
    pairs = [(j, i) for j in range(K) for i in range(j + 1)]
    return sample_tcd_targets(torch.tensor([j for j, _ in pairs]), torch.tensor([i for _, i in pairs]), K)


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
def test_tcd_teacher_chain_student_has_zero_loss_at_every_end_point(flow):
    targets = all_tcd_pairs()
    assert (targets.edge <= targets.t_next).all() and torch.equal(targets.starts_phase, targets.edge == targets.t_next)
    on_chain = lambda x, t, e, c: chain(x, t, e, 3.0, flow)  # noqa: E731
    loss = loss_of(targets, mapping_student(targets.edge, on_chain, flow), flow)
    assert loss.max().item() < 1e-12, loss.max().item()
    off = loss_of(targets, mapping_student(targets.edge, on_chain, flow, perturb=1e-2), flow)
    assert (off[targets.starts_phase] > 1e-4).all()
    assert loss_of(targets, mapping_student(targets.edge, on_chain, flow), flow, w=1.0).max().item() > 1e-4


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
def test_the_closed_form_ode_map_is_the_probability_flow(flow):
    """Independent check of `exact_map`: Euler on dx/dσ = (x − D(x, σ))/σ (the ODE of both parametrisations) with
    20000 steps, from the table's top σ (VP 14.6, flow 1) to its lowest (VP 0.03, flow 0.003)."""
    sigmas = FLOW_SIGMAS if flow else SIGMAS
    x = torch.tensor([[2.0, -1.0, 0.3]], dtype=torch.float64)
    grid = torch.linspace(float(sigmas[-1]), float(sigmas[0]), 20001, dtype=torch.float64)
    y = x.clone()
    for a, b in zip(grid[:-1], grid[1:]):
        y = y + (b - a) * (y - teacher(y, a, ["cat"], flow)) / a
    expected = exact_map(x, sigmas[-1], sigmas[0], ["cat"], flow)
    assert (y - expected).abs().max() < 2e-4  # measured VP 2.8e-5, flow 9.3e-5 (Euler's first-order error)
    # the K-grid DDIM (Euler) chain: another map (VP 6.0e-3, flow 0.15)
    assert (expected - chain(x, 999, 0, 0.0, flow)).abs().max() > 1e-3


def exact_solver(flow):
    return lambda x, s, s_to, cond, uncond, w: exact_map(x, s, s_to, cond, flow)


def exact_on_grid(flow):
    sigmas = FLOW_SIGMAS if flow else SIGMAS
    return lambda x, t, e, cond: exact_map(x, sigmas[t], sigmas[e], [cond], flow)


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
def test_tcd_and_tscd_with_the_exact_ode_solver_have_zero_loss(flow):
    """The closed-form ODE map as the solver and in the students: zero loss for TCD at every s and TSCD at every
    stage; a perturbed student or previous stage gives a loss."""
    targets, on_map, ms = all_tcd_pairs(), exact_on_grid(flow), FLOW if flow else VP
    student = mapping_student(targets.edge, on_map, flow)
    assert loss_of(targets, student, flow, solver=exact_solver(flow), w=0).max() < 1e-12
    off = loss_of(targets, mapping_student(targets.edge, on_map, flow, perturb=1e-2), flow, solver=exact_solver(flow),
                  w=0)
    assert (off[targets.starts_phase] > 1e-4).all()
    j = torch.arange(K)
    for before, now in [(8, 4), (4, 2), (2, 1)]:
        tg = sample_segment_targets(j, before, now, K)
        old_edges = sample_phased_targets(j, before, K).edge  # where the previous stage's student jumps
        previous = jump_solver(mapping_student(old_edges, on_map, flow), ms)
        student = mapping_student(tg.edge, on_map, flow)
        assert loss_of(tg, student, flow, solver=previous).max() < 1e-12
        wrong = jump_solver(mapping_student(old_edges, on_map, flow, perturb=1e-2), ms)
        assert (loss_of(tg, student, flow, solver=wrong)[tg.starts_phase] > 1e-4).all()


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
@pytest.mark.parametrize("segments", [(4, 2, 1), (8, 4, 2, 1)])
def test_tscd_every_stage_of_the_teacher_chain_has_zero_loss(segments, flow):
    """Stage 1: PCM with the first number of segments and the CFG teacher's step. Later stages: the previous
    stage's student (here: the teacher chain to the old edges) jumps x_t to its edge, the student to the new edge."""
    j, w, ms = torch.arange(K), 3.0, FLOW if flow else VP
    on_chain = lambda x, t, e, c: chain(x, t, e, w, flow)  # noqa: E731
    first = sample_phased_targets(j, segments[0], K)
    assert loss_of(first, mapping_student(first.edge, on_chain, flow), flow).max().item() < 1e-12
    for before, now in zip(segments, segments[1:]):
        tg = sample_segment_targets(j, before, now, K)
        assert set(tg.edge.tolist()) <= set(tg.t_next.tolist()) and (tg.t_next < tg.t).all()
        old_edges = sample_phased_targets(j, before, K).edge  # the previous stage's student, made on its own edges
        previous = jump_solver(mapping_student(old_edges, on_chain, flow), ms)
        student = mapping_student(tg.edge, on_chain, flow)
        assert loss_of(tg, student, flow, solver=previous).max().item() < 1e-12
        off = loss_of(tg, mapping_student(tg.edge, on_chain, flow, perturb=1e-2), flow, solver=previous)
        assert (off[tg.starts_phase] > 1e-4).all()
        wrong_previous = jump_solver(mapping_student(old_edges, on_chain, flow, perturb=1e-2), ms)
        assert (loss_of(tg, student, flow, solver=wrong_previous)[tg.starts_phase] > 1e-4).all()
        # the later stage never asks the teacher: a different teacher leaves the loss as it was
        other = lambda x, s, c, flow=False: teacher(x, s, c, flow) * 2.0 + 1.0  # noqa: E731
        assert torch.equal(loss_of(tg, student, flow, solver=previous, exact_teacher=other),
                           loss_of(tg, student, flow, solver=previous))


def test_segments_that_do_not_nest_are_refused():
    with pytest.raises(ValueError, match="dividing the one before"):
        sample_segment_targets(torch.arange(4), 4, 3, K)
    with pytest.raises(ValueError, match="0..j"):
        sample_tcd_targets(torch.tensor([2]), torch.tensor([3]), K)


# ----- the engine: draws, stages, resume

TSCD = dict(method="tscd", tscd_segments="4,2,1", tscd_stage_steps="3,3,4")  # the toy set-up runs 10 steps


def test_tcd_draws_an_end_point_at_or_below_the_teacher_step_and_pcm_draws_as_before():
    net, lora, data, config = make_setup(method="tcd", batch=8)
    distiller = Distiller(config, vp_denoise(net), lora, data, TOY_VP)
    ends, starts = [], []
    for _ in range(200):
        d = distiller.draw()
        assert (d.end_index >= 0).all() and (d.end_index <= d.grid_index).all()
        ends += d.end_index.tolist()
        starts += d.grid_index.tolist()
    assert set(ends) == set(range(10))  # every end index occurs
    assert sum(e == s for e, s in zip(ends, starts)) > 0
    pcm = Distiller(make_setup(batch=8)[3], vp_denoise(net), lora, data, TOY_VP).draw()
    first = Distiller(config, vp_denoise(net), lora, data, TOY_VP).draw()
    assert torch.equal(pcm.noise, first.noise) and torch.equal(pcm.grid_index, first.grid_index)


def scaled_teacher_distiller(scale, ms=TOY_VP):
    """A TSCD distiller whose teacher (the network with the LoRA off) is multiplied by scale["teacher"]."""
    net, lora, data, config = make_setup(**TSCD, batch=4, cfg_mode="normal", empty_prompt_prob=0.0)
    denoise = vp_denoise(net, ms)

    def with_teacher_scale(x, sigma, cond):
        out = denoise(x, sigma, cond)
        return out if lora.enabled else out * scale["teacher"]

    return Distiller(config, with_teacher_scale, lora, data, ms)


def loss_now(distiller):
    """This step's loss without using up its draws."""
    rng = distiller.generator.get_state()
    loss = distiller.gradients()
    distiller.generator.set_state(rng)
    return loss


@pytest.mark.parametrize("ms", [TOY_VP, TOY_FLOW], ids=["vp", "flow"])
def test_tscd_later_stage_learns_from_the_previous_lora_not_the_teacher(ms):
    """At stage 2 the loss moves with the frozen previous LoRA and not at all with the teacher (LoRA off);
    at stage 1 it moves with the teacher."""
    scale = {"teacher": 1.0}
    distiller = scaled_teacher_distiller(scale, ms)
    stage_one = loss_now(distiller)
    scale["teacher"] = 1.5
    assert loss_now(distiller) != stage_one  # stage 1 asks the teacher
    scale["teacher"] = 1.0
    for _ in range(3):
        distiller.train_step()
    stage_two = loss_now(distiller)
    assert distiller.stage == 1 and distiller.previous is not None
    assert all(torch.equal(a, b) for a, b in zip(distiller.previous, distiller.params))
    scale["teacher"] = 1.5
    assert loss_now(distiller) == stage_two  # the teacher is not asked
    scale["teacher"] = 1.0
    saved = [v.clone() for v in distiller.previous]
    with torch.no_grad():
        for v in distiller.previous:
            v.add_(0.05)
    assert loss_now(distiller) != stage_two  # the previous stage's LoRA makes the target
    distiller.previous = saved
    assert loss_now(distiller) == stage_two


def optimiser_state(distiller):
    return [(k, v) for p in distiller.params for k, v in sorted(distiller.optimizer.state[p].items())]


@pytest.mark.parametrize("split", [3, 4, 7])
def test_tscd_resume_across_stage_boundaries_is_exact(tmp_path, split):
    straight = run_steps(10, **TSCD)
    assert straight.stage == 2
    first = run_steps(split, **TSCD)
    tensors, meta = first.state()
    assert meta["stage"] == str(first.stage) and (("previous.0" in tensors) == (first.stage > 0))
    save_safetensors_atomic(tensors, tmp_path / "state.safetensors", meta)
    resumed = run_steps(10 - split, resume_from=load_safetensors(tmp_path / "state.safetensors"), **TSCD)
    assert resumed.step == 10 and resumed.stage == 2
    assert resumed.losses == straight.losses
    assert all(torch.equal(a, b) for a, b in zip(straight.params, resumed.params))
    a, b = optimiser_state(straight), optimiser_state(resumed)
    assert len(a) == len(b) == 3 * len(straight.params)
    assert all(ka == kb and torch.equal(va, vb) for (ka, va), (kb, vb) in zip(a, b))
    assert all(torch.equal(a, b) for a, b in zip(straight.previous, resumed.previous))


def test_tscd_resume_needs_the_previous_stage_and_the_same_schedule():
    tensors, meta = run_steps(4, **TSCD).state()
    net, lora, data, config = make_setup(**{**TSCD, "tscd_stage_steps": "1,1,8"})
    with pytest.raises(ValueError, match="other settings"):
        Distiller(config, vp_denoise(net), lora, data, TOY_VP).load_state(tensors, meta)
    net, lora, data, config = make_setup(**{**TSCD, "tscd_stage_steps": "", "steps": 20})
    loose = {**meta, "config": config.to_json()}  # an even split of 20 steps (7, 7, 6): step 5 is still in stage 1
    with pytest.raises(ValueError, match="TSCD stage 2 at step 4.*in stage 1"):
        Distiller(config, vp_denoise(net), lora, data, TOY_VP).load_state(tensors, loose)
    net, lora, data, config = make_setup(**TSCD)
    with pytest.raises(ValueError, match="lacks the previous"):
        Distiller(config, vp_denoise(net), lora, data, TOY_VP).load_state(
            {k: v for k, v in tensors.items() if not k.startswith("previous.")}, meta)


@pytest.mark.parametrize("change,message", [
    ({"method": "dmd"}, "method must be one of"),
    ({"tscd_segments": "4,3"}, "each dividing the one before"),
    ({"tscd_segments": "2,4,1"}, "each dividing the one before"),
    ({"tscd_segments": "4,x"}, "comma list of whole numbers"),
    ({"tscd_segments": "16,8"}, r"phases \(16\) must be between 1 and ddim_timesteps K \(10\)"),
    ({"tscd_stage_steps": "2,2"}, "one count of at least 1 per stage"),
    ({"tscd_stage_steps": "3,3,5"}, "sum to 11, but steps is 10"),
    ({"tscd_solver": "ema"}, "tscd_solver must be one of"),
])
def test_bad_tscd_settings_are_refused(change, message):
    net, lora, data, config = make_setup(**{**TSCD, **change})
    with pytest.raises(ValueError, match=message):
        Distiller(config, vp_denoise(net), lora, data, TOY_VP)


def test_tscd_teacher_solver_keeps_no_previous_lora_and_trains():
    distiller = run_steps(10, **TSCD, tscd_solver="teacher")
    assert distiller.stage == 2 and distiller.previous is None
    assert "previous.0" not in distiller.state()[0]


def test_trained_segments_follow_the_stage_that_made_the_weights():
    config = make_setup(**TSCD)[3]
    assert [config.trained_segments(n) for n in range(11)] == [4, 4, 4, 4, 2, 2, 2, 1, 1, 1, 1]
    assert config.stage_steps() == [3, 3, 4]
    config.tscd_stage_steps = ""
    config.steps = 7
    assert config.stage_steps() == [3, 2, 2]
