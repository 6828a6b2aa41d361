"""Seeded LoRA files in every key format, for models the tests build, with the weights each must produce.

`lora_layers(model, clip)` lists every LoRA-able weight of a loaded ComfyUI model: its weight key (or
(key, offset) for the slices of FLUX's fused qkv) and the names each trainer family gives it. Names come
from ComfyUI's own diffusers<->LDM tables (the host's truth); the loader under test must turn them back
into the same weights. `make_lora(layers, fmt, seed)` writes a state dict in one format and returns, per
target, the exact delta the loader must add: scale * (up @ down).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

CLIP_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


@dataclass
class Layer:
    component: str          # "unet" | "transformer" | "te1" | "te2"
    target: object          # target_id(): weight key, or (key, (dim, start, length) | None, function name | None)
    shape: tuple            # shape of the (sliced) weight
    names: dict             # naming scheme -> module name in that scheme (no prefix/suffix)


def target_id(target):
    """A comparable id for a key-map value: "key", (key, offset), or (key, offset, fn) as ComfyUI writes them."""
    if isinstance(target, str):
        return target
    key, offset = target[0], (tuple(target[1]) if target[1] is not None else None)
    fn = target[2].__name__ if len(target) > 2 and target[2] is not None else None
    return (key, offset, fn)


def _unet_layers(model):
    import comfy.utils

    sd = model.model.state_dict()
    out, seen = [], set()
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items():
        key = "diffusion_model." + ldm_key
        if not diffusers_key.endswith(".weight") or key not in sd or sd[key].ndim < 2 or key in seen:
            continue  # label_emb has two diffusers names (add_embedding, class_embedding): one LoRA layer
        seen.add(key)
        name = diffusers_key[: -len(".weight")]
        out.append(Layer("unet", key, tuple(sd[key].shape), {"diffusers": name, "ldm": ldm_key[: -len(".weight")]}))
    return out


def _dit_layers(model, table):
    """Diffusers-named layers (some are slices of fused weights, or carry a scale/shift swap) and, separately,
    every LDM weight under its own name: the two naming families cover the transformer differently."""
    sd = model.model.state_dict()
    out = []
    for diffusers_key, target in sorted(table.items(), key=lambda item: item[0]):  # ComfyUI builds parts from sets
        if not diffusers_key.endswith(".weight"):
            continue
        tid = target_id(target)
        key = tid if isinstance(tid, str) else tid[0]
        if key not in sd or sd[key].ndim < 2:
            continue
        shape = list(sd[key].shape)
        if not isinstance(tid, str) and tid[1] is not None:
            shape[tid[1][0]] = tid[1][2]
        out.append(Layer("transformer", tid, tuple(shape), {"diffusers": diffusers_key[: -len(".weight")]}))
    for key, value in sd.items():
        if key.startswith("diffusion_model.") and key.endswith(".weight") and value.ndim >= 2:
            name = key[len("diffusion_model."): -len(".weight")]
            out.append(Layer("transformer", key, tuple(value.shape), {"ldm": name}))
    return out


def _clip_layers(clip):
    sd = clip.cond_stage_model.state_dict()
    out = []
    for prefix, component in (("clip_l.", "te1"), ("clip_g.", "te2")):
        for layer in range(64):
            for target in CLIP_TARGETS:
                key = f"{prefix}transformer.text_model.encoder.layers.{layer}.{target}.weight"
                if key in sd:
                    name = f"text_model.encoder.layers.{layer}.{target}"
                    out.append(Layer(component, key, tuple(sd[key].shape), {"clip": name}))
    return out


def lora_layers(model=None, clip=None):
    import comfy.model_base
    import comfy.utils

    layers = []
    if model is not None:
        base = model.model
        if isinstance(base, comfy.model_base.Flux):
            layers += _dit_layers(model, comfy.utils.flux_to_diffusers(base.model_config.unet_config, "diffusion_model."))
        elif isinstance(base, comfy.model_base.SD3):
            layers += _dit_layers(model, comfy.utils.mmdit_to_diffusers(base.model_config.unet_config, "diffusion_model."))
        else:
            layers += _unet_layers(model)
    if clip is not None:
        layers += _clip_layers(clip)
    return layers


# Per format: how a layer's module name is spelled, the down/up suffixes, how the scale is stored.
# scale "alpha": a .alpha key per module; "peft": lora_adapter_metadata; "none": scale 1.
FORMATS = {
    "kohya": dict(suffix=(".lora_down.weight", ".lora_up.weight"), scale="alpha"),
    "kohya-ldm": dict(suffix=(".lora_down.weight", ".lora_up.weight"), scale="alpha"),
    "ldm": dict(suffix=(".lora_down.weight", ".lora_up.weight"), scale="alpha"),
    "peft": dict(suffix=(".lora_A.weight", ".lora_B.weight"), scale="peft"),
    "peft-noprefix": dict(suffix=(".lora_A.weight", ".lora_B.weight"), scale="none"),
    "peft-default": dict(suffix=(".lora_A.default.weight", ".lora_B.default.weight"), scale="none"),
    "peft-base_model": dict(suffix=(".lora_A.weight", ".lora_B.weight"), scale="peft"),
    "diffusers-lora.down": dict(suffix=(".lora.down.weight", ".lora.up.weight"), scale="none"),
    "lora_linear_layer": dict(suffix=(".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"), scale="none"),
    "attn-processor": dict(suffix=("_lora.down.weight", "_lora.up.weight"), scale="none"),
    "onetrainer": dict(suffix=(".lora_down.weight", ".lora_up.weight"), scale="alpha"),
}

_TE_KOHYA = {"te1": "lora_te1_", "te2": "lora_te2_"}
_TE_DIFFUSERS = {"te1": "text_encoder.", "te2": "text_encoder_2."}


def module_name(layer: Layer, fmt: str, single_te: bool):
    """The module name `fmt` gives this layer, or None when the format cannot express it."""
    if layer.component in ("te1", "te2"):
        clip = layer.names["clip"]
        if fmt in ("kohya", "kohya-ldm", "ldm", "onetrainer"):
            prefix = "lora_te_" if single_te else _TE_KOHYA[layer.component]
            return prefix + clip.replace(".", "_")
        if fmt in ("peft", "peft-noprefix", "diffusers-lora.down", "lora_linear_layer", "peft-default"):
            return _TE_DIFFUSERS[layer.component] + clip
        return None
    diffusers, ldm = layer.names.get("diffusers"), layer.names.get("ldm")
    if layer.component == "unet":
        return {
            "kohya": "lora_unet_" + diffusers.replace(".", "_"),
            "kohya-ldm": "lora_unet_" + ldm.replace(".", "_"),
            "ldm": "diffusion_model." + ldm,
            "peft": "unet." + diffusers,
            "peft-noprefix": diffusers,
            "peft-default": "unet." + diffusers,
            "peft-base_model": "unet.base_model.model." + diffusers,
            "diffusers-lora.down": "unet." + diffusers,
            "lora_linear_layer": "unet." + diffusers,
            "attn-processor": _processor_name(diffusers),
        }.get(fmt)
    if fmt in ("kohya", "ldm"):  # SD3 / FLUX transformer under its LDM names
        return None if ldm is None else ("lora_unet_" + ldm.replace(".", "_") if fmt == "kohya" else "diffusion_model." + ldm)
    if diffusers is None:
        return None
    return {  # ... and under diffusers names
        "peft": "transformer." + diffusers,
        "peft-default": "transformer." + diffusers,
        "peft-base_model": "base_model.model." + diffusers,
        "onetrainer": "lora_transformer_" + diffusers.replace(".", "_"),
    }.get(fmt)


def _processor_name(diffusers: str):
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        if diffusers.endswith(".attn1." + proj) or diffusers.endswith(".attn2." + proj):
            block = diffusers[: -len(proj) - 1]
            return "unet." + block + ".processor." + proj.replace(".0", "")
    return None


def make_lora(layers, fmt, seed=0, rank=4, alpha=2.0, single_te=False, dtype=torch.float32):
    """(state dict, safetensors metadata, {target_id: (up, down, scale)}) for `fmt`.

    The loader must add scale * up @ down (see expected_delta) to each target."""
    spec = FORMATS[fmt]
    down_suffix, up_suffix = spec["suffix"]
    gen = torch.Generator().manual_seed(seed)
    tensors, expected, peft_alpha_pattern = {}, {}, {}
    all_paths = [_peft_module_path(n).split("|", 1)[1] for n in (module_name(l, fmt, single_te) for l in layers) if n]
    for i, layer in enumerate(layers):
        name = module_name(layer, fmt, single_te)
        if name is None:
            continue
        out_dim, in_shape = layer.shape[0], layer.shape[1:]
        down = (torch.randn((rank,) + tuple(in_shape[:1]) + tuple(in_shape[1:]), generator=gen) * 0.05).to(dtype)
        up_shape = (out_dim, rank) + (1,) * (len(in_shape) - 1)
        up = (torch.randn(up_shape, generator=gen) * 0.05).to(dtype)
        scale = 1.0
        if spec["scale"] == "alpha":
            a = alpha if i % 5 else alpha * 3  # some modules with their own alpha
            tensors[name + ".alpha"] = torch.tensor(a)
            scale = a / rank
        elif spec["scale"] == "peft":
            scale = alpha / rank
            path = _peft_module_path(name)
            # an alpha_pattern entry for some modules; PEFT matches a pattern against the end of every module path,
            # so only paths that are no other module's dotted suffix (FLUX "proj_out" is) make single-module patterns
            if i % 7 == 3 and not any(p != path.split("|", 1)[1] and p.endswith("." + path.split("|", 1)[1])
                                      for p in all_paths):
                peft_alpha_pattern[path] = alpha * 2
                scale = alpha * 2 / rank
        tensors[name + down_suffix] = down.contiguous()
        tensors[name + up_suffix] = up.contiguous()
        expected[layer.target] = (up, down, scale)
    metadata = {"format": "pt"}
    if spec["scale"] == "peft":
        config = {}
        components = sorted({_component(n) for n in _module_names(tensors, down_suffix)})
        for comp in components:
            patterns = {p: v for p, v in peft_alpha_pattern.items() if p.startswith(comp + "|")}
            config.update({f"{comp}.r": rank, f"{comp}.lora_alpha": alpha,
                           f"{comp}.alpha_pattern": {p.split("|", 1)[1]: v for p, v in patterns.items()}})
        if fmt == "peft-base_model":  # a model-level save: no component prefixes
            config = {"r": rank, "lora_alpha": alpha,
                      "alpha_pattern": {p.split("|", 1)[1]: v for p, v in peft_alpha_pattern.items()}}
        metadata["lora_adapter_metadata"] = json.dumps(config)
    return tensors, metadata, expected


def expected_delta(target, up, down, scale, shape, dtype=torch.float64):
    """scale * up @ down, in the layout of the weight (diffusers' norm_out/adaLN halves swapped back)."""
    delta = scale * (up.to(dtype).flatten(1) @ down.to(dtype).flatten(1)).reshape(shape)
    if not isinstance(target, str) and target[2] is not None:
        assert target[2] == "swap_scale_shift", target
        first, second = delta.chunk(2, dim=0)
        delta = torch.cat([second, first], dim=0)
    return delta


def _module_names(tensors, down_suffix):
    return [k[: -len(down_suffix)] for k in tensors if k.endswith(down_suffix)]


def _component(module: str) -> str:
    return module.split(".", 1)[0]


def _peft_module_path(module: str) -> str:
    comp, _, path = module.partition(".")
    if module.startswith("base_model.model."):
        comp, path = "base_model", module[len("base_model.model."):]
    elif ".base_model.model." in module:
        path = path[len("base_model.model."):]
    return comp + "|" + path


def write_lora(path, tensors, metadata):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


# ---------------------------------------------------------------- files for the shipped workflows

DEMO_LORAS = {  # official release names, so that the loader recognises them as a user's download would be
    "pcm_sd15_smallcfg_4step_converted.safetensors": 101,
    "Hyper-SD15-4steps-lora.safetensors": 102,
}
DEMO_STAMP_KEY = "fewstep.test_lora"


def write_demo_lora(path, checkpoint, seed, rank=8, zero=False):
    """A kohya-format LoRA (LDM names, .alpha) for every UNet and text-encoder matrix of an SD1.5-layout
    checkpoint, read from the checkpoint's own shapes (no ComfyUI needed); written atomically, reused.
    zero=True: every up matrix is zero, so the LoRA changes nothing (a stand-in that keeps a file name's preset)."""
    import pathlib

    from safetensors import safe_open

    path = pathlib.Path(path)
    stamp = f"v1-seed{seed}-rank{rank}-{'zero-' if zero else ''}{pathlib.Path(checkpoint).name}"
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get(DEMO_STAMP_KEY) == stamp:
                return path
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(checkpoint), framework="pt") as f:
        for key in sorted(f.keys()):
            shape = f.get_slice(key).get_shape()
            if len(shape) < 2 or not key.endswith(".weight"):
                continue
            if key.startswith("model.diffusion_model."):
                name = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
            elif key.startswith("cond_stage_model.transformer.text_model.encoder.layers.") and any(
                    t in key for t in CLIP_TARGETS):
                name = "lora_te_" + key[len("cond_stage_model.transformer."):-len(".weight")].replace(".", "_")
            else:
                continue
            down = torch.randn((rank,) + tuple(shape[1:]), generator=gen) * (0.3 / (shape[1] ** 0.5))
            up = torch.randn((shape[0], rank) + (1,) * (len(shape) - 2), generator=gen) * 0.3 / rank ** 0.5
            if zero:
                up.zero_()
            tensors[name + ".lora_down.weight"] = down.to(torch.float16)
            tensors[name + ".lora_up.weight"] = up.to(torch.float16)
            tensors[name + ".alpha"] = torch.tensor(float(rank))
    from support.tiny_checkpoint import save_atomic

    return save_atomic(tensors, path, {DEMO_STAMP_KEY: stamp, "format": "pt"})


def write_zero_lora(path, checkpoint, seed=0):
    """A LoRA for every layer of `checkpoint` that changes nothing (see write_demo_lora's zero)."""
    return write_demo_lora(path, checkpoint, seed, zero=True)


def cached_demo_loras(checkpoint):
    """The LoRA files the shipped LoRA workflows load, under <repo>/.cache/loras (written once)."""
    import pathlib

    folder = pathlib.Path(__file__).resolve().parents[2] / ".cache" / "loras"
    return [write_demo_lora(folder / name, checkpoint, seed) for name, seed in DEMO_LORAS.items()]


# ---------------------------------------------------------------- published layouts, rebuilt from key lists (pure)

# The first PCM-SDXL upload (wangfuyun/PCM_Weights, e.g. pcm_sdxl_smallcfg_4step.safetensors, before the
# "_converted" files): what peft's save_pretrained writes for a UNet wrapped by get_peft_model: "base_model.model."
# + the diffusers UNet name + lora_A/lora_B, float32, rank 64 (--lora_rank=64), no .alpha keys and no adapter
# metadata (lora_alpha stayed in adapter_config.json). A sample of its layers: module → (out, in) or
# (out, in, kh, kw) of the patched weight, with SDXL's sizes (2048-wide cross-attention context).
PCM_SDXL_FIRST_UPLOAD = {
    "base_model.model.down_blocks.0.resnets.0.conv1": (320, 320, 3, 3),
    "base_model.model.down_blocks.0.resnets.0.time_emb_proj": (320, 1280),
    "base_model.model.down_blocks.0.downsamplers.0.conv": (320, 320, 3, 3),
    "base_model.model.down_blocks.1.attentions.0.proj_in": (640, 640),
    "base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (640, 640),
    "base_model.model.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k": (640, 2048),
    "base_model.model.mid_block.attentions.0.transformer_blocks.0.ff.net.2": (1280, 5120),
    "base_model.model.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0": (1280, 1280),
}


def published_lora(layers, rank, suffixes=(".lora_A.weight", ".lora_B.weight"), dtype=torch.float32, seed=0):
    """A state dict in a published key layout: for each module of `layers` (name → weight shape) a down and an up
    tensor under `suffixes` (down, up), small seeded values, nothing else (no .alpha, no metadata)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in layers.items():
        out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
        tensors[name + suffixes[0]] = (torch.randn((rank, in_dim) + kernel, generator=gen) * 0.01).to(dtype)
        tensors[name + suffixes[1]] = (torch.randn((out_dim, rank) + (1,) * len(kernel), generator=gen) * 0.01).to(dtype)
    return tensors
