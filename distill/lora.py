"""LoRA layers hooked onto an existing network: one copy of the base weights, switchable on and off.

`LoraSet(root, names, rank, alpha)` adds, for every named nn.Linear / nn.Conv2d under `root`, a trainable
low-rank branch y += (alpha/rank)·up(down(x)) through a forward hook. The base weights are never written, so
the same network is the teacher when the set is `disabled()` (as diffusers' LCM-LoRA script does with
peft's `disable_adapter`) and the student when enabled. `up` starts at zero: the student starts as the teacher.

The branch runs in the dtype of the layer's input, with float32 master weights: a half-precision base model
trains its LoRA in float32. `lora_state_dict()` writes kohya keys on LDM names
(`lora_unet_<name with _>.lora_down.weight / .lora_up.weight / .alpha`), which ComfyUI core, A1111/Forge and
this pack's loader all read with zero missed keys.
"""
import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

KOHYA_UNET_PREFIX = "lora_unet_"
# The trained LoRA's shape by default (with DistillConfig's field defaults, the pack's training defaults: the
# PCM Distillation node's widgets and the CLI's options read them).
DEFAULT_RANK = 16
DEFAULT_ALPHA = 16.0


def lora_targets(root: nn.Module, under=None):
    """Names of the Linear / (non-grouped) Conv2d layers of `root`, optionally only those inside `under` prefixes."""
    names = []
    for name, module in root.named_modules():
        if under is not None and not any(name == p or name.startswith(p + ".") for p in under):
            continue
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
            names.append(name)
    return names


class LoraBranch(nn.Module):
    """down: in → rank (same kernel/stride/padding as the base conv), up: rank → out (1×1); zero-initialised up."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator=None):
        super().__init__()
        if isinstance(base, nn.Linear):
            fan_in, fan_out, kernel = base.in_features, base.out_features, ()
        else:
            fan_in, fan_out, kernel = base.in_channels, base.out_channels, tuple(base.kernel_size)
        self.is_conv = isinstance(base, nn.Conv2d)
        self.conv_args = dict(stride=base.stride, padding=base.padding, dilation=base.dilation) if self.is_conv else {}
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        self.down = nn.Parameter(torch.empty((rank, fan_in) + kernel))
        self.up = nn.Parameter(torch.zeros((fan_out, rank) + ((1, 1) if self.is_conv else ())))
        bound = 1.0 / math.sqrt(fan_in * math.prod(kernel))  # kaiming-uniform(a=√5) bound, as nn.Linear/peft
        with torch.no_grad():
            self.down.uniform_(-bound, bound, generator=generator)

    def forward(self, x):
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if self.is_conv:
            return F.conv2d(F.conv2d(x, down, **self.conv_args), up) * self.scale
        return F.linear(F.linear(x, down), up) * self.scale


class LoraSet(nn.Module):
    """Trainable LoRA branches on `root`'s layers `names`; `enabled` switches all of them at once."""

    def __init__(self, root: nn.Module, names, rank: int, alpha: float, seed: int = 0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}.")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"LoRA alpha must be a positive number (the scale is alpha/rank), got {alpha}.")
        if not names:
            raise ValueError("No layers to train: the LoRA target list is empty.")
        modules = dict(root.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"LoRA targets not found in the model: {missing[:5]}")
        generator = torch.Generator().manual_seed(seed)
        # The base network is frozen while the set is attached: no gradients (or their memory) for its weights.
        self._frozen = [(q, q.requires_grad) for q in root.parameters()]
        for q, _ in self._frozen:
            q.requires_grad_(False)
        self.names = list(names)
        self.branches = nn.ModuleDict()
        self.enabled = True
        self._handles = []
        for name in self.names:
            base = modules[name]
            branch = LoraBranch(base, rank, alpha, generator)
            param = next(base.parameters(), None)
            if param is not None:
                branch.to(param.device)
            self.branches[self._key(name)] = branch
            self._handles.append(base.register_forward_hook(self._hook(branch)))

    @staticmethod
    def _key(name):
        return name.replace(".", "__")

    def _hook(self, branch):
        def add_branch(module, args, output):
            if not self.enabled:
                return None
            return output + branch(args[0]).to(output.dtype)
        return add_branch

    @contextlib.contextmanager
    def disabled(self):
        """The base network (the teacher) for the duration of the block."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def remove(self):
        """Take the hooks off the base network (it is the plain teacher again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for q, flag in self._frozen:
            q.requires_grad_(flag)
        self._frozen = []

    def items(self):
        return [(name, self.branches[self._key(name)]) for name in self.names]

    def lora_state_dict(self, dtype=torch.float32):
        """kohya keys on LDM names, with `.alpha` so every reader applies alpha/rank."""
        out = {}
        for name, branch in self.items():
            key = KOHYA_UNET_PREFIX + name.replace(".", "_")
            out[key + ".lora_down.weight"] = branch.down.detach().to("cpu", dtype).contiguous()
            out[key + ".lora_up.weight"] = branch.up.detach().to("cpu", dtype).contiguous()
            out[key + ".alpha"] = torch.tensor(branch.alpha, dtype=dtype)
        return out

    def load_lora_state_dict(self, tensors):
        """Inverse of `lora_state_dict` (for resume): shapes and alphas must match this set."""
        with torch.no_grad():
            for name, branch in self.items():
                key = KOHYA_UNET_PREFIX + name.replace(".", "_")
                for part, param in (("lora_down", branch.down), ("lora_up", branch.up)):
                    value = tensors.get(f"{key}.{part}.weight")
                    if value is None or tuple(value.shape) != tuple(param.shape):
                        raise ValueError(f"checkpoint does not fit this LoRA at {key}.{part} "
                                         f"(expected shape {tuple(param.shape)}; rank or model changed?)")
                    param.copy_(value)
