"""The pack's dropdown schedulers: each name with its function and the defaults the dropdown entry runs with.

ComfyUI calls a scheduler handler as handler(model_sampling, steps), so an entry's defaults are its function's
own keyword defaults (tests/test_vocabulary.py checks they agree). host/registration.py registers these names and
functions, loras/presets.py accepts these names, and the SIGMAS nodes (nodes/schedulers.py) default their
widgets to these values where they have the same input.
"""
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

from .hyper_sd import HYPER_SD_START, hyper_sd_1step_sigmas
from .lcm import ORIGINAL_STEPS, lcm_sigmas
from .pcm import pcm_sigmas


@dataclass(frozen=True)
class DropdownScheduler:
    function: Callable  # (model_sampling, steps, **defaults) -> σ's
    defaults: Mapping   # keyword defaults of the dropdown entry (= the function's)
    summary: str        # what the dropdown entry gives, as README says it
    node: str           # id of the pack's SIGMAS node that computes the same schedule


SCHEDULERS = MappingProxyType({
    "pcm": DropdownScheduler(pcm_sigmas, MappingProxyType({"phases": None, "ddim_steps": None, "end": "zero"}),
                             "M = N phases, diffusers' trailing spacing", "FewStepPCMScheduler"),
    "lcm": DropdownScheduler(lcm_sigmas, MappingProxyType({"denoise": 1.0, "end": "zero",
                                                           "original_steps": ORIGINAL_STEPS}),
                             f"the {ORIGINAL_STEPS}-point grid", "FewStepLCMScheduler"),
    "hyper_sd_1step": DropdownScheduler(hyper_sd_1step_sigmas, MappingProxyType({"end": "zero"}),
                                        f"from t = {HYPER_SD_START}", "FewStepHyperSD1StepScheduler"),
})
