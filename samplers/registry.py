"""The pack's dropdown samplers: each name with its function and the options the dropdown entry runs with.

ComfyUI's KSampler and KSamplerSelect call a dropdown sampler without extra options, so an entry's options are
its function's own keyword defaults (tests/test_vocabulary.py checks they agree). Everything else reads this
table: host/registration.py registers these names and functions, the SAMPLER nodes (nodes/samplers.py) default
their widgets to these options, loras/presets.py accepts these names, the Fast Sampler builds its sampler from
it, and Preset to KSampler Settings says when a preset wants other options than the dropdown's.
"""
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

from . import ctm, tcd
from .pcm import sample_pcm


@dataclass(frozen=True)
class DropdownSampler:
    function: Callable  # k-diffusion signature: (model, x, sigmas, extra_args, callback, disable, **options)
    options: Mapping    # keyword options of the dropdown entry (= the function's defaults)
    node: str           # id of the pack's SAMPLER node that runs this function (never through the dropdown)

    def describe(self):
        """The options as README and notes write them: "γ = 0.3" (empty for none)."""
        return ", ".join(f"{OPTION_SYMBOLS.get(k, k)} = {v:g}" for k, v in self.options.items())


OPTION_SYMBOLS = {"gamma": "γ"}

SAMPLERS = MappingProxyType({
    "pcm": DropdownSampler(sample_pcm, MappingProxyType({}), "FewStepPCMSampler"),
    "tcd": DropdownSampler(tcd.sample_tcd, MappingProxyType({"gamma": tcd.DEFAULT_GAMMA}), "FewStepTCDSampler"),
    "ctm_gamma": DropdownSampler(ctm.sample_ctm_gamma, MappingProxyType({"gamma": ctm.DEFAULT_GAMMA}),
                                 "FewStepCTMGammaSampler"),
})
