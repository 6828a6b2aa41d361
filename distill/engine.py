"""The distillation loop: phased consistency distillation of a LoRA, with callables for the model.

`Distiller(config, denoise, lora, data, model_sampling)` trains the LoRA branches of `lora` (a `LoraSet` hooked
onto the network behind `denoise(x, σ[B], cond) -> D`); `model_sampling` is the model's (ComfyUI's object, or a
stand-in with the same `sigmas` table, `noise_scaling` and `calculate_input`): the engine noises, steps and jumps
through its forward process exactly as the samplers do (`samplers.forward_process`), ε, v and flow alike. The
teacher is the same network with the LoRA off and the target is the student under stop-grad (or its EMA), so the
base weights exist once in memory.

`config.method` picks the target computation inside the one loop (distill/phased_loss.py): "pcm" (phases),
"tcd" (an end point s drawn per sample below the teacher's next point), or "tscd" (Hyper-SD's stages: PCM with the
first number of segments, then fewer segments with the previous stage's frozen LoRA as the solver). The TSCD stage
schedule lives here: `_enter_stage` freezes the LoRA of the stage that ends, and the state records the stage and
those frozen weights, so a run resumes exactly across stage boundaries.

Every random draw (samples, grid indices, guidance w, noise, empty-prompt dropout) comes from one CPU
generator seeded by `config.seed` and is made for the whole global batch, so a run is reproducible on any
device and a data-parallel run (torch.distributed: each rank takes its slice of the global batch, gradients are
averaged with all_reduce) trains on the same global batches as one process. The generator's state is part of
the training state, so a resumed run continues exactly where an uninterrupted one would be.

What data parallelism guarantees is the same loss and the same averaged gradient up to float rounding (a batch
of 4 and two batches of 2 sum in different orders); AdamW's first steps turn rounding-level differences on
near-zero gradients into ±lr moves, so trained weights need not agree to the bit. `virtual_ranks=N` computes N
ranks' slices in one process, one after the other, and sums their gradients in the all-reduce's order: with
N = 2 it matches a 2-process run bit for bit, which is how the tests check the data-parallel path.
"""
import contextlib
import json
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist

from ..samplers.forward_process import forward_noise
from ..schedulers.pcm import check_phases
from .lora import LoraSet
from .phased_loss import (jump_solver, pcm_samples, phased_distance, sample_phased_targets, sample_segment_targets,
                          sample_tcd_targets)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CFG_MODES = ("small", "normal")
METHODS = ("pcm", "tscd", "tcd")  # docs/algorithms.md: PCM, Hyper-SD's TSCD, TCD
TSCD_SOLVERS = ("previous", "teacher")  # a later TSCD stage's solver: the previous stage's LoRA, or the CFG teacher
MAX_GUIDANCE_W = 30.0  # teacher guidance w of the CFG-augmented mode: ComfyUI CFG 1 + w up to 31
MAX_FP16_SKIPS = 20  # consecutive overflowing fp16 steps before the run is called diverged


class DistillDiverged(RuntimeError):
    """The loss or the gradients became NaN/Inf; the LoRA still holds the weights of the last good step."""


def _comma_ints(text, what):
    """[int, ...] of a comma list such as "8,4,2,1"; ValueError "<what>, got <text>." when it is not one."""
    try:
        return [int(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise ValueError(f"{what}, got {text!r}.") from None


@dataclass
class DistillConfig:
    """The training settings. Its field defaults are the pack's training defaults: the PCM Distillation node's
    widgets and the CLI's options (host/distill_cli.py) read them, so the three cannot differ."""
    phases: int = 4                 # M; 1 is the consistency-model (LCM-style) baseline
    ddim_timesteps: int = 50        # K, the teacher's DDIM grid
    steps: int = 500                # optimiser steps
    batch_size: int = 2             # global batch per micro-step (split over data-parallel ranks)
    grad_accumulation: int = 1      # micro-steps per optimiser step
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    grad_clip: float = 1.0          # 0 disables clipping
    cfg_mode: str = "small"         # "small": CFG-augmented teacher, w ~ U[w_min, w_max]; "normal": CFG solver off
    w_min: float = 4.0              # teacher guidance range; ComfyUI cfg = 1 + w
    w_max: float = 5.0
    empty_prompt_prob: float = 0.1  # "normal" mode: share of samples trained on the empty prompt
    huber_c: float = 0.001
    precision: str = "bf16"         # autocast dtype of the forwards: fp32, bf16, or fp16 (with a gradient scaler)
    ema_decay: float = 0.0          # 0: the target is the student itself (the reference LoRA setting)
    adversarial_weight: float = 0.0  # weight of the adversarial G loss (reference 0.1); 0 = off
    seed: int = 0
    deterministic: bool = False     # torch.use_deterministic_algorithms during training
    method: str = "pcm"             # "pcm" (phases above), "tscd" (the stages below) or "tcd" (any end point s)
    tscd_segments: str = "8,4,2,1"  # tscd: segments per stage, each dividing the one before; stage 1 is PCM with
                                    # phases = the first number
    tscd_stage_steps: str = ""      # tscd: optimiser steps per stage ("250,250,250,250", summing to steps); "" splits
                                    # steps evenly (earlier stages take the remainder)
    tscd_solver: str = "previous"   # tscd, stages 2+: x_n from the previous stage's frozen LoRA ("previous") or the
                                    # CFG teacher's DDIM step ("teacher": PCM with the fewer segments, from its weights)

    def segments(self):
        """The TSCD stages' segment counts, as integers (ValueError naming the setting when malformed)."""
        return _comma_ints(self.tscd_segments, "tscd_segments must be a comma list of whole numbers such as 8,4,2,1")

    def stage_steps(self):
        """Optimiser steps of each TSCD stage (a list as long as `segments()`)."""
        stages = len(self.segments())
        if not self.tscd_stage_steps.strip():
            return [self.steps // stages + (1 if i < self.steps % stages else 0) for i in range(stages)]
        return _comma_ints(self.tscd_stage_steps,
                           "tscd_stage_steps must be a comma list of whole numbers (steps per stage) or empty")

    def stage_at(self, step):
        """The 0-based TSCD stage that trains optimiser step `step` + 1 (the last stage once training is over);
        0 for the other methods."""
        if self.method != "tscd":
            return 0
        end = 0
        for stage, count in enumerate(self.stage_steps()):
            end += count
            if step < end:
                return stage
        return len(self.stage_steps()) - 1

    def trained_segments(self, steps):
        """Segments (phases) of the LoRA after `steps` optimiser steps: the stage that made those weights (TSCD),
        the phases (PCM), 1 for TCD (it jumps to any end point: the unified preset)."""
        if self.method == "tscd":
            return self.segments()[self.stage_at(max(steps - 1, 0))]
        return 1 if self.method == "tcd" else self.phases

    def _check_tscd(self):
        segments = self.segments()
        if not segments or any(m < 1 for m in segments):
            raise ValueError(f"tscd_segments must list at least one stage, each with at least 1 segment, got "
                             f"{self.tscd_segments!r}.")
        for m in segments:
            check_phases(m, self.ddim_timesteps)
        for before, now in zip(segments, segments[1:]):
            if now >= before or before % now:
                raise ValueError(f"tscd_segments must shrink, each dividing the one before (8,4,2,1), so that a stage's "
                                 f"segment edges are edges of the stage before: {now} after {before} in "
                                 f"{self.tscd_segments!r}.")
        steps = self.stage_steps()
        if len(steps) != len(segments) or any(n < 1 for n in steps):
            raise ValueError(f"tscd_stage_steps needs one count of at least 1 per stage ({len(segments)} stages: "
                             f"{self.tscd_segments}), got {self.tscd_stage_steps!r}; with it empty steps ({self.steps})"
                             " are split evenly and must be at least the number of stages.")
        if sum(steps) != self.steps:
            raise ValueError(f"tscd_stage_steps ({self.tscd_stage_steps}) sum to {sum(steps)}, but steps is "
                             f"{self.steps}: make them agree, or leave tscd_stage_steps empty.")
        if self.tscd_solver not in TSCD_SOLVERS:
            raise ValueError(f"tscd_solver must be one of {TSCD_SOLVERS}, got {self.tscd_solver!r}.")

    def check(self, num_samples=None, world_size=1, adversarial=None):
        """Raise a ValueError naming the bad setting and the fix; `adversarial`: whether a term was given."""
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{item.name} must be a finite number, got {value}.")
        if not 0.0 <= self.huber_c <= 1.0:
            raise ValueError(f"huber_c must be in [0, 1] (0 = L1 distance), got {self.huber_c}.")
        if self.cfg_mode == "small" and self.w_max > MAX_GUIDANCE_W:
            raise ValueError(f"w_max must be at most {MAX_GUIDANCE_W:g} (ComfyUI CFG {1 + MAX_GUIDANCE_W:g}), got "
                             f"{self.w_max}.")
        if self.ddim_timesteps < 1 or self.ddim_timesteps > 1000:
            raise ValueError(f"ddim_timesteps (K) must be in 1..1000, got {self.ddim_timesteps}.")
        check_phases(self.phases, self.ddim_timesteps)
        for name in ("steps", "batch_size", "grad_accumulation"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}.")
        if self.method == "tscd":
            self._check_tscd()
        if self.cfg_mode not in CFG_MODES:
            raise ValueError(f"cfg_mode must be one of {CFG_MODES}, got {self.cfg_mode!r}.")
        if self.cfg_mode == "small" and not 0.0 <= self.w_min <= self.w_max:
            raise ValueError(f"need 0 ≤ w_min ≤ w_max, got w_min {self.w_min}, w_max {self.w_max}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}.")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}.")
        if num_samples is not None:
            if num_samples < 1:
                raise ValueError("The training data is empty: connect at least one latent.")
            if self.batch_size > num_samples:
                raise ValueError(f"batch_size ({self.batch_size}) is larger than the data ({num_samples} latents): "
                                 "lower batch_size or add latents.")
        if self.batch_size % world_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by the number of processes "
                             f"({world_size}).")
        if not (self.adversarial_weight >= 0 and math.isfinite(self.adversarial_weight)):
            raise ValueError(f"adversarial_weight must be 0 (off) or positive, got {self.adversarial_weight}.")
        if adversarial is not None and adversarial != (self.adversarial_weight > 0):
            if adversarial:
                raise ValueError("An adversarial term was given but adversarial_weight is 0: set adversarial_weight "
                                 "(the reference uses 0.1) or leave the term out.")
            raise ValueError(f"adversarial_weight is {self.adversarial_weight} but no adversarial term was given: pass "
                             "Distiller(..., adversarial=AdversarialTerm(...)) (discriminator heads on the teacher's "
                             "features) or set adversarial_weight to 0.")

    def to_json(self):
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


def _rows(cond, index):
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: _rows(v, index) for k, v in cond.items()}
    return cond[index] if cond.shape[0] > 1 else cond.expand(len(index), *cond.shape[1:])


def _where_rows(mask, a, b):
    if isinstance(a, dict):
        return {k: _where_rows(mask, a[k], b[k]) for k in a}
    return torch.where(mask.to(a.device).reshape((-1,) + (1,) * (a.ndim - 1)), a, b)


def _to(cond, device):
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: _to(v, device) for k, v in cond.items()}
    return cond.to(device)


class LatentData:
    """Training latents [N, …] with their conditioning: a tensor or a dict of tensors with N rows (one per latent)
    or 1 row (shared); `uncond` (1 or N rows) is the empty prompt, needed for small-CFG and empty-prompt dropout."""

    def __init__(self, latents, cond, uncond=None):
        self.latents = latents
        self.cond, self.uncond = cond, uncond
        for name, c in (("cond", cond), ("uncond", uncond)):
            for t in (c.values() if isinstance(c, dict) else [c]) if c is not None else []:
                if t.shape[0] not in (1, len(latents)):
                    raise ValueError(f"{name} has {t.shape[0]} rows for {len(latents)} latents: give one row per "
                                     "latent or a single shared one.")

    def __len__(self):
        return len(self.latents)

    def batch(self, index, empty):
        x0 = self.latents[index]
        cond, uncond = _rows(self.cond, index), _rows(self.uncond, index)
        if empty.any():
            cond = _where_rows(empty, uncond, cond)
        return x0, cond, uncond


@dataclass
class Draw:
    """Everything random about one micro-batch (global, identical on every rank)."""
    index: torch.Tensor
    grid_index: torch.Tensor
    w: torch.Tensor
    noise: torch.Tensor
    empty: torch.Tensor
    adv_offset: torch.Tensor = None      # adversarial term only: t' − e, uniform in 0 .. T/M − 1
    adv_noise_fake: torch.Tensor = None  # fresh noise carrying pred from σ_e to σ_t'
    adv_noise_real: torch.Tensor = None  # fresh noise carrying the target from σ_e to σ_t'
    end_index: torch.Tensor = None       # TCD only: the end point's grid index i, uniform in 0..j

    def slice(self, start, stop):
        values = (getattr(self, f.name) for f in fields(self))
        return Draw(*(v if v is None else v[start:stop] for v in values))


@contextlib.contextmanager
def deterministic_algorithms(enabled):
    before = torch.are_deterministic_algorithms_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


class GradientCheckpointing:
    """Recompute `modules`' activations in backward instead of storing them (non-reentrant checkpoint).

    Pass the `lora` set when the adversarial term is on: its G loss back-propagates through the teacher (LoRA off),
    and the recomputation in backward must see the LoRA switched as it was in the forward.
    """

    def __init__(self, modules, lora=None):
        from torch.utils.checkpoint import checkpoint

        self.lora = lora
        self.patched = []
        for module in modules:
            forward = module.forward

            def checkpointed(*args, _forward=forward, **kwargs):
                if not torch.is_grad_enabled():
                    return _forward(*args, **kwargs)
                if self.lora is not None:
                    kwargs["context_fn"] = self._lora_as_now
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            module.forward = checkpointed
            self.patched.append(module)

    def _lora_as_now(self):
        """(forward context, recomputation context): the recomputation switches the LoRA as it is now."""
        enabled, lora = self.lora.enabled, self.lora

        @contextlib.contextmanager
        def switched():
            before, lora.enabled = lora.enabled, enabled
            try:
                yield
            finally:
                lora.enabled = before
        return contextlib.nullcontext(), switched()

    def remove(self):
        for module in self.patched:
            del module.forward  # back to the class's forward
        self.patched = []


class Distiller:
    def __init__(self, config: DistillConfig, denoise, lora: LoraSet, data: LatentData, model_sampling, device=None,
                 adversarial=None, virtual_ranks=1):
        """adversarial: an `AdversarialTerm` (discriminator heads on the teacher's features), with
        config.adversarial_weight > 0; None with the weight 0. virtual_ranks: compute that many data-parallel
        ranks in this one process (see the module docstring); not with torch.distributed."""
        processes = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if virtual_ranks < 1 or (virtual_ranks > 1 and processes > 1):
            raise ValueError(f"virtual_ranks must be 1 under torch.distributed ({processes} processes) and at least 1 "
                             f"otherwise, got {virtual_ranks}.")
        self.processes = processes
        self.world_size = processes * virtual_ranks
        self.rank = dist.get_rank() if processes > 1 else 0
        self.local_ranks = [self.rank] if processes > 1 else list(range(virtual_ranks))
        config.check(len(data), self.world_size, adversarial is not None)
        if config.cfg_mode == "small" and config.w_max > 0 and data.uncond is None:
            raise ValueError("small-CFG distillation needs the empty-prompt conditioning (uncond) for the teacher's "
                             "guidance; connect it, or set cfg_mode to normal, or w_min = w_max = 0.")
        if config.cfg_mode == "normal" and config.empty_prompt_prob > 0 and data.uncond is None:
            raise ValueError("normal-CFG distillation drops prompts to the empty prompt; connect its conditioning "
                             "(uncond) or set empty_prompt_prob to 0.")
        self.config, self.denoise, self.lora, self.data = config, denoise, lora, data
        self.device = torch.device(device) if device is not None else data.latents.device
        # float32 maths (master weights, loss) whatever the forwards' precision; float64 latents (and a float64
        # network and LoRA) run the whole step in float64, which the tests use to see past float32 rounding
        self.dtype = torch.promote_types(data.latents.dtype, torch.float32)
        self.model_sampling = model_sampling
        self.sigmas = model_sampling.sigmas.detach().to(self.device, self.dtype).clone()  # indexed by timestep
        self.params = [p for p in lora.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.ema = [p.detach().clone() for p in self.params] if config.ema_decay > 0 else None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.adversarial = adversarial.to(self.device) if adversarial is not None else None
        self._adv_micro = None  # this micro-step's [G loss, D loss]
        self._adv_step_losses = None  # this step's, summed over the micro-steps and this process's ranks
        self.step = 0
        self.losses = []
        self.fp16_skips = 0
        self.stage = 0          # TSCD: the stage set up (the frozen previous LoRA below is that of stage − 1)
        self.previous = None    # TSCD, stages 2+ with the "previous" solver: the last stage's LoRA weights, frozen

    # ----- one optimiser step -----
    def draw(self):
        c, n, g = self.config, len(self.data), self.generator
        b = c.batch_size
        index = torch.randperm(n, generator=g)[:b]
        grid_index = torch.randint(0, c.ddim_timesteps, (b,), generator=g)
        w = c.w_min + (c.w_max - c.w_min) * torch.rand(b, generator=g, dtype=torch.float64)
        noise = torch.randn((b,) + tuple(self.data.latents.shape[1:]), generator=g)
        empty = torch.rand(b, generator=g) < (c.empty_prompt_prob if c.cfg_mode == "normal" else 0.0)
        torch.rand(b, generator=g)  # once the flip draw: kept so that every seed draws what it always drew
        draw = Draw(index, grid_index, w.float(), noise, empty)
        if self.adversarial is not None:
            # after the draws above, so that the switch off consumes the generator exactly as before
            draw.adv_offset = torch.randint(0, max(len(self.sigmas) // self._segments(), 1), (b,), generator=g)
            draw.adv_noise_fake = torch.randn(noise.shape, generator=g)
            draw.adv_noise_real = torch.randn(noise.shape, generator=g)
        if c.method == "tcd":  # last: PCM and TSCD runs draw exactly what they always drew
            draw.end_index = (torch.rand(b, generator=g, dtype=torch.float64) * (grid_index + 1)).floor().long()
        return draw

    def _segments(self):
        """The number of segments the student jumps across now: PCM's phases, the TSCD stage's, TCD's K."""
        c = self.config
        return {"pcm": c.phases, "tcd": c.ddim_timesteps}.get(c.method) or c.segments()[self.stage]

    def _enter_stage(self):
        """TSCD: move to the stage of the next step; the stage that ends leaves its LoRA, frozen, as the solver."""
        c = self.config
        while self.stage < c.stage_at(self.step):
            if c.tscd_solver == "previous":
                self.previous = [p.detach().clone() for p in self.params]
            self.stage += 1

    def previous_stage(self, x, sigma, cond):
        """The previous TSCD stage's student: the network with the frozen LoRA of that stage."""
        with self._swapped_weights(self.previous):
            return self.denoise(x, sigma, cond)

    def _targets(self, mine):
        c, n = self.config, len(self.sigmas)
        if c.method == "tcd":
            return sample_tcd_targets(mine.grid_index, mine.end_index, c.ddim_timesteps, n), None
        if c.method == "pcm":
            return sample_phased_targets(mine.grid_index, c.phases, c.ddim_timesteps, n), None
        segments = c.segments()
        if self.stage == 0 or c.tscd_solver == "teacher":  # PCM with this stage's segments, the CFG teacher's step
            return sample_phased_targets(mine.grid_index, segments[self.stage], c.ddim_timesteps, n), None
        targets = sample_segment_targets(mine.grid_index, segments[self.stage - 1], segments[self.stage],
                                         c.ddim_timesteps, n)
        return targets, jump_solver(self.previous_stage, self.model_sampling)

    def student(self, x, sigma, cond):
        return self.denoise(x, sigma, cond)

    def teacher(self, x, sigma, cond):
        with self.lora.disabled():
            return self.denoise(x, sigma, cond)

    def target(self, x, sigma, cond):
        if self.ema is None:
            return self.denoise(x, sigma, cond)
        with self._swapped_weights(self.ema):
            return self.denoise(x, sigma, cond)

    @contextlib.contextmanager
    def _swapped_weights(self, values):
        """The LoRA with `values` (EMA, or the previous TSCD stage's) in place of its weights for the block."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, values):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def micro_loss(self, draw: Draw, rank=None):
        """A rank's mean loss over its slice of one global micro-batch (with the adversarial term: plus its
        weighted G loss, and the discriminator's gradients accumulate in its heads). Default: this process's rank."""
        c = self.config
        rank = self.rank if rank is None else rank
        per_rank = c.batch_size // self.world_size
        mine = draw.slice(rank * per_rank, (rank + 1) * per_rank)
        x0, cond, uncond = self.data.batch(mine.index, mine.empty)
        x0 = x0.to(self.device, self.dtype)
        cond, uncond = _to(cond, self.device), _to(uncond, self.device)
        guided = c.cfg_mode == "small" and c.w_max > 0
        targets, solver = self._targets(mine)
        targets = type(targets)(*(t.to(self.device) for t in (targets.t, targets.t_next, targets.edge,
                                                                  targets.starts_phase)))
        autocast = PRECISIONS[c.precision]
        with torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
            samples = pcm_samples(self.student, self.teacher, self.model_sampling, x0, mine.noise.to(self.device), cond,
                                  uncond if guided else None, self.sigmas, targets, mine.w.to(self.device),
                                  target_model=self.target, solver=solver)
        loss = phased_distance(self.model_sampling, samples, c.huber_c).to(self.dtype).mean()
        if self.adversarial is not None:
            loss = loss + c.adversarial_weight * self._adversarial(mine, targets, samples, cond)
        return loss

    def _adversarial(self, mine, targets, samples, cond):
        """The G loss of this rank's slice; runs the discriminator's backward (detached samples) on the way."""
        adv = self.adversarial
        shape = samples.sigma_edge.shape
        t_adv = (targets.edge + mine.adv_offset.to(self.device)).clamp_max(len(self.sigmas) - 1)
        s_adv = self.sigmas[t_adv]
        ms, s_e, s_to = self.model_sampling, samples.sigma_edge, s_adv.reshape(shape)
        fake = forward_noise(ms, samples.pred, s_e, s_to, mine.adv_noise_fake.to(self.device))
        real = forward_noise(ms, samples.target, s_e, s_to, mine.adv_noise_real.to(self.device))
        c = self.config
        autocast = PRECISIONS[c.precision]
        with torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None), self.lora.disabled():
            fake_features = adv.features(fake, s_adv, cond)  # the teacher's; gradients flow back into pred
            with torch.no_grad():
                real_features = adv.features(real, s_adv, cond)
        g_loss = adv.g_loss(fake_features)
        d_loss = adv.d_loss(real_features, fake_features)
        (d_loss / c.grad_accumulation).backward()
        self._adv_micro = torch.stack([g_loss.detach(), d_loss.detach()])
        return g_loss

    def _all_reduce_mean(self, tensor):
        """Sum over processes (all_reduce), then divide by the world size (processes × virtual ranks)."""
        if self.processes > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        if self.world_size > 1:
            tensor /= self.world_size
        return tensor

    def _trained_params(self):
        return self.params + (self.adversarial.params if self.adversarial is not None else [])

    def _set_learning_rate(self):
        c = self.config
        lr = c.learning_rate * min(1.0, (self.step + 1) / c.warmup_steps) if c.warmup_steps else c.learning_rate
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _rank_gradients(self, draws, rank):
        """Backward of one rank's slices of the step's micro-batches; gradients accumulate in .grad.
        Returns the rank's loss and [G, D] losses, each the mean over the micro-batches."""
        c = self.config
        total, adv_total = torch.zeros((), device=self.device, dtype=self.dtype), torch.zeros(2, device=self.device)
        for draw in draws:
            loss = self.micro_loss(draw, rank) / c.grad_accumulation
            self.scaler.scale(loss).backward()
            total += loss.detach()
            if self.adversarial is not None:
                adv_total += self._adv_micro / c.grad_accumulation
        return total, adv_total

    def _local_gradients(self, draws):
        """This process's ranks' gradients in .grad, summed in rank order as the all-reduce sums them, and their
        summed losses."""
        if len(self.local_ranks) == 1:
            return self._rank_gradients(draws, self.local_ranks[0])
        params, sums = self._trained_params(), None
        for rank in self.local_ranks:
            for p in params:
                p.grad = None
            rank_total, rank_adv = self._rank_gradients(draws, rank)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            if sums is None:
                sums, total, adv_total = grads, rank_total, rank_adv
            else:
                for s, g in zip(sums, grads):
                    s += g
                total, adv_total = total + rank_total, adv_total + rank_adv
        for p, s in zip(params, sums):
            p.grad = s
        return total, adv_total

    def gradients(self):
        """Draw one step's micro-batches and leave the LoRA's averaged (all-reduced) gradients in .grad, before
        clipping and the optimiser: what data parallelism must reproduce. Returns the averaged loss."""
        c, params = self.config, self._trained_params()
        for p in params:
            p.grad = None
        self._enter_stage()
        rng = self.generator.get_state()
        try:
            with deterministic_algorithms(c.deterministic):
                draws = [self.draw() for _ in range(c.grad_accumulation)]  # the only reads of the generator
                total, self._adv_step_losses = self._local_gradients(draws)
        except BaseException:
            # Stopped inside the step (the host's Cancel raises from any layer, out of memory): nothing was updated,
            # and the draws are put back, so the saved state resumes exactly as if the step never started.
            self.generator.set_state(rng)
            for p in params:
                p.grad = None
            raise
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for p in self.params:
            self._all_reduce_mean(p.grad)
        return float(self._all_reduce_mean(total))

    def _clip(self):
        """Clip the LoRA's (and the heads') gradients; the total norm, NaN/Inf when they are not finite."""
        c = self.config
        norm = torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip if c.grad_clip > 0 else float("inf"))
        if self.adversarial is not None:  # the heads' gradients: averaged over ranks, clipped; NaN stops alike
            norm = norm + self.adversarial.reduce_and_clip(c.grad_clip, self._all_reduce_mean).to(norm.device)
        return norm

    def _check_loss(self, total):
        if not math.isfinite(total):
            raise DistillDiverged(f"The distillation loss became {total} at step {self.step + 1}; the LoRA keeps the "
                                  f"weights of step {self.step}. Lower the learning rate, or use bf16/fp32 instead of "
                                  "fp16.")

    def _check_norm(self, norm):
        """fp16: a non-finite norm skips the update (the scaler lowers its scale), up to MAX_FP16_SKIPS in a row."""
        if torch.isfinite(norm):
            self.fp16_skips = 0
            return
        if self.config.precision != "fp16":
            raise DistillDiverged(f"The gradients became NaN/Inf at step {self.step + 1}; the LoRA keeps the "
                                  f"weights of step {self.step}. Lower the learning rate or the w range.")
        self.fp16_skips += 1
        if self.fp16_skips > MAX_FP16_SKIPS:
            raise DistillDiverged(f"fp16 gradients overflowed {self.fp16_skips} steps in a row (step "
                                  f"{self.step + 1}); the LoRA keeps the last good weights. Use bf16 or fp32.")

    def _update_ema(self):
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema, self.params):
                    e.lerp_(p.detach(), 1.0 - self.config.ema_decay)

    def train_step(self) -> float:
        """One optimiser step (grad_accumulation micro-batches); returns its loss averaged over the global batch.

        Raises DistillDiverged, before the optimiser touches the weights, when the loss or gradients are NaN/Inf.
        """
        self._set_learning_rate()
        total = self.gradients()
        self._check_loss(total)
        self.scaler.unscale_(self.optimizer)
        self._check_norm(self._clip())
        self.scaler.step(self.optimizer)  # skips the update when fp16 gradients overflowed
        self.scaler.update()
        if self.adversarial is not None:
            self.adversarial.step()  # skipped by itself when its gradients are not finite
            self.adversarial.history.append(self._all_reduce_mean(self._adv_step_losses).tolist())
        self._update_ema()
        self.step += 1
        self.losses.append(total)
        return total

    # ----- resumable state: tensors + JSON metadata, no pickle -----
    def state(self):
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.params)}
        for i, p in enumerate(self.params):
            for name, value in self.optimizer.state.get(p, {}).items():
                tensors[f"optim.{i}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
        if self.ema is not None:
            tensors.update({f"ema.{i}": e.cpu().contiguous() for i, e in enumerate(self.ema)})
        tensors["rng"] = self.generator.get_state()
        tensors["losses"] = torch.tensor(self.losses, dtype=torch.float64)
        meta = {"step": str(self.step), "config": self.config.to_json(), "fp16_skips": str(self.fp16_skips),
                "scaler": json.dumps(self.scaler.state_dict() if self.scaler.is_enabled() else {})}
        if self.config.method == "tscd":
            meta["stage"] = str(self.stage)
            if self.previous is not None:
                tensors.update({f"previous.{i}": v.cpu().contiguous() for i, v in enumerate(self.previous)})
        if self.adversarial is not None:
            adv_tensors, adv_meta = self.adversarial.state()
            tensors.update(adv_tensors)
            meta.update(adv_meta)
        return tensors, meta

    def load_state(self, tensors, meta):
        saved = DistillConfig.from_json(meta["config"])
        differs = [f.name for f in fields(DistillConfig)
                   if f.name != "steps" and getattr(saved, f.name) != getattr(self.config, f.name)]
        if differs:
            raise ValueError("Cannot resume: the checkpoint was trained with other settings ("
                             + ", ".join(f"{n} {getattr(saved, n)!r} → {getattr(self.config, n)!r}" for n in differs)
                             + "). Use the same settings, or start a new output name.")
        if sum(1 for k in tensors if k.startswith("param.")) != len(self.params):
            raise ValueError("Cannot resume: the checkpoint's LoRA has a different number of layers (model or rank "
                             "changed).")
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if tensors[f"param.{i}"].shape != p.shape:
                    raise ValueError(f"Cannot resume: LoRA tensor {i} has shape {tuple(tensors[f'param.{i}'].shape)}"
                                     f", expected {tuple(p.shape)} (rank or model changed).")
                p.copy_(tensors[f"param.{i}"])
                state = {k.split(".", 2)[2]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"optim.{i}.")}
                if state:
                    state["step"] = state["step"].cpu()  # AdamW keeps its step count on the CPU
                    self.optimizer.state[p] = state
            if self.ema is not None:
                self.ema = [tensors[f"ema.{i}"].to(p.device) for i, p in enumerate(self.params)]
        self._load_stage(tensors, meta)
        if self.adversarial is not None:
            self.adversarial.load_state(tensors, meta)
        self.generator.set_state(tensors["rng"])
        self.losses = tensors["losses"].tolist()
        self.step = int(meta["step"])
        self.fp16_skips = int(meta.get("fp16_skips", 0))
        scaler = json.loads(meta.get("scaler", "{}"))
        if scaler and self.scaler.is_enabled():
            self.scaler.load_state_dict(scaler)

    def _load_stage(self, tensors, meta):
        """TSCD: the saved stage and its frozen previous LoRA; the stage must be the one the schedule gives at the
        saved step (or the one before, saved at the step that ends it)."""
        c = self.config
        if c.method != "tscd":
            return
        step, stage = int(meta["step"]), int(meta.get("stage", 0))
        due = c.stage_at(step)
        if stage not in (due, due - 1) or (stage == due - 1 and c.stage_at(step - 1) != stage):
            raise ValueError(f"Cannot resume: the checkpoint is in TSCD stage {stage + 1} at step {step}, but the "
                             f"stage schedule ({c.tscd_segments}, steps {c.stage_steps()}) puts step {step + 1} in "
                             f"stage {due + 1}. Use the steps of the run that wrote it.")
        previous = [tensors.get(f"previous.{i}") for i in range(len(self.params))]
        needed = stage > 0 and c.tscd_solver == "previous"
        if needed and any(v is None for v in previous):
            raise ValueError(f"Cannot resume: the checkpoint is in TSCD stage {stage + 1} but lacks the previous "
                             "stage's LoRA (previous.* tensors).")
        self.stage = stage
        self.previous = [v.to(p.device, p.dtype) for v, p in zip(previous, self.params)] if needed else None
