"""One distillation job inside the host: a ComfyUI model, latents and conditioning in, a LoRA file out.

Shared by the training node and the headless CLI (`python -m fewstep.distill`). The LoRA branches are hooked
onto the teacher's own modules for the duration of the job (one copy of the base weights) and removed after,
whatever happens. Files: the LoRA under models/loras (written atomically, with the trainer metadata the loader
turns into a preset) and a resumable training state beside it in the output directory; host/output_files.py keeps
them inside their roots, off files the trainer did not write, clean after a kill, and in step with each other.
"""
import dataclasses
import gc
import logging
import pathlib
import time
from typing import Callable, Optional

import torch

from ..distill.adversarial import AdversarialTerm, HookedFeatures
from ..distill.engine import DistillConfig, DistillDiverged, Distiller, GradientCheckpointing, LatentData
from ..distill.io import load_safetensors
from ..distill.lora import LoraSet
from ..loras import presets
from ..version import __version__
from .output_files import TrainingFiles
from .training_model import TrainingModel

log = logging.getLogger("fewstep")


class TrainingInterrupted(Exception):
    """Cancel was pressed; the resumable state and the LoRA so far are saved."""


@dataclasses.dataclass
class TrainJob:
    model: object                     # the teacher ModelPatcher
    latents: torch.Tensor             # LATENT["samples"], N × C × H × W (before the model's latent scaling)
    positive: list                    # CONDITIONING per latent (N entries) or shared (1 entry)
    negative: Optional[list]          # the empty prompt's CONDITIONING (1 entry), or None
    config: DistillConfig
    rank: int
    alpha: float
    lora_path: pathlib.Path           # final LoRA file
    state_path: pathlib.Path          # resumable training state
    gradient_checkpointing: bool = True
    save_every: int = 0
    validate_every: int = 0
    resume: bool = False
    progress: Callable = lambda step, total, loss, eta: None
    interrupted: Callable[[], bool] = lambda: False
    validate: Optional[Callable] = None   # validate(step) with the LoRA live on the model
    writer: bool = True                   # data-parallel runs: only rank 0 writes files
    virtual_ranks: int = 1                # compute that many data-parallel ranks in this process (checks)
    lora_root: Optional[pathlib.Path] = None   # the LoRA stays inside it (node: models/loras; default: its folder)
    state_root: Optional[pathlib.Path] = None  # the state stays inside it (node: output/; default: its folder)


@dataclasses.dataclass
class TrainResult:
    lora_path: pathlib.Path
    state_path: pathlib.Path
    losses: list
    steps: int
    resumed_from: int
    metadata: dict


def lora_metadata(config: DistillConfig, base_arch: str, steps: int, rank: int, alpha: float) -> dict:
    """The fewstep.* keys the Fast LoRA Loader reads back into a sampling preset (loras/presets.py)."""
    method = config.method if config.method != "pcm" else ("lcm" if config.phases == 1 else "pcm")
    tscd = {presets.META_STAGES: ",".join(map(str, config.segments())),
            presets.META_STAGE: str(config.stage_at(max(steps - 1, 0)) + 1)} if config.method == "tscd" else {}
    return {
        presets.META_METHOD: method,
        presets.META_PHASES: str(config.trained_segments(steps)),
        **tscd,
        presets.META_DDIM_TIMESTEPS: str(config.ddim_timesteps),
        presets.META_CFG_MODE: config.cfg_mode,
        presets.META_W_MIN: repr(float(config.w_min)),
        presets.META_W_MAX: repr(float(config.w_max)),
        presets.META_BASE_ARCH: base_arch,
        presets.META_STEPS_TRAINED: str(steps),
        presets.META_VERSION: __version__,
        "fewstep.rank": str(rank), "fewstep.alpha": repr(float(alpha)),
        "fewstep.config": config.to_json(),
    }


def oom_message(job, error):
    c = job.config
    return (f"Out of memory while distilling (batch size {c.batch_size}, latents {tuple(job.latents.shape[1:])}, "
            f"rank {job.rank}, precision {c.precision}, gradient checkpointing "
            f"{'on' if job.gradient_checkpointing else 'off'}). Memory was freed. Lower batch_size (use "
            "grad_accumulation for the same effective batch), turn gradient_checkpointing on, use bf16 or fp16, "
            f"lower the rank, or train on smaller latents. ({str(error).splitlines()[0][:200]})")


def _is_oom(error):
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def run(job: TrainJob) -> TrainResult:
    import comfy.model_management as mm

    config = dataclasses.replace(job.config)
    files = TrainingFiles(job.lora_path, job.state_path, job.lora_root, job.state_root)
    if job.writer:
        files.prepare()  # before anything is loaded: refuse bad destinations, sweep, repair a lagging LoRA
    teacher = TrainingModel(job.model)
    model_sampling = teacher.model_sampling()  # refuses the sampling types the engine cannot train, with the reason
    config.check(len(job.latents))
    arch = teacher.arch
    feature_modules, feature_channels = (teacher.adversarial_features() if config.adversarial_weight > 0
                                         else (None, None))
    with torch.inference_mode(False):
        mm.load_models_gpu([job.model], force_full_load=True)
        base = job.model.model
        latents = base.process_latent_in(job.latents.detach().clone().float())
        positive = teacher.conditioning_batch(job.positive, tuple(latents.shape), "cpu")
        negative = (teacher.conditioning_batch([job.negative], tuple(latents.shape), "cpu")
                    if job.negative is not None else None)
        data = LatentData(latents, positive, negative)
        denoise = teacher.denoiser()  # also frees the weights from inference mode
        lora = LoraSet(base.diffusion_model, teacher.lora_target_names(), job.rank, job.alpha, seed=config.seed)
        checkpointing = GradientCheckpointing(teacher.checkpoint_blocks(), lora=lora) \
            if job.gradient_checkpointing else None
        features = HookedFeatures(denoise, feature_modules) if feature_modules else None
        try:
            adversarial = AdversarialTerm(features, feature_channels, seed=config.seed) if features else None
            distiller = Distiller(config, denoise, lora, data, model_sampling, device=job.model.load_device,
                                  adversarial=adversarial, virtual_ranks=job.virtual_ranks)
            resumed_from = 0
            if job.resume and job.state_path.is_file():
                distiller.load_state(*load_safetensors(job.state_path))
                resumed_from = distiller.step
                log.info("fewstep: resumed %s at step %d", job.state_path, resumed_from)
            return _loop(job, files, config, distiller, lora, arch, resumed_from)
        except BaseException as error:
            if _is_oom(error) and not isinstance(error, (TrainingInterrupted, DistillDiverged)):
                distiller = None
                gc.collect()
                mm.soft_empty_cache(True)
                raise RuntimeError(oom_message(job, error)) from None
            raise
        finally:
            if features is not None:
                features.remove()
            if checkpointing is not None:
                checkpointing.remove()
            lora.remove()


def _save(job, files, distiller, lora, config, arch):
    if not job.writer:
        return
    tensors, meta = distiller.state()
    files.save(tensors, meta, lora.lora_state_dict(), lora_metadata(config, arch, distiller.step, job.rank, job.alpha))


def _one_step(job, files, config, distiller, lora, arch, started, first):
    try:
        loss = distiller.train_step()
    except DistillDiverged as error:
        if distiller.step == 0:  # nothing trained yet: a LoRA of the initial weights would only mislead
            raise DistillDiverged(f"{error} Nothing was trained, so no LoRA was written.") from None
        _save(job, files, distiller, lora, config, arch)  # the optimiser did not step: these are the last good weights
        raise DistillDiverged(f"{error} Saved the last good state ({job.lora_path.name}, step {distiller.step}).") \
            from None
    eta = (time.monotonic() - started) / (distiller.step - first) * (config.steps - distiller.step)
    job.progress(distiller.step, config.steps, loss, eta)
    if job.save_every and distiller.step % job.save_every == 0 and distiller.step < config.steps:
        _save(job, files, distiller, lora, config, arch)
    if job.validate is not None and job.validate_every and distiller.step % job.validate_every == 0 \
            and distiller.step < config.steps:
        with torch.no_grad():
            job.validate(distiller.step)


def _loop(job, files, config, distiller, lora, arch, resumed_from):
    from comfy.model_management import InterruptProcessingException

    started, first = time.monotonic(), distiller.step
    while distiller.step < config.steps:
        try:
            if job.interrupted():
                raise InterruptProcessingException()
            _one_step(job, files, config, distiller, lora, arch, started, first)
        except InterruptProcessingException:
            # Cancel: ComfyUI raises it from inside any layer's forward (comfy.ops) or the progress hook; the
            # interrupted step has changed nothing (the engine puts its draws back), so this state resumes exactly.
            _save(job, files, distiller, lora, config, arch)
            raise TrainingInterrupted(f"Training cancelled at step {distiller.step} of {config.steps}; the LoRA so far "
                                      f"is {job.lora_path.name} and resume = true continues from here.") from None
    _save(job, files, distiller, lora, config, arch)
    return TrainResult(job.lora_path, job.state_path, list(distiller.losses), distiller.step, resumed_from,
                       lora_metadata(config, arch, distiller.step, job.rank, job.alpha))
