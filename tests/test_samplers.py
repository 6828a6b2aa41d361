"""Samplers on exact analytic cases, the γ limits, flow models, and bad input (no ComfyUI needed)."""
import math

import pytest
import torch

from fewstep.samplers import sample_ctm_gamma, sample_pcm, sample_tcd
from fewstep.samplers.forward_process import forward_coefficients, forward_noise
from fewstep.schedulers import lcm_sigmas, pcm_sigmas
from support.model_sampling import DiscreteVPSampling, FlowSampling

SAMPLERS = [sample_pcm, lambda *a, **k: sample_tcd(*a, gamma=0.3, **k), lambda *a, **k: sample_ctm_gamma(*a, gamma=0.6, **k)]


class PointMass:
    """Exact denoiser of data concentrated at one point μ: D(x, σ) = μ for every x and σ."""

    def __init__(self, mu, ms):
        self.mu, self.model_sampling, self.calls = mu, ms, 0

    def __call__(self, x, sigma, **extra):
        self.calls += 1
        return self.mu.expand_as(x).clone()


def never_called(*args):
    raise AssertionError("a deterministic sampler drew noise")


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("ms", [DiscreteVPSampling(), FlowSampling(shift=3.0)], ids=["eps", "flow"])
def test_every_sampler_lands_on_a_point_mass_exactly(sampler, ms):
    mu = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 10
    for steps in (1, 2, 4, 8):
        model = PointMass(mu, ms)
        out = sampler(model, x.clone(), pcm_sigmas(ms, steps), extra_args={"seed": 1})
        assert model.calls == steps
        assert (out - mu).abs().max() < 1e-12


def gaussian_denoiser(ms, scale=0.5):
    """Exact denoiser of N(0, scale²) data for ε models: D = s²/(s² + σ²)·x."""

    def denoise(x, sigma, **extra):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return scale ** 2 / (scale ** 2 + s ** 2) * x

    denoise.model_sampling = ms
    return denoise


def test_gamma_zero_limits_are_ddim_and_draw_no_noise():
    ms = DiscreteVPSampling()
    model = gaussian_denoiser(ms)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 14
    sigmas = lcm_sigmas(ms, 4)
    ddim = sample_pcm(model, x, sigmas)
    assert torch.allclose(sample_tcd(model, x, sigmas, gamma=0.0, noise_sampler=never_called), ddim, atol=1e-13)
    assert torch.allclose(sample_ctm_gamma(model, x, sigmas, gamma=0.0, noise_sampler=never_called), ddim, atol=1e-13)
    # DDIM by hand: x' = D + σ'·(x − D)/σ.
    by_hand = x
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = model(by_hand, s.reshape(1))
        by_hand = d + s_next * (by_hand - d) / s
    assert torch.allclose(ddim, by_hand, atol=1e-13)


def test_gamma_one_limits_renoise_the_clean_estimate():
    ms = DiscreteVPSampling()
    model = gaussian_denoiser(ms)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 14
    sigmas = pcm_sigmas(ms, 4)
    zs = [torch.randn_like(x) for _ in range(3)]
    # CTM γ = 1 with σ_end = 0 is consistency multistep sampling: x' = D + σ'·z.
    expected = x
    for i in range(4):
        expected = model(expected, sigmas[i].reshape(1)) + (sigmas[i + 1] * zs[i] if i < 3 else 0)
    stream = iter(zs)
    out = sample_ctm_gamma(model, x, sigmas, gamma=1.0, noise_sampler=lambda *a: next(stream))
    assert torch.allclose(out, expected, atol=1e-12)


@pytest.mark.parametrize("ms", [DiscreteVPSampling(), FlowSampling(shift=3.0)], ids=["eps", "flow"])
def test_renoising_true_samples_reaches_the_next_levels_marginal(ms):
    """Exact samples of x_s (data N(μ, 0.5²)), moved by forward_noise to t, have x_t's mean and std."""
    n, mu, scale, s, t = 400_000, 0.8, 0.5, 0.2, 0.7
    g = torch.Generator().manual_seed(0)
    like = torch.zeros((), dtype=torch.float64)
    x0 = mu + scale * torch.randn(n, generator=g, dtype=torch.float64)
    a_s, b_s = forward_coefficients(ms, s, like)
    a_t, b_t = forward_coefficients(ms, t, like)
    x_s = a_s * torch.randn(n, generator=g, dtype=torch.float64) + b_s * x0
    x_t = forward_noise(ms, x_s, s, t, torch.randn(n, generator=g, dtype=torch.float64))
    assert abs(x_t.mean().item() - float(b_t) * mu) < 0.01
    assert abs(x_t.std().item() / math.sqrt(float(a_t) ** 2 + float(b_t) ** 2 * scale ** 2) - 1) < 0.01


@pytest.mark.parametrize("ms", [DiscreteVPSampling(), FlowSampling(shift=3.0)], ids=["eps", "flow"])
def test_forward_noise_has_the_marginal_of_the_target_level(ms):
    like = torch.zeros((), dtype=torch.float64)
    s, t = 0.3, 0.8
    a_s, b_s = forward_coefficients(ms, s, like)
    a_t, b_t = forward_coefficients(ms, t, like)
    # x_s = a_s·n + b_s·x0 → mean factor b_t, variance a_t² after the move.
    x0, n, z = torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64), torch.tensor(-1.1, dtype=torch.float64)
    moved = forward_noise(ms, a_s * n + b_s * x0, s, t, z)
    ratio = b_t / b_s
    std = (a_t ** 2 - ratio ** 2 * a_s ** 2).sqrt()
    assert torch.isclose(moved, ratio * (a_s * n + b_s * x0) + std * z)
    assert torch.isclose(ratio * b_s, b_t) and torch.isclose(ratio ** 2 * a_s ** 2 + std ** 2, a_t ** 2)


def test_seeded_noise_is_deterministic_and_seed_dependent():
    ms = DiscreteVPSampling()
    model = gaussian_denoiser(ms)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 14
    sigmas = lcm_sigmas(ms, 4)
    a = sample_tcd(model, x, sigmas, extra_args={"seed": 1})
    assert torch.equal(a, sample_tcd(model, x, sigmas, extra_args={"seed": 1}))
    assert not torch.allclose(a, sample_tcd(model, x, sigmas, extra_args={"seed": 2}))


@pytest.mark.parametrize("sigmas, message", [
    (torch.tensor([1.0, 2.0, 0.0]), "must be decreasing"),
    (torch.tensor([3.0, float("nan"), 0.0]), "finite"),
    (torch.tensor([3.0, 0.0, 0.0]), "only the last"),
    (torch.tensor([[3.0, 0.0]]), "1-D"),
])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_bad_sigmas_are_refused_with_the_reason(sampler, sigmas, message):
    ms = DiscreteVPSampling()
    with pytest.raises(ValueError, match=message):
        sampler(gaussian_denoiser(ms), torch.zeros(1, 1, 2, 2, dtype=torch.float64), sigmas.double())


@pytest.mark.parametrize("sampler", [sample_tcd, sample_ctm_gamma])
@pytest.mark.parametrize("gamma", [-0.1, 1.5])
def test_gamma_outside_unit_interval_is_refused(sampler, gamma):
    ms = DiscreteVPSampling()
    with pytest.raises(ValueError, match="gamma must be in"):
        sampler(gaussian_denoiser(ms), torch.zeros(1, 1, 2, 2, dtype=torch.float64), pcm_sigmas(ms, 2), gamma=gamma)
