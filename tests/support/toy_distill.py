"""A small conditional ε-network and the distillation set-up the engine tests share.

Run as a script it takes 3 steps of the same set-up and saves the LoRA parameters and losses to argv[1]: under
torchrun as a data-parallel worker (rank 0 saves), else in one process with argv[2] virtual ranks.
"""
import pathlib
import socket
import sys

import torch
from torch import nn

if __name__ == "__main__":  # under torchrun: import the repo as `fewstep` first
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import conftest  # noqa: F401

from fewstep.distill import DistillConfig, Distiller, LatentData, LoraSet, lora_targets  # noqa: E402
from support.model_sampling import DiscreteVPSampling  # noqa: E402

VP = DiscreteVPSampling(dtype=torch.float32)


class TinyEpsNet(nn.Module):
    """ε(x_in, t, cond): two convs with a timestep and condition embedding."""

    def __init__(self, channels=4, width=16, cond_dim=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.embed = nn.Linear(1 + cond_dim, width)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t, cond):
        emb = self.embed(torch.cat([t[:, None] / 1000.0, cond], dim=1))[:, :, None, None]
        h = torch.nn.functional.silu(self.conv_in(x) + emb)
        h = torch.nn.functional.silu(self.mid(h))
        return self.conv_out(h)


def vp_denoise(net, ms=VP):
    def denoise(x, sigma, cond):
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        eps = net(ms.calculate_input(s, x), ms.timestep(sigma.float()).to(x.dtype), cond)
        return ms.calculate_denoised(s, eps, x)
    return denoise


def make_setup(seed=0, n=8, batch=4, ms=VP, dtype=torch.float32, **overrides):
    """dtype float64: network, LoRA and data in float64, so the engine runs the whole step in float64."""
    net = TinyEpsNet(seed=seed).to(dtype)
    lora = LoraSet(net, lora_targets(net), rank=4, alpha=4, seed=seed).to(dtype)
    g = torch.Generator().manual_seed(123)
    data = LatentData(torch.randn(n, 4, 8, 8, generator=g).to(dtype), cond=torch.randn(n, 8, generator=g).to(dtype),
                      uncond=torch.zeros(1, 8, dtype=dtype))
    settings = dict(phases=2, ddim_timesteps=10, steps=10, batch_size=batch, learning_rate=1e-3, w_min=1.0, w_max=2.0,
                    seed=seed, precision="fp32")  # fp32 unless a test asks otherwise (the pack's default is bf16)
    config = DistillConfig(**{**settings, **overrides})
    return net, lora, data, config


def toy_adversarial(net, lr=1e-5, seed=0):
    """The adversarial term on the toy network: one head each on the teacher's conv_in and mid outputs."""
    from fewstep.distill.adversarial import AdversarialTerm, HookedFeatures

    return AdversarialTerm(HookedFeatures(vp_denoise(net), [net.conv_in, net.mid]), [net.conv_in.out_channels,
                           net.mid.out_channels], lr=lr, seed=seed)


def base_state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def advance(distiller, steps, resume_from=None):
    """Optionally resume `distiller` from (tensors, meta), then take `steps` optimiser steps."""
    if resume_from is not None:
        distiller.load_state(*resume_from)
    for _ in range(steps):
        distiller.train_step()
    return distiller


def run_steps(steps, seed=0, resume_from=None, virtual_ranks=1, **overrides):
    net, lora, data, config = make_setup(seed=seed, **overrides)
    distiller = Distiller(config, vp_denoise(net), lora, data, VP, virtual_ranks=virtual_ranks)
    return advance(distiller, steps, resume_from)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    import os

    import torch.distributed as dist

    from fewstep.distill.torchrun import exit_without_teardown

    torch.set_num_threads(1)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    try:
        distiller = run_steps(3, virtual_ranks=1 if distributed else int(sys.argv[2]))
        if not distributed or dist.get_rank() == 0:
            torch.save([p.detach() for p in distiller.params] + [torch.tensor(distiller.losses, dtype=torch.float64)],
                       sys.argv[1])
    finally:
        if distributed:
            dist.destroy_process_group()
    exit_without_teardown(0)  # as the CLI's workers do (see distill/torchrun.py)
