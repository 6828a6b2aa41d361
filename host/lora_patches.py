"""Where a parsed LoRA meets ComfyUI: key maps, the model's architecture, patches, the load report.

The key map is core's (`comfy.lora.model_lora_keys_unet/clip`), extended with the plain diffusers
names of UNet layers that core only knows in their old attention-processor spelling — that gap is why
core drops every attention key of PEFT/diffusers UNet LoRAs. Patches are core's LoRAAdapter, so
sampling applies them exactly as core LoraLoader would.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import comfy.lora
import comfy.model_base
import comfy.patcher_extension
import comfy.utils
from comfy.weight_adapter import LoRAAdapter

from ..loras.architectures import CONTEXT_DIM_ARCHS, FLUX, SD2, SD3, SD15, SDXL, arch_fits, arch_label
from ..loras.formats import LoraFileError, module_aliases, refuse_non_finite

log = logging.getLogger("fewstep")


def model_arch(model_patcher) -> str:
    """One of architectures.MODEL_ARCHS, or the model config's class name (lower case) for anything else."""
    base = model_patcher.model
    if isinstance(base, comfy.model_base.Flux):
        return FLUX
    if isinstance(base, comfy.model_base.SD3):
        return SD3
    if isinstance(base, comfy.model_base.SDXL):
        return SDXL
    unet_config = base.model_config.unet_config
    if type(base) is comfy.model_base.BaseModel and unet_config.get("adm_in_channels") is None:
        arch = CONTEXT_DIM_ARCHS.get(unet_config.get("context_dim"))
        if arch in (SD15, SD2):  # an SDXL-wide context on a plain BaseModel is something else
            return arch
    return type(base.model_config).__name__.lower()


def clip_arch(clip) -> str | None:
    keys = clip.cond_stage_model.state_dict().keys()
    has_l = any(k.startswith("clip_l.") for k in keys)
    has_g = any(k.startswith("clip_g.") for k in keys)
    if has_l and has_g:
        return SDXL
    if has_l and not has_g:
        return SD15
    return None


def lora_key_map(model=None, clip=None) -> dict:
    """LoRA module name -> model weight key (or (key, offset)) for the UNet/transformer and text encoders."""
    key_map = {}
    if model is not None:
        comfy.lora.model_lora_keys_unet(model.model, key_map)
        unet_config = model.model.model_config.unet_config
        if "num_res_blocks" in unet_config:  # a UNet: add the plain diffusers names core lacks
            for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(unet_config).items():
                if diffusers_key.endswith(".weight"):
                    name = diffusers_key[: -len(".weight")]
                    for alias in (name, "unet." + name):
                        key_map.setdefault(alias, "diffusion_model." + ldm_key)
    if clip is not None:
        comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


@dataclass
class LoadReport:
    file_name: str
    key_formats: tuple
    lora_arch: str | None
    target_arch: str | None
    ranks: list
    model_layers: int = 0
    clip_layers: int = 0
    no_clip_layers: list = field(default_factory=list)  # text-encoder layers skipped because no CLIP was given
    missed: list = field(default_factory=list)  # file keys that patch nothing, by name

    def line(self) -> str:
        rank = "/".join(str(r) for r in self.ranks[:3]) + ("…" if len(self.ranks) > 3 else "")
        parts = [f"{self.file_name}: {arch_label(self.lora_arch)} LoRA ({', '.join(self.key_formats)}, rank {rank})",
                 f"{self.model_layers} model + {self.clip_layers} text-encoder layers patched",
                 f"{len(self.missed)} keys missed"]
        if self.no_clip_layers:
            parts.append(f"{len(self.no_clip_layers)} text-encoder layers skipped (no CLIP connected)")
        return ", ".join(parts)


def _weight_shape(state_shapes: dict, target):
    # key-map values: "key", (key, (dim, start, length)) for a slice of a fused weight, or (key, offset, fn)
    # where fn reorders the delta (diffusers' swapped scale/shift halves)
    key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
    shape = state_shapes.get(key)
    if shape is None or offset is None:
        return key, shape
    shape = list(shape)
    shape[offset[0]] = offset[2]
    return key, tuple(shape)


def _shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def build_patches(parsed, file_name: str, model=None, clip=None):
    """(model patches, clip patches, LoadReport). Raises LoraFileError for a LoRA of another architecture."""
    target_arch = model_arch(model) if model is not None else (clip_arch(clip) if clip is not None else None)
    if not arch_fits(parsed.base_arch, target_arch):
        raise LoraFileError(
            f"{file_name} is a LoRA for {arch_label(parsed.base_arch)}, but the model is {arch_label(target_arch)}. "
            f"Use a LoRA made for {arch_label(target_arch)} here, or this LoRA with a {arch_label(parsed.base_arch)} checkpoint.")
    key_map = lora_key_map(model, clip)
    model_shapes = _shapes(model.model) if model is not None else {}
    clip_shapes = _shapes(clip.cond_stage_model) if clip is not None else {}
    # Text-encoder names resolve even without a CLIP so that they are reported as skipped, not missed.
    te_only_map = {} if clip is not None else _text_encoder_names(parsed)

    report = LoadReport(file_name, parsed.key_formats, parsed.base_arch, target_arch, parsed.ranks,
                        missed=list(parsed.unused))
    model_patches, clip_patches, misfits = {}, {}, []
    for module in parsed.modules:
        target = next((key_map[a] for a in module_aliases(module.name) if a in key_map), None)
        if target is None:
            if module.name in te_only_map:
                report.no_clip_layers.append(module.name)
            else:
                report.missed.extend(module.keys)
            continue
        key, shape = _weight_shape(model_shapes, target)
        patches = model_patches
        if shape is None:
            key, shape = _weight_shape(clip_shapes, target)
            patches = clip_patches
        delta = module.delta_shape()
        if shape is None or delta[0] != shape[0] or math.prod(delta) != math.prod(shape):
            misfits.append(f"{module.name} {tuple(delta)} vs {key} {shape}")
            continue
        alpha = None if module.scale_rule == "none" else module.scale * module.rank
        patches[target] = LoRAAdapter(set(module.keys), (module.up, module.down, alpha, module.mid, None, None))
    if misfits:
        raise LoraFileError(
            f"{file_name} does not fit the model: {len(misfits)} layer(s) have other shapes (first: {misfits[0]}). "
            f"The LoRA looks like {arch_label(parsed.base_arch)}, the model is {arch_label(target_arch)}; "
            "use a LoRA made for this model's architecture.")
    if parsed.modules and not model_patches and not clip_patches and not report.no_clip_layers:
        raise LoraFileError(
            f"None of the {len(parsed.modules)} layers of {file_name} match the model "
            f"(LoRA looks like {arch_label(parsed.base_arch)}, the model is {arch_label(target_arch)}). "
            "Use a LoRA made for this model.")
    report.model_layers, report.clip_layers = len(model_patches), len(clip_patches)
    return model_patches, clip_patches, report


_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.",
                          "text_encoders.", "te1.", "te2.")


def _text_encoder_names(parsed) -> set:
    return {m.name for m in parsed.modules if m.name.startswith(_TEXT_ENCODER_PREFIXES)}


def apply_lora(parsed, file_name, model, clip, strength_model, strength_clip, values_checked=True):
    """(model', clip', LoadReport): clones patched as core LoraLoader does; inputs untouched. values_checked=False:
    the tensors' values were not read yet (read_lora_file(check_values=False)): the text encoder's are checked now,
    the model's when sampling first loads the model (ValuesCheck)."""
    model_patches, clip_patches, report = build_patches(parsed, file_name, model, clip)
    if not values_checked:
        bad_scales = sorted(m.name for m in parsed.modules if not math.isfinite(m.scale))
        if bad_scales:
            raise LoraFileError(f"{file_name}: the alpha of {len(bad_scales)} layer(s) ({', '.join(bad_scales[:3])}) is "
                                "NaN or Inf; it would turn every image black. The file is damaged.")
        refuse_non_finite(_value_groups(clip_patches), file_name)
    new_model, new_clip = model, clip
    if model is not None and model_patches:
        new_model = model.clone()
        added = set(new_model.add_patches(model_patches, strength_model))
        _check_all_added(model_patches, added, file_name)
        if not values_checked:
            new_model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, VALUES_CHECK_KEY,
                                           ValuesCheck(file_name, _value_groups(model_patches)))
    if clip is not None and clip_patches:
        new_clip = clip.clone()
        added = set(new_clip.add_patches(clip_patches, strength_clip))
        _check_all_added(clip_patches, added, file_name)
    if report.missed:
        log.warning("fewstep: %s: %d keys patch nothing: %s", file_name, len(report.missed), ", ".join(report.missed))
    return new_model, new_clip, report


VALUES_CHECK_KEY = "fewstep.lora_values"


class ValuesCheck:
    """The NaN/Inf check of a LoRA's model tensors, as a PREPARE_SAMPLING wrapper: it runs once, when sampling first
    loads the patched model and before any weight is patched, and refuses to sample a LoRA that would turn every
    image black. Not at load time: the tensors are memory-mapped and core reads them only when it patches, so
    reading all of them up front cost the loader more than everything else it does (bench/lora_load.py)."""

    def __init__(self, file_name, groups):
        self.file_name, self.groups = file_name, groups

    def __call__(self, executor, *args, **kwargs):
        if self.groups is not None:
            refuse_non_finite(self.groups, self.file_name)
            self.groups = None  # checked: clones of the model share this wrapper, and sample again
        return executor(*args, **kwargs)


def _value_groups(patches):
    """{layer name: [up, down, mid]} of LoRAAdapter patches (named by the layer's first file key)."""
    return {min(adapter.loaded_keys): [adapter.weights[0], adapter.weights[1], adapter.weights[3]]
            for adapter in patches.values()}


def _check_all_added(patches, added, file_name):
    lost = [k for k in patches if k not in added]
    if lost:  # would mean our shape/key bookkeeping disagrees with the patcher's: never pass it off as loaded
        raise RuntimeError(f"fewstep: {file_name}: the model refused {len(lost)} patches (first {lost[0]}); please report this.")

