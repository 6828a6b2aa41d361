"""SAMPLER nodes with their knobs, for SamplerCustom / SamplerCustomAdvanced."""
import comfy.samplers
from comfy_api.latest import io

from ..samplers import sample_ctm_gamma, sample_pcm, sample_tcd

CATEGORY = "sampling/custom_sampling/samplers"


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
                io.Float.Input("gamma", default=0.3, min=0.0, max=1.0, step=0.01, round=False,
                               tooltip="Stochasticity γ, the number diffusers and ComfyUI-TCD call `eta` (same meaning, not 1 − γ). "
                                       "0 = deterministic DDIM; 0.3 = diffusers' default; 1 = re-noise fully each step "
                                       "(Hyper-SD's unified LoRA uses 1.0). Higher γ: smoother, less detail."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, gamma) -> io.NodeOutput:
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_tcd, extra_options={"gamma": float(gamma)}))


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
                io.Float.Input("gamma", default=0.5, min=0.0, max=1.0, step=0.01, round=False,
                               tooltip="0 = deterministic (DDIM jumps); 1 = jump to the end and re-noise each step (CM multistep)."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, gamma) -> io.NodeOutput:
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_ctm_gamma, extra_options={"gamma": float(gamma)}))


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
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_pcm))
