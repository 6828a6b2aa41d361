"""The one module that touches ComfyUI's global sampler/scheduler registries.

Adds the pack's samplers and schedulers to the lists behind KSampler, KSamplerAdvanced,
KSamplerSelect and BasicScheduler. Append-only (the host's lists are shared objects: never rebind),
idempotent, and it leaves alone a name another pack registered first, saying so in the log. Also hooks the
pack's input screening (host/input_checks.py) into the server's POST /prompt, once.
"""
import logging

import comfy.k_diffusion.sampling as k_sampling
import comfy.samplers

from ..samplers.registry import SAMPLERS
from .input_checks import screen_prompt
from ..schedulers.registry import SCHEDULERS

log = logging.getLogger("fewstep")


# The names, functions and dropdown defaults are samplers/registry.py's and schedulers/registry.py's tables.
def register_samplers():
    for name, entry in SAMPLERS.items():
        fn = entry.function
        attr = "sample_" + name
        existing = getattr(k_sampling, attr, None)
        if existing is not None and existing is not fn:
            log.warning("fewstep: sampler %r is already registered by another pack; keeping theirs. "
                        "Use the fewstep SAMPLER nodes for ours.", name)
            continue
        setattr(k_sampling, attr, fn)
        for names in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES):
            if name not in names:
                names.append(name)


def register_schedulers():
    for name, entry in SCHEDULERS.items():
        fn = entry.function
        existing = comfy.samplers.SCHEDULER_HANDLERS.get(name)
        if existing is not None and existing.handler is not fn:
            log.warning("fewstep: scheduler %r is already registered by another pack; keeping theirs. "
                        "Use the fewstep SIGMAS nodes for ours.", name)
            continue
        comfy.samplers.SCHEDULER_HANDLERS[name] = comfy.samplers.SchedulerHandler(fn, use_ms=True)
        if name not in comfy.samplers.SCHEDULER_NAMES:
            comfy.samplers.SCHEDULER_NAMES.append(name)


def _prompt_server():
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def register_prompt_checks(node_classes):
    """Screen the pack's nodes' widget values on every POST /prompt, before ComfyUI validates the prompt. Without a
    server (ComfyUI used as a library) there is no /prompt; the nodes still check their values in execute()."""
    server = _prompt_server()
    if server is None or any(getattr(h, "fewstep_screen", False) for h in server.on_prompt_handlers):
        return
    by_type = {cls.define_schema().node_id: cls for cls in node_classes}

    def screen(json_data):
        screen_prompt(json_data.get("prompt") if isinstance(json_data, dict) else None, by_type)
        return json_data

    screen.fewstep_screen = True
    server.add_on_prompt_handler(screen)


def register_all(node_classes=()):
    register_samplers()
    register_schedulers()
    register_prompt_checks(node_classes)
