"""The one module that touches ComfyUI's global sampler/scheduler registries.

Adds the pack's samplers and schedulers to the lists behind KSampler, KSamplerAdvanced,
KSamplerSelect and BasicScheduler. Append-only (the host's lists are shared objects: never rebind),
idempotent, and it leaves alone a name another pack registered first, saying so in the log.
"""
import logging

import comfy.k_diffusion.sampling as k_sampling
import comfy.samplers

from ..samplers import sample_ctm_gamma, sample_pcm, sample_tcd
from ..schedulers import hyper_sd_1step_sigmas, lcm_sigmas, pcm_sigmas

log = logging.getLogger("fewstep")

# Dropdown samplers take their defaults: TCD γ = 0.3 (diffusers' eta default), CTM γ = 0.5.
SAMPLERS = {"pcm": sample_pcm, "tcd": sample_tcd, "ctm_gamma": sample_ctm_gamma}


# ComfyUI calls handler(model_sampling, steps); the schedules take exactly that, with their defaults
# (pcm: M = N phases, trailing; lcm: the 50-point grid; hyper_sd_1step: from t = 800).
SCHEDULERS = {"pcm": pcm_sigmas, "lcm": lcm_sigmas, "hyper_sd_1step": hyper_sd_1step_sigmas}


def register_samplers():
    for name, fn in SAMPLERS.items():
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
    for name, fn in SCHEDULERS.items():
        existing = comfy.samplers.SCHEDULER_HANDLERS.get(name)
        if existing is not None and existing.handler is not fn:
            log.warning("fewstep: scheduler %r is already registered by another pack; keeping theirs. "
                        "Use the fewstep SIGMAS nodes for ours.", name)
            continue
        comfy.samplers.SCHEDULER_HANDLERS[name] = comfy.samplers.SchedulerHandler(fn, use_ms=True)
        if name not in comfy.samplers.SCHEDULER_NAMES:
            comfy.samplers.SCHEDULER_NAMES.append(name)


def register_all():
    register_samplers()
    register_schedulers()
