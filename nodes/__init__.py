"""The pack's V3 nodes (thin: they translate ComfyUI types and call the pure packages and host/).

Only node classes (each named as its node id) and the extension are public here; a helper only the nodes use is
private (leading underscore). tests/test_layering.py checks both."""
from comfy_api.latest import ComfyExtension, io

from .loras import NODES as LORA_NODES
from .preview import FewStepSchedulePreview
from .samplers import FewStepCTMGammaSampler, FewStepPCMSampler, FewStepTCDSampler
from .schedulers import FewStepHyperSD1StepScheduler, FewStepLCMScheduler, FewStepPCMScheduler
from .train import NODES as TRAIN_NODES

NODES = [FewStepPCMScheduler, FewStepLCMScheduler, FewStepHyperSD1StepScheduler, FewStepTCDSampler, FewStepCTMGammaSampler,
         FewStepPCMSampler, FewStepSchedulePreview, *LORA_NODES, *TRAIN_NODES]


class FewStepExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
