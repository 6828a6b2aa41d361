"""The forward process of a model, read from its `model_sampling`, and the moves along it.

ComfyUI works in σ-space. A model's forward process is `model_sampling.noise_scaling(σ, n, x0)`, affine in
(n, x0): x = a(σ)·n + b(σ)·x0, with (a, b) = (σ, 1) for ε/v models and (σ, 1 − σ) for flow models (SD3, FLUX).
Every move below goes through a and b, so the samplers and the distillation engine (its noising, its teacher's
DDIM/Euler step, its jumps to the phase edge, the adversarial term's re-noising) share this one definition and
serve all three kinds of model. σ may be a number, a 0-d tensor or a per-sample tensor [B, 1, …].
Nothing here imports ComfyUI.
"""
import torch


class EpsSigmaSpace:
    """Forward process x = x0 + σ·n, used when a denoiser carries no model_sampling of its own."""

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return latent_image + sigma * noise


def forward_coefficients(model_sampling, sigma, like):
    """(a, b) with noise_scaling(σ, n, x0) = a·n + b·x0, as tensors of `like`'s dtype and device."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.numel() == 1:
        sigma = sigma.reshape(())
    one, zero = torch.ones_like(sigma), torch.zeros_like(sigma)
    a = model_sampling.noise_scaling(sigma, one, zero.clone())
    b = model_sampling.noise_scaling(sigma, zero, one.clone())
    return a, b


def noised(model_sampling, x0, noise, sigma):
    """x at σ: a·n + b·x0 (in x0's dtype: a 0-d coefficient would not widen float32 noise)."""
    a, b = forward_coefficients(model_sampling, sigma, x0)
    return a * noise.to(x0.dtype) + b * x0


def predicted_noise(model_sampling, x, denoised, sigma):
    """ε̂ such that x = noise_scaling(σ, ε̂, D): the noise the denoiser implies (σ > 0)."""
    a, b = forward_coefficients(model_sampling, sigma, x)
    return (x - b * denoised) / a


def ddim_jump(model_sampling, denoised, eps, sigma_to):
    """Deterministic DDIM (η = 0) move to σ_to: keep x̂0 and ε̂, put them at σ_to."""
    a, b = forward_coefficients(model_sampling, sigma_to, denoised)
    return a * eps + b * denoised


def ddim_step(model_sampling, x, sigma, sigma_to, denoised):
    """The DDIM move of x from σ to σ_to given D(x, σ); for flow models this is exactly the Euler step."""
    return ddim_jump(model_sampling, denoised, predicted_noise(model_sampling, x, denoised, sigma), sigma_to)


def forward_noise(model_sampling, x, sigma_from, sigma_to, noise):
    """Sample q(x_σto | x_σfrom) of the forward process, for σ_to ≥ σ_from.

    With x_s = a_s·n + b_s·x0, x_t = (b_t/b_s)·x_s + √(a_t² − (b_t/b_s)²·a_s²)·z has the marginal
    of x_t. For ε models this is x + √(σ_t² − σ_s²)·z.
    """
    a_s, b_s = forward_coefficients(model_sampling, sigma_from, x)
    a_t, b_t = forward_coefficients(model_sampling, sigma_to, x)
    ratio = b_t / b_s
    std = (a_t * a_t - ratio * ratio * a_s * a_s).clamp(min=0).sqrt()
    return ratio * x + std * noise.to(x.dtype)
