"""The stand-in pack's samplers (k-diffusion signature). Not TCD: a DDIM jump to a lower σ, then fresh noise up
to the next σ, the lower σ set by gamma. They only need to run and to differ from fewstep's `tcd`."""
import torch

INITIALIZED = False


@torch.no_grad()
def sample_tcd(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, gamma=0.3):
    extra_args = {} if extra_args is None else extra_args
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * ones, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        low = sigma_next * (1.0 - gamma)
        x = denoised + low * (x - denoised) / sigma
        if sigma_next > 0:
            noise = torch.randn_like(x) if noise_sampler is None else noise_sampler(sigma, sigma_next)
            x = x + (sigma_next ** 2 - low ** 2).clamp(min=0).sqrt() * noise
    return x


def sample_tcd_euler_a(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, gamma=0.3):
    return sample_tcd(model, x, sigmas, extra_args, callback, disable, noise_sampler, gamma=gamma)
