"""Distillation fidelity on real data: LCM-style (M = 1), PCM (M = 4), Hyper-SD's TSCD and TCD, few steps.

Data: scikit-learn's bundled digits (1,797 8×8 images, no download; a bench-only dependency, see
requirements-bench.txt), pixels 0..16 scaled to [−1, 1], a fixed 1,500 / 297 train / held-out split.

1. Teacher: a small class-conditional ε-prediction UNet (labels 0–9 plus a null label for CFG's unconditional
   branch, 10 % label dropout) on SD's scaled-linear schedule (`DiscreteVPSampling`), trained a few minutes on
   the CPU. Cached in bench_out/ under a hash of its config (`--retrain` ignores the cache).
2. Students: the engine (`distill.engine.Distiller`) trains a LoRA on the teacher with each method, the same
   number of optimiser steps (and batch, learning rate, rank) for every method, on the K-point DDIM grid,
   CFG-augmented teacher at a fixed guidance w (ComfyUI CFG 1 + w), several seeds each:
     LCM (M = 1)   method "pcm", one phase: the single-stage consistency baseline;
     PCM (M = 4)   method "pcm", four phases;
     TSCD 8→4→2→1  method "tscd": the stages share the one budget, split evenly (the engine's default for an
                   empty tscd_stage_steps), each later stage's solver the previous stage's frozen LoRA;
     TCD           method "tcd": the student jumps to any end point s below the teacher's next point.
3. Evaluation, every model on the same initial noise and labels, at 1, 2, 4, 8 steps, each method with its own
   sampler: LCM with `lcm` on the LCM 50-point grid (ComfyUI's `lcm` sampler is TCD with γ = 1) and with `pcm`
   on its one phase; PCM with `pcm` on its phase edges; TSCD and TCD with `tcd` at γ = 0, 0.3 and 1 on the LCM
   grid (the tcd sampler's schedule, `lcm_sigmas`); the undistilled teacher (DDIM on trailing steps, CFG 1 + w)
   as a reference row.
   (a) RMSE (pixels in [−1, 1]) to the teacher's 50-step DDIM endpoint (its probability-flow ODE on the
       K = 50 grid, CFG 1 + w) from the same noise — the function the students are trained to reproduce;
   (b) Fréchet distance on the penultimate features of a small digit classifier against the held-out digits.
       Every set compared has the held-out class mix (generated labels = held-out labels tiled twice): with
       class features, a different mix alone moves the distance. Floors: the teacher's 50-step samples, and as
       many real train digits (same class mix; the classifier is trained on the rest of the train split).
Cells are mean ± half-range over the training seeds. The claims checked, whichever way they come out: Hyper-SD's,
that TSCD beats single-stage training (LCM, M = 1) at 1 step; TCD's, that its quality does not fall as the steps
grow, unlike LCM's. Outputs: the tables and the claims on stdout, bench_out/distill_fidelity.json (every number,
per seed) and bench_out/distill_fidelity.png (a sample grid).

Run: `make bench` (installs requirements-bench.txt), or .venv/bin/python bench/distill_fidelity.py
[--quick] [--retrain] [--threads N (default 1)]. --quick is a < 1 minute smoke run with tiny settings (numbers meaningless),
written to bench_out/distill_fidelity_quick.{json,png}.
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "bench_out"

if "fewstep" not in sys.modules:  # import the repo root as the package `fewstep`, as tests/conftest.py does
    _spec = importlib.util.spec_from_file_location("fewstep", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["fewstep"] = _module
    _spec.loader.exec_module(_module)
sys.path.insert(0, str(ROOT / "tests"))  # support.model_sampling: the float64 stand-in of ComfyUI's model sampling

from fewstep.distill.engine import DistillConfig, Distiller, LatentData  # noqa: E402
from fewstep.distill.lora import LoraSet, lora_targets  # noqa: E402
from fewstep.samplers.common import seeded_noise_sampler  # noqa: E402
from fewstep.samplers.pcm import sample_pcm  # noqa: E402
from fewstep.samplers.tcd import DEFAULT_GAMMA, sample_tcd  # noqa: E402
from fewstep.schedulers.lcm import lcm_sigmas  # noqa: E402
from support.model_sampling import DiscreteVPSampling, initial_noise_scale  # noqa: E402
from fewstep.schedulers.pcm import pcm_sigmas  # noqa: E402

NULL_LABEL = 10  # the unconditional "prompt"
TEACHER_VERSION = "1"  # bump when the network or its training changes: the cache key includes it

# The methods compared: a display name and the DistillConfig fields that make it (the rest is cfg["distill"]).
METHODS = [
    {"name": "LCM (M=1)", "method": "pcm", "phases": 1},
    {"name": "PCM (M=4)", "method": "pcm", "phases": 4},
    {"name": "TSCD 8→4→2→1", "method": "tscd", "tscd_segments": "8,4,2,1"},
    {"name": "TCD", "method": "tcd"},
]

FULL = {
    "split_seed": 0, "n_train": 1500,
    "teacher": {"width": 48, "steps": 4000, "batch": 128, "lr": 2e-3, "warmup": 200, "ema": 0.999,
                "label_drop": 0.1, "seed": 0},
    "classifier": {"epochs": 20, "batch": 100, "lr": 2e-3, "weight_decay": 1e-3, "dropout": 0.5, "features": 32, "seed": 0},
    "guidance_w": 0.5,  # teacher CFG 1 + w, fixed (w_min = w_max) so the RMSE reference is one well-defined ODE
    "ddim_timesteps": 50, "methods": METHODS, "seeds": [0, 1],
    "distill": {"steps": 500, "batch": 128, "lr": 5e-4, "rank": 16},  # per method; TSCD's stages share the steps
    "eval_per_held": 2, "eval_seed": 1234, "steps": [1, 2, 4, 8], "tcd_gammas": [0.0, 0.3, 1.0],
    "reference_steps": 50,
}
QUICK = {
    **FULL,
    "teacher": {**FULL["teacher"], "width": 16, "steps": 150, "warmup": 20},
    "classifier": {**FULL["classifier"], "epochs": 3},
    "steps": [1, 2, 4],
    "distill": {**FULL["distill"], "steps": 8, "batch": 32, "rank": 4},
    "eval_per_held": 1, "reference_steps": 10,
}


# ---------------------------------------------------------------- data

def load_digits_split(cfg):
    """(x_train, y_train, x_held, y_held, reference_index): a seeded 1,500 / 297 split, pixels in [−1, 1].

    reference_index picks, inside the train split, `eval_per_held` real digits per held-out digit of the same
    class: the real-data floor set. It has the generated sets' size and class mix (their labels are the held-out
    labels tiled), and the feature classifier never sees it, so the floor is not flattered or hurt by overfitting.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("scikit-learn is missing: .venv/bin/python -m pip install --isolated -r requirements-bench.txt")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 → [−1, 1]
    labels = torch.tensor(digits.target, dtype=torch.long)
    rng = np.random.default_rng(cfg["split_seed"])
    order = torch.tensor(rng.permutation(len(labels)))
    train, held = order[:cfg["n_train"]], order[cfg["n_train"]:]
    y_train, y_held = labels[train], labels[held]
    reference = []
    for digit in range(10):
        members = torch.nonzero(y_train == digit).flatten()
        need = cfg["eval_per_held"] * int((y_held == digit).sum())
        reference.append(members[torch.tensor(rng.permutation(len(members))[:need])])
    return images[train], y_train, images[held], y_held, torch.sort(torch.cat(reference)).values


# ---------------------------------------------------------------- teacher network

class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(e)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class DigitUNet(nn.Module):
    """ε(x_VP, t, label): 8×8 → 4×4 and back, one skip; timestep and label embeddings added in every block."""

    def __init__(self, width=48):
        super().__init__()
        emb = 4 * width
        self.width = width
        self.time_mlp = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(NULL_LABEL + 1, emb)
        self.conv_in = nn.Conv2d(1, width, 3, padding=1)
        self.block_hi = ResBlock(width, width, emb)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.block_lo = ResBlock(2 * width, 2 * width, emb)
        self.block_mid = ResBlock(2 * width, 2 * width, emb)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.block_out = ResBlock(2 * width, width, emb)
        self.norm_out, self.conv_out = nn.GroupNorm(8, width), nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, x, t, labels):
        half = self.width // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
        angles = t.to(torch.float32)[:, None] * freqs[None]
        e = self.time_mlp(torch.cat([angles.sin(), angles.cos()], dim=1)) + self.label_emb(labels)
        hi = self.block_hi(self.conv_in(x), e)
        lo = self.block_mid(self.block_lo(self.down(hi), e), e)
        h = self.block_out(torch.cat([self.up(lo), hi], dim=1), e)
        return self.conv_out(F.silu(self.norm_out(h)))


class SigmaSpaceModel:
    """The network seen in ComfyUI's σ-space: D(x, σ) = x − σ·ε(x/√(1 + σ²), t(σ)), x = x0 + σ·ε.

    `denoise(x, σ[B], labels[B])` is what the engine trains; calling the object is the k-diffusion interface the
    samplers use, with `labels` and CFG `w` (ComfyUI cfg = 1 + w) as extra_args, and `model_sampling` for them.
    """

    def __init__(self, network, model_sampling):
        self.network = network
        self.model_sampling = model_sampling

    def denoise(self, x, sigma, labels):
        ms = self.model_sampling
        sigma = sigma.reshape(-1)
        sigma_b = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        labels = labels.reshape(-1).expand(x.shape[0]) if labels.numel() == 1 else labels.reshape(-1)
        eps = self.network(ms.calculate_input(sigma_b, x), ms.timestep(sigma.double()), labels)
        return ms.calculate_denoised(sigma_b, eps, x)

    def __call__(self, x, sigma, labels=None, w=0.0):
        if w == 0.0:
            return self.denoise(x, sigma, labels)
        both = self.denoise(torch.cat([x, x]), torch.cat([sigma, sigma]),
                            torch.cat([labels, torch.full_like(labels, NULL_LABEL)]))
        cond, uncond = both.chunk(2)
        return cond + w * (cond - uncond)


def teacher_cache_path(cfg):
    key = json.dumps({"version": TEACHER_VERSION, "split_seed": cfg["split_seed"], "n_train": cfg["n_train"],
                      **cfg["teacher"]}, sort_keys=True)
    return OUT_DIR / f"distill_teacher_{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"


def train_teacher(cfg, x_train, y_train, ms, retrain=False):
    tc = cfg["teacher"]
    path = teacher_cache_path(cfg)
    network = DigitUNet(tc["width"])
    if path.exists() and not retrain:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(saved["ema"])
        print(f"teacher: loaded {path.relative_to(ROOT)} (trained {saved['seconds']:.0f} s, final loss {saved['loss']:.4f})")
        return network.eval().requires_grad_(False), {"cached": True, "seconds": saved["seconds"], "loss": saved["loss"]}
    start = time.perf_counter()
    torch.manual_seed(tc["seed"])
    gen = torch.Generator().manual_seed(tc["seed"])
    network = DigitUNet(tc["width"])
    ema = DigitUNet(tc["width"]).requires_grad_(False)
    ema.load_state_dict(network.state_dict())
    opt = torch.optim.AdamW(network.parameters(), lr=tc["lr"], weight_decay=0.0)
    alphas = ms.alphas_cumprod.float()
    recent = []
    for step in range(tc["steps"]):
        # Linear warm-up, then cosine decay to 5 % (a short run needs the decay for its final samples).
        progress = max(0.0, (step - tc["warmup"]) / max(1, tc["steps"] - tc["warmup"]))
        scale = min(1.0, (step + 1) / tc["warmup"]) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = tc["lr"] * scale
        idx = torch.randint(0, len(x_train), (tc["batch"],), generator=gen)
        x0, labels = x_train[idx], y_train[idx].clone()
        labels[torch.rand(tc["batch"], generator=gen) < tc["label_drop"]] = NULL_LABEL
        t = torch.randint(0, ms.num_timesteps, (tc["batch"],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].reshape(-1, 1, 1, 1)
        x_vp = a.sqrt() * x0 + (1 - a).sqrt() * noise  # = calculate_input(σ_t, x0 + σ_t·ε)
        loss = F.mse_loss(network(x_vp, t, labels), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        opt.step()
        decay = min(tc["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), network.parameters()):
                p_ema.lerp_(p, 1 - decay)
        recent = (recent + [loss.item()])[-200:]
        if (step + 1) % 1000 == 0:
            print(f"  teacher step {step + 1}/{tc['steps']}: loss {np.mean(recent):.4f} ({time.perf_counter() - start:.0f} s)")
    seconds = time.perf_counter() - start
    OUT_DIR.mkdir(exist_ok=True)
    torch.save({"ema": ema.state_dict(), "seconds": seconds, "loss": float(np.mean(recent))}, path)
    print(f"teacher: trained in {seconds:.0f} s, final loss {np.mean(recent):.4f}, saved {path.relative_to(ROOT)}")
    return ema.eval(), {"cached": False, "seconds": seconds, "loss": float(np.mean(recent))}


# ---------------------------------------------------------------- classifier features and Fréchet distance

class DigitClassifier(nn.Module):
    """Three convs and a small feature layer; dropout and weight decay keep its features from memorising digits."""

    def __init__(self, features=32, dropout=0.5):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Dropout(dropout))
        self.fc = nn.Linear(64 * 16, features)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(features, 10))

    def features(self, x):
        return self.fc(self.convs(x))  # before the ReLU: a full-rank covariance for the Fréchet distance

    def forward(self, x):
        return self.head(self.features(x))


def shift_augment(x, gen):
    """Random ±1 pixel shifts, so the features do not hinge on exact pixel positions."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    return torch.roll(F.pad(x, (1, 1, 1, 1), value=-1.0), (dy, dx), dims=(2, 3))[:, :, 1:-1, 1:-1]


def train_classifier(cfg, x, y):
    cc = cfg["classifier"]
    torch.manual_seed(cc["seed"])
    gen = torch.Generator().manual_seed(cc["seed"])
    net = DigitClassifier(cc["features"], cc["dropout"])
    opt = torch.optim.AdamW(net.parameters(), lr=cc["lr"], weight_decay=cc["weight_decay"])
    for _epoch in range(cc["epochs"]):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(order), cc["batch"]):
            idx = order[i:i + cc["batch"]]
            loss = F.cross_entropy(net(shift_augment(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def classify(classifier, x):
    feats = classifier.features(x)
    return feats.double().numpy(), classifier.head(feats).argmax(dim=1)


def feature_stats(feats):
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(stats_a, stats_b):
    """|μa − μb|² + tr(Ca + Cb − 2(Ca Cb)^½), with tr((Ca Cb)^½) = Σ √eig(Ca^½ Cb Ca^½) (symmetric, float64)."""
    (mu_a, cov_a), (mu_b, cov_b) = stats_a, stats_b
    vals, vecs = np.linalg.eigh(cov_a)
    root_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


# ---------------------------------------------------------------- students

def distill_student(cfg, teacher, x_train, y_train, spec, seed):
    """A LoRA student on its own copy of the teacher's network, trained by the engine with the method of `spec`
    (an entry of METHODS); returns (model, info)."""
    dc = cfg["distill"]
    network = DigitUNet(cfg["teacher"]["width"])
    network.load_state_dict(teacher.network.state_dict())
    network.requires_grad_(False)
    model = SigmaSpaceModel(network, teacher.model_sampling)
    lora = LoraSet(network, lora_targets(network), rank=dc["rank"], alpha=dc["rank"], seed=seed)
    method = {k: v for k, v in spec.items() if k != "name"}
    config = DistillConfig(ddim_timesteps=cfg["ddim_timesteps"], steps=dc["steps"],
                           batch_size=dc["batch"], learning_rate=dc["lr"], cfg_mode="small",
                           w_min=cfg["guidance_w"], w_max=cfg["guidance_w"], huber_c=0.001,
                           precision="fp32", seed=seed, deterministic=True, **method)
    data = LatentData(latents=x_train, cond=y_train, uncond=torch.tensor([NULL_LABEL]))
    distiller = Distiller(config, model.denoise, lora, data, model.model_sampling)
    start, losses = time.perf_counter(), []
    for _ in range(config.steps):
        losses.append(float(distiller.train_step()))
    seconds = time.perf_counter() - start
    lora.requires_grad_(False)
    window = max(1, min(50, config.steps // 4))
    info = {"seconds": seconds, "loss_first": float(np.mean(losses[:window])),
            "loss_last": float(np.mean(losses[-window:])), "trained_segments": config.trained_segments(config.steps)}
    if config.method == "tscd":
        info["stage_steps"] = config.stage_steps()
    return model, info


# ---------------------------------------------------------------- evaluation

def sampler_rows(cfg, spec):
    """(sampler name, schedule name, sampler fn, schedule fn) rows of a student made with `spec` (an entry of
    METHODS): each method's own sampler(s); spec None = the teacher's DDIM."""
    k = cfg["ddim_timesteps"]
    pcm = lambda model, x, sigmas, extra, ns: sample_pcm(model, x, sigmas, extra_args=extra)  # noqa: E731

    def tcd(gamma):
        return lambda model, x, sigmas, extra, ns: sample_tcd(model, x, sigmas, extra_args=extra, gamma=gamma, noise_sampler=ns)

    lcm_grid = lambda ms, n: lcm_sigmas(ms, n)  # noqa: E731  the tcd preset's and the lcm sampler's schedule
    if spec is None:
        return [("pcm (DDIM)", "trailing", pcm, lambda ms, n: pcm_sigmas(ms, n))]
    if spec["method"] == "pcm":
        phases = spec["phases"]
        edges = ("pcm", f"edges M={phases} K={k}", pcm, lambda ms, n: pcm_sigmas(ms, n, phases=phases, ddim_steps=k))
        if phases == 1:
            # ComfyUI's `lcm` sampler (x = D, then D + σ'·z when σ' > 0) is TCD with γ = 1: jump to x̂0, re-noise fully.
            return [("lcm", "lcm grid", tcd(1.0), lcm_grid), edges]
        return [edges]
    return [(f"tcd γ={gamma:g}", "lcm grid", tcd(gamma), lcm_grid) for gamma in cfg["tcd_gammas"]]


@torch.no_grad()
def generate(model, sampler, sigmas, noise, labels, w, noise_seed):
    x = noise * initial_noise_scale(model.model_sampling, sigmas[0])
    ns = seeded_noise_sampler(x, noise_seed)
    return sampler(model, x, sigmas, {"labels": labels, "w": w}, ns)


def evaluate(cfg, model, rows, w, ctx, keep=()):
    """{row: {steps: {rmse, fd, acc}}} on the shared noise/labels; `keep` = (row, steps) whose samples to return."""
    out, kept, done = {}, {}, {}
    for name, schedule, sampler, sigmas_fn in rows:
        row = f"{name} | {schedule}"
        out[row] = {}
        for n in cfg["steps"]:
            sigmas = sigmas_fn(model.model_sampling, n)
            # One step is x̂0 = D(x_T) for every sampler (nothing is re-noised at σ = 0), and equal σ lists with the
            # same sampler give the same samples: compute each trajectory once.
            key = ("any" if n == 1 else name, tuple(round(float(s), 6) for s in sigmas))
            if key not in done:
                x = generate(model, sampler, sigmas, ctx["noise"], ctx["labels"], w, cfg["eval_seed"] + n)
                feats, pred = classify(ctx["classifier"], x)
                done[key] = x, {"rmse": float((x - ctx["reference"]).pow(2).mean().sqrt()),
                                "fd": frechet_distance(feature_stats(feats), ctx["held_stats"]),
                                "acc": float((pred == ctx["labels"]).float().mean())}
            x, out[row][n] = done[key]
            if (row, n) in keep:
                kept[(row, n)] = x
    return out, kept


# ---------------------------------------------------------------- report

def spread_cell(values, digits):
    mean, half = float(np.mean(values)), (max(values) - min(values)) / 2
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def print_table(title, metric, results, cfg, digits):
    steps = cfg["steps"]
    print(f"\n{title}\n")
    print("| model | sampler | schedule | " + " | ".join(f"{n} step{'s' * (n > 1)}" for n in steps) + " |")
    print("|---|---|---|" + "---:|" * len(steps))
    for model_name, per_seed in results.items():
        for row in per_seed[0]:
            sampler, schedule = row.split(" | ")
            cells = [spread_cell([r[row][n][metric] for r in per_seed], digits) for n in steps]
            print(f"| {model_name} | {sampler} | {schedule} | " + " | ".join(cells) + " |")


def mean_of(results, model_name, row, n, metric):
    values = [r[row][n][metric] for r in results[model_name]]
    return float(np.mean(values)), (max(values) - min(values)) / 2


def paired_difference(results, a, row_a, n_a, b, row_b, n_b, metric):
    """a − b per seed (the i-th seed of each: same training seed, same evaluation noise): (mean, half-range)."""
    diffs = [ra[row_a][n_a][metric] - rb[row_b][n_b][metric] for ra, rb in zip(results[a], results[b])]
    return float(np.mean(diffs)), (max(diffs) - min(diffs)) / 2


def compare(a, b, lower_better_name, higher_name):
    """Verdict on two (mean, half-range) cells, lower is better: a difference counts only when the seed ranges do
    not overlap (|mean_a − mean_b| > half-range_a + half-range_b)."""
    gap = abs(a[0] - b[0]) - (a[1] + b[1])
    if gap <= 0:
        return "within the seed spread"
    return f"{lower_better_name} better" if a[0] < b[0] else f"{higher_name} better"


def print_claims(results, floors, cfg, stage_steps):
    """stage_steps: TSCD's optimiser steps per stage, as trained (for the text)."""
    fmt = lambda v: f"{v[0]:.3f} ± {v[1]:.3f}"  # noqa: E731
    fmtd = lambda v: f"{v[0]:.2f} ± {v[1]:.2f}"  # noqa: E731
    steps = cfg["steps"]
    lcm, tscd, tcd = METHODS[0]["name"], METHODS[2]["name"], METHODS[3]["name"]
    first_row = lambda name: next(iter(results[name][0]))  # noqa: E731  at 1 step every sampler gives D(x_T)
    print(f"\nPaper claims, as measured here (mean ± half-range over {len(cfg['seeds'])} seeds; a difference counts "
          f"when the seed ranges do not overlap; FD floors: teacher {cfg['reference_steps']}-step "
          f"{floors['teacher_50']:.2f}, real digits {floors['real']:.2f}):")
    if lcm in results and tscd in results and 1 in steps:
        print(f"- Hyper-SD's claim, TSCD beats single-stage consistency training (LCM, M = 1) at 1 step; same optimiser steps "
              f"({cfg['distill']['steps']}; TSCD's stages {'+'.join(map(str, stage_steps))}):")
        for metric, f in (("rmse", fmt), ("fd", fmtd)):
            t, s = mean_of(results, tscd, first_row(tscd), 1, metric), mean_of(results, lcm, first_row(lcm), 1, metric)
            d = paired_difference(results, tscd, first_row(tscd), 1, lcm, first_row(lcm), 1, metric)
            others = "; ".join(f"{name} {f(mean_of(results, name, first_row(name), 1, metric))}"
                               for name in results if name not in (tscd, lcm))
            print(f"  {metric.upper()} at 1 step: {tscd} {f(t)} vs {lcm} {f(s)} (difference per seed {f(d)}): "
                  f"{compare(t, s, 'TSCD', 'LCM')}. Others at 1 step: {others}.")
    if len(steps) > 1:
        top = steps[-1]
        rows = [(lcm, "lcm | lcm grid"), (tcd, None), (tscd, None)]
        print(f"- TCD's claim, its quality (FD) does not fall as the steps grow, unlike LCM's. FD at 1 → {top} steps, and "
              f"{top} steps minus each fewer count, per seed:")
        for name, only in rows:
            if name not in results:
                continue
            for row in results[name][0]:
                if only is not None and row != only:
                    continue
                sequence = " → ".join(fmtd(mean_of(results, name, row, n, "fd")) for n in steps)
                deltas = {n: paired_difference(results, name, row, top, name, row, n, "fd") for n in steps[:-1]}
                worse = [n for n, d in deltas.items() if d[0] - d[1] > 0]
                better = [n for n, d in deltas.items() if d[0] + d[1] < 0]
                verdict = (f"worse at {top} steps than at {', '.join(map(str, worse))} beyond the seed spread (falls)"
                           if worse else f"not worse at {top} steps than at any fewer count (does not fall)")
                if better:
                    verdict += f"; better than at {', '.join(map(str, better))}"
                print(f"  {name} {row.split(' | ')[0]}: {sequence}; {top} − n: "
                      + ", ".join(f"n={n} {fmtd(d)}" for n, d in deltas.items()) + f": {verdict}.")


def save_grid(path, rows, per_row=10):
    """Rows of 8×8 samples (nearest ×4), a label on the left, written with PIL (a ComfyUI dependency)."""
    from PIL import Image, ImageDraw

    scale, pad, label_w = 4, 2, 230
    cell = 8 * scale + pad
    image = Image.new("L", (label_w + per_row * cell + pad, len(rows) * cell + pad), 255)
    draw = ImageDraw.Draw(image)
    for r, (label, batch) in enumerate(rows):
        pixels = ((batch[:per_row, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        for c, digit in enumerate(pixels):
            tile = Image.fromarray(255 - digit).resize((8 * scale, 8 * scale), Image.NEAREST)  # dark ink on white
            image.paste(tile, (label_w + pad + c * cell, pad + r * cell))
        text = label.replace("γ", "gamma").replace("→", "-")  # PIL's default font has neither
        draw.text((4, pad + r * cell + 10), text, fill=0)
    image.save(path)


# ---------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 minute); the numbers mean nothing")
    parser.add_argument("--retrain", action="store_true", help="train the teacher even if a cached one matches")
    # One thread by default: these are small tensors, and when other jobs share the cores two OpenMP threads wait on
    # each other (the quick run took 119 s with 2 threads and 13 s with 1 at a load average of about 2, 2 cores).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; see the comment)")
    opts = parser.parse_args()
    cfg = QUICK if opts.quick else FULL
    torch.set_num_threads(opts.threads)
    wall, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    timings = {}

    x_train, y_train, x_held, y_held, ref_index = load_digits_split(cfg)
    ms = DiscreteVPSampling()
    print(f"digits: {len(x_train)} train / {len(x_held)} held-out, 8×8; SD scaled-linear schedule; "
          f"{torch.get_num_threads()} CPU threads{' (QUICK: numbers meaningless)' if opts.quick else ''}")

    network, teacher_info = train_teacher(cfg, x_train, y_train, ms, retrain=opts.retrain)
    teacher = SigmaSpaceModel(network, ms)
    timings["teacher"] = teacher_info["seconds"]

    # The classifier trains on the train split minus the real-floor set (see load_digits_split).
    start = time.perf_counter()
    seen = torch.ones(len(x_train), dtype=torch.bool)
    seen[ref_index] = False
    classifier = train_classifier(cfg, x_train[seen], y_train[seen])
    held_feats, held_pred = classify(classifier, x_held)
    held_stats = feature_stats(held_feats)
    timings["classifier"] = time.perf_counter() - start
    classifier_acc = float((held_pred == y_held).float().mean())
    print(f"classifier: {int(seen.sum())} train digits, held-out accuracy {classifier_acc:.3f} ({timings['classifier']:.0f} s)")

    # Shared evaluation noise; labels = the held-out labels tiled, so every set has the held-out class mix.
    w = cfg["guidance_w"]
    labels = y_held.repeat(cfg["eval_per_held"])
    n_eval = len(labels)
    noise = torch.randn((n_eval, 1, 8, 8), generator=torch.Generator().manual_seed(cfg["eval_seed"]))
    start = time.perf_counter()
    reference = generate(teacher, lambda m, x, s, e, ns: sample_pcm(m, x, s, extra_args=e),
                         pcm_sigmas(ms, cfg["reference_steps"]), noise, labels, w, cfg["eval_seed"])
    ref_feats, ref_pred = classify(classifier, reference)
    real_feats, _ = classify(classifier, x_train[ref_index])
    floors = {"teacher_50": frechet_distance(feature_stats(ref_feats), held_stats),
              "real": frechet_distance(feature_stats(real_feats), held_stats),
              "teacher_50_acc": float((ref_pred == labels).float().mean()), "classifier_acc": classifier_acc}
    ctx = {"noise": noise, "labels": labels, "reference": reference, "classifier": classifier, "held_stats": held_stats}

    grid_keep = [("pcm (DDIM) | trailing", 4)]
    results, per_seed_info, grid = {}, {}, {}
    teacher_eval, kept = evaluate(cfg, teacher, sampler_rows(cfg, None), w, ctx, keep=grid_keep)
    results["teacher"] = [teacher_eval]
    grid.update({("teacher", *key): x for key, x in kept.items()})
    timings["teacher_eval"] = time.perf_counter() - start
    print(f"floors: FD teacher {cfg['reference_steps']}-step (CFG {1 + w:g}) vs held-out {floors['teacher_50']:.2f} "
          f"(its samples classified as their label: {floors['teacher_50_acc']:.3f}); "
          f"FD real train digits ({n_eval}, unseen by the classifier) vs held-out {floors['real']:.2f}")

    timings["distill"], timings["student_eval"] = [], []
    stage_steps = []
    for spec in cfg["methods"]:
        name = spec["name"]
        rows = sampler_rows(cfg, spec)
        # the sample grid: each method's own sampler (tcd at the dropdown's γ), 1, 4 and the most steps
        main_row = f"{rows[0][0]} | {rows[0][1]}" if spec["method"] == "pcm" else f"tcd γ={DEFAULT_GAMMA:g} | lcm grid"
        keep = [(main_row, n) for n in (1, 4, cfg["steps"][-1])]
        results[name], per_seed_info[name] = [], []
        for seed in cfg["seeds"]:
            student, info = distill_student(cfg, teacher, x_train, y_train, spec, seed)
            stage_steps = info.get("stage_steps", stage_steps)
            start = time.perf_counter()
            evaluation, kept = evaluate(cfg, student, rows, 0.0, ctx, keep=keep if seed == cfg["seeds"][0] else ())
            info["eval_seconds"] = time.perf_counter() - start
            timings["distill"].append(info["seconds"])
            timings["student_eval"].append(info["eval_seconds"])
            results[name].append(evaluation)
            per_seed_info[name].append(info)
            grid.update({(name, *key): x for key, x in kept.items()})
            print(f"student {name} seed {seed}: distilled in {info['seconds']:.0f} s (loss {info['loss_first']:.4f} → "
                  f"{info['loss_last']:.4f}), evaluated in {info['eval_seconds']:.0f} s")

    print_table(f"(a) RMSE to the teacher's {cfg['reference_steps']}-step DDIM endpoint (CFG {1 + w:g}), same noise and labels; "
                f"{n_eval} samples; mean ± half-range over {len(cfg['seeds'])} seeds", "rmse", results, cfg, 3)
    print("\n(tcd with γ > 0 and lcm re-noise at every step: by design they leave the ODE path, so their RMSE measures "
          "how far, not an error; compare them on FD. At 1 step every sampler gives the same D(x_T).)")
    print_table(f"(b) Fréchet distance, digit-classifier features, {n_eval} samples vs {len(x_held)} held-out digits "
                f"(floors: teacher {cfg['reference_steps']}-step {floors['teacher_50']:.2f}, real {floors['real']:.2f})",
                "fd", results, cfg, 2)
    print_claims(results, floors, cfg, stage_steps)

    OUT_DIR.mkdir(exist_ok=True)
    one_each = torch.tensor([int(torch.nonzero(labels == d)[0]) for d in range(10)])  # digits 0..9, same noise per column
    grid_rows = [("real held-out", torch.stack([x_held[y_held == d][0] for d in range(10)])),
                 (f"teacher {cfg['reference_steps']}-step", reference[one_each])]
    grid_rows += [(f"{key[0]}: {key[1].split(' | ')[0]} @{key[2]}", x[one_each]) for key, x in grid.items()]
    stem = "distill_fidelity_quick" if opts.quick else "distill_fidelity"  # a smoke run keeps the real results
    save_grid(OUT_DIR / f"{stem}.png", grid_rows)
    timings["total"] = time.perf_counter() - wall
    # CPU time of this process (all its threads): unlike the wall time, it hardly moves when other jobs share the cores
    timings["cpu"] = time.process_time() - cpu_start
    timings["load_average_1min"] = [load_start, os.getloadavg()[0]]
    with open(OUT_DIR / f"{stem}.json", "w") as f:
        json.dump({"config": cfg, "floors": floors, "teacher": teacher_info, "students": per_seed_info,
                   "results": {m: [{row: {str(n): v for n, v in r.items()} for row, r in seed_r.items()} for seed_r in per]
                               for m, per in results.items()},
                   "timings_s": timings}, f, indent=1)
    print(f"\nwrote bench_out/{stem}.json and bench_out/{stem}.png; total wall time "
          f"{timings['total']:.0f} s (teacher {timings['teacher']:.0f} s{' cached' if teacher_info['cached'] else ''}, "
          f"distillation {sum(timings['distill']):.0f} s, evaluation {timings['teacher_eval'] + sum(timings['student_eval']):.0f} s); "
          f"CPU time {timings['cpu']:.0f} s over {torch.get_num_threads()} threads; "
          f"1-minute load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
