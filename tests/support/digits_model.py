"""The embedded digits model: a small *real* SD1.5-class text-to-image checkpoint, built from what ships here.

Data: ``assets/digits/digits.npz``, the 1,797 8×8 handwritten digits scikit-learn bundles (UCI "Optical
Recognition of Handwritten Digits", Alpaydin & Kaynak, CC BY 4.0; exported by ``export_digits``), split once
into 1,500 training and 297 held-out digits (fixed permutation, seed 0).

The checkpoint ``fewstep_digits_sd15.safetensors`` (single file, LDM layout) loads with ComfyUI's
CheckpointLoaderSimple as SD15 and draws "a handwritten digit 7" at 64×64 px through core nodes:

* latent = the digit itself: 64×64 px ↔ 8×8×4 latent, each of the 4 channels holding the 8×8 ink image
  (model space, −1 blank … +1 ink, i.e. raw latent × 0.18215 as SD1.5's latent format scales it);
* VAE: a TAESD whose weights are *set by hand*, not trained: the encoder averages 8×8 pixel blocks of
  (1 − 2·gray), the decoder repeats each latent pixel over an 8×8 block (mean of the 4 channels, through
  TAESD's tanh clamp) as dark ink on white. ReLU pairs carry signed values (relu(a) − relu(−a) = a); every
  residual block has a zero last conv, so it is the identity on the non-negative maps it sees;
* text encoder: the seeded random CLIP-L of the tiny test checkpoint (``tiny_checkpoint.py``); random, but the
  ten prompts give contexts ~20 % apart, which cross-attention learns to read;
* UNet: SD1.5's blocks at model_channels 320 (one level, one res block, input/output attention, no middle
  block: 18.7 M parameters), every conv and linear layer except the 4-channel ends stored as a rank-32 product
  ``up @ down``. Only the factors, norms and biases ship (``assets/digits/digits_unet_factors.safetensors``,
  2.3 M parameters, float16); ``write_digits_checkpoint`` multiplies them out into the dense float32 weights
  ComfyUI expects. Training the factors directly costs ~1/8 of the dense UNet (0.66 s per batch-64 step on 2
  CPU threads instead of an hour-scale run), and the dense product is the same function.

Trained by ``python tests/support/digits_model.py train`` (ε-prediction on SD1.5's discrete schedule, the prompt
"a handwritten digit {d}", 10 % empty prompts for CFG, EMA weights shipped); it prints its wall time and a
teacher accuracy check. Same seed and thread count → the same numbers on these machines.

Evaluation helpers (demo, tests, benchmarks): ``DigitClassifier`` (a small CNN trained in seconds on the training
split, checked on the held-out one), ``images_to_ink`` (ComfyUI IMAGE → 8×8 ink), ``frechet_distance`` on the
classifier's features.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import pathlib
import sys
import time

if __package__:
    from .tiny_checkpoint import UNET_CONFIG as TINY_UNET_CONFIG, _REPO_ROOT, _import_comfy, cached_tiny_sd15, save_atomic
else:  # run as a script
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from support.tiny_checkpoint import (UNET_CONFIG as TINY_UNET_CONFIG, _REPO_ROOT, _import_comfy, cached_tiny_sd15,
                                         save_atomic)

ASSETS = _REPO_ROOT / "assets" / "digits"
DATA_PATH = ASSETS / "digits.npz"
FACTORS_PATH = ASSETS / "digits_unet_factors.safetensors"
CHECKPOINT_NAME = "fewstep_digits_sd15.safetensors"
# What workflows/api/pcm_distill_train.json writes (make demo retrains it and compares); the LoRA workflow loads it.
PCM_LORA_PATH = ASSETS / "fewstep_digits_pcm.safetensors"
STAMP_KEY = "fewstep.digits_sd15"
FORMAT_VERSION = "1"

PROMPT = "a handwritten digit {}"
IMAGE_SIZE = 64  # px; the latent is 8×8
TAESD_SD1_SCALE = 0.18215  # SD1.5's latent scale: decoder input = raw latent × this = model-space latent
N_TRAIN = 1500
SPLIT_SEED = 0

# The tiny test checkpoint's SD1.5 UNet, with two levels and no middle block.
UNET_CONFIG = {**TINY_UNET_CONFIG, "image_size": 8, "num_res_blocks": [1, 1], "channel_mult": [1, 1],
               "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": -2}
RANK = 32
DENSE_LAYERS = ("input_blocks.0.0", "out.2")  # the 4-channel ends: small, kept dense
# Layers that feed a residual add: their up factor starts at zero, so every block starts as the identity.
_RESIDUAL_OUT = (".out_layers.3", ".proj_out", ".to_out.0", ".ff.net.2")

TRAIN = {"steps": 2800, "batch": 48, "lr": 1e-3, "grad_clip": 1.0, "warmup": 100, "final_lr_fraction": 0.1, "weight_decay": 0.0,
         "ema": 0.999, "empty_prompt": 0.1, "seed": 0, "threads": 2, "max_weight": 16.0, "snapshot_every": 0}
# The loss is ε-MSE weighted by min(1 + σ², max_weight): v-prediction's weighting, capped. Plain ε-MSE gives the
# high-noise steps, where the prompt decides the digit, almost no weight (a first run learned no conditioning).


# ---------------------------------------------------------------------------------------------------- data

def export_digits(path=DATA_PATH):
    """Write scikit-learn's bundled digits (bench-only dependency) as the shipped npz (uint8 0..16, labels)."""
    import numpy as np
    from sklearn.datasets import load_digits

    bunch = load_digits()
    np.savez_compressed(path, images=bunch.images.astype(np.uint8), labels=bunch.target.astype(np.uint8))
    return path


def load_digits():
    """(ink [N, 8, 8] float32 in [−1, 1], labels [N] int64) for all 1,797 digits."""
    import numpy as np
    import torch

    with np.load(DATA_PATH) as data:
        images, labels = data["images"], data["labels"]
    ink = torch.from_numpy(images.astype(np.float32)) / 8.0 - 1.0
    return ink, torch.from_numpy(labels.astype(np.int64))


def digits_split():
    """{"train": (ink, labels), "held": (ink, labels)}: a fixed 1,500 / 297 split."""
    import torch

    ink, labels = load_digits()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, held = order[:N_TRAIN], order[N_TRAIN:]
    return {"train": (ink[train], labels[train]), "held": (ink[held], labels[held])}


def ink_to_latent(ink):
    """[N, 8, 8] ink → [N, 4, 8, 8] model-space latent (the ink in every channel)."""
    return ink.unsqueeze(1).expand(-1, 4, -1, -1).contiguous()


def images_to_ink(images):
    """ComfyUI IMAGE [N, H, W, 3] in [0, 1] (H, W multiples of 8) → [N, 8, 8] ink in [−1, 1] (block means)."""
    import torch.nn.functional as F

    gray = images.float().mean(dim=-1).unsqueeze(1)
    blocks = F.adaptive_avg_pool2d(gray, (8, 8)).squeeze(1)
    return 1.0 - 2.0 * blocks


TRAINING_IMAGES = "fewstep_digits_train.png"  # what the training workflow's LoadImage reads (ComfyUI's input/)
TRAINING_PER_DIGIT = 10


def ink_to_pixels(ink):
    """[N, 8, 8] ink → [N, 64, 64] gray in [0, 1], dark ink on white, each pixel an 8×8 block (the VAE's picture)."""
    return ((1.0 - ink) / 2.0).repeat_interleave(8, 1).repeat_interleave(8, 2)


def training_digits(per_digit=TRAINING_PER_DIGIT):
    """The training workflow's data: the first `per_digit` training digits of each class, digit-major."""
    import torch

    ink, labels = digits_split()["train"]
    picks = torch.cat([torch.nonzero(labels == d).flatten()[:per_digit] for d in range(10)])
    return ink[picks], labels[picks]


def training_prompts(per_digit=TRAINING_PER_DIGIT):
    """One prompt per frame of the training image, in frame order (the node's `prompts` text)."""
    return "\n".join(PROMPT.format(d) for d in range(10) for _ in range(per_digit))


def write_training_images(path, per_digit=TRAINING_PER_DIGIT):
    """An animated PNG with one 64×64 frame per training digit: LoadImage gives it as one IMAGE batch."""
    import numpy as np
    from PIL import Image

    ink, _ = training_digits(per_digit)
    gray = (ink_to_pixels(ink).numpy() * 255).round().astype(np.uint8)
    frames = [Image.fromarray(frame).convert("RGB") for frame in gray]
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".part")
    frames[0].save(temp, format="PNG", save_all=True, append_images=frames[1:], duration=200, loop=0)
    temp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------------- UNet

def _low_rank_modules():
    import torch
    from torch import nn

    class LowRankConv(nn.Module):
        """1×1 down to `rank` channels, the k×k kernel among them (Tucker-2; none for 1×1 convs), 1×1 up."""

        def __init__(self, conv, rank):
            super().__init__()
            self.down = nn.Conv2d(conv.in_channels, rank, 1, bias=False)
            self.core = (nn.Conv2d(rank, rank, conv.kernel_size, conv.stride, conv.padding, bias=False)
                         if conv.kernel_size != (1, 1) else None)
            self.up = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)

        def forward(self, x):
            x = self.down(x)
            return self.up(x if self.core is None else self.core(x))

        def dense(self):
            up, down = self.up.weight[:, :, 0, 0].float(), self.down.weight[:, :, 0, 0].float()
            if self.core is None:
                return (up @ down)[:, :, None, None]
            return torch.einsum("oa,abhw,bi->oihw", up, self.core.weight.float(), down)

    class LowRankLinear(nn.Module):
        def __init__(self, linear, rank):
            super().__init__()
            self.down = nn.Linear(linear.in_features, rank, bias=False)
            self.up = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)

        def forward(self, x):
            return self.up(self.down(x))

        def dense(self):
            return self.up.weight.float() @ self.down.weight.float()

    return LowRankConv, LowRankLinear


def prompt_directions(contexts, count=10):
    """[count, 768]: the directions of CLIP-token space that best tell the prompts apart (Fisher's LDA).

    Each direction maximises the spread of the prompts' mean tokens over the spread across one prompt's 77 tokens,
    scaled to unit total variance over all tokens. The seeded CLIP's prompts differ by ~20 % of a token's norm and
    most of that is shared by every prompt, so a random start of the cross-attention's key/value factors reads
    almost nothing of the prompt (a first run learned no conditioning in 2,500 steps: 13 % accuracy at CFG 1).
    """
    import torch

    tokens = contexts.double()
    prompts, positions, width = tokens.shape
    flat = tokens.reshape(-1, width)
    means = tokens.mean(dim=1)
    between = (means - flat.mean(0)).T @ (means - flat.mean(0)) / prompts
    residual = (tokens - means[:, None]).reshape(-1, width)
    within = residual.T @ residual / len(flat)
    within += torch.eye(width, dtype=within.dtype) * 1e-3 * within.trace() / width
    chol = torch.linalg.cholesky(within)
    inv = torch.linalg.inv(chol)
    values, vectors = torch.linalg.eigh(inv @ between @ inv.T)
    directions = (inv.T @ vectors[:, -count:]).T.flip(0)  # unit within-prompt variance, largest ratio first
    features = flat @ directions.T
    return (directions / features.std(dim=0)[:, None]).float()


def low_rank_unet(seed=0, contexts=None):
    """ComfyUI's own UNetModel for UNET_CONFIG with every conv/linear (but the ends) replaced by rank-RANK factors.

    contexts (training only): start the cross-attention key/value factors on `prompt_directions(contexts)`.
    """
    import torch
    from torch import nn

    comfy, openaimodel, _ = _import_comfy()
    import comfy.ops

    LowRankConv, LowRankLinear = _low_rank_modules()
    unet = openaimodel.UNetModel(**UNET_CONFIG, dtype=torch.float32, device="cpu",
                                 operations=comfy.ops.disable_weight_init)
    for parent_name, parent in list(unet.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if full in DENSE_LAYERS:
                continue
            if isinstance(child, nn.Conv2d):
                setattr(parent, name, LowRankConv(child, RANK))
            elif isinstance(child, nn.Linear):
                setattr(parent, name, LowRankLinear(child, RANK))
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for key, param in sorted(unet.named_parameters()):
            if param.dim() == 1:  # norm gains 1, biases 0
                param.copy_(torch.ones_like(param) if key.endswith(".weight") else torch.zeros_like(param))
            elif key.endswith(".up.weight") and any(part + ".up" in key for part in _RESIDUAL_OUT):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param[0].numel()))
        if contexts is not None:
            directions = prompt_directions(contexts)
            for name, module in unet.named_modules():
                if name.endswith(("attn2.to_k", "attn2.to_v")):
                    module.down.weight[:len(directions)] = directions
    return unet


def load_factors(unet, path=FACTORS_PATH):
    """Load the shipped factors (float16) into a low-rank UNet, as float32."""
    from safetensors.torch import load_file

    state = {k: v.float() for k, v in load_file(str(path)).items()}
    unet.load_state_dict(state, strict=True)
    return unet


def dense_unet_state(unet):
    """{LDM UNet key: float32 tensor}: the low-rank UNet multiplied out into ComfyUI's dense layer shapes."""
    import torch

    state = {}
    low_rank = {name: m for name, m in unet.named_modules() if hasattr(m, "dense")}
    with torch.no_grad():
        for name, module in low_rank.items():
            state[name + ".weight"] = module.dense().contiguous()
            if module.up.bias is not None:
                state[name + ".bias"] = module.up.bias.detach().float().clone()
        for key, value in unet.state_dict().items():
            if key.rsplit(".", 2)[0] not in low_rank:
                state[key] = value.detach().float().clone()
    return state


# ---------------------------------------------------------------------------------------------------- TAESD

def analytic_taesd_state():
    """{'first_stage_model.' key: float32 tensor} of the hand-set TAESD described in the module docstring."""
    import torch

    _, _, taesd = _import_comfy()
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in taesd.TAESD(latent_channels=4).state_dict().items()}
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    state["vae_scale"] = torch.tensor(TAESD_SD1_SCALE)
    state["vae_shift"] = torch.tensor(0.0)

    def center(key, pairs, stride_average=False):
        """Set a 3×3 conv's taps: pairs of (out, in, value) at the centre, or 2×2 means for stride-2 convs."""
        weight = state[key]
        for out_ch, in_ch, value in pairs:
            if stride_average:
                weight[out_ch, in_ch, 1:3, 1:3] = value / 4.0
            else:
                weight[out_ch, in_ch, 1, 1] = value

    plus_minus = [(0, 0, 1.0), (1, 1, 1.0)]
    # Encoder: conv(3→64) makes a = 1 − 2·gray (input x in [0, 1]) and −a; blocks apply ReLU; stride-2 convs
    # average 2×2; the last conv returns relu(a) − relu(−a) averaged = mean of a over the 8×8 block, to all 4 channels.
    enc = "taesd_encoder."
    center(enc + "0.weight", [(0, c, -2.0 / 3.0) for c in range(3)] + [(1, c, 2.0 / 3.0) for c in range(3)])
    state[enc + "0.bias"][0], state[enc + "0.bias"][1] = 1.0, -1.0
    for index in (2, 6, 10):
        center(enc + f"{index}.weight", plus_minus, stride_average=True)
    center(enc + "14.weight", [(c, 0, 1.0) for c in range(4)] + [(c, 1, -1.0) for c in range(4)])
    # Decoder: clamp, conv(4→64) → mean of the channels and its negative, ReLU; identity blocks; nearest upsampling
    # with centre-tap copies; the last conv writes 0.5 − ink/2 (dark ink on white) to R, G and B.
    dec = "taesd_decoder."
    center(dec + "1.weight", [(0, c, 0.25) for c in range(4)] + [(1, c, -0.25) for c in range(4)])
    for index in (7, 12, 17):
        center(dec + f"{index}.weight", plus_minus)
    center(dec + "19.weight", [(c, 0, -0.5) for c in range(3)] + [(c, 1, 0.5) for c in range(3)])
    state[dec + "19.bias"][:] = 0.5
    return {"first_stage_model." + k: v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------- checkpoint

def _factors_digest(path=FACTORS_PATH):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:16]


def _read_stamp(path):
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(STAMP_KEY)
    except Exception:
        return None


def write_digits_checkpoint(path, factors=FACTORS_PATH):
    """Write (or reuse, when its stamp matches) the digits checkpoint at ``path``."""
    from safetensors.torch import load_file

    path = pathlib.Path(path)
    stamp = "v{}-{}".format(FORMAT_VERSION, _factors_digest(factors))
    if path.is_file() and _read_stamp(path) == stamp:
        return path
    unet = load_factors(low_rank_unet(), factors)
    tensors = {"model.diffusion_model." + k: v for k, v in dense_unet_state(unet).items()}
    tensors.update(analytic_taesd_state())
    clip = load_file(str(cached_tiny_sd15()))
    tensors.update({k: v for k, v in clip.items() if k.startswith("cond_stage_model.")})
    metadata = {STAMP_KEY: stamp, "format": "pt",
                "description": "fewstep digits model: SD1.5-class, draws 'a handwritten digit N' at 64x64 px"}
    return save_atomic({k: v.contiguous() for k, v in tensors.items()}, path, metadata)


def cached_digits_sd15(cache_dir=None):
    """The one cached copy (tests, demo, benchmarks) under <repo>/.cache."""
    cache = pathlib.Path(cache_dir) if cache_dir else _REPO_ROOT / ".cache"
    return write_digits_checkpoint(cache / CHECKPOINT_NAME)


# ---------------------------------------------------------------------------------------------------- training

def discrete_sigmas():
    """SD1.5's 1,000 σ values exactly as ComfyUI's ModelSamplingDiscrete holds them (float32)."""
    _import_comfy()
    import comfy.model_sampling

    class _Config:
        sampling_settings = {}

    return comfy.model_sampling.ModelSamplingDiscrete(_Config()).sigmas.float().clone()


def prompt_contexts():
    """[11, 77, 768]: CLIPTextEncode's context for the ten digit prompts, then for the empty prompt."""
    import torch

    _import_comfy()
    import comfy.sd

    loaded = comfy.sd.load_checkpoint_guess_config(str(cached_tiny_sd15()), output_vae=False, output_clip=True)
    clip = loaded[1]
    contexts = []
    for text in [PROMPT.format(d) for d in range(10)] + [""]:
        contexts.append(clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0].float())
    return torch.cat(contexts)


def eps_model(unet, contexts):
    """(x, σ, context rows) → ε̂, with SD1.5's EPS input scaling and ComfyUI's σ → timestep rule."""
    sigmas = discrete_sigmas()
    log_sigmas = sigmas.log()

    def predict(x, sigma, rows):
        sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma.reshape(-1)
        t = (sigma.log()[:, None] - log_sigmas[None]).abs().argmin(dim=1).float()
        x_in = x / (sigma ** 2 + 1).sqrt().reshape(-1, 1, 1, 1)
        return unet(x_in, timesteps=t, context=contexts[rows])

    return predict


def sample_ddim(predict, labels, steps, cfg, generator, sigmas):
    """DDIM (η = 0) on `steps` evenly spaced timesteps from t = 999, CFG with the empty prompt; model-space latents."""
    import torch

    timesteps = torch.linspace(999, 0, steps).round().long()
    schedule = torch.cat([sigmas[timesteps], torch.zeros(1)])
    x = torch.randn(len(labels), 4, 8, 8, generator=generator) * schedule[0]
    empty = torch.full_like(labels, 10)
    with torch.no_grad():
        for sigma, sigma_next in zip(schedule[:-1], schedule[1:]):
            eps_c = predict(x, sigma, labels)
            eps = eps_c if cfg == 1.0 else predict(x, sigma, empty) + cfg * (eps_c - predict(x, sigma, empty))
            x = x + (sigma_next - sigma) * eps
    return x


def train(out=FACTORS_PATH, cfg=None, log=print):
    """Train the factors and write them (float16) to ``out``; returns the metadata written."""
    cfg = {**TRAIN, **(cfg or {})}
    started = time.monotonic()
    tensors = train_state(cfg, log)
    wall = time.monotonic() - started
    metadata = {"fewstep.digits_train": json.dumps(cfg, sort_keys=True), "fewstep.train_seconds": f"{wall:.0f}",
                "fewstep.rank": str(RANK), "format": "pt"}
    save_atomic(tensors, pathlib.Path(out), metadata)
    log(f"digits model: trained in {wall:.0f} s, wrote {out} ({pathlib.Path(out).stat().st_size / 2 ** 20:.2f} MiB)")
    return metadata


def train_state(cfg=None, log=None):
    """The trained factors: {low-rank UNet key: float16 tensor} (EMA weights)."""
    import torch

    cfg = {**TRAIN, **(cfg or {})}
    log = log or (lambda message: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    try:
        return _train_state(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _train_state(cfg, log):
    import torch

    torch.manual_seed(cfg["seed"])
    started = time.monotonic()
    data = digits_split()
    x_train, y_train = data["train"]
    latents = ink_to_latent(x_train)
    contexts = prompt_contexts()
    sigmas = discrete_sigmas()
    unet = low_rank_unet(cfg["seed"], contexts)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    params = [p for p in unet.parameters()]
    optimiser = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    predict = eps_model(unet, contexts)
    log(f"digits model: {sum(p.numel() for p in params) / 1e6:.2f} M trained parameters, {cfg['steps']} steps")
    running = None
    for step in range(cfg["steps"]):
        progress = step / max(1, cfg["steps"] - 1)
        lr = cfg["lr"] * min(1.0, (step + 1) / cfg["warmup"]) * (
            cfg["final_lr_fraction"] + (1 - cfg["final_lr_fraction"]) * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimiser.param_groups:
            group["lr"] = lr
        index = torch.randint(len(latents), (cfg["batch"],), generator=gen)
        rows = y_train[index].clone()
        rows[torch.rand(cfg["batch"], generator=gen) < cfg["empty_prompt"]] = 10
        t = torch.randint(1000, (cfg["batch"],), generator=gen)
        noise = torch.randn(cfg["batch"], 4, 8, 8, generator=gen)
        sigma = sigmas[t]
        x = latents[index] + sigma.reshape(-1, 1, 1, 1) * noise
        weight = (1 + sigma ** 2).clamp(max=cfg["max_weight"]).reshape(-1, 1, 1, 1)
        loss = (weight * (predict(x, sigma, rows) - noise) ** 2).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        optimiser.step()
        decay = min(cfg["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].mul_(decay).add_(v, alpha=1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if cfg["snapshot_every"] and (step + 1) % cfg["snapshot_every"] == 0:
            save_atomic({k: v.to(torch.float16).contiguous() for k, v in ema.items()},
                        pathlib.Path(cfg["snapshot_dir"]) / f"snapshot_{step + 1}.safetensors", {"format": "pt"})
        if (step + 1) % 100 == 0 or step == 0:
            log(f"step {step + 1:5d}  loss {running:.4f}  lr {lr:.2e}  {time.monotonic() - started:7.1f} s")
    return {k: v.to(torch.float16).contiguous() for k, v in ema.items()}


# ---------------------------------------------------------------------------------------------------- evaluation

class DigitClassifier:
    """A small CNN on 8×8 ink, trained in seconds on the training split (shift-augmented); ``features`` for FD."""

    def __init__(self, seed=0, epochs=25):
        import torch
        from torch import nn

        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 16, 32), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(32, 10))
        data = digits_split()
        x, y = data["train"]
        params = list(self.body.parameters()) + list(self.head.parameters())
        optimiser = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-3)
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=gen)
            for start in range(0, len(y), 100):
                batch = order[start:start + 100]
                shifted = self._shift(x[batch], gen)
                loss = nn.functional.cross_entropy(self._logits(shifted, train=True), y[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        self.body.eval()
        self.head.eval()
        held_x, held_y = data["held"]
        self.held_accuracy = float((self.predict(held_x) == held_y).float().mean())

    @staticmethod
    def _shift(x, gen):
        import torch

        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
        dy, dx = torch.randint(3, (2,), generator=gen).tolist()
        return padded[:, dy:dy + 8, dx:dx + 8]

    def _logits(self, ink, train=False):
        self.body.train(train)
        self.head.train(train)
        return self.head(self.body(ink.float().clamp(-1, 1).unsqueeze(1)))

    def predict(self, ink):
        import torch

        with torch.no_grad():
            return self._logits(ink).argmax(dim=1)

    def features(self, ink):
        import torch

        with torch.no_grad():
            self.body.eval()
            return self.body(ink.float().clamp(-1, 1).unsqueeze(1)).double()


def frechet_distance(features_a, features_b):
    """Fréchet distance between Gaussians fitted to two feature sets ([N, D] float64), via eigendecompositions."""
    import torch

    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = torch.cov(features_a.T), torch.cov(features_b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * middle)


def teacher_check(unet, contexts, per_class=20, steps=25, cfgs=(1.0, 2.0, 3.0, 5.0), seed=1234, log=print):
    """Classifier accuracy of DDIM samples from the low-rank UNet (a quick check next to training)."""
    import torch

    classifier = DigitClassifier()
    log(f"classifier held-out accuracy {classifier.held_accuracy:.3f}")
    predict = eps_model(unet, contexts)
    labels = torch.arange(10).repeat_interleave(per_class)
    held = digits_split()["held"][0]
    results = {}
    for cfg in cfgs:
        latents = sample_ddim(predict, labels, steps, cfg, torch.Generator().manual_seed(seed), discrete_sigmas())
        ink = latents.mean(dim=1)
        accuracy = float((classifier.predict(ink) == labels).float().mean())
        fd = frechet_distance(classifier.features(ink), classifier.features(held))
        results[cfg] = (accuracy, fd)
        log(f"teacher {steps} steps CFG {cfg}: accuracy {accuracy:.3f}, FD {fd:.2f}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train_cmd = sub.add_parser("train", help="train the UNet factors and write assets/digits/")
    train_cmd.add_argument("--steps", type=int, default=TRAIN["steps"])
    train_cmd.add_argument("--out", type=pathlib.Path, default=FACTORS_PATH)
    train_cmd.add_argument("--cfgs", default="1,2,3,5", help="CFG scales of the accuracy check after training")
    train_cmd.add_argument("--snapshots", type=pathlib.Path, help="write the EMA weights here every 400 steps")
    check_cmd = sub.add_parser("check", help="teacher accuracy of the shipped factors (pure torch DDIM)")
    check_cmd.add_argument("--factors", type=pathlib.Path, default=FACTORS_PATH)
    check_cmd.add_argument("--cfgs", default="1,2,3,5")
    check_cmd.add_argument("--per-class", type=int, default=20)
    build_cmd = sub.add_parser("build", help="write the ComfyUI checkpoint")
    build_cmd.add_argument("out", type=pathlib.Path, nargs="?")
    sub.add_parser("export-digits", help="(maintainers) re-export the data from scikit-learn")
    ns = parser.parse_args(argv)
    if ns.command == "train":
        train(ns.out, {"steps": ns.steps, **({"snapshot_every": 400, "snapshot_dir": str(ns.snapshots)}
                                             if ns.snapshots else {})})
        cfgs = tuple(float(c) for c in ns.cfgs.split(","))
        teacher_check(load_factors(low_rank_unet(), ns.out), prompt_contexts(), cfgs=cfgs)
    elif ns.command == "check":
        teacher_check(load_factors(low_rank_unet(), ns.factors), prompt_contexts(),
                      cfgs=tuple(float(c) for c in ns.cfgs.split(",")), per_class=ns.per_class)
    elif ns.command == "build":
        out = write_digits_checkpoint(ns.out) if ns.out else cached_digits_sd15()
        print("{} ({:.1f} MiB, stamp {})".format(out, out.stat().st_size / 2 ** 20, _read_stamp(out)))
    else:
        print(export_digits())
    return 0


if __name__ == "__main__":
    sys.exit(main())
