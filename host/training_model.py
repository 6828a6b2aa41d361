"""Where the distillation engine meets ComfyUI: σ table, denoiser, conditioning batches, LoRA targets, student.

The engine (distill/) is plain torch. It needs `denoise(x, sigma, cond) -> D`, ComfyUI's σ-space denoised
prediction, a table of training σ's, and conditioning as one dict of batched tensors. `TrainingModel` builds
those from a ModelPatcher with ComfyUI's own machinery (`BaseModel.apply_model`, `extra_conds`, the
CONDRegular/CONDCrossAttn `process_cond`/`concat` logic), so the values are what sampling feeds the model.

How to use it from a node (PromptExecutor runs nodes under torch.inference_mode):

    teacher = TrainingModel(model)
    with torch.inference_mode(False):
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        denoise = teacher.denoiser()                # frees the weights from inference mode, freezes them
        model_sampling = teacher.model_sampling()  # the forward process and σ table for Distiller
        cond = teacher.conditioning_batch(encode_prompts(clip, prompts), latent.shape, model.load_device)
        lora = LoraSet(model.model.diffusion_model, teacher.lora_target_names(), rank, alpha)
        ... denoise(x, sigma, cond) ...

Latents from VAEEncode are in the VAE's space: sampling applies `model.model.process_latent_in` (scale and
shift) before the model sees them, and `process_latent_out` afterwards; x0 for training must be processed in.
"""
from __future__ import annotations

import os
import uuid

import torch
import torch.nn.functional as F
from torch import nn

import comfy.lora
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock

from ..distill.lora import lora_targets
from ..loras.formats import parse_lora, read_lora_file
from ..loras.architectures import FLUX, SD3, TRAINABLE_ARCHS, UNET_ARCHS, arch_label, label_list
from .lora_patches import apply_lora, model_arch

# Conditioning features sampling supports but one batch row cannot express.
_UNBATCHABLE_KEYS = ("area", "mask", "control", "gligen", "hooks")
_TRAINING_UUID = uuid.UUID(int=0)


# ---------------------------------------------------------------- σ table


def _sampling_name(model_sampling) -> str:
    # model_base builds `class ModelSampling(<sampling>, <prediction>)` on the fly; its bases say what it is.
    return " + ".join(base.__name__ for base in type(model_sampling).__bases__) or type(model_sampling).__name__


def sampling_kind(model_sampling) -> str:
    """'vp' (x = x0 + σε, discrete ε/v-prediction) or 'flow' (x = (1−σ)x0 + σε); ValueError for anything else."""
    ms = comfy.model_sampling
    if isinstance(model_sampling, ms.CONST) and isinstance(model_sampling, (ms.ModelSamplingDiscreteFlow, ms.ModelSamplingFlux)):
        return "flow"
    if (isinstance(model_sampling, ms.EPS) and not isinstance(model_sampling, (ms.EDM, ms.X0))
            and isinstance(model_sampling, ms.ModelSamplingDiscrete)
            and not isinstance(model_sampling, ms.StableCascadeSampling)):
        return "vp"
    raise ValueError(
        f"The model's sampling type ({_sampling_name(model_sampling)}) is not supported for distillation: only discrete "
        "ε/v-prediction models (SD1.5, SD2, SDXL) and flow models (SD3, FLUX) are. Continuous EDM/cosine models "
        "(Playground v2.5, Stable Cascade, a ModelSamplingContinuousEDM/V node) cannot be trained here.")


# ---------------------------------------------------------------- for the denoiser


def _own_inference_tensors(module: nn.Module) -> int:
    """Replace inference-mode weights and buffers by normal copies (same values); returns how many.

    Models loaded inside a node are inference tensors, which autograd refuses to save for backward; a LoRA
    branch upstream of a frozen layer makes autograd save that layer's weight."""
    replaced = {}
    with torch.inference_mode(False):
        for name, param in module.named_parameters(remove_duplicate=False):
            if param.is_inference():
                copy = replaced.get(id(param))
                if copy is None:
                    copy = replaced[id(param)] = nn.Parameter(param.detach().clone(), requires_grad=False)
                comfy.utils.set_attr(module, name, copy)
        for name, buf in module.named_buffers(remove_duplicate=False):
            if buf.is_inference():
                copy = replaced.get(id(buf))
                if copy is None:
                    copy = replaced[id(buf)] = buf.detach().clone()
                owner_name, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                owner._buffers[leaf] = copy
    return len(replaced)


def _clone_input(module, args):
    x = args[0]
    if torch.is_grad_enabled() and torch.is_tensor(x) and x.requires_grad:
        return (x.clone(),) + tuple(args[1:])
    return None


_COPYING_BLOCKS = {}


def _copying_block_class(cls):
    """A subclass of a FLUX block class whose forward runs on copies of its tensor arguments while gradients are
    recorded. Inside a checkpoint wrapper (which calls the class forward) the copy is part of the recomputed
    region, so the checkpoint keeps the untouched inputs."""
    sub = _COPYING_BLOCKS.get(cls)
    if sub is None:
        def forward(self, *args, **kwargs):
            if torch.is_grad_enabled():
                args = [a.clone() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
                kwargs = {k: v.clone() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
            return cls.forward(self, *args, **kwargs)

        sub = _COPYING_BLOCKS[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return sub


# ---------------------------------------------------------------- conditioning


def encode_prompts(clip, prompts, extra: dict | None = None):
    """One CONDITIONING per prompt, as CLIPTextEncode makes it ("" gives the empty-prompt conditioning).

    `extra` is merged into each entry's dict, e.g. {"guidance": 3.5} (FluxGuidance) or SDXL's
    {"width", "height", "crop_w", "crop_h", "target_width", "target_height"} (CLIPTextEncodeSDXL)."""
    if clip is None:
        raise ValueError("No CLIP given: connect the text encoder (the checkpoint's CLIP output, or a CLIP loader).")
    out = []
    for prompt in prompts:
        tokens = clip.tokenize(prompt)
        out.append(clip.encode_from_tokens_scheduled(tokens, add_dict=dict(extra or {})))
    return out


def empty_conditioning(clip, extra: dict | None = None):
    """The empty-prompt CONDITIONING (the unconditional branch of classifier-free guidance)."""
    return encode_prompts(clip, [""], extra)[0]


def _single_entry(conditioning, index):
    entries = comfy.sampler_helpers.convert_cond(conditioning)
    if len(entries) != 1:
        raise ValueError(
            f"Conditioning {index} has {len(entries)} entries (ConditioningCombine or a list): sampling averages "
            "their predictions, which one training row cannot do. Give one conditioning per prompt (use "
            "ConditioningConcat to join prompts).")
    entry = entries[0]
    found = [k for k in _UNBATCHABLE_KEYS if entry.get(k) is not None]
    if entry.get("start_percent", 0.0) > 0.0 or entry.get("end_percent", 1.0) < 1.0:
        found.append("start_percent/end_percent")
    if found:
        raise ValueError(f"Conditioning {index} uses {', '.join(found)}; distillation needs plain prompt "
                         "conditioning (no area, mask, ControlNet, GLIGEN, hooks or timestep range).")
    return entry


# ---------------------------------------------------------------- the model


class TrainingModel:
    """A ModelPatcher as the engine needs it: the σ table, the denoiser, conditioning batches, the layers to train
    and to checkpoint, the adversarial term's features, latent previews and the student with a trained LoRA."""

    def __init__(self, patcher):
        self.patcher = patcher

    @property
    def arch(self) -> str:
        """One of architectures.MODEL_ARCHS, or another model config's name (lora_patches.model_arch)."""
        return model_arch(self.patcher)

    def model_sampling(self):
        """The model_sampling object whose forward process the engine trains on; ValueError for the sampling types
        it cannot train. Reads the model_sampling object patch when there is one, so ModelSamplingSD3/Flux/Discrete
        nodes upstream (shift, zsnr) are respected."""
        model_sampling = self.patcher.get_model_object("model_sampling")
        sampling_kind(model_sampling)
        return model_sampling

    def sigmas(self):
        """(float32 CPU table of the model's training σ's, ascending; 'vp' | 'flow'), of `model_sampling()`."""
        model_sampling = self.model_sampling()
        with torch.inference_mode(False):  # a normal tensor: the engine may use it in autograd-tracked maths
            table = model_sampling.sigmas.detach().to("cpu", torch.float32).clone()
        return table, sampling_kind(model_sampling)

    def _require_loaded(self):
        base = self.patcher.model
        if getattr(base, "current_weight_patches_uuid", None) != self.patcher.patches_uuid:
            raise RuntimeError(
                "The model's weights are not this model's: load it with comfy.model_management.load_models_gpu([model], "
                "force_full_load=True) before training, and again after anything that loads another clone of the same "
                "checkpoint (a sampler on the teacher or another LoRA, a memory clean-up).")

    def _guard_flux_inplace_adds(self):
        """FLUX's blocks add to their residual streams in place (`img += ...`, `x += ...`), and the streams are their
        own arguments. Autograd refuses both once a LoRA upstream makes the streams require grad: a LayerNorm inside
        has saved the stream for backward, and a checkpoint wrapper has saved the block's inputs. The norms get a
        copy of their input, and each block works on copies of its arguments (a subclass swap, so a wrapper that
        replaces and later deletes `block.forward` keeps it); both only while gradients are recorded, so sampling
        is untouched. Once per model."""
        dm = self.patcher.model.diffusion_model
        if getattr(dm, "_fewstep_inplace_guard", False):
            return
        for block in list(dm.double_blocks) + list(dm.single_blocks):
            for module in block.modules():
                if isinstance(module, nn.LayerNorm):
                    module.register_forward_pre_hook(_clone_input)
            block.__class__ = _copying_block_class(type(block))
        dm._fewstep_inplace_guard = True

    def denoiser(self):
        """denoise(x [B,C,H,W], sigma [B], cond_batch) -> D [B,C,H,W] float32, through the loaded BaseModel.

        Call after `load_models_gpu([self.patcher], force_full_load=True)` (inside torch.inference_mode(False)): it
        runs on the weights as the patcher left them (its LoRA patches merged). No no_grad/inference inside, so
        gradients flow to anything hooked onto the network (the base weights are frozen: requires_grad False); works
        under torch.autocast. Honours the patcher's transformer_options (attention patches, wrappers) and
        model_function_wrapper as sampling does, with the whole batch as one 'cond' chunk."""
        base = self.patcher.model
        self._require_loaded()
        base.requires_grad_(False)
        _own_inference_tensors(base)
        if self.arch == FLUX:
            self._guard_flux_inplace_adds()

        def denoise(x, sigma, cond_batch):
            self._require_loaded()
            if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
                _own_inference_tensors(base)  # cheap when nothing is left to replace (a reload may bring some back)
            sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
            if sigma.ndim == 0:
                sigma = sigma.expand(x.shape[0])
            model_options = self.patcher.model_options
            # What _calc_cond_batch hands the model, on a copy so that nothing leaks back into the patcher's options.
            transformer_options = comfy.patcher_extension.merge_nested_dicts(
                {}, model_options.get("transformer_options", {}), copy_dict1=False)
            transformer_options["cond_or_uncond"] = [0]
            transformer_options["uuids"] = [_TRAINING_UUID]
            transformer_options["sigmas"] = sigma
            c = dict(cond_batch)
            c["transformer_options"] = transformer_options
            wrapper = model_options.get("model_function_wrapper")
            if wrapper is not None:
                return wrapper(base.apply_model, {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": [0]})
            return base.apply_model(x, sigma, **c)

        return denoise

    def conditioning_batch(self, conditionings, latent_shape, device=None, prompt_type="positive") -> dict:
        """Model kwargs for `denoise`, one row per CONDITIONING in `conditionings`: {name: tensor [N, ...]}.

        Built as sampling builds them: `encode_model_conds(model.extra_conds, ...)` on an empty latent of
        `latent_shape` ([B,]C,H,W; it sets SDXL's default sizes to H·8×W·8 and FLUX's default guidance 3.5), then
        each cond's `process_cond` and `concat` (prompts of 77 and 154 tokens are repeated to their least common
        multiple, as CONDCrossAttn does). Tensors are normal (non-inference) copies on `device` (default: the load
        device)."""
        base = self.patcher.model
        if not conditionings:
            raise ValueError("No conditioning given.")
        device = self.patcher.load_device if device is None else torch.device(device)
        shape = tuple(latent_shape)
        if len(shape) == 3:
            shape = (1,) + shape
        noise = torch.zeros((1,) + shape[1:], device=device)
        rows = []
        for index, conditioning in enumerate(conditionings):
            entry = _single_entry(conditioning, index)
            try:
                encoded = comfy.samplers.encode_model_conds(
                    base.extra_conds, [entry], noise, device, prompt_type,
                    latent_image=torch.zeros_like(noise), denoise_mask=None, seed=None)[0]
            except KeyError as e:
                raise ValueError(f"Conditioning {index} lacks {e} which this model ({self.arch}) needs; encode "
                                 "the prompt with this model's text encoder (CLIPTextEncode with its CLIP).") from None
            rows.append({k: v.process_cond(batch_size=1, area=None) for k, v in encoded["model_conds"].items()})

        keys = list(rows[0])
        for index, row in enumerate(rows[1:], 1):
            if set(row) != set(keys):
                raise ValueError(f"Conditioning {index} gives the model {sorted(row)}, conditioning 0 gives {sorted(keys)}; "
                                 "use the same kind of conditioning for every prompt.")
        out = {}
        for key in keys:
            first, others = rows[0][key], [row[key] for row in rows[1:]]
            for index, other in enumerate(others, 1):
                if not first.can_concat(other):
                    raise ValueError(
                        f"'{key}' of conditioning {index} ({other.size()}) cannot share a batch with conditioning 0's "
                        f"({first.size()}): the prompts' token lengths differ (or differ more than 4×). Shorten the "
                        "longer prompts, or give every prompt a similar length.")
            value = first.concat(others)
            if not torch.is_tensor(value) or value.ndim == 0 or value.shape[0] != len(rows):
                raise ValueError(f"'{key}' is not a per-row tensor ({type(first).__name__}); this conditioning feature is "
                                 "not supported for distillation.")
            with torch.inference_mode(False):
                out[key] = value.detach().to(device).clone()
        return out

    def _supported_arch(self) -> str:
        arch = self.arch
        if arch not in TRAINABLE_ARCHS:
            raise ValueError(f"Distillation supports {label_list(TRAINABLE_ARCHS)} models; this one is {arch}.")
        return arch

    def lora_target_names(self) -> list:
        """Module names (inside diffusion_model) of the layers to train, each in core's LoRA key map as kohya
        `lora_unet_<name with _>`.

        UNets: every Linear/Conv2d of input_blocks, middle_block and output_blocks except conv_in (input_blocks.0.0)
        — attention q/k/v/out, proj_in/out, feed-forward, resnet convs, skip convs, time-embedding projections,
        down/upsample convs, the set LCM-LoRA and PCM train. SD3: joint_blocks' attention qkv/proj and MLP fc1/fc2.
        FLUX: double_blocks' img/txt attention qkv/proj and MLPs, single_blocks' linear1/linear2. The DiTs' adaLN
        modulation layers (once-per-sample conditioning, 3072→18432 on FLUX) are left frozen, as diffusers' SD3/FLUX
        LoRA scripts do."""
        arch = self._supported_arch()
        dm = self.patcher.model.diffusion_model
        if arch in UNET_ARCHS:
            names = [n for n in lora_targets(dm, ("input_blocks", "middle_block", "output_blocks"))
                     if not n.startswith("input_blocks.0.")]
        elif arch == SD3:
            names = [n for n in lora_targets(dm, ("joint_blocks",)) if ".adaLN_modulation." not in n]
        else:
            names = [n for n in lora_targets(dm, ("double_blocks", "single_blocks"))
                     if not n.endswith(("_mod.lin", "modulation.lin"))]
        key_map = comfy.lora.model_lora_keys_unet(self.patcher.model, {})
        unmapped = [n for n in names if key_map.get("lora_unet_" + n.replace(".", "_")) != f"diffusion_model.{n}.weight"]
        if unmapped:  # would give a file core drops keys of: never write one
            raise RuntimeError(f"{len(unmapped)} LoRA targets are not in ComfyUI's LoRA key map (first {unmapped[0]}); please report this.")
        return names

    def checkpoint_blocks(self) -> list:
        """Modules whose forward to wrap in torch.utils.checkpoint, in execution order.

        UNets: the ResBlocks, SpatialTransformers and up/downsamplers *inside* input_blocks/middle_block/output_blocks:
        the UNet calls those children itself (forward_timestep_embed), never TimestepEmbedSequential.forward, so a
        wrapped block would be bypassed. SD3: joint_blocks; FLUX: double_blocks and single_blocks (made safe for a
        plain checkpoint wrapper first: they add into their own arguments in place)."""
        arch = self._supported_arch()
        dm = self.patcher.model.diffusion_model
        if arch in UNET_ARCHS:
            seqs = list(dm.input_blocks) + ([dm.middle_block] if dm.middle_block is not None else []) + list(dm.output_blocks)
            return [layer for seq in seqs for layer in seq if not isinstance(layer, (nn.Conv2d, nn.Linear))]
        if arch == SD3:
            return list(dm.joint_blocks)
        self._guard_flux_inplace_adds()  # before anyone wraps the blocks
        return list(dm.double_blocks) + list(dm.single_blocks)

    def adversarial_features(self):
        """(modules, channels): where the adversarial term's discriminator heads read the teacher's features.

        UNets: the encoder at every resolution — each Downsample of input_blocks (the level's features as they leave
        it) and the middle block's last ResBlock (the lowest level) — the encoder-as-discriminator layout of the PCM
        and latent adversarial references. Layers inside the blocks, since the UNet calls those (see checkpoint_blocks).
        SD3 and FLUX would need their token streams reshaped to maps: refused with the fix, not silently skipped."""
        arch = self._supported_arch()
        if arch not in UNET_ARCHS:
            unets = ", ".join(map(arch_label, UNET_ARCHS))
            raise ValueError(f"The adversarial term is available for UNet models ({unets}), not {arch}: set "
                             "adversarial_weight to 0 to train this model without it.")
        dm = self.patcher.model.diffusion_model
        modules = [layer for seq in dm.input_blocks for layer in seq if isinstance(layer, Downsample)]
        if dm.middle_block is not None and isinstance(dm.middle_block[-1], ResBlock):
            modules.append(dm.middle_block[-1])
        if not modules:
            raise ValueError("This UNet has no downsampling levels or middle block to read features from: set "
                             "adversarial_weight to 0.")
        return modules, [m.out_channels for m in modules]

    def latent_preview_images(self, latents, model_space=True):
        """IMAGE [B, 8H, 8W, 3] in 0..1 from latents [B, C, H, W] with the latent format's RGB factors (+ bias),
        as ComfyUI's latent2rgb previewer does; upscaled ×8 nearest. For validation output without a VAE.

        `latents` are in the model's space (what denoise returns; the sampler's x0); pass model_space=False for a
        LATENT from a sampler's output or VAEEncode."""
        fmt = self.patcher.get_model_object("latent_format")
        factors = getattr(fmt, "latent_rgb_factors", None)
        if factors is None:
            raise ValueError(f"{type(fmt).__name__} latents have no RGB preview factors; connect a VAE to decode them.")
        x = latents.detach()
        if not model_space:
            x = fmt.process_in(x)
        x = x.to("cpu", torch.float32)
        reshape = getattr(fmt, "latent_rgb_factors_reshape", None)
        if reshape is not None:
            x = reshape(x)
        weight = torch.tensor(factors, dtype=torch.float32).transpose(0, 1)  # [3, C]
        if x.ndim != 4 or x.shape[1] != weight.shape[1]:
            raise ValueError(f"Expected latents [B, {weight.shape[1]}, H, W] for this model, got {tuple(latents.shape)}.")
        bias = getattr(fmt, "latent_rgb_factors_bias", None)
        bias = torch.tensor(bias, dtype=torch.float32) if bias is not None else None
        rgb = F.linear(x.movedim(1, -1), weight, bias)
        images = ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)
        return images.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2).contiguous()

    def student(self, lora, file_name: str, strength: float = 1.0):
        """A clone of the model with `lora` (a .safetensors path, or the tensors of one) applied through the pack's
        loader, exactly as the Fast LoRA Loader would apply the written file. Every key must patch a layer."""
        if isinstance(lora, (str, os.PathLike)):
            tensors, metadata = read_lora_file(os.fspath(lora))
        else:  # copies: lora_state_dict() can share storage with the live training parameters
            tensors, metadata = {k: v.detach().clone() for k, v in lora.items()}, {}
        new_model, _, report = apply_lora(parse_lora(tensors, metadata), file_name, self.patcher, None, strength, 0.0)
        if report.missed or report.clip_layers or report.no_clip_layers or new_model is self.patcher:
            raise RuntimeError(f"The student LoRA did not load cleanly: {report.line()}.")
        return new_model
