"""SAMPLER nodes with their knobs, for SamplerCustom / SamplerCustomAdvanced."""
import comfy.samplers
from comfy_api.latest import io

from ..host.input_checks import check_values
from ..samplers.registry import SAMPLERS

CATEGORY = "sampling/custom_sampling/samplers"
TCD, CTM, PCM = SAMPLERS["tcd"], SAMPLERS["ctm_gamma"], SAMPLERS["pcm"]  # the widgets default to the dropdown's options


class FewStepTCDSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepTCDSampler",
            display_name="TCD Sampler (gamma)",
            category=CATEGORY,
            description="Strategic Stochastic Sampling of Trajectory Consistency Distillation, step for step as diffusers' "
                        "TCDScheduler. Use with the LCM / TCD Grid Scheduler for TCD LoRAs, or the PCM Scheduler for PCM.",
            inputs=[
                io.Float.Input("gamma", default=TCD.options["gamma"], min=0.0, max=1.0, step=0.01, round=False,
                               tooltip="Stochasticity γ, the number diffusers and ComfyUI-TCD call `eta` (same meaning, not 1 − γ). "
                                       f"0 = deterministic DDIM; {TCD.options['gamma']:g} = diffusers' default and the `tcd` "
                                       "dropdown's; 1 = re-noise fully each step (Hyper-SD's unified LoRA uses 1.0). "
                                       "Higher γ: smoother, less detail."),
            ],
            outputs=[io.Sampler.Output(tooltip="TCD sampling with this γ: for SamplerCustom(Advanced).")],
        )

    @classmethod
    def execute(cls, gamma) -> io.NodeOutput:
        check_values(cls, gamma=gamma)
        return io.NodeOutput(comfy.samplers.KSAMPLER(TCD.function, extra_options={"gamma": float(gamma)}))


class FewStepCTMGammaSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepCTMGammaSampler",
            display_name="CTM Gamma Sampler",
            category=CATEGORY,
            description="γ-sampling of Consistency Trajectory Models: jump to s = √(1−γ²)·σ_next, then re-noise to σ_next. "
                        "γ interpolates between deterministic jumps (0) and consistency multistep sampling (1).",
            inputs=[
                io.Float.Input("gamma", default=CTM.options["gamma"], min=0.0, max=1.0, step=0.01, round=False,
                               tooltip="0 = deterministic (DDIM jumps); 1 = jump to the end and re-noise each step (CM multistep). "
                                       f"The `ctm_gamma` dropdown uses {CTM.options['gamma']:g}."),
            ],
            outputs=[io.Sampler.Output(tooltip="CTM γ-sampling with this γ: for SamplerCustom(Advanced).")],
        )

    @classmethod
    def execute(cls, gamma) -> io.NodeOutput:
        check_values(cls, gamma=gamma)
        return io.NodeOutput(comfy.samplers.KSAMPLER(CTM.function, extra_options={"gamma": float(gamma)}))


class FewStepPCMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepPCMSampler",
            display_name="PCM Sampler (deterministic)",
            category=CATEGORY,
            description="Deterministic phased sampling for PCM LoRAs: a DDIM (η = 0) jump to each σ of the schedule. "
                        "Same as choosing `pcm` in KSamplerSelect.",
            inputs=[],
            outputs=[io.Sampler.Output(tooltip="Deterministic PCM sampling (DDIM jumps): for SamplerCustom(Advanced).")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(comfy.samplers.KSAMPLER(PCM.function))
