"""SIGMAS nodes: PCM phased schedule, LCM/TCD 50-point grid, Hyper-SD one-step."""
from comfy_api.latest import io

from ..host.input_checks import check_values
from ..schedulers import (END_CONVENTIONS, apply_denoise, hyper_sd_1step_sigmas, lcm_sigmas, lcm_timesteps, pcm_sigmas,
                          phases_problem)
from ..schedulers.registry import SCHEDULERS

CATEGORY = "sampling/custom_sampling/schedulers"

END_TOOLTIP = ("Where the last step lands. zero: σ = 0, a clean image (ComfyUI's convention). sigma_min: the model's "
               "smallest training σ (t = 0), as diffusers' DDIM/TCD pipelines with set_alpha_to_one=False; keeps ~3 % noise.")
DENOISE_TOOLTIP = "1.0 for text-to-image; below 1 for img2img: only the last part of the schedule is sampled."


def _model_sampling(model):
    return model.get_model_object("model_sampling")


class FewStepPCMScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepPCMScheduler",
            display_name="PCM Scheduler (phased)",
            category=CATEGORY,
            description="σ schedule of a Phased Consistency Model LoRA: its phase edges (phases M over K DDIM timesteps), "
                        "optionally with sub-steps inside phases. Pair with the `pcm` sampler (deterministic LoRAs) "
                        "or `tcd` with gamma 0.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample; its own σ table gives σ(t)."),
                io.Int.Input("phases", default=4, min=1, max=50,
                             tooltip="Number of phases M the LoRA was trained with (its name says it: PCM_*_4step → 4)."),
                io.Int.Input("ddim_timesteps", default=50, min=1, max=1000,
                             tooltip="K, the DDIM timesteps of training: 50 for the SD1.5 LoRAs, 40 for SDXL. "
                                     "Edges for K=50, M=4: 999/739/499/239."),
                io.Int.Input("steps", default=4, min=1, max=1000,
                             tooltip="Sampling steps N. N = phases walks the edges; N > phases adds sub-steps inside phases; "
                                     "N < phases skips edges (the LoRA was not trained for that)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=DENOISE_TOOLTIP),
                io.Combo.Input("end", options=list(END_CONVENTIONS), default=SCHEDULERS["pcm"].defaults["end"],
                               tooltip=END_TOOLTIP),
            ],
            outputs=[io.Sigmas.Output(tooltip="The PCM σ schedule: for SamplerCustom(Advanced) or Schedule Preview.")],
        )

    # Rules between inputs live here, not in validate_inputs (whose message ComfyUI repeats on every input it
    # takes, and which turns off ComfyUI's range checks for them): host/input_checks.py runs them at /prompt.
    @classmethod
    def cross_checks(cls, values):
        if "phases" in values and "ddim_timesteps" in values:
            problem = phases_problem(int(values["phases"]), int(values["ddim_timesteps"]))
            if problem:
                return {"phases": problem}
        return {}

    @classmethod
    def execute(cls, model, phases, ddim_timesteps, steps, denoise, end) -> io.NodeOutput:
        check_values(cls, phases=phases, ddim_timesteps=ddim_timesteps, steps=steps, denoise=denoise)
        ms = _model_sampling(model)
        sigmas = apply_denoise(lambda n: pcm_sigmas(ms, n, phases, ddim_timesteps, end), steps, denoise)
        return io.NodeOutput(sigmas)


class FewStepLCMScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepLCMScheduler",
            display_name="LCM / TCD Grid Scheduler",
            category=CATEGORY,
            description="The 50-point timestep grid of diffusers' LCMScheduler and TCDScheduler (999/759/499/259 at 4 steps). "
                        "For LCM LoRAs (with the `lcm` sampler) and TCD LoRAs (with the `tcd` sampler).",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample; its own σ table gives σ(t)."),
                io.Int.Input("steps", default=4, min=1, max=50, tooltip="Sampling steps, at most the grid size (50 × denoise)."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="diffusers' `strength`: below 1 the grid shrinks to its lower part (img2img)."),
                io.Int.Input("original_steps", default=SCHEDULERS["lcm"].defaults["original_steps"], min=1, max=1000,
                             tooltip="Size of the distillation grid (diffusers' original_inference_steps); 50 for every released LCM/TCD LoRA."),
                io.Combo.Input("end", options=list(END_CONVENTIONS), default=SCHEDULERS["lcm"].defaults["end"],
                               tooltip=END_TOOLTIP),
            ],
            outputs=[io.Sigmas.Output(tooltip="The LCM / TCD grid σ schedule: for SamplerCustom(Advanced) or Schedule Preview.")],
        )

    @classmethod
    def cross_checks(cls, values):
        if all(name in values for name in ("steps", "denoise", "original_steps")):
            try:
                lcm_timesteps(int(values["steps"]), float(values["denoise"]), int(values["original_steps"]))
            except ValueError as err:
                return {"steps": str(err)}
        return {}

    @classmethod
    def execute(cls, model, steps, denoise, original_steps, end) -> io.NodeOutput:
        check_values(cls, steps=steps, denoise=denoise, original_steps=original_steps)
        return io.NodeOutput(lcm_sigmas(_model_sampling(model), steps, denoise, end, original_steps=original_steps))


class FewStepHyperSD1StepScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepHyperSD1StepScheduler",
            display_name="Hyper-SD 1-Step Scheduler",
            category=CATEGORY,
            description="σ(800) → 0, the schedule of the Hyper-SDXL 1-step UNet (LCMScheduler with timesteps=[800]). "
                        "More steps walk evenly down from t = 800.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample; its own σ table gives σ(800)."),
                io.Int.Input("steps", default=1, min=1, max=100, tooltip="1 for the 1-step UNet."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=DENOISE_TOOLTIP),
            ],
            outputs=[io.Sigmas.Output(tooltip="The Hyper-SD 1-step σ schedule: for SamplerCustom(Advanced) or Schedule Preview.")],
        )

    @classmethod
    def execute(cls, model, steps, denoise) -> io.NodeOutput:
        check_values(cls, steps=steps, denoise=denoise)
        ms = _model_sampling(model)
        return io.NodeOutput(apply_denoise(lambda n: hyper_sd_1step_sigmas(ms, n), steps, denoise))
