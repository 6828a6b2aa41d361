"""Phased consistency distillation (pure torch; no ComfyUI import). Work in progress: the training loss."""
from .phased_loss import PhasedTargets, pcm_loss, pseudo_huber, sample_phased_targets

__all__ = ["PhasedTargets", "pcm_loss", "pseudo_huber", "sample_phased_targets"]
