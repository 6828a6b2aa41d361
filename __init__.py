"""fewstep: few-step sampling (PCM, TCD, LCM, CTM-γ, Hyper-SD) for ComfyUI.

Importing the package touches nothing in ComfyUI; the host calls `comfy_entrypoint()`, which
registers the samplers/schedulers into the dropdowns and returns the pack's V3 nodes.
"""
__version__ = "0.1.0"

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import FewStepExtension
    from .nodes.registration import register_all

    register_all()
    return FewStepExtension()
