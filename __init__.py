"""fewstep: few-step sampling (PCM, TCD, LCM, CTM-γ, Hyper-SD) for ComfyUI.

Importing the package touches nothing in ComfyUI; the host calls `comfy_entrypoint()`, which
registers the samplers/schedulers into the dropdowns and returns the pack's V3 nodes.
"""
WEB_DIRECTORY = "./web"


def __getattr__(name):
    # `fewstep.__version__` lives in version.py (the pack's modules read it there). Lazy, like every import in this
    # file: pytest may execute this file as a lone module, where a relative import at the top fails.
    if name == "__version__":
        from .version import __version__

        return __version__
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


async def comfy_entrypoint():
    from .host.output_files import sweep_at_startup
    from .host.registration import register_all
    from .nodes import NODES, FewStepExtension

    register_all(NODES)
    sweep_at_startup()  # temporary files of trainings killed mid-save (host/output_files.py)
    return FewStepExtension()
