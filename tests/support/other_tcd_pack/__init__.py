"""Stand-in for licyk/ComfyUI-TCD-Sampler, another custom node pack that registers a `tcd` sampler.

Registers the way that pack's __init__.py does (read at github.com/licyk/ComfyUI-TCD-Sampler, commits 40bd0c7 and
06ec647): at import, once per module (a flag in its sampling module), it sets
comfy.k_diffusion.sampling.sample_tcd and sample_tcd_euler_a to its own functions and appends "tcd" and
"tcd_euler_a" to comfy.samplers.SAMPLER_NAMES (not KSAMPLER_NAMES), without looking at what is there. Its samplers
here are simple stand-ins (tcd_sampling.py); only how and where they are registered imitates the pack.

Host tests copy this folder to <tmp>/custom_nodes/ComfyUI-TCD-Sampler and load it with ComfyUI's own
nodes.load_custom_node, before or after fewstep's registration. Never imported by the pure tests (it needs comfy).
"""
from . import tcd_sampling
from .tcd_sampling import sample_tcd, sample_tcd_euler_a

if not tcd_sampling.INITIALIZED:
    import comfy.k_diffusion.sampling
    import comfy.samplers

    comfy.k_diffusion.sampling.sample_tcd = sample_tcd
    comfy.k_diffusion.sampling.sample_tcd_euler_a = sample_tcd_euler_a
    comfy.samplers.SAMPLER_NAMES.append("tcd")
    comfy.samplers.SAMPLER_NAMES.append("tcd_euler_a")
    tcd_sampling.INITIALIZED = True

NODE_CLASS_MAPPINGS = {}
