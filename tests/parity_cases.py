"""Parity runs of the pack's samplers + schedules against diffusers' schedulers, in float64.

Each case runs one diffusers scheduler loop and the pack's σ-space loop on the same ε (or flow
velocity) function, the same initial noise and the same per-step noise, and returns the largest
absolute difference of the final latents. Shared by tests/test_parity_diffusers.py (asserts) and
scripts/parity_report.py (prints the table). Both sides read the same ᾱ table (diffusers', cast to
float64): the table is data, not the method under test.

diffusers works on VP latents x_vp = x_σ/√(1 + σ²); flow latents are the same in both.
"""
import math

import torch

import fewstep  # noqa: F401  (registered by tests/conftest.py)
from fewstep.samplers import sample_ctm_gamma, sample_pcm, sample_tcd
from fewstep.schedulers import lcm_sigmas, pcm_sigmas
from support.model_sampling import Denoiser, DiscreteVPSampling, FlowSampling, initial_noise_scale

SHAPE = (2, 4, 8, 8)
STEP_COUNTS = (1, 2, 3, 4, 8)
TCD_GAMMAS = (0.0, 0.3, 0.5, 1.0)
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def eps_network(x, t):
    """A smooth, nonlinear stand-in for a UNet: ε̂(x_vp, t) (or a flow velocity), float64."""
    tt = (torch.as_tensor(t, dtype=x.dtype).reshape(-1)[:1] / 1000.0).reshape(())
    mixed = 0.8 * x + 0.2 * x.roll(1, dims=-1) - 0.1 * x.flip(-2)
    return torch.tanh(mixed + 0.5 * torch.sin(3.0 * tt)) * (0.6 + 0.4 * tt) + 0.05 * x


def initial_noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class ReplayNoise:
    """A seeded N(0, I) stream; diffusers' schedulers and ours draw from identical copies in the same order."""

    def __init__(self, seed, draw_dtype=torch.float64):
        self.generator = torch.Generator().manual_seed(seed)
        self.draw_dtype = draw_dtype

    def __call__(self, *unused):
        return torch.randn(SHAPE, generator=self.generator, dtype=self.draw_dtype).to(torch.float64)


def _vp_table(scheduler):
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]
    return DiscreteVPSampling(scheduler.alphas_cumprod)


def _to_vp(x, sigma):
    return x / math.sqrt(1.0 + float(sigma) ** 2)


def _run_ours(sampler, ms, sigmas, seed, **kwargs):
    x = initial_noise(seed) * initial_noise_scale(ms, sigmas[0])
    return sampler(Denoiser(eps_network, ms), x, sigmas, **kwargs)


def _diffusers_loop(scheduler, seed, step_kwargs=None):
    step_kwargs = step_kwargs or {}
    x = initial_noise(seed) * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        x = scheduler.step(eps_network(x, t), t, x, **step_kwargs).prev_sample
    return x


def pcm_vs_ddim(steps, seed=0):
    """pcm sampler + pcm trailing schedule (end at ᾱ0) vs DDIMScheduler(trailing, clip_sample=False, set_alpha_to_one=False)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**SD_BETAS, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)
    ms = _vp_table(scheduler)
    scheduler.set_timesteps(steps)
    sigmas = pcm_sigmas(ms, steps, end="sigma_min")
    ours = _to_vp(_run_ours(sample_pcm, ms, sigmas, seed), sigmas[-1])
    return (ours - _diffusers_loop(scheduler, seed)).abs().max().item()


def pcm_vs_tcd0(steps, phases=None, ddim_steps=None, seed=0):
    """pcm sampler on the pcm schedule (trailing or phase edges) vs TCDScheduler(γ=0) on the same timesteps."""
    from diffusers import TCDScheduler

    scheduler = TCDScheduler(**SD_BETAS, set_alpha_to_one=False)
    ms = _vp_table(scheduler)
    sigmas = pcm_sigmas(ms, steps, phases, ddim_steps, end="sigma_min")
    timesteps = [int(ms.timestep(s)) for s in sigmas[:-1]]
    scheduler.set_timesteps(timesteps=timesteps)
    ours = _to_vp(_run_ours(sample_pcm, ms, sigmas, seed), sigmas[-1])
    theirs = _diffusers_loop(scheduler, seed, {"eta": 0.0})
    return (ours - theirs).abs().max().item()


def tcd_vs_tcd(steps, gamma, seed=0):
    """tcd sampler (γ) + lcm-grid schedule (end at ᾱ0) vs TCDScheduler(eta=γ) with the same per-step noise."""
    from diffusers import TCDScheduler

    scheduler = TCDScheduler(**SD_BETAS)
    ms = _vp_table(scheduler)
    scheduler.set_timesteps(steps)
    sigmas = lcm_sigmas(ms, steps, end="sigma_min")
    ours = _to_vp(_run_ours(sample_tcd, ms, sigmas, seed, gamma=gamma, noise_sampler=ReplayNoise(seed + 1)), sigmas[-1])
    theirs = _diffusers_loop(scheduler, seed, {"eta": gamma, "generator": torch.Generator().manual_seed(seed + 1)})
    return (ours - theirs).abs().max().item()


class ComfyLayout:
    """Presents a denoiser the way ComfyUI hands it to samplers (`inner_model.inner_model.model_sampling`),
    which core `sample_lcm` reaches into."""

    def __init__(self, denoiser, ms):
        self.denoiser = denoiser
        self.inner_model = type("Guider", (), {})()
        self.inner_model.inner_model = type("BaseModel", (), {})()
        self.inner_model.inner_model.model_sampling = ms

    def __call__(self, x, sigma, **extra):
        return self.denoiser(x, sigma)


def lcm_boundary_denoiser(ms, comfy_form=False):
    """D = c_out·x̂0 + c_skip·x at timestep t, u = 10·t (LCMScheduler's boundary, c_skip on the VP sample).

    `comfy_form=True` applies c_skip to the σ-space input instead, as ComfyUI's LCM model sampling does.
    """
    base = Denoiser(eps_network, ms)

    def denoise(x, sigma):
        x0 = base(x, sigma)
        u = 10.0 * ms.timestep(sigma).reshape(-1, 1, 1, 1)
        c_skip, c_out = 0.25 / (u ** 2 + 0.25), u / (u ** 2 + 0.25).sqrt()
        s = sigma.reshape(-1, 1, 1, 1)
        skip_input = x if comfy_form else x / (1.0 + s ** 2).sqrt()
        return c_out * x0 + c_skip * skip_input

    return ComfyLayout(denoise, ms)


def core_lcm_vs_lcm(sample_lcm, steps, seed=0, comfy_form=False):
    """ComfyUI's core `lcm` sampler + the pack's lcm schedule + the LCM boundary vs LCMScheduler."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(**SD_BETAS)
    ms = _vp_table(scheduler)
    scheduler.set_timesteps(steps)
    sigmas = lcm_sigmas(ms, steps, end="zero")
    x = initial_noise(seed) * initial_noise_scale(ms, sigmas[0])
    ours = sample_lcm(lcm_boundary_denoiser(ms, comfy_form), x, sigmas, noise_sampler=ReplayNoise(seed + 1))
    generator = torch.Generator().manual_seed(seed + 1)
    x = initial_noise(seed)
    denoised = None
    for t in scheduler.timesteps:
        out = scheduler.step(eps_network(x, t), t, x, generator=generator)
        x, denoised = out.prev_sample, out.denoised
    return (ours - denoised).abs().max().item()


def _flow_scheduler(sigmas, stochastic):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, stochastic_sampling=stochastic)
    scheduler.set_timesteps(sigmas=[float(s) for s in sigmas[:-1]])
    scheduler.sigmas = sigmas.to(torch.float64).clone()  # diffusers stores float32 σ's; compare the update rule in float64
    return scheduler


def sd3_deterministic(steps, shift=3.0, seed=0):
    """pcm sampler on a flow model (SD3, shift 3) vs FlowMatchEulerDiscreteScheduler: x' = x + (σ' − σ)·v.

    diffusers computes flow steps in float32 (it casts the sample), so agreement is ~1e-7.
    """
    ms = FlowSampling(shift=shift)
    sigmas = pcm_sigmas(ms, steps)
    ours = _run_ours(sample_pcm, ms, sigmas, seed)
    theirs = _diffusers_loop(_flow_scheduler(sigmas, False), seed)
    return (ours - theirs).abs().max().item()


def sd3_stochastic(sample_lcm, steps, shift=3.0, seed=0):
    """Core `lcm` on a flow model vs FlowMatchEulerDiscreteScheduler(stochastic_sampling): x' = (1 − σ')·D + σ'·z.

    diffusers casts flow samples to float32 inside `step` and draws its noise in float32, so the replayed
    noise is drawn in float32 too, and agreement is at float32 precision (~1e-7), not float64.
    """
    ms = FlowSampling(shift=shift)
    sigmas = pcm_sigmas(ms, steps)
    x = initial_noise(seed) * initial_noise_scale(ms, sigmas[0])
    ours = sample_lcm(ComfyLayout(Denoiser(eps_network, ms), ms), x, sigmas, noise_sampler=ReplayNoise(seed + 1, torch.float32))
    theirs = _diffusers_loop(_flow_scheduler(sigmas, True), seed, {"generator": torch.Generator().manual_seed(seed + 1)})
    return (ours - theirs).abs().max().item()


def ctm_reference(ms, sigmas, gamma, seed):
    """CTM γ-sampling written straight from the paper's loop for an ε model in σ-space (independent of the pack)."""
    noise = ReplayNoise(seed + 1)
    x = initial_noise(seed) * initial_noise_scale(ms, sigmas[0])
    denoise = Denoiser(eps_network, ms)
    sigma_end = float(sigmas[-1])
    for i in range(len(sigmas) - 1):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        d = denoise(x, torch.full((SHAPE[0],), t, dtype=torch.float64))
        s = math.sqrt(1 - gamma ** 2) * (t_next - sigma_end) + sigma_end
        x = (s / t) * x + (1 - s / t) * d  # G(x, t, s) with g = D
        if gamma > 0 and t_next > s:
            x = x + math.sqrt(t_next ** 2 - s ** 2) * noise()
    return x


def ctm_vs_reference(steps, gamma, seed=0):
    ms = DiscreteVPSampling()
    sigmas = pcm_sigmas(ms, steps)
    ours = _run_ours(sample_ctm_gamma, ms, sigmas, seed, gamma=gamma, noise_sampler=ReplayNoise(seed + 1))
    return (ours - ctm_reference(ms, sigmas, gamma, seed)).abs().max().item()


def all_cases(sample_lcm=None):
    """(name, max abs diff) for every configuration; core-lcm cases only when ComfyUI's sample_lcm is given."""
    rows = []
    for n in STEP_COUNTS:
        rows.append((f"pcm trailing vs DDIMScheduler(trailing), N={n}", pcm_vs_ddim(n)))
    for n in STEP_COUNTS:
        rows.append((f"pcm trailing vs TCDScheduler(γ=0), N={n}", pcm_vs_tcd0(n)))
    for n in STEP_COUNTS:
        rows.append((f"pcm edges K=50 M=4 vs TCDScheduler(γ=0) on the same timesteps, N={n}", pcm_vs_tcd0(n, 4, 50)))
    for gamma in TCD_GAMMAS:
        for n in STEP_COUNTS:
            rows.append((f"tcd γ={gamma} vs TCDScheduler(eta={gamma}), N={n}", tcd_vs_tcd(n, gamma)))
    for n in STEP_COUNTS:
        rows.append((f"SD3 flow pcm vs FlowMatchEuler, N={n}", sd3_deterministic(n)))
    for gamma in (0.0, 0.3, 0.7, 1.0):
        for n in STEP_COUNTS:
            rows.append((f"ctm_gamma γ={gamma} vs CTM reference loop, N={n}", ctm_vs_reference(n, gamma)))
    if sample_lcm is not None:
        for n in STEP_COUNTS:
            rows.append((f"core lcm + lcm schedule + LCM boundary vs LCMScheduler, N={n}", core_lcm_vs_lcm(sample_lcm, n)))
        for n in STEP_COUNTS:
            rows.append((f"SD3 flow core lcm vs FlowMatchEuler(stochastic), N={n}", sd3_stochastic(sample_lcm, n)))
    return rows

