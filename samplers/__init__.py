"""Few-step samplers in k-diffusion's signature (pure torch; no ComfyUI import)."""
from .ctm import sample_ctm_gamma
from .pcm import sample_pcm
from .tcd import sample_tcd

__all__ = ["sample_pcm", "sample_tcd", "sample_ctm_gamma"]
