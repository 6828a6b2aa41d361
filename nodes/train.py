"""PCM Distillation node: trains a phased-consistency LoRA for the connected model, inside ComfyUI."""
from __future__ import annotations

import logging
import pathlib
import re
import tempfile

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ..distill.engine import (CFG_MODES, MAX_GUIDANCE_W, METHODS, PRECISIONS, TSCD_SOLVERS, DistillConfig,
                              DistillDiverged)
from ..distill.lora import DEFAULT_ALPHA, DEFAULT_RANK
from ..host.input_checks import check_values
from ..host.output_files import refuse_foreign_lora, write_atomic
from ..host.training_model import TrainingModel, encode_prompts
from ..host.training_job import TrainingInterrupted, TrainJob, run
from ..samplers import sample_pcm
from ..schedulers import pcm_sigmas, phases_problem
from .preview import _draw_loss_curve

log = logging.getLogger("fewstep")

VALIDATION_STEPS = (1, 2, 4)
_DEFAULTS = DistillConfig()  # the training defaults: the widgets show DistillConfig's own
# File systems allow 255 bytes per name; the saves add a temporary prefix and suffix, the state a folder per name.
MAX_NAME_CHARS, MAX_PART_CHARS = 200, 100
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+-]*(/[A-Za-z0-9][A-Za-z0-9 _.+-]*)*$")


def _loras_root() -> pathlib.Path:
    """The folder trained LoRAs go to: the first models/loras path."""
    return pathlib.Path(folder_paths.get_folder_paths("loras")[0]).resolve()


def _lora_output_path(output_name: str) -> pathlib.Path:
    """models/loras/<output_name>.safetensors; names that would leave models/loras are refused."""
    name = (output_name or "").strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not NAME_PATTERN.match(name) or ".." in name.split("/"):
        raise ValueError(f"output_name {output_name!r} is not a plain file name inside models/loras: use letters, "
                         "digits, space, _ . + - and optionally sub/folders, no '..' and no absolute path.")
    longest = max(len(part) for part in name.split("/"))
    if len(name) > MAX_NAME_CHARS or longest > MAX_PART_CHARS:
        raise ValueError(f"output_name is {len(name)} characters long (longest part {longest}): keep it to "
                         f"{MAX_NAME_CHARS} characters, each folder or file name to {MAX_PART_CHARS}.")
    root = _loras_root()
    path = (root / (name + ".safetensors")).resolve()
    if root not in path.parents:
        raise ValueError(f"output_name {output_name!r} leaves models/loras.")
    return path


def _check_writable(folder: pathlib.Path):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # nameless where the OS allows (O_TMPFILE): a kill leaves nothing
            pass
    except OSError as error:
        raise ValueError(f"Cannot write the LoRA into {folder} ({error.strerror or error}). Make the folder writable "
                         "or pick another output_name.") from None


def _state_path_for(lora_path: pathlib.Path) -> pathlib.Path:
    relative = lora_path.relative_to(_loras_root()).with_suffix("")
    return pathlib.Path(folder_paths.get_output_directory()) / "fewstep_training" / relative / "state.safetensors"


def _validation_images(model, positive, negative, latent_shape, phases, ddim_timesteps, cfg, seed, vae=None):
    """The pack's `pcm` sampler at 1, 2 and 4 steps on the trained phase edges, from one seeded noise."""
    ms = model.get_model_object("model_sampling")
    latent = torch.zeros(latent_shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    sampler = comfy.samplers.KSAMPLER(sample_pcm)
    rows = []
    for steps in VALIDATION_STEPS:
        sigmas = pcm_sigmas(ms, steps, phases, ddim_timesteps)  # phases ≤ K: checked before training
        samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative or positive, latent,
                                             disable_pbar=True, seed=seed)
        rows.append(vae.decode(samples)[..., :3] if vae is not None
                    else TrainingModel(model).latent_preview_images(samples, model_space=False))
    return torch.cat([r.float().cpu() for r in rows], dim=0)


class FewStepPCMDistill(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepPCMDistill",
            display_name="PCM Distillation (train LoRA)",
            category="training/fewstep",
            is_output_node=True,
            description="Trains a few-step LoRA for the connected model on your latents: phased consistency (PCM, "
                        "the pcm sampler at 1–8 steps), trajectory consistency (TCD, the tcd sampler at any step count) "
                        "or Hyper-SD's segmented stages (TSCD). Writes models/loras/<output_name>.safetensors with "
                        "metadata the Fast LoRA Loader turns into the right sampling preset. Cancel saves a resumable "
                        "state.",
            inputs=[
                io.Model.Input("model", tooltip="The teacher: the model to make fast (SD1.5, SDXL, SD3 or FLUX)."),
                io.Latent.Input("latents", tooltip="Training data: a batch of latents, e.g. VAE Encode of your images."),
                io.String.Input("output_name", default="fewstep_pcm_lora",
                                tooltip="LoRA file name inside models/loras (sub/folders allowed)."),
                io.Int.Input("steps", default=_DEFAULTS.steps, min=1, max=1_000_000, tooltip="Optimiser steps to train."),
                io.Int.Input("phases", default=_DEFAULTS.phases, min=1, max=100,
                             tooltip="PCM phases M: the LoRA samples best at M steps. 1 = one-phase consistency "
                                     "(LCM-style) baseline."),
                io.Int.Input("ddim_timesteps", default=_DEFAULTS.ddim_timesteps, min=1, max=1000,
                             tooltip="K, the teacher's DDIM grid (SD1.5 script 50, SDXL 40). Must be ≥ phases."),
                io.Int.Input("batch_size", default=_DEFAULTS.batch_size, min=1, max=1024, tooltip="Latents per step."),
                io.Int.Input("grad_accumulation", default=_DEFAULTS.grad_accumulation, min=1, max=1024,
                             tooltip="Steps whose gradients are summed before an update (bigger effective batch)."),
                io.Float.Input("learning_rate", default=_DEFAULTS.learning_rate, min=1e-8, max=1.0, step=1e-6, round=1e-8,
                               tooltip="AdamW learning rate of the LoRA."),
                io.Int.Input("rank", default=DEFAULT_RANK, min=1, max=512, tooltip="LoRA rank."),
                io.Float.Input("alpha", default=DEFAULT_ALPHA, min=0.01, max=1024.0, step=0.5,
                               tooltip="LoRA alpha; the LoRA's scale is alpha/rank."),
                io.Combo.Input("cfg_mode", options=list(CFG_MODES), default=_DEFAULTS.cfg_mode,
                               tooltip="small: the teacher's CFG (w in [w_min, w_max]) is distilled in, sample at CFG "
                                       "1–2. normal: CFG solver off with 10 % empty prompts, sample at CFG 2–6."),
                io.Float.Input("w_min", default=_DEFAULTS.w_min, min=0.0, max=MAX_GUIDANCE_W, step=0.1,
                               tooltip="Smallest teacher guidance w (ComfyUI CFG = 1 + w). small mode only."),
                io.Float.Input("w_max", default=_DEFAULTS.w_max, min=0.0, max=MAX_GUIDANCE_W, step=0.1,
                               tooltip="Largest teacher guidance w. small mode only."),
                io.Float.Input("huber_c", default=_DEFAULTS.huber_c, min=0.0, max=1.0, step=0.0001,
                               tooltip="Pseudo-Huber c of the distance (0 = L1 on the samples)."),
                # Explicit: the frontend gives every INT named seed a "control after generate" widget unless the
                # input sets this (the shipped UI workflow stores its value, "fixed", after the seed). web/fewstep.js
                # starts it at "fixed" on a new node: a run is reproducible until the user asks for another seed.
                io.Int.Input("seed", default=_DEFAULTS.seed, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seeds the LoRA's init and every random draw: same seed, same LoRA."),
                io.Combo.Input("precision", options=list(PRECISIONS), default=_DEFAULTS.precision,
                               tooltip="Autocast dtype of the forwards; the LoRA's weights stay float32. fp16 uses a "
                                       "gradient scaler. fp32 on CPU."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in the backward pass: much less memory, ~30 % slower."),
                io.Int.Input("save_every", default=0, min=0, max=1_000_000,
                             tooltip="Also write the LoRA and the resumable state every N steps (0 = only at the end)."),
                io.Int.Input("validate_every", default=0, min=0, max=1_000_000,
                             tooltip="Sample validation images every N steps into output/fewstep_training (0 = only at "
                                     "the end)."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue the saved state of this output_name (weights, optimiser, step, "
                                         "random state). Raise steps to train longer."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Prompt conditioning: one entry per latent, or one shared by all."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="The empty prompt's conditioning (CLIP Text Encode of \"\"), for the "
                                              "teacher's guidance and the empty-prompt dropout."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Instead of positive/negative: encode the prompts below (and the empty prompt)."),
                io.String.Input("prompts", optional=True, multiline=True, default="",
                                tooltip="With clip: one prompt per line, one per latent or a single shared line."),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the validation images (else a latent preview)."),
                io.Int.Input("warmup_steps", default=_DEFAULTS.warmup_steps, min=0, max=1_000_000, optional=True,
                             tooltip="Raise the learning rate linearly over the first N steps (PCM scripts: 500). "
                                     "0 = full rate from the start."),
                io.Float.Input("ema_decay", default=_DEFAULTS.ema_decay, min=0.0, max=0.9999, step=0.0001, round=0.0001, optional=True,
                               tooltip="Target network: an EMA of the LoRA with this decay (e.g. 0.95), or 0 = the "
                                       "student itself under stop-grad (the PCM/LCM-LoRA scripts' setting)."),
                io.Float.Input("adversarial_weight", default=_DEFAULTS.adversarial_weight, min=0.0, max=10.0, step=0.01, optional=True,
                               tooltip="Weight of PCM's optional adversarial loss (reference 0.1): discriminator heads "
                                       "on the frozen teacher's UNet features, hinge loss. 0 = off. SD1.5/SD2/SDXL "
                                       "only; about doubles the step time."),
                io.Combo.Input("method", options=list(METHODS), default=_DEFAULTS.method, optional=True,
                               tooltip="pcm: phased consistency (phases above; 1 = LCM-style). tcd: trajectory "
                                       "consistency, any end point: one LoRA for any step count with the tcd sampler. "
                                       "tscd: Hyper-SD's segmented stages (tscd_segments), ending in the unified "
                                       "1-segment LoRA."),
                io.String.Input("tscd_segments", default=_DEFAULTS.tscd_segments, optional=True,
                                tooltip="tscd: segments per stage, each dividing the one before (8,4,2,1); stage 1 is "
                                        "PCM with the first number."),
                io.String.Input("tscd_stage_steps", default=_DEFAULTS.tscd_stage_steps, optional=True,
                                tooltip="tscd: optimiser steps per stage (e.g. 250,250,250,250, summing to steps); "
                                        "empty = steps split evenly."),
                io.Combo.Input("tscd_solver", options=list(TSCD_SOLVERS), default=_DEFAULTS.tscd_solver, optional=True,
                               tooltip="tscd stages 2+: the previous stage's frozen LoRA supplies the target "
                                       "(previous, Hyper-SD's) or the CFG teacher does (teacher)."),
            ],
            outputs=[
                io.Model.Output(display_name="student", tooltip="The teacher with the trained LoRA applied."),
                io.String.Output(display_name="lora_name", tooltip="The LoRA file, relative to models/loras."),
                io.Image.Output(display_name="loss_curve", tooltip="Loss per optimiser step."),
                io.Image.Output(display_name="validation",
                                tooltip="The student with the pcm sampler at 1, 2 and 4 steps on its phase edges."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    # One input only: ComfyUI repeats a validate_inputs message on every input the function takes and skips its
    # range checks for them. The numbers and the rules between them: cross_checks, run by host/input_checks.py.
    @classmethod
    def validate_inputs(cls, output_name=None):
        if isinstance(output_name, str):
            try:
                refuse_foreign_lora(_lora_output_path(output_name))  # a file not written by the trainer stays
            except ValueError as error:
                return str(error)
        return True

    @classmethod
    def cross_checks(cls, values):
        problems = {}
        if "phases" in values and "ddim_timesteps" in values:
            problem = phases_problem(int(values["phases"]), int(values["ddim_timesteps"]))
            if problem:
                problems["phases"] = problem
        if "w_min" in values and "w_max" in values and values["w_min"] > values["w_max"]:
            problems["w_min"] = (f"w_min ({values['w_min']:g}) is larger than w_max ({values['w_max']:g}): the teacher's "
                                 "guidance is drawn from [w_min, w_max].")
        return problems

    @classmethod
    def execute(cls, model, latents, output_name, steps, phases, ddim_timesteps, batch_size, grad_accumulation,
                learning_rate, rank, alpha, cfg_mode, w_min, w_max, huber_c, seed, precision, gradient_checkpointing,
                save_every, validate_every, resume, positive=None, negative=None, clip=None, prompts="",
                vae=None, warmup_steps=0, ema_decay=0.0, adversarial_weight=0.0, method=_DEFAULTS.method,
                tscd_segments=_DEFAULTS.tscd_segments, tscd_stage_steps=_DEFAULTS.tscd_stage_steps,
                tscd_solver=_DEFAULTS.tscd_solver) -> io.NodeOutput:
        check_values(cls, steps=steps, phases=phases, ddim_timesteps=ddim_timesteps, batch_size=batch_size,
                     grad_accumulation=grad_accumulation, learning_rate=learning_rate, rank=rank, alpha=alpha,
                     w_min=w_min, w_max=w_max, huber_c=huber_c, seed=seed, gradient_checkpointing=gradient_checkpointing,
                     save_every=save_every, validate_every=validate_every, resume=resume, warmup_steps=warmup_steps,
                     ema_decay=ema_decay, adversarial_weight=adversarial_weight)
        samples = latents["samples"] if isinstance(latents, dict) else None
        if samples is None or samples.ndim != 4 or samples.shape[0] == 0:
            raise ValueError("latents is empty: connect a batch of latents (e.g. VAE Encode of your images).")
        positive, negative = cls.conditioning(clip, prompts, positive, negative, len(samples))
        lora_path = _lora_output_path(output_name)
        _check_writable(lora_path.parent)
        state_path = _state_path_for(lora_path)
        if not resume and state_path.is_file():
            log.info("fewstep: resume is off; starting %s from scratch (old state replaced at the first save)",
                     lora_path.name)
        config = DistillConfig(
            phases=phases, ddim_timesteps=ddim_timesteps, steps=steps, batch_size=batch_size,
            grad_accumulation=grad_accumulation, learning_rate=learning_rate, cfg_mode=cfg_mode, w_min=w_min,
            w_max=w_max, huber_c=huber_c, precision=precision, seed=seed % (2 ** 63),
            warmup_steps=warmup_steps, ema_decay=ema_decay, adversarial_weight=adversarial_weight,
            method=method, tscd_segments=tscd_segments, tscd_stage_steps=tscd_stage_steps, tscd_solver=tscd_solver,
            deterministic=True)
        config.check(len(samples))  # before any file is touched: a bad stage list is a clear error, not a crash
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        bar = comfy.utils.ProgressBar(steps)
        validation_cfg = 1.0 if cfg_mode == "small" else 3.0
        val_dir, output_root = state_path.parent, pathlib.Path(folder_paths.get_output_directory())

        def progress(step, total, loss, eta):
            bar.update_absolute(step, total)  # the server's hook raises on Cancel; the job saves before it stops
            text = f"step {step}/{total}  loss {loss:.4g}  ETA {_duration(eta)}"
            log.info("fewstep: %s: %s", lora_path.name, text)
            server = _server()
            if server is not None and node_id is not None:
                server.send_progress_text(text, node_id)
                server.send_sync("fewstep.train", {"node": node_id, "step": step, "total": total, "loss": loss,
                                                   "eta_s": eta}, server.client_id)

        def validate(step):
            images = _validation_images(model, positive[0], negative, (1,) + tuple(samples.shape[1:]),
                                        config.trained_segments(step),
                                        ddim_timesteps, validation_cfg, seed, vae)
            _save_png(images, val_dir / f"validation_step{step:06d}.png", output_root)

        job = TrainJob(model=model, latents=samples, positive=positive, negative=negative, config=config, rank=rank,
                       alpha=alpha, lora_path=lora_path, state_path=state_path,
                       gradient_checkpointing=gradient_checkpointing, save_every=save_every,
                       validate_every=validate_every, resume=resume, progress=progress,
                       interrupted=comfy.model_management.processing_interrupted, validate=validate,
                       lora_root=_loras_root(), state_root=output_root)
        try:
            result = run(job)
        except TrainingInterrupted as stop:
            log.warning("fewstep: %s", stop)
            comfy.model_management.interrupt_current_processing(False)
            raise comfy.model_management.InterruptProcessingException() from None  # the host's "interrupted" status
        except DistillDiverged as error:
            raise RuntimeError(str(error)) from None
        relative = lora_path.relative_to(_loras_root())
        student = TrainingModel(model).student(str(lora_path), relative.as_posix())
        with torch.inference_mode(False), torch.no_grad():
            images = _validation_images(student, positive[0], negative, (1,) + tuple(samples.shape[1:]),
                                        config.trained_segments(result.steps),
                                        ddim_timesteps, validation_cfg, seed, vae)
        curve = torch.from_numpy(np.array(_draw_loss_curve(result.losses, title=f"{relative.as_posix()}: loss per step "
                                                  f"(log scale), {result.steps} steps"))).float()[None] / 255.0
        return io.NodeOutput(student, relative.as_posix(), curve, images)

    @staticmethod
    def conditioning(clip, prompts, positive, negative, n):
        lines = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
        if clip is not None and lines:
            if positive is not None:
                raise ValueError("Connect either positive conditioning or clip + prompts, not both.")
            positive = encode_prompts(clip, lines)
            if negative is None:
                negative = encode_prompts(clip, [""])[0]
        elif positive is None:
            raise ValueError("No prompts: connect positive conditioning (one per latent or one shared), or clip and "
                             "prompts (one per line).")
        else:
            positive = [[entry] for entry in positive]  # each CONDITIONING entry is one latent's prompt
        if len(positive) not in (1, n):
            raise ValueError(f"{len(positive)} prompts for {n} latents: give one per latent or a single shared one.")
        return positive, negative


def _duration(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _server():
    try:
        from server import PromptServer
        return PromptServer.instance
    except (ImportError, AttributeError):
        return None


def _save_png(images, path, root):
    import io as _io

    from PIL import Image

    strip = (images.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    png = _io.BytesIO()
    Image.fromarray(np.concatenate(list(strip), axis=1)).save(png, format="PNG")
    write_atomic(root, path, png.getvalue())  # inside output/, as the state beside it


NODES = [FewStepPCMDistill]
