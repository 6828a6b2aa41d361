"""The shipped workflows' one table: for each API twin in workflows/api/<id>.json, the title its drag-and-drop file
carries (workflows/<title>.json: the frontend 1.32.9 titles a pack's template cards by file name and nothing else),
the note shown beside the graph, and the public model files it is meant for (name, download URL, models/ folder).

scripts/write_ui_workflows.py writes the UI files from this table; the tests read it to pair each UI file with its
twin and to check what the files and the Templates dialog show.
"""
from __future__ import annotations

from dataclasses import dataclass, field

HF = "https://huggingface.co"
DIGITS_CHECKPOINT = "fewstep_digits_sd15.safetensors"
HYPER_SDXL_UNET = "Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors"
SDXL_BASE = "sd_xl_base_1.0.safetensors"
HYPER_SD15_LORA = "Hyper-SD15-4steps-lora.safetensors"


@dataclass(frozen=True)
class Model:
    """A public file a workflow loads, as the frontend's missing-models check reads it (name, url, directory)."""

    name: str
    url: str
    directory: str

    def as_json(self) -> dict:
        return {"name": self.name, "url": self.url, "directory": self.directory}


@dataclass(frozen=True)
class Workflow:
    title: str  # the UI file's name, so the Templates dialog's card title (letters, digits, spaces, '-', '(', ')')
    note: str  # markdown: what the graph shows, which model it expects, how to make it yours
    models: tuple = field(default_factory=tuple)  # Model entries: public files this graph loads by name
    # False: its real models do not ship and the digits model cannot stand in (the SDXL workflow). Its card image
    # is then its graph on the canvas, not its output (noise on the tests' tiny random SDXL), and the demo skips it
    runs_on_digits: bool = True


_DIGITS = (f"Runs as shipped on the pack's small digits model `{DIGITS_CHECKPOINT}` (64×64; `make demo` builds it "
           "into models/checkpoints). For your own SD1.5 checkpoint: pick it in Load Checkpoint, set the latent to "
           "512×512 and write your prompt.")
_SEED = "The seed is fixed so the card's image comes back; set its control to *randomize* for new images."

WORKFLOWS = {
    "pcm_lora_fast_sampler": Workflow(
        "PCM LoRA with the Fast Sampler",
        "**PCM LoRA + Fast Sampler.** The Fast LoRA Loader reads the LoRA's file (key format, phases, CFG) and "
        "hands its preset to the Fast Sampler: steps 0, CFG 0 and γ −1 mean *the preset's*. The text box shows "
        "what the loader recognised.\n\n"
        "Loads `fewstep_digits_pcm.safetensors`, the LoRA the training template writes. For a real model use a "
        "published PCM LoRA (huggingface.co/wangfuyun/PCM_Weights) in models/loras.\n\n" + _DIGITS + " " + _SEED),
    "hyper_sd_lora_ksampler": Workflow(
        "Hyper-SD LoRA in KSampler",
        "**Hyper-SD LoRA, core KSampler.** The Fast LoRA Loader recognises the file by its name and format; "
        "Preset to KSampler Settings turns the preset into KSampler's steps, CFG, sampler and scheduler. The text "
        "boxes show what was recognised and what KSampler cannot express.\n\n"
        f"Meant for ByteDance's `{HYPER_SD15_LORA}` (SD1.5; the frontend offers to download it when it is "
        "missing) on an SD1.5 checkpoint at 512×512. " + _DIGITS + " " + _SEED,
        (Model(HYPER_SD15_LORA, f"{HF}/ByteDance/Hyper-SD/resolve/main/{HYPER_SD15_LORA}", "loras"),)),
    "hyper_sdxl_1step_unet": Workflow(
        "Hyper-SDXL 1-step UNet",
        "**Hyper-SDXL 1-step UNet.** ByteDance's distilled SDXL UNet draws in one step: its loader attaches the "
        "1-step preset (σ(800) → 0, CFG 1) and the Fast Sampler follows it. The text encoders and VAE come from "
        "any SDXL checkpoint.\n\n"
        f"Expects `{HYPER_SDXL_UNET}` in models/diffusion_models and `{SDXL_BASE}` in models/checkpoints (the "
        "frontend offers both for download when they are missing). " + _SEED,
        (Model(HYPER_SDXL_UNET, f"{HF}/ByteDance/Hyper-SD/resolve/main/{HYPER_SDXL_UNET}", "diffusion_models"),
         Model(SDXL_BASE, f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/{SDXL_BASE}",
               "checkpoints")), runs_on_digits=False),
    "pcm_ksampler": Workflow(
        "PCM in KSampler",
        "**PCM in core KSampler.** The pack adds `pcm` to KSampler's sampler and scheduler lists: a deterministic "
        "phased consistency step on trailing phase edges, 4 steps at CFG 1.\n\n"
        "With a PCM LoRA, use as many steps as it has phases. " + _DIGITS + " " + _SEED),
    "pcm_phased_custom": Workflow(
        "PCM phased sampling (custom sampler)",
        "**PCM with its own nodes.** PCM Scheduler puts the steps on the phase edges of M phases on the K-point "
        "DDIM grid (here K 50, M 4); PCM Sampler runs them in SamplerCustomAdvanced.\n\n"
        "Set M to the LoRA's phases (its file name says, e.g. `4phases`). " + _DIGITS + " " + _SEED),
    "tcd": Workflow(
        "TCD sampling with gamma",
        "**TCD.** The TCD Sampler's γ sets how much fresh noise each step puts back (γ 0: deterministic, like "
        "DDIM; 0.3: the TCD authors' default; 1: like LCM), on the LCM / TCD grid schedule.\n\n"
        "Meant for a TCD LoRA (e.g. h1t/TCD-SD15-LoRA, TCD-SDXL-LoRA): raise γ when a picture gets blurry, lower "
        "it for detail. " + _DIGITS + " " + _SEED),
    "lcm": Workflow(
        "LCM sampling",
        "**LCM.** Core KSampler's `lcm` sampler on the pack's `lcm` schedule (the LCM 50-point grid), 4 steps at "
        "CFG 1, with ModelSamplingDiscrete set to lcm as LCM LoRAs need.\n\n"
        "Meant for an LCM LoRA (latent-consistency/lcm-lora-sdv1-5 and its SDXL / SSD-1B kin). " + _DIGITS + " "
        + _SEED),
    "ctm_gamma": Workflow(
        "CTM gamma sampling",
        "**CTM γ-sampling.** Each step jumps below the next σ (to √(1 − γ²)·σ_next, here γ 0.5) and re-noises back "
        "up to it; γ 0 is DDIM, γ 1 consistency multistep sampling. On the pcm schedule, in SamplerCustomAdvanced.\n\n" + _DIGITS + " " + _SEED),
    "hyper_sd_1step": Workflow(
        "Hyper-SD 1-step schedule",
        "**Hyper-SD 1-step.** The Hyper-SD 1-Step Scheduler starts at the model's own σ(800) (Hyper-SD's 1-step "
        "timestep) and the lcm sampler finishes in one step.\n\n"
        "Meant for Hyper-SD's 1-step LoRAs (`Hyper-SD15-1step-lora`, `Hyper-SDXL-1step-lora`). " + _DIGITS + " "
        + _SEED),
    "schedule_preview": Workflow(
        "Compare few-step schedules",
        "**Schedule preview.** Draws the schedule you wire in (here PCM, M 4, 8 steps) as an image: σ per step on a "
        "log scale, each σ's training timestep and the PCM phase edges. Check a schedule before sampling with it.\n\n"
        "Any checkpoint works: only its σ table is read."),
    "pcm_distill_train": Workflow(
        "Train a PCM LoRA (distillation)",
        "**Train a PCM LoRA.** PCM Distillation trains a fast LoRA for the checkpoint it is given (the teacher) "
        "on your images and prompts, then KSampler samples the student in 2 steps. The node shows step and loss "
        "while it trains and writes models/loras/<output_name>.safetensors plus a resumable state.\n\n"
        "As shipped: the digits model, 100 digits (`fewstep_digits_train.png`, one frame each, one prompt per "
        "line), 400 steps (minutes on a CPU). For your checkpoint, load your images and prompts and raise the "
        "steps. Its seed is fixed: a new seed retrains."),
}


def ui_file_name(workflow_id: str) -> str:
    return f"{WORKFLOWS[workflow_id].title}.json"
