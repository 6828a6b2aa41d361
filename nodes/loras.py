"""LoRA / UNet loaders that know what they loaded, and the nodes that sample the way the preset says."""
from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
import latent_preview
from comfy_api.latest import io

from ..host.input_checks import check_values
from ..host.lora_patches import apply_lora, model_arch
from ..loras import presets as preset_table
from ..loras.architectures import SD3, SD15, SDXL, arch_label
from ..loras.formats import (LoraFileError, check_lora_path, not_a_lora_problem, parse_lora, read_lora_file,
                             read_safetensors_header)
from ..samplers.registry import SAMPLERS
from ..schedulers import apply_denoise, hyper_sd_1step_sigmas, lcm_sigmas, pcm_sigmas, phases_problem

log = logging.getLogger("fewstep")

Preset = io.Custom("FEWSTEP_PRESET")
CATEGORY = "loaders/fewstep"

_cache = {}  # path -> (mtime, size, tensors, metadata): one file, as core LoraLoader keeps one


def _inside(path: str, folders) -> bool:
    path = os.path.normpath(os.path.abspath(path))
    for folder in folders:
        folder = os.path.normpath(os.path.abspath(folder))
        if os.path.commonpath([path, folder]) == folder:
            return True
    return False


def _resolve_model_file(folder: str, name: str) -> str:
    """Full path of `name` inside ComfyUI's models/<folder>, refusing anything that would leave it."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise LoraFileError(f"{name!r} is not a file name inside models/{folder}; pick a file from the list.")
    path = folder_paths.get_full_path(folder, name)
    if path is None or not _inside(path, folder_paths.get_folder_paths(folder)):
        raise LoraFileError(f"{name!r} was not found in models/{folder}. Put the file there and refresh (press R).")
    return path


def _load_lora_file(path: str):
    stat = os.stat(path)
    hit = _cache.get(path)
    if hit is not None and hit[:2] == (stat.st_mtime_ns, stat.st_size):
        return hit[2], hit[3]
    tensors, metadata = read_lora_file(path, check_values=False)  # apply_lora(values_checked=False) checks them
    _cache.clear()
    _cache[path] = (stat.st_mtime_ns, stat.st_size, tensors, metadata)
    return tensors, metadata


def _cheap_file_check(folder, name, lora=False):
    """validate_inputs: problems visible without reading tensor data, as a message, else True. lora: the file must
    also hold a LoRA (not a full model's weights)."""
    try:
        path = _resolve_model_file(folder, name)
        check_lora_path(path)
        header = read_safetensors_header(path)
    except (LoraFileError, OSError) as e:
        return str(e)
    problem = not_a_lora_problem(header, os.path.basename(name)) if lora else None
    return problem or True


class FewStepLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepLoraLoader",
            display_name="Fast LoRA Loader (PCM / Hyper-SD / TCD / LCM)",
            category=CATEGORY,
            description="Loads a LoRA in any common key format (kohya, LDM, PEFT/diffusers, attention-processor; SD1.5, "
                        "SDXL, SD3, FLUX) with every key applied or reported, and recognises fast LoRAs to give their "
                        "sampling preset. Refuses a LoRA made for another architecture.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The text encoder to patch (optional). Without it, text-encoder layers are skipped "
                                      "and the summary says how many."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A .safetensors file in models/loras. Pickle files (.ckpt/.pt/.bin) are refused."),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="LoRA strength on the diffusion model (ignored while use_recommended_strength is on)."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="LoRA strength on the text encoder."),
                io.Boolean.Input("use_recommended_strength", default=True,
                                 tooltip="On: use the preset's recommended model strength (1.0 for PCM/TCD/LCM, 0.125 for "
                                         "Hyper-SD3/FLUX, ...). Off: use strength_model."),
            ],
            outputs=[
                io.Model.Output(tooltip="The patched diffusion model."),
                io.Clip.Output(tooltip="The patched text encoder (the input unchanged when none was given)."),
                Preset.Output(display_name="preset", tooltip="How to sample this LoRA: wire into Fast Sampler or "
                                                              "Preset to KSampler Settings."),
                io.String.Output(display_name="summary", tooltip="One line: what was loaded, what was recognised."),
            ],
        )

    # One input only: ComfyUI repeats a validate_inputs message on every input the function takes. The numbers are
    # checked by ComfyUI's range checks and host/input_checks.py.
    @classmethod
    def validate_inputs(cls, lora_name=None):
        return _cheap_file_check("loras", lora_name, lora=True) if isinstance(lora_name, str) else True

    @classmethod
    def execute(cls, model, lora_name, strength_model, strength_clip, use_recommended_strength, clip=None) -> io.NodeOutput:
        check_values(cls, strength_model=strength_model, strength_clip=strength_clip,
                     use_recommended_strength=use_recommended_strength)
        path = _resolve_model_file("loras", lora_name)
        tensors, metadata = _load_lora_file(path)
        parsed = parse_lora(tensors, metadata)
        preset = preset_table.preset_for(lora_name, metadata, parsed.base_arch, max(parsed.ranks, default=None))
        strength = preset.strength if use_recommended_strength else strength_model
        new_model, new_clip, report = apply_lora(parsed, os.path.basename(lora_name), model, clip, strength, strength_clip,
                                                 values_checked=False)
        summary = f"{report.line()}; model strength {strength:g}. {preset.message}"
        log.info("fewstep: %s", summary)
        return io.NodeOutput(new_model, new_clip, preset, summary)


def _unet_choices():
    return ([f"diffusion_models/{n}" for n in folder_paths.get_filename_list("diffusion_models")]
            + [f"checkpoints/{n}" for n in folder_paths.get_filename_list("checkpoints")])


class FewStepHyperSD1StepUNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepHyperSD1StepUNetLoader",
            display_name="Hyper-SDXL 1-Step UNet Loader",
            category=CATEGORY,
            description="Loads the Hyper-SDXL 1-step UNet (UNet-only file in diffusers or LDM layout from "
                        "models/diffusion_models, or a full checkpoint from models/checkpoints) and attaches its "
                        "1-step preset (σ(800) → 0, CFG 1). Use the text encoder and VAE of any SDXL checkpoint.",
            inputs=[
                io.Combo.Input("unet_name", options=_unet_choices(),
                               tooltip="diffusion_models/… for UNet-only files, checkpoints/… for full checkpoints "
                                       "(only the UNet is used)."),
            ],
            outputs=[
                io.Model.Output(tooltip="The 1-step SDXL UNet."),
                Preset.Output(display_name="preset", tooltip="Its 1-step preset (σ(800) → 0, CFG 1): wire into Fast "
                                                              "Sampler or Preset to KSampler Settings."),
                io.String.Output(display_name="summary", tooltip="One line: what was loaded, the preset's note."),
            ],
        )

    @classmethod
    def validate_inputs(cls, unet_name=None):
        if not isinstance(unet_name, str):
            return True
        folder, _, name = unet_name.partition("/")
        if folder not in ("diffusion_models", "checkpoints"):
            return f"{unet_name!r} must start with diffusion_models/ or checkpoints/; pick a file from the list."
        return _cheap_file_check(folder, name)

    @classmethod
    def execute(cls, unet_name) -> io.NodeOutput:
        folder, _, name = unet_name.partition("/")
        path = _resolve_model_file(folder, name)
        check_lora_path(path)  # the same rule as LoRAs: safetensors only, never unpickle
        if folder == "checkpoints":
            model = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]
        else:
            model = comfy.sd.load_diffusion_model(path)
        if model is None:
            raise LoraFileError(f"{name}: ComfyUI found no diffusion model in this file.")
        arch = model_arch(model)
        if arch != SDXL:
            raise LoraFileError(f"{name} is an {arch_label(arch)} model, but the Hyper-SD 1-step UNet is SDXL. "
                                "Load it with core Load Diffusion Model / Load Checkpoint instead.")
        preset = preset_table.preset_from_filename(name)
        if preset is None or preset.scheduler != "hyper_sd_1step":
            preset = _one_step_unet_preset()
        return io.NodeOutput(model, preset, f"{name}: SDXL UNet loaded. {preset.message}")


def _one_step_unet_preset():
    return next(p for p in preset_table.all_presets().values() if p.scheduler == "hyper_sd_1step")


def _preset_sampler(preset, gamma):
    """The KSAMPLER a preset asks for; γ only matters to the stochastic samplers (those with a γ option)."""
    pack = SAMPLERS.get(preset.sampler)
    if pack is not None:
        options = {"gamma": float(gamma)} if "gamma" in pack.options else {}
        return comfy.samplers.KSAMPLER(pack.function, extra_options=options)
    if preset.sampler not in comfy.samplers.KSampler.SAMPLERS:
        raise ValueError(f"preset {preset.preset_id} names an unknown sampler {preset.sampler!r}.")
    return comfy.samplers.sampler_object(preset.sampler)


def _preset_sigmas(model, preset, steps, denoise):
    ms = model.get_model_object("model_sampling")
    if preset.scheduler == "pcm":
        phases, k = getattr(preset, "phases", None), getattr(preset, "ddim_timesteps", None)
        if phases and k:
            problem = phases_problem(phases, k)
            if problem is None:
                return apply_denoise(lambda n: pcm_sigmas(ms, n, phases, k), steps, denoise)
            # e.g. a PCM SDXL file named "…_48step": 48 phases on SDXL's K = 40 grid. Not refused (the file may be
            # fine, its name is what says 48), but said: it samples on the `pcm` dropdown's trailing schedule.
            log.warning("fewstep: preset %s: %s Sampling with the pcm dropdown's schedule (M = steps phases, "
                        "trailing) instead of the preset's phase edges.", preset.preset_id, problem)
        return apply_denoise(lambda n: pcm_sigmas(ms, n), steps, denoise)
    if preset.scheduler == "lcm":
        return apply_denoise(lambda n: lcm_sigmas(ms, n), steps, denoise)
    if preset.scheduler == "hyper_sd_1step":
        return apply_denoise(lambda n: hyper_sd_1step_sigmas(ms, n), steps, denoise)
    return apply_denoise(lambda n: comfy.samplers.calculate_sigmas(ms, preset.scheduler, n).cpu(), steps, denoise)


def _preset_model(model, preset):
    """Model-sampling patches a family needs: LCM's boundary condition, SD3's flow shift."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete, ModelSamplingSD3

    # LCMScheduler's boundary condition lives in ComfyUI's LCM model sampling, whose σ table is the 50-point grid:
    # right for the lcm schedule only (the 1-step UNet's t = 800 is off that grid).
    if preset.sampler == "lcm" and preset.scheduler == "lcm" and model_arch(model) in (SD15, SDXL):
        return ModelSamplingDiscrete().patch(model, "lcm", False)[0]
    if getattr(preset, "shift", None) and model_arch(model) == SD3:
        return ModelSamplingSD3().patch(model, float(preset.shift))[0]
    return model


class FewStepFastSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepFastSampler",
            display_name="Fast Sampler (from preset)",
            category="sampling/fewstep",
            description="Samples exactly as the LoRA's preset says (sampler, schedule, steps, CFG, γ), with optional "
                        "overrides. Same noise and maths as SamplerCustom with those settings.",
            inputs=[
                io.Model.Input("model", tooltip="The model the preset belongs to (e.g. the Fast LoRA Loader's MODEL)."),
                Preset.Input("preset", tooltip="From Fast LoRA Loader or Hyper-SDXL 1-Step UNet Loader."),
                io.Conditioning.Input("positive", tooltip="What the image should show."),
                io.Conditioning.Input("negative", tooltip="Only has an effect when CFG > 1."),
                io.Latent.Input("latent_image", tooltip="Empty latent for text-to-image, an encoded image for img2img."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the start noise and of the fresh noise stochastic samplers add."),
                io.Int.Input("steps", default=0, min=0, max=1000, tooltip="0 = the preset's steps."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="0 = the preset's CFG. 1 disables the negative prompt."),
                io.Float.Input("gamma", default=-1.0, min=-1.0, max=1.0, step=0.01,
                               tooltip="TCD / CTM γ; -1 = the preset's. Ignored by deterministic samplers."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1.0 for text-to-image; below 1 for img2img (the last part of the schedule)."),
            ],
            outputs=[io.Latent.Output(tooltip="The sampled latent: VAE Decode it.")],
        )

    @classmethod
    def execute(cls, model, preset, positive, negative, latent_image, seed, steps, cfg, gamma, denoise) -> io.NodeOutput:
        check_values(cls, seed=seed, steps=steps, cfg=cfg, gamma=gamma, denoise=denoise)
        steps = steps or preset.steps
        cfg = cfg or preset.cfg
        gamma = gamma if gamma >= 0 else (preset.gamma if preset.gamma is not None else 0.0)
        model = _preset_model(model, preset)
        sampler = _preset_sampler(preset, gamma)
        sigmas = _preset_sigmas(model, preset, steps, denoise)

        latent = latent_image.copy()
        samples = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(samples, seed, latent_image.get("batch_index"))
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1, {})
        latent["samples"] = comfy.sample.sample_custom(
            model, noise, cfg, sampler, sigmas, positive, negative, samples, noise_mask=latent_image.get("noise_mask"),
            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        return io.NodeOutput(latent)


class FewStepPresetToKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepPresetToKSampler",
            display_name="Preset to KSampler Settings",
            category="sampling/fewstep",
            description="Turns a preset into sampler_name / scheduler / steps / cfg for core KSampler (convert those "
                        "widgets to inputs and wire them). The note says what KSampler cannot express (e.g. "
                        f"γ ≠ {SAMPLERS['tcd'].options['gamma']:g}).",
            inputs=[Preset.Input("preset", tooltip="From Fast LoRA Loader or Hyper-SDXL 1-Step UNet Loader.")],
            outputs=[
                io.Combo.Output(display_name="sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                                tooltip="The preset's sampler, for KSampler's sampler_name."),
                io.Combo.Output(display_name="scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                                tooltip="The preset's scheduler, for KSampler's scheduler."),
                io.Int.Output(display_name="steps", tooltip="The preset's steps."),
                io.Float.Output(display_name="cfg", tooltip="The preset's CFG."),
                io.Float.Output(display_name="lora_strength",
                                tooltip="The LoRA strength the preset recommends (for a core LoRA loader)."),
                io.String.Output(display_name="note", tooltip="The preset's note and what KSampler cannot express "
                                                              "(γ, PCM phases other than steps)."),
            ],
        )

    @classmethod
    def execute(cls, preset) -> io.NodeOutput:
        notes = [preset.message]
        dropdown_gamma = SAMPLERS["tcd"].options["gamma"]
        if preset.sampler == "tcd" and preset.gamma is not None and abs(preset.gamma - dropdown_gamma) > 1e-9:
            notes.append(f"KSampler's tcd uses γ {dropdown_gamma:g}; this preset wants γ {preset.gamma:g}: use Fast "
                         "Sampler or the TCD Sampler node for an exact match.")
        phases = getattr(preset, "phases", None)
        if preset.scheduler == "pcm" and phases and phases != preset.steps:
            notes.append(f"KSampler's pcm scheduler puts phases = steps; this preset has {phases} phases.")
        return io.NodeOutput(preset.sampler, preset.scheduler, int(preset.steps), float(preset.cfg),
                             float(preset.strength), " ".join(notes))


NODES = [FewStepLoraLoader, FewStepHyperSD1StepUNetLoader, FewStepFastSampler, FewStepPresetToKSampler]
