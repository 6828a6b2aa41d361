"""Consistency distillation of a LoRA: PCM, TCD and Hyper-SD's TSCD (pure torch; no ComfyUI import).

- `phased_loss`: one training step's loss (phase, TCD end-point and TSCD segment bookkeeping, CFG teacher step or
  the previous TSCD stage as solver, stop-grad target).
- `lora`: LoRA branches hooked onto an existing network (the teacher is the same network with them off).
- `engine`: the training loop (`DistillConfig`, `LatentData`, `Distiller`): method and TSCD stages, precision,
  accumulation,
  checkpointing, NaN guard, resumable state, data parallel over torch.distributed.
- `adversarial`: the optional adversarial term (discriminator heads on frozen teacher features, hinge loss).
- `io`: atomic safetensors files.
- `torchrun`: leaving a torchrun worker cleanly.

`python -m fewstep.distill` runs the headless runner, host/distill_cli.py (it imports ComfyUI; nothing here does):
`__main__` is only run, never imported, and is the one module here that reaches the host.
"""
from .adversarial import AdversarialTerm, DiscriminatorHeads, HookedFeatures
from .engine import DistillConfig, DistillDiverged, Distiller, GradientCheckpointing, LatentData
from .lora import LoraSet, lora_targets
from .phased_loss import PhasedTargets, pcm_loss, pseudo_huber, sample_phased_targets

__all__ = ["AdversarialTerm", "DiscriminatorHeads", "HookedFeatures", "DistillConfig", "DistillDiverged", "Distiller",
           "GradientCheckpointing", "LatentData", "LoraSet", "PhasedTargets", "lora_targets", "pcm_loss", "pseudo_huber", "sample_phased_targets"]
