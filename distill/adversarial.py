"""Optional adversarial term of PCM: a discriminator made of the frozen teacher's features and small heads.

As in the reference training scripts (G-U-N/Phased-Consistency-Model, `train_pcm_lora_*_adv.py` and
`discriminator_*.py`), per sample:

    t' = e + U{0 .. T/M − 1}                   (T training timesteps, M phases, e the phase edge)
    fake = pred   carried from σ_e to σ_t' by the forward process with fresh noise (`forward_noise`, the
                  samplers' re-noising: the exact marginal at σ_t', for flow models too, where the reference's
                  SD3 script scales its noise by (σ' − σ)/(1 − σ) and leaves x' with less than σ' of noise)
    real = target carried from σ_e to σ_t' the same way, with its own fresh noise
    D(x) = heads(teacher features of x at σ_t'), the teacher being the network with the LoRA off
    D loss = mean relu(1 − D(real)) + mean relu(1 + D(fake))     (hinge; averaged over the heads)
    G loss = mean relu(1 − D(fake))                              (the reference's G loss is hinged too)

The student's loss gains weight·G (reference 0.1); gradients reach the student through the teacher's features,
never the teacher's weights. Every step updates both the student and the heads from the same forwards; the
reference alternates (even steps D only, odd steps the student only): why not here, in docs/algorithms.md,
"PCM: adversarial term". The heads train with their own AdamW (lr 1e-5, betas (0, 0.999)) on detached
samples. A head is conv3×3–GroupNorm–LeakyReLU, the same again plus a residual, then a 1×1 conv to one logit map.

`features(x, σ[B], cond) -> list of [B, C, H, W]` is the caller's: `HookedFeatures` captures block outputs of the
network behind a `denoise` callable (the engine calls it with the LoRA switched off). Token features of a
transformer must be reshaped to maps by the caller (the reference's SD3 heads use 1×1 convs: kernel_size=1).
"""
import contextlib
import json
import math

import torch
import torch.nn.functional as F
from torch import nn


class Head(nn.Module):
    def __init__(self, channels, kernel_size=3):
        super().__init__()
        groups = math.gcd(channels, 32)  # the reference's 32 groups where they divide the channels
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=pad)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=pad)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.out = nn.Conv2d(channels, 1, 1)

    def forward(self, x):
        h = F.leaky_relu(self.norm1(self.conv1(x)))
        h = F.leaky_relu(self.norm2(self.conv2(h))) + h
        return self.out(h)


class DiscriminatorHeads(nn.Module):
    """`heads_per_feature` heads on each feature map (reference: 4 for SD1.5, 1 for SDXL and SD3)."""

    def __init__(self, channels, heads_per_feature=1, kernel_size=3, seed=0):
        super().__init__()
        self.channels = [int(c) for c in channels]
        if not self.channels or heads_per_feature < 1:
            raise ValueError("The discriminator needs at least one feature map and one head per map.")
        with torch.random.fork_rng(devices=[]):  # seeded initialisation, the global RNG left alone
            torch.manual_seed(seed)
            self.heads = nn.ModuleList(nn.ModuleList(Head(c, kernel_size) for _ in range(heads_per_feature))
                                       for c in self.channels)

    def forward(self, features):
        """One logit map per head, in float32 whatever the features' precision."""
        got = [f.shape[1] if f.ndim == 4 else tuple(f.shape) for f in features]
        if got != self.channels:
            raise ValueError(f"The discriminator heads expect feature maps [B, C, H, W] with C = {self.channels}, "
                             f"got {got}.")
        with torch.autocast(features[0].device.type, enabled=False):
            return [h(f.float()) for f, group in zip(features, self.heads) for h in group]


def d_hinge_loss(real_logits, fake_logits):
    return torch.stack([F.relu(1.0 - r).mean() + F.relu(1.0 + f).mean()
                        for r, f in zip(real_logits, fake_logits)]).mean()


def g_hinge_loss(fake_logits):
    return torch.stack([F.relu(1.0 - f).mean() for f in fake_logits]).mean()


class HookedFeatures:
    """`features(x, σ, cond)`: runs `denoise` and returns the outputs of `modules` (first element of a tuple).

    Hooks record only during this object's own calls, so student forwards (and recomputation under gradient
    checkpointing) pass through untouched.
    """

    def __init__(self, denoise, modules):
        self.denoise, self.modules = denoise, list(modules)
        self._captured = None
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]

    def _hook(self, i):
        def capture(module, args, output):
            if self._captured is not None:
                self._captured[i] = output[0] if isinstance(output, (tuple, list)) else output
        return capture

    def __call__(self, x, sigma, cond):
        self._captured = {}
        try:
            self.denoise(x, sigma, cond)
            missing = [i for i in range(len(self.modules)) if i not in self._captured]
            if missing:
                raise RuntimeError(f"Feature modules {missing} did not run in the forward pass.")
            return [self._captured[i] for i in range(len(self.modules))]
        finally:
            self._captured = None

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []


class AdversarialTerm:
    """The heads, their optimiser and the features callable; state as tensors + JSON (no pickle)."""

    def __init__(self, features, channels, lr=1e-5, betas=(0.0, 0.999), weight_decay=1e-2, heads_per_feature=1,
                 kernel_size=3, seed=0, device=None):
        self.features = features
        self.settings = {"channels": [int(c) for c in channels], "lr": float(lr), "betas": [float(b) for b in betas],
                         "weight_decay": float(weight_decay), "heads_per_feature": int(heads_per_feature),
                         "kernel_size": int(kernel_size), "seed": int(seed)}
        self.heads = DiscriminatorHeads(channels, heads_per_feature, kernel_size, seed).to(device)
        self.params = list(self.heads.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        self.history = []  # [g_loss, d_loss] per optimiser step
        self._norm = None

    def to(self, device):
        """Move the heads (before the first step: the optimiser holds no state yet)."""
        self.heads.to(device)
        return self

    @contextlib.contextmanager
    def frozen(self):
        """Heads without gradients: the G loss passes through them to the sample only."""
        flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in zip(self.params, flags):
                p.requires_grad_(flag)

    def g_loss(self, fake_features):
        with self.frozen():
            return g_hinge_loss(self.heads(fake_features))

    def d_loss(self, real_features, fake_features):
        return d_hinge_loss(self.heads([f.detach() for f in real_features]),
                            self.heads([f.detach() for f in fake_features]))

    def reduce_and_clip(self, max_norm=1.0, all_reduce_mean=None):
        """Average the heads' gradients over ranks, clip them (0 = no clipping); returns the norm."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if all_reduce_mean is not None:
                all_reduce_mean(p.grad)
        self._norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf"))
        return self._norm

    def step(self):
        """One AdamW step of the heads, skipped when the gradients are not finite; clears the gradients."""
        if self._norm is None or torch.isfinite(self._norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._norm = None

    def state(self, prefix="adv."):
        tensors = {f"{prefix}param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.params)}
        for i, p in enumerate(self.params):
            for name, value in self.optimizer.state.get(p, {}).items():
                tensors[f"{prefix}optim.{i}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
        tensors[f"{prefix}history"] = torch.tensor(self.history, dtype=torch.float64).reshape(-1, 2)
        return tensors, {"adversarial": json.dumps(self.settings, sort_keys=True)}

    def load_state(self, tensors, meta, prefix="adv."):
        saved = json.loads(meta.get("adversarial", "null") or "null")
        if saved is None:
            raise ValueError("Cannot resume: the checkpoint was trained without the adversarial term.")
        if saved != self.settings:
            differs = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
            raise ValueError("Cannot resume: the checkpoint's discriminator has other settings ("
                             + ", ".join(f"{k} {saved.get(k)!r} → {self.settings.get(k)!r}" for k in differs) + ").")
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(tensors[f"{prefix}param.{i}"])
                state = {k[len(f"{prefix}optim.{i}."):]: v.to(p.device) for k, v in tensors.items()
                         if k.startswith(f"{prefix}optim.{i}.")}
                if state:
                    state["step"] = state["step"].cpu()  # AdamW keeps its step count on the CPU
                    self.optimizer.state[p] = state
        self.history = tensors[f"{prefix}history"].tolist()
