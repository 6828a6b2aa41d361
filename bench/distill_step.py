"""Distillation step time against its floor (goal: ratio ≤ 1.10), and peak memory.

One `Distiller.train_step()` of PCM distillation costs, at the least, what its model calls cost:

    floor = t_student (student forward + backward, LoRA on; with gradient checkpointing also the re-forward)
          + 2·t_fwd (teacher cond + uncond, small-CFG) or 1·t_fwd (teacher cond, normal-CFG)
          + t_target (the target jump: a no-grad forward with the LoRA on)

Each term is timed on its own, at the same batch and through the same host path the training node uses
(`host/training_model.py`: `TrainingModel`'s `denoiser`, `conditioning_batch`, `lora_target_names`, `checkpoint_blocks`;
the LoRA hooked on with `LoraSet`, checkpointing with the engine's `GradientCheckpointing`), and
t_step = median `train_step()` time. ratio = t_step / floor; everything else the step does (random draws,
conditioning rows, loss maths, gradient clipping, AdamW) is overhead against the goal. The "counting" floor is
in forward-equivalents with backward ≈ 2 forwards (1 + 2 [+ 1 re-forward] + 2 or 1 + 1); the measured one is
floor / t_fwd. A breakdown table splits each step with timers around the engine's parts (draw, the model calls
inside micro_loss, the rest of micro_loss = loss maths and data, backward, clip_grad_norm_, AdamW).

Setups:
- CPU (default): the seeded tiny SD1.5 checkpoint (tests/support/tiny_checkpoint.py: 320 channels, never
  downsamples), loaded with comfy.sd.load_checkpoint_guess_config, prompts through its CLIP; fp32; rank 16;
  latents 8×8 and 16×16 (64 and 128 px) at batch 1 and 4; checkpointing on and off; small- and normal-CFG.
  (32×32 at batch 4 already costs 2 s per forward on this UNet and one thread, 64×64 26 s: `--sizes 32 64`
  works but takes far longer than the ≤ 3 min this bench is allowed.) One torch thread by default: with two
  threads on a small shared machine a descheduled thread stalls every op, which measures the scheduler.
- `--device cuda`: full-size random-weight UNets built from ComfyUI's own model configs (comfy.model_detection
  → comfy.supported_models SD15 / SDXL, on the meta device, materialised on the GPU with seeded fan-in-scaled
  weights), bf16 weights and bf16 autocast (the node's default precision), checkpointing on: SD1.5 at 512 px
  (64×64 latents) batch 4, SDXL at 1024 px (128×128) batch 2; peak torch.cuda.max_memory_allocated against the
  24 GB goal. Refuses to start without CUDA.
- `--full-size` (CPU): the same full-size configurations on the CPU, as the stand-in for the GPU rows where no GPU
  is at hand: bf16 weights and autocast, checkpointing on, ComfyUI's pytorch attention (torch's
  scaled_dot_product_attention, which ComfyUI picks by itself on an NVIDIA GPU; its CPU default, sub-quadratic
  attention, would keep every chunk's attention weights for the backward, a cost the GPU path does not have). One
  round without warm-up (a step takes minutes here); the report gives per configuration the peak RSS of the step
  (RSS before it + its peak increase) and the same less what torch and ComfyUI hold before the model is built, in
  GB (2³⁰ bytes) against the 24 GB goal, and the round's t_step and t_fwd (CPU times: not the GPU's).

Method: each (model, latent size) runs in a fresh subprocess, its batches one after the other; for a batch,
every item (t_fwd, t_target, t_student per checkpointing mode, train_step per configuration; one Distiller per
configuration, all on the same LoRA) is measured once per round, the order rotating between rounds; the first
round (`--warmup`) is thrown away and the median of the other `--steps` rounds is reported. Every Distiller has
the node's settings (deterministic=True, M = 4, K = 50; rank 16, alpha 16).
Memory, CPU: the peak RSS increase during a step, on the (untimed) warm-up round's steps: free heap goes back to
the kernel (malloc_trim) and the kernel's peak-RSS mark is reset (/proc/self/clear_refs 5) right before the
step, the peak read from VmHWM right after, so a step's number does not depend on what ran before it in the
process. (Not on the timed steps: faulting the trimmed memory back in made a 16×16 batch-4 step ~9 % slower;
`--full-size` has no warm-up round, so there its one round is both.) CUDA:
torch.cuda.max_memory_allocated after a reset before each step (absolute: weights included), max over the steps.
Run: `make bench` (or .venv/bin/python bench/distill_step.py [--device cuda | --full-size] [--models ...] [--steps N]
[--sizes ...] [--batches ...] [--cfg ...] [--threads N]).
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

from bench_host import SDXL_UNET, reset_peak, start_comfy, status_kb

GOAL = 1.10
GPU_GOAL_GB = 24.0
RANK, ALPHA = 16, 16.0

# ComfyUI's UNets as comfy/model_detection.py (unet_config_from_diffusers_unet) lists them; dtype added at build.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
FULL_SIZE = {"sd15": (SD15_UNET, 768, None), "sdxl": (SDXL_UNET, 2048, 1280)}  # unet, context dim, pooled dim
MODEL_LABELS = {"tiny-sd15": "tiny SD1.5 (26 M UNet)", "sd15": "SD1.5 (860 M UNet)", "sdxl": "SDXL (2.57 B UNet)"}
FULL_SIZE_DEFAULTS = {"sd15": (64, 4), "sdxl": (128, 2)}  # latent side, batch: 512 px ×4, 1024 px ×2
PROMPTS = ["a photo of a cat", "a red bicycle leaning on a wall", "mountains at dawn, oil painting",
           "a bowl of ramen, studio light", "an old lighthouse in a storm", "a robot reading a newspaper",
           "macro shot of a dragonfly", "a city street at night in the rain"]


# ---------------------------------------------------------------- child side (ComfyUI in this process)

def tiny_sd15(size, n, seed):
    """(patcher, LatentData) of the tiny SD1.5 checkpoint, prompts through its own CLIP, as the node's run()."""
    import torch

    import comfy.model_management as mm
    import comfy.sd
    from fewstep.distill.engine import LatentData
    from fewstep.host.training_model import TrainingModel, empty_conditioning, encode_prompts
    from support.tiny_checkpoint import cached_tiny_sd15

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(cached_tiny_sd15(0)), output_vae=False,
                                                              output_clip=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    with torch.inference_mode(False):
        mm.load_models_gpu([model], force_full_load=True)
        latents = model.model.process_latent_in(torch.randn(n, 4, size, size, generator=torch.Generator().manual_seed(seed)))
        positive = TrainingModel(model).conditioning_batch(encode_prompts(clip, prompts), latents.shape, "cpu")
        negative = TrainingModel(model).conditioning_batch([empty_conditioning(clip)], latents.shape, "cpu")
    return model, LatentData(latents, positive, negative)


def _random_init_(module, seed):
    """Fan-in-scaled normal weights (half gain on residual outputs), zero biases, unit norm gains: finite outputs in
    bf16 through the whole UNet, which is all a timing needs."""
    import torch

    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    residual_out = (".out_layers.3.", ".proj_out.", ".to_out.0.", ".ff.net.2.", "out.2.")
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                gain = 0.5 if any(r in "." + name for r in residual_out) else 1.0
                p.normal_(0.0, gain / p[0].numel() ** 0.5, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for b in module.buffers():
            b.zero_()


def full_size(arch, size, n, device, dtype, seed):
    """(patcher, LatentData) of a full-size random-weight UNet from ComfyUI's model config, built on the meta device
    and materialised on `device`; random text conditioning of the right shapes through conditioning_batch."""
    import torch

    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    from fewstep.distill.engine import LatentData
    from fewstep.host.training_model import TrainingModel

    unet, context_dim, pooled_dim = FULL_SIZE[arch]
    config = comfy.model_detection.model_config_from_unet_config(dict(unet, dtype=dtype))
    if config is None or type(config).__name__.lower() != arch:
        raise RuntimeError(f"ComfyUI did not detect the {arch} UNet config as {arch} (got {type(config).__name__}).")
    config.set_inference_dtype(dtype, None)
    base = config.get_model({}, device=torch.device("meta"))  # only the UNet is on meta; model_sampling is real
    base.diffusion_model.to_empty(device=device)
    _random_init_(base.diffusion_model, seed)
    model = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False):
        mm.load_models_gpu([model], force_full_load=True)
        latents = base.process_latent_in(torch.randn(n, 4, size, size, generator=gen))

        def conditioning():
            extra = {"pooled_output": torch.randn(1, pooled_dim, generator=gen)} if pooled_dim else {}
            return [[torch.randn(1, 77, context_dim, generator=gen), extra]]
        # on the CPU, as run() keeps them: the engine moves each micro-batch's rows to the device
        positive = TrainingModel(model).conditioning_batch([conditioning() for _ in range(n)], latents.shape, "cpu")
        negative = TrainingModel(model).conditioning_batch([conditioning()], latents.shape, "cpu")
    return model, LatentData(latents, positive, negative)


# ----- memory

class CpuMemory:
    """Peak RSS increase of one call: free heap back to the kernel, reset the peak mark, run, read VmHWM.

    Only on the last warm-up round's steps: after the trim a step page-faults all of its memory in again (about
    9 % of a step at 16×16 batch 4), which the timed steps, like steady training, do not pay."""

    every_step = False

    def __init__(self):
        import ctypes

        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self._trim = lambda pad: 0
        self.can_reset = reset_peak()

    def start(self):
        self._trim(0)
        reset_peak()
        self.before_kb = status_kb("VmRSS")

    def stop(self):
        return {"peak_mb": (status_kb("VmHWM") - self.before_kb) / 1024, "base_mb": self.before_kb / 1024}


class CudaMemory:
    every_step = True  # resetting the counters costs nothing

    def __init__(self, torch):
        self.torch, self.can_reset = torch, True

    def start(self):
        self.torch.cuda.reset_peak_memory_stats()
        self.before = self.torch.cuda.memory_allocated()

    def stop(self):
        cuda = self.torch.cuda
        return {"peak_mb": cuda.max_memory_allocated() / 2 ** 20, "base_mb": self.before / 2 ** 20,
                "reserved_mb": cuda.max_memory_reserved() / 2 ** 20}


# ----- the step's parts

class Probe:
    """Timers around the engine's parts of one train_step; `sync` makes GPU times honest (CPU: a no-op)."""

    def __init__(self, distiller, lora, sync):
        import torch

        self.sync, self.active = sync, False
        self.parts = {}
        self.marks = {}
        d = distiller
        denoise, draw, micro_loss, opt_step = d.denoise, d.draw, d.micro_loss, d.optimizer.step

        def timed(name, fn, mark=None):
            def call(*args, **kwargs):
                if not self.active:
                    return fn(*args, **kwargs)
                self.sync()
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                self.sync()
                end = time.perf_counter()
                self.parts[name] = self.parts.get(name, 0.0) + end - start
                if mark:
                    self.marks[mark + "_start"], self.marks[mark + "_end"] = start, end
                return out
            return call

        def which_model(*args, **kwargs):
            if torch.is_grad_enabled():
                name = "student"
            else:
                name = "teacher" if not lora.enabled else "target"
            return timed(name, denoise)(*args, **kwargs)

        d.denoise = which_model
        d.draw = timed("draw", draw)
        d.micro_loss = timed("micro_loss", micro_loss, mark="micro")
        d.optimizer.step = timed("adamw", opt_step)
        self._clip = timed("clip", torch.nn.utils.clip_grad_norm_, mark="clip")

    @contextlib.contextmanager
    def measuring(self):
        import torch

        original = torch.nn.utils.clip_grad_norm_
        torch.nn.utils.clip_grad_norm_ = self._clip  # the engine looks it up at call time
        self.parts, self.marks, self.active = {}, {}, True
        try:
            yield
        finally:
            self.active = False
            torch.nn.utils.clip_grad_norm_ = original

    def result(self, total):
        p = dict(self.parts)
        forwards = sum(p.get(k, 0.0) for k in ("teacher", "target", "student"))
        p["loss_and_data"] = p.pop("micro_loss", 0.0) - forwards  # micro_loss minus its model calls
        p["backward"] = self.marks.get("clip_start", 0.0) - self.marks.get("micro_end", 0.0)
        p["rest"] = total - sum(v for k, v in p.items())
        return p


def attention_name():
    """The attention function ComfyUI's UNets call (CrossAttention → optimized_attention)."""
    import comfy.ldm.modules.attention as attention

    return attention.optimized_attention.__name__


def child(opts):
    """Measure every batch of `opts.batches` on one model and latent size; one RESULT line per batch."""
    import torch

    cuda = opts.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; torch.cuda.is_available() is False here.")
    # full size on the CPU: torch's scaled_dot_product_attention, the attention ComfyUI picks on an NVIDIA GPU (its
    # CPU default, sub-quadratic attention, keeps every chunk's attention weights for the backward)
    start_comfy(cpu=not cuda, pytorch_attention=opts.full_size and not cuda)
    if opts.threads and not cuda:
        torch.set_num_threads(opts.threads)
    rss_base_kb = status_kb("VmRSS")  # torch and ComfyUI imported, no model yet
    from fewstep.distill.engine import PRECISIONS
    from fewstep.distill.lora import LoraSet
    from fewstep.host import training_model

    device = torch.device("cuda" if cuda else "cpu")
    n = max(2 * max(opts.batches), 4)  # more latents than the batch: each step gathers its rows
    autocast_dtype = PRECISIONS[opts.precision]
    if opts.model == "tiny-sd15":
        model, data = tiny_sd15(opts.size, n, seed=0)
    else:
        model, data = full_size(opts.model, opts.size, n, device, autocast_dtype or torch.float32, seed=0)
    rss_model_kb = status_kb("VmRSS")
    memory = CudaMemory(torch) if cuda else CpuMemory()
    with torch.inference_mode(False):
        teacher = training_model.TrainingModel(model)
        model_sampling = teacher.model_sampling()
        sigmas = model_sampling.sigmas.detach().to("cpu", torch.float32)
        denoise = teacher.denoiser()
        base = model.model
        lora = LoraSet(base.diffusion_model, teacher.lora_target_names(), RANK, ALPHA, seed=0)
        blocks = teacher.checkpoint_blocks()
        try:
            for batch in opts.batches:
                out = measure(opts, batch, device, model_sampling, data, sigmas, denoise, lora, blocks, memory)
                # what the host's per-call guard costs when nothing is left to replace (every grad-enabled call)
                start = time.perf_counter()
                for _ in range(20):
                    training_model._own_inference_tensors(base)
                out["own_inference_ms"] = (time.perf_counter() - start) / 20 * 1000
                out.update(lora_params=sum(p.numel() for p in lora.parameters()),
                           unet_params=sum(p.numel() for p in base.diffusion_model.parameters()),
                           unet_bytes=sum(p.numel() * p.element_size() for p in base.diffusion_model.parameters()),
                           unet_dtype=str(next(base.diffusion_model.parameters()).dtype).replace("torch.", ""),
                           attention=attention_name(), rss_base_mb=rss_base_kb / 1024,
                           rss_model_mb=rss_model_kb / 1024,
                           threads=torch.get_num_threads(), gpu=torch.cuda.get_device_name() if cuda else None)
                print("RESULT " + json.dumps(out), flush=True)
        finally:
            lora.remove()


def measure(opts, b, device, model_sampling, data, sigmas, denoise, lora, blocks, memory):
    import torch

    from fewstep.distill.engine import PRECISIONS, DistillConfig, Distiller, GradientCheckpointing, deterministic_algorithms

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast_dtype = PRECISIONS[opts.precision]
    # inputs of the isolated model calls: B latents at a middle σ, on the device as the engine hands them over
    x = (data.latents[:b] + sigmas[499] * torch.randn(data.latents[:b].shape,
                                                        generator=torch.Generator().manual_seed(1))).to(device)
    sigma = torch.full((b,), float(sigmas[499]), device=device)
    cond = {k: v[:b].to(device) for k, v in data.cond.items()}
    ac = dict(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    def t_fwd():  # the teacher: LoRA off, no grad
        with torch.no_grad(), torch.autocast(**ac), lora.disabled():
            denoise(x, sigma, cond)

    def t_target():  # the target jump's model: LoRA on, no grad
        with torch.no_grad(), torch.autocast(**ac):
            denoise(x, sigma, cond)

    def t_student():  # LoRA on, gradients into the LoRA only
        with torch.autocast(**ac):
            out = denoise(x, sigma, cond)
        out.float().mean().backward()
        for p in lora.parameters():
            p.grad = None

    configs = [(cfg, ck) for ck in opts.checkpointing for cfg in opts.cfg]
    distillers, probes = {}, {}
    for cfg, ck in configs:  # the node's settings; all train the same LoRA, each with its own AdamW
        config = DistillConfig(phases=4, ddim_timesteps=50, steps=10 ** 6, batch_size=b, cfg_mode=cfg,
                               precision=opts.precision, seed=0, deterministic=True)
        distillers[(cfg, ck)] = d = Distiller(config, denoise, lora, data, model_sampling,
                                              device=device)
        probes[(cfg, ck)] = Probe(d, lora, sync)

    @contextlib.contextmanager
    def checkpointing(on):
        wrap = GradientCheckpointing(blocks, lora=lora) if on == "on" else None  # as run() wraps them
        try:
            yield
        finally:
            if wrap is not None:
                wrap.remove()

    items = [("fwd", None), ("target", None)] + [("student", ck) for ck in opts.checkpointing] \
        + [("step", c) for c in configs]
    calls = {"fwd": t_fwd, "target": t_target, "student": t_student}
    times = {item: [] for item in items}
    peaks, breakdown = {c: [] for c in configs}, {c: [] for c in configs}
    instrument_steps = not cuda  # CPU: the timers cost microseconds; GPU: their syncs would cost overlap
    oom = set()

    def run_item(item, measured, instrumented=False, mem_probe=False):
        what, arg = item
        with deterministic_algorithms(True):  # the node and the CLI train with deterministic=True
            if what != "step":
                with checkpointing(arg if what == "student" else "off"):
                    sync()
                    start = time.perf_counter()
                    calls[what]()
                    sync()
                    seconds = time.perf_counter() - start
                if measured:
                    times[item].append(seconds)
                return
            d, probe = distillers[arg], probes[arg]
            with checkpointing(arg[1]):
                if mem_probe:
                    memory.start()
                with probe.measuring() if instrumented else contextlib.nullcontext():
                    sync()
                    start = time.perf_counter()
                    d.train_step()
                    sync()
                    seconds = time.perf_counter() - start
                if mem_probe:
                    peaks[arg].append(memory.stop())
            if measured:
                times[item].append(seconds)
            if instrumented:
                breakdown[arg].append(probe.result(seconds))

    load_start = os.getloadavg()[0]
    for r in range(opts.warmup + opts.steps):
        order = items[r % len(items):] + items[: r % len(items)]  # who goes first rotates
        for item in order:
            if item in oom:
                continue
            try:
                run_item(item, measured=r >= opts.warmup, instrumented=instrument_steps and r >= opts.warmup,
                         mem_probe=memory.every_step or r == max(opts.warmup - 1, 0))
            except torch.OutOfMemoryError:
                oom.add(item)
                for p in lora.parameters():
                    p.grad = None
                torch.cuda.empty_cache()
    if cuda:  # the breakdown from separate, synchronised steps
        for c in configs:
            for _ in range(2):
                if ("step", c) not in oom:
                    run_item(("step", c), measured=False, instrumented=True)
    load_end = os.getloadavg()[0]

    med = {item: (statistics.median(v) if v else None) for item, v in times.items()}
    out = {
        "model": opts.model, "size": opts.size, "batch": b, "device": opts.device, "precision": opts.precision,
        "fwd": med[("fwd", None)], "target": med[("target", None)],
        "student": {ck: med[("student", ck)] for ck in opts.checkpointing},
        "fwd_all": times[("fwd", None)], "steps": [], "load": [load_start, load_end], "peak_reset": memory.can_reset,
    }
    for c in configs:
        bd, mem = breakdown[c], peaks[c]
        out["steps"].append({
            "cfg": c[0], "ckpt": c[1], "step": med[("step", c)], "step_all": times[("step", c)],
            "oom": ("step", c) in oom,
            "peak_mb": max((m["peak_mb"] for m in mem), default=None),
            "base_mb": statistics.median(m["base_mb"] for m in mem) if mem else None,
            "reserved_mb": max((m.get("reserved_mb", 0) for m in mem), default=None),
            "breakdown": {k: statistics.median(x[k] for x in bd) for k in bd[0]} if bd else None,
        })
    return out


# ---------------------------------------------------------------- parent side (no torch on the CPU path)

def run_child(args):
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"child {' '.join(args)} failed (exit {proc.returncode})")
    return [json.loads(line[len("RESULT "):]) for line in lines]


def counting_floor(cfg, ckpt):
    """Forward-equivalents: student 1 + backward 2 (+ re-forward 1) + teacher 2 or 1 + target 1."""
    return 1 + 2 + (1 if ckpt == "on" else 0) + (2 if cfg == "small" else 1) + 1


def report(results, opts):
    cuda = opts.device == "cuda"
    first = results[0]
    where = (f"GPU {first['gpu']}" if cuda else f"CPU, torch threads: {first['threads']}")
    print(f"Distillation step vs its floor — {where}, precision {first['precision']}, LoRA rank {RANK} (alpha "
          f"{ALPHA:g}), M = 4, K = 50, deterministic; median of {opts.steps} rounds after {opts.warmup} warm-up, "
          "items interleaved, one fresh process per model and latent size")
    print()
    print("| model | latent (px) | batch | CFG | ckpt | t_fwd (ms) | student f+b (×fwd) | target (×fwd) "
          "| floor counted / measured (×fwd) | floor (ms) | t_step (ms) | t_step (×fwd) | ratio | ratio, target as t_fwd | "
          + ("peak GB (alloc / reserved) |" if cuda else "peak RSS +MB |"))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for res in results:
        fwd, tgt = res["fwd"], res["target"]
        for s in res["steps"]:
            label = (f"| {MODEL_LABELS[res['model']]} | {res['size']}×{res['size']} ({res['size'] * 8}) | {res['batch']} "
                     f"| {s['cfg']} | {s['ckpt']} ")
            student = res["student"].get(s["ckpt"])
            if s["oom"] or s["step"] is None or student is None or fwd is None or tgt is None:
                print(label + "| out of memory |" + " |" * 9)
                verdicts.append(False)
                continue
            floor = student + (2 if s["cfg"] == "small" else 1) * fwd + tgt
            ratio = s["step"] / floor
            verdicts.append(ratio <= GOAL)
            mem = (f"{s['peak_mb'] / 1024:.1f} / {s['reserved_mb'] / 1024:.1f}" if cuda else f"{s['peak_mb']:.0f}")
            print(label + f"| {fwd * 1000:.1f} | {student / fwd:.2f} | {tgt / fwd:.2f} "
                  f"| {counting_floor(s['cfg'], s['ckpt'])} / {floor / fwd:.2f} | {floor * 1000:.0f} "
                  f"| {s['step'] * 1000:.0f} | {s['step'] / fwd:.2f} | **{ratio:.3f}** "
                  f"| {s['step'] / (floor - tgt + fwd):.3f} | {mem} |")
    print()
    print("floor = t_student + (2 or 1)·t_fwd + t_target, t_target being the target's no-grad forward with the LoRA on "
          "(the target is the student under stop-grad); the column after the ratio counts the target as a teacher "
          "forward (t_fwd) instead, a floor that leaves the LoRA's cost in that call out.")
    print()
    print("Where a step's time goes (ms, median over the measured steps" + (", 2 extra synchronised steps" if cuda else "")
          + "): the model calls inside micro_loss, the rest of micro_loss (conditioning rows, data to the device, "
          "loss maths), backward (student backward [+ re-forward], until clipping), clip_grad_norm_, AdamW, the "
          "random draws, and the rest (zero_grad, bookkeeping). `non-model` sums the parts that are no model call: the "
          "step's own overhead. `student f+b in step` vs `isolated` compares the student's forward + backward inside "
          "the step with t_student; the difference, and the teacher/target calls against t_fwd/t_target, are the "
          "model calls' own variation.")
    print()
    print("| model | latent | batch | CFG | ckpt | t_step | teacher | target | student fwd | backward | loss+data "
          "| clip | AdamW | draw | rest | non-model (% floor) | step − floor | student f+b in step / isolated |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for res in results:
        fwd, tgt = res["fwd"], res["target"]
        for s in res["steps"]:
            bd, student = s["breakdown"], res["student"].get(s["ckpt"])
            if not bd or s["step"] is None or student is None:
                continue
            floor = student + (2 if s["cfg"] == "small" else 1) * fwd + tgt
            ms = lambda key: f"{bd.get(key, 0.0) * 1000:.1f}"  # noqa: E731
            in_step = bd.get("student", 0.0) + bd.get("backward", 0.0)
            non_model = sum(bd.get(k, 0.0) for k in ("loss_and_data", "clip", "adamw", "draw", "rest"))
            print(f"| {res['model']} | {res['size']}² | {res['batch']} | {s['cfg']} | {s['ckpt']} | {s['step'] * 1000:.1f} "
                  f"| {ms('teacher')} | {ms('target')} | {ms('student')} | {ms('backward')} | {ms('loss_and_data')} "
                  f"| {ms('clip')} | {ms('adamw')} | {ms('draw')} | {ms('rest')} "
                  f"| {non_model * 1000:.1f} ({non_model / floor:.1%}) | {(s['step'] - floor) * 1000:+.1f} "
                  f"| {in_step * 1000:.1f} / {student * 1000:.1f} |")
    print()
    for res in results:
        bases = [s["base_mb"] for s in res["steps"] if s["base_mb"] is not None]
        base = ("no step ran" if not bases else f"RSS before a step {statistics.median(bases):.0f} MB" if not cuda
                else f"allocated before a step {statistics.median(bases) / 1024:.2f} GB")
        spread = max(res["fwd_all"]) / min(res["fwd_all"]) if res["fwd_all"] else float("nan")
        print(f"- {MODEL_LABELS[res['model']]} {res['size']}² batch {res['batch']}: UNet {res['unet_params'] / 1e6:.1f} M "
              f"params, LoRA {res['lora_params'] / 1e6:.2f} M params; {base}; t_fwd max/min over rounds "
              f"{spread:.2f}; _own_inference_tensors (per grad-enabled call, nothing to replace) "
              f"{res['own_inference_ms']:.2f} ms; load average {res['load'][0]:.2f} → {res['load'][1]:.2f}"
              + ("" if res["peak_reset"] else "; peak-RSS reset refused: peaks include start-up"))
    met = all(verdicts)
    print(f"\ngoal t_step ≤ {GOAL:.2f}× floor: {'met' if met else 'not met'} in {sum(verdicts)} of {len(verdicts)} "
          "configurations")
    if cuda:
        peaks = [(r["model"], s["peak_mb"] / 1024) for r in results for s in r["steps"] if s["peak_mb"] is not None]
        worst = max(peaks, key=lambda p: p[1]) if peaks else None
        if worst:
            print(f"goal peak ≤ {GPU_GOAL_GB:.0f} GB (max_memory_allocated): "
                  f"{'met' if worst[1] <= GPU_GOAL_GB else 'not met'} (highest {worst[1]:.1f} GB, {worst[0]})")


def report_full_size_cpu(results, opts):
    """The CPU stand-in for the GPU rows: full-size configurations' memory on the CPU, and what a step took."""
    first = results[0]
    print(f"Distillation step, full-size random-weight UNets on the CPU (stand-in for the GPU rows) — torch threads: "
          f"{first['threads']}, weights {first['unet_dtype']}, autocast {first['precision']}, attention "
          f"{first['attention']}, LoRA rank {RANK} (alpha {ALPHA:g}), M = 4, K = 50, deterministic; "
          f"{opts.warmup} warm-up and {opts.steps} measured round(s), one fresh process per model and latent size")
    print()
    print("| model | latent (px) | batch | CFG | ckpt | UNet weights (GB) | RSS before the step (GB) | step's peak RSS "
          f"increase (GB) | peak RSS (GB) | peak RSS less torch + ComfyUI (GB) | vs {GPU_GOAL_GB:.0f} GB | t_step (s) "
          "| t_fwd (s) | t_step (×fwd) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    gb = lambda mb: f"{mb / 1024:.2f}"  # noqa: E731
    for res in results:
        for s in res["steps"]:
            label = (f"| {MODEL_LABELS[res['model']]} | {res['size']}×{res['size']} ({res['size'] * 8}) | {res['batch']} "
                     f"| {s['cfg']} | {s['ckpt']} | {res['unet_bytes'] / 2 ** 30:.2f} ")
            if s["peak_mb"] is None:
                print(label + "| not measured |" + " |" * 7)
                continue
            peak = s["base_mb"] + s["peak_mb"]
            fwd, step = res["fwd"], s["step"]
            times = (f"| {step:.1f} | {fwd:.1f} | {step / fwd:.2f} |" if step and fwd
                     else f"| {step or float('nan'):.1f} | {fwd or float('nan'):.1f} | |")
            print(label + f"| {gb(s['base_mb'])} | {gb(s['peak_mb'])} | **{gb(peak)}** | {gb(peak - res['rss_base_mb'])} "
                  f"| {'under' if peak / 1024 <= GPU_GOAL_GB else 'over'} " + times)
    print()
    print("GB = 2³⁰ bytes. peak RSS = RSS right before the step (after malloc_trim: the weights, the LoRA, its AdamW "
          "state, the data, torch and ComfyUI) + the step's peak RSS increase (VmHWM reset before the step); less "
          "torch + ComfyUI: minus the RSS before the model was built, the closer counterpart of the GPU's "
          "max_memory_allocated (weights included). Times are of the round's one step and one forward each, cold "
          "caches after the trim included: CPU step times, not the GPU's.")
    for res in results:
        print(f"- {MODEL_LABELS[res['model']]} {res['size']}² batch {res['batch']}: UNet {res['unet_params'] / 1e6:.1f} M "
              f"params ({res['unet_dtype']}), LoRA {res['lora_params'] / 1e6:.2f} M params; RSS torch + ComfyUI "
              f"{res['rss_base_mb'] / 1024:.2f} GB, with the model {res['rss_model_mb'] / 1024:.2f} GB; load average "
              f"{res['load'][0]:.2f} → {res['load'][1]:.2f}" + ("" if res["peak_reset"] else
                                                               "; peak-RSS reset refused: peaks include start-up"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--full-size", action="store_true",
                        help="CPU: the --device cuda configurations (full-size random-weight SD1.5 512 px batch 4, SDXL "
                             "1024 px batch 2, bf16, checkpointing) on the CPU, for their peak memory; 1 round, "
                             "no warm-up (CUDA: always full size)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODEL_LABELS),
                        help="default: tiny-sd15 on the CPU; sd15 sdxl (full size, random weights) on CUDA")
    parser.add_argument("--sizes", nargs="+", type=int, help="latent sides (px / 8); default CPU 8 16, CUDA per model")
    parser.add_argument("--batches", nargs="+", type=int, help="default CPU 1 4, CUDA per model (SD1.5 4, SDXL 2)")
    parser.add_argument("--checkpointing", nargs="+", choices=("off", "on"), help="default CPU off on, CUDA on")
    parser.add_argument("--cfg", nargs="+", choices=("small", "normal"), default=["small", "normal"])
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="default CPU fp32, CUDA bf16")
    parser.add_argument("--steps", type=int, dest="steps_given",
                        help="measured rounds (steps per configuration); default 5 (CPU --full-size: 1)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (default CPU 1, CUDA 2)")
    parser.add_argument("--threads", type=int, default=1, help="CPU torch threads (0 = torch's default)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    cuda = opts.device == "cuda"
    full = cuda or opts.full_size
    if opts.full_size and "tiny-sd15" in (opts.models or []):
        parser.error("--full-size runs the full-size models (sd15, sdxl), not tiny-sd15")
    opts.checkpointing = opts.checkpointing or (["on"] if full else ["off", "on"])
    opts.precision = opts.precision or ("bf16" if full else "fp32")
    opts.warmup = opts.warmup if opts.warmup is not None else (2 if cuda else 0 if full else 1)
    opts.steps = opts.steps_given if opts.steps_given is not None else (1 if opts.full_size and not cuda else 5)
    if opts.child:
        return child(opts)
    if cuda:
        import torch

        if not torch.cuda.is_available():
            why = (f"no CUDA GPU is visible to this torch ({torch.__version__}, built for CUDA {torch.version.cuda})"
                   if torch.version.cuda else f"this torch ({torch.__version__}) is a CPU-only build")
            raise SystemExit(f"bench/distill_step.py --device cuda needs a CUDA GPU: {why}. Run it on a GPU machine "
                             "with a CUDA build of torch, or without --device for the CPU bench.")
    models = opts.models or (["sd15", "sdxl"] if full else ["tiny-sd15"])
    shared = ["--device", opts.device, "--precision", opts.precision, "--steps", str(opts.steps), "--warmup",
              str(opts.warmup), "--threads", str(opts.threads), "--checkpointing", *opts.checkpointing,
              "--cfg", *opts.cfg] + (["--full-size"] if opts.full_size else [])
    load_start, started = os.getloadavg(), time.perf_counter()
    results = []
    for model in models:
        default_size, default_batch = FULL_SIZE_DEFAULTS.get(model, (None, None)) if full else (None, None)
        sizes = opts.sizes or ([default_size] if default_size else [8, 16])
        batches = opts.batches or ([default_batch] if default_batch else [1, 4])
        for size in sizes:
            results += run_child(["--model", model, "--size", str(size), "--batches", *map(str, batches), *shared])
    (report_full_size_cpu if opts.full_size and not cuda else report)(results, opts)
    load_end = os.getloadavg()
    print(f"\nwall time {time.perf_counter() - started:.0f} s; load average (1/5/15 min) at start "
          f"{' / '.join(f'{x:.2f}' for x in load_start)}, at end {' / '.join(f'{x:.2f}' for x in load_end)}")


if __name__ == "__main__":
    main()
