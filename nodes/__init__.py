"""The pack's V3 nodes (thin: they translate ComfyUI types and call the pure samplers/schedules)."""
from comfy_api.latest import ComfyExtension, io

from .loras import NODES as LORA_NODES
from .preview import SchedulePreview
from .samplers import CTMGammaSampler, PCMSampler, TCDSampler
from .schedulers import HyperSD1StepScheduler, LCMGridScheduler, PCMScheduler
from .train import NODES as TRAIN_NODES

NODES = [PCMScheduler, LCMGridScheduler, HyperSD1StepScheduler, TCDSampler, CTMGammaSampler, PCMSampler, SchedulePreview,
         *LORA_NODES, *TRAIN_NODES]


class FewStepExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
