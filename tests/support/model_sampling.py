"""Pure-torch model_sampling objects with ComfyUI's interface, in any dtype.

They let the samplers and schedules run (and be tested in float64) without ComfyUI, and give the
distillation engine the same σ ↔ timestep conventions as the host:
- `DiscreteVPSampling`: SD's "scaled_linear" DDPM schedule (β from 0.00085 to 0.012, 1000 steps)
  in σ-space, σ(t) = √((1 − ᾱ_t)/ᾱ_t), x = x0 + σ·ε (as comfy.model_sampling.ModelSamplingDiscrete + EPS).
- `FlowSampling`: rectified flow x = (1 − σ)·x0 + σ·ε with SD3's time shift (as ModelSamplingDiscreteFlow + CONST).
"""
import math

import torch


def scaled_linear_alphas_cumprod(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, dtype=torch.float64):
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=dtype) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class _SigmaTable:
    """sigma_min / sigma_max of an ascending `sigmas` table, as ComfyUI's model samplings expose them."""

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]


class DiscreteVPSampling(_SigmaTable):
    """ε-prediction model on a discrete VP schedule, seen in σ-space."""

    def __init__(self, alphas_cumprod=None, dtype=torch.float64):
        if alphas_cumprod is None:
            alphas_cumprod = scaled_linear_alphas_cumprod(dtype=dtype)
        self.alphas_cumprod = alphas_cumprod.to(dtype)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()
        self.num_timesteps = len(self.sigmas)
        self.sigma_data = 1.0

    def timestep(self, sigma):
        """The nearest training timestep (an integer, as a float tensor like ComfyUI's)."""
        sigma = torch.as_tensor(sigma, dtype=self.sigmas.dtype)
        dists = sigma.log().reshape(-1)[None, :] - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).reshape(sigma.shape).to(self.sigmas.dtype)

    def sigma(self, timestep):
        t = torch.as_tensor(timestep, dtype=self.sigmas.dtype).clamp(0, self.num_timesteps - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        scale = torch.sqrt(1.0 + sigma ** 2) if max_denoise else sigma
        return latent_image + scale * noise

    def calculate_input(self, sigma, x):
        """The VP-space input the ε network sees: x/√(1 + σ²) = √ᾱ·x."""
        return x / torch.sqrt(1.0 + sigma ** 2)

    def calculate_denoised(self, sigma, eps, x):
        return x - sigma * eps


class FlowSampling(_SigmaTable):
    """Rectified-flow model (SD3/FLUX style): timestep = 1000·σ, σ table = shift(t/1000) for t = 1..1000."""

    def __init__(self, shift=3.0, num_train_timesteps=1000, dtype=torch.float64):
        self.shift = shift
        self.multiplier = num_train_timesteps
        percents = torch.arange(1, num_train_timesteps + 1, dtype=dtype) / num_train_timesteps
        self.sigmas = self.shifted(percents)

    def shifted(self, t):
        return self.shift * t / (1 + (self.shift - 1) * t)

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        return self.shifted(torch.as_tensor(timestep, dtype=self.sigmas.dtype) / self.multiplier)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image

    def calculate_input(self, sigma, x):
        return x

    def calculate_denoised(self, sigma, velocity, x):
        return x - sigma * velocity


class Denoiser:
    """k-diffusion denoiser D(x, σ) from a raw network output function f(x_in, timestep) and a model_sampling.

    Stands in for ComfyUI's model wrapper in pure tests and benchmarks; exposes `model_sampling`
    the way `samplers.common.model_sampling_of` expects.
    """

    def __init__(self, network, model_sampling):
        self.network = network
        self.model_sampling = model_sampling

    def __call__(self, x, sigma, **extra_args):
        ms = self.model_sampling
        sigma_b = sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1)).to(x.dtype)
        out = self.network(ms.calculate_input(sigma_b, x), ms.timestep(sigma))
        return ms.calculate_denoised(sigma_b, out, x)


def initial_noise_scale(model_sampling, sigma_start):
    """ComfyUI's start: noise·√(1 + σ²) when the schedule starts at σ_max (ε models), else noise·σ."""
    sigma_max, sigma_start = float(model_sampling.sigma_max), float(sigma_start)
    max_denoise = math.isclose(sigma_max, sigma_start, rel_tol=1e-5) or sigma_start > sigma_max
    one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    return float(model_sampling.noise_scaling(torch.tensor(sigma_start, dtype=torch.float64), one, zero, max_denoise=max_denoise))
