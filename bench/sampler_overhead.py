"""Per-step cost of the pack's samplers relative to core `euler` (goal: ratio ≤ 1.02).

Real host in-process, the seeded tiny SD1.5 checkpoint (tests/support), 64×64 images (8×8 latents),
cfg 1 (one model call per step, so sampler overhead is most visible), the same `pcm` σ schedule for
every sampler. Rounds are interleaved and the median is reported, to wash out load from elsewhere.
Run: `make bench` (or .venv/bin/python bench/sampler_overhead.py [--rounds N]).
"""
import argparse
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMFY = pathlib.Path(os.environ.get("COMFYUI_PATH", ROOT / ".comfyui"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(COMFY))
import conftest  # noqa: E402,F401  (imports the repo as package `fewstep`)
from comfy.cli_args import args  # noqa: E402

args.cpu = True
import torch  # noqa: E402

import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
from fewstep.host.registration import register_all  # noqa: E402
from support.tiny_checkpoint import cached_tiny_sd15  # noqa: E402

SAMPLERS = ["euler", "pcm", "tcd", "ctm_gamma", "lcm"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    opts = parser.parse_args()
    register_all()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ckpt = cached_tiny_sd15(0)
    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=True)
    tokens = clip.tokenize("a photo of a cat")
    positive = clip.encode_from_tokens_scheduled(tokens)
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))

    def run(sampler, steps):
        start = time.perf_counter()
        comfy.sample.sample(model, noise, steps, 1.0, sampler, "pcm", positive, negative, latent, seed=0, disable_pbar=True)
        return time.perf_counter() - start

    print(f"sampler overhead vs euler — tiny SD1.5 UNet, 64×64, cfg 1, CPU ({torch.get_num_threads()} threads), "
          f"median of {opts.rounds} interleaved rounds")
    print(f"{'steps':>5}  {'sampler':<10} {'ms/step':>8}  {'ratio vs euler':>14}")
    for steps in (4, 8):
        for sampler in SAMPLERS:
            run(sampler, steps)  # warm-up
        times = {s: [] for s in SAMPLERS}
        for _ in range(opts.rounds):
            for sampler in SAMPLERS:
                times[sampler].append(run(sampler, steps))
        base = statistics.median(times["euler"]) / steps
        for sampler in SAMPLERS:
            per_step = statistics.median(times[sampler]) / steps
            print(f"{steps:>5}  {sampler:<10} {per_step * 1000:8.2f}  {per_step / base:14.3f}")


if __name__ == "__main__":
    main()
