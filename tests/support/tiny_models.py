"""Seeded, download-free SDXL, SD3 and FLUX test models (random weights) for LoRA-loading host tests.

Companion of ``tiny_checkpoint.py`` (SD1.5), built the same way: every shape and key name comes from
ComfyUI 0.3.75's own modules instantiated on the meta device, every value from a seeded
``torch.Generator`` with fan-in scaled initialisation (norm gains 1, small biases, layers that feed a
residual add or a prediction at half gain, adaLN modulation at quarter gain), so every output stays
finite. Each part (UNet, CLIP-L, CLIP-G, TAESD, DiT) draws from its own stream, derived from the seed,
so e.g. the UNet-only SDXL file holds exactly the checkpoint's UNet. A stamp (format version + seed)
sits in the safetensors metadata; a file with the right stamp is reused untouched, otherwise it is
written to a temp file in the same folder and renamed into place.

Times measured on this project's 2-core CPU machine (Python 3.11, torch 2.13 CPU), first on an idle
machine, then (in brackets) while other jobs kept a load average of 3-4 on it. "Load" is the comfy.sd call
on a warm page cache in a process that has ComfyUI imported; ComfyUI keeps diffusion models float32 on CPU.

``cached_tiny_sdxl(seed=0)`` -> <repo>/.cache/fewstep_tiny_sdxl.safetensors
    Single-file checkpoint in the original SGM/LDM layout: ``model.diffusion_model.*`` (UNet, float16),
    ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L, HF layout),
    ``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG text tower in its original layout:
    ``transformer.resblocks.N.attn.in_proj_weight``, ``positional_embedding``, ``ln_final``,
    ``text_projection`` (x @ P orientation), ``logit_scale``), both text encoders float8_e4m3fn, and a
    TAESD-XL ``first_stage_model.taesd_encoder/taesd_decoder.*`` (float16, vae_scale 0.13025 as
    ComfyUI's VAELoader gives taesdxl). ``comfy.sd.load_checkpoint_guess_config`` detects
    ``comfy.supported_models.SDXL`` -> ``comfy.model_base.SDXL`` (EPS), builds a TAESD VAE and the
    SDXLClipModel; no unet missing/unexpected key and no left-over key. The only keys ComfyUI reports at
    all are ``clip_l.logit_scale`` and ``clip_l.transformer.text_projection.weight`` as "clip missing" at
    DEBUG level: the SDXL prefix map only routes ``conditioner.embedders.0.transformer.text_model*`` to
    clip_l, so no SDXL checkpoint can carry them (real ones do not either; SDXL never uses CLIP-L's
    pooled output).
    UNet config (``SDXL_UNET_CONFIG``): model_channels 320, channel_mult [1, 1, 1], num_res_blocks
    [2, 2, 2], transformer_depth [0, 0, 2, 2, 10, 10], transformer_depth_output [0, 0, 0, 1, 1, 1, 1, 1, 1],
    transformer_depth_middle 1, context_dim 2048, adm_in_channels 2816, linear proj_in/out, 64-channel
    heads. Why: ``SDXL.matches`` compares model_channels 320, context_dim 2048, adm_in_channels 2816,
    linear-in-transformer, no temporal attention and the *exact* input transformer_depth
    [0, 0, 2, 2, 10, 10]; channel_mult, the output depths and the middle block are not compared
    (channel_mult is read from the weights, 1 is its floor). [0, 2, 5] / [0, 0, 2, 2, 4, 4] /
    [0, 0, 1, 1, 2, 2] would be smaller (Koala-like [0, 2, 5] at channel_mult [1, 1, 1]: 60.6 M) but are
    detected as the subclasses KOALA_700M / SSD1B / Segmind_Vega, so plain SDXL costs 28 input
    transformer blocks. The strict minimum for plain SDXL (no output attention, no middle block) is
    131.6 M; one transformer block at each of SDXL's output attention positions plus a middle block of
    depth 1 (+28.1 M) is kept on purpose so that every SDXL LoRA target family (input_blocks.{4,5,7,8}.1,
    middle_block.1, output_blocks.{3..8}.1, with SDXL's own block indices) exists.
    Parameters: UNet 159.7 M, CLIP-L 123.1 M (no text projection, as in SDXL), CLIP-G 694.7 M, TAESD 2.4 M
    (979.9 M in all). File 1,089 MiB. Generation 9.3-9.5 s [22.5 s]; load 3.3 s [12.6 s] (ComfyUI builds
    the text encoders float16 on CPU, 1.56 GB); one prompt through CLIP-L + CLIP-G 1.4 s; UNet forward on a
    1x4x16x16 latent 0.2 s [1.1 s].

``cached_tiny_sdxl_unet(seed=0)`` -> <repo>/.cache/fewstep_tiny_sdxl_unet.safetensors
    The same UNet alone, LDM key names without prefix (what core UNETLoader /
    ``comfy.sd.load_diffusion_model`` reads; the layout of e.g. the Hyper-SDXL 1-step UNet in LDM form),
    float16, identical values to the checkpoint's UNet for the same seed. Detected as SDXL -> model_base.SDXL.
    305 MiB, 0.9-1.6 s [4.2 s] to generate, 0.5 s [1.3 s] to load. A *diffusers*-layout (UNet2DConditionModel
    names) tiny UNet is not possible: ComfyUI's diffusers path (``unet_config_from_diffusers_unet``) matches only
    transformer_depth / model_channels / in_channels / adm / context and then builds one of its
    hard-coded full configs (SDXL 2.57 B, or KOALA_700M 782.8 M / Segmind_Vega 745.2 M as subclasses), so a
    reduced UNet fails with size mismatches (checked with the inverse of ``comfy.utils.unet_to_diffusers``).

``cached_tiny_sd3(seed=0)`` -> <repo>/.cache/fewstep_tiny_sd3_dit.safetensors
    Diffusion-model-only MMDiT file, keys without prefix (``joint_blocks.*``, ``x_embedder.*``, ...; what
    ``comfy.sd.load_diffusion_model`` reads, a ``model.diffusion_model.`` prefix would be stripped too),
    float16. Detected as ``comfy.supported_models.SD3`` -> ``comfy.model_base.SD3``.
    Config (``SD3_DIT_CONFIG``): depth 2 (ComfyUI derives hidden = 64·depth = 128, 2 heads, 2 joint
    blocks), patch 2, 16 latent channels, adm_in_channels 2048 (pooled CLIP-L+G), context embedder
    4096 -> 128 (T5-width context), pos_embed 32×32 (sin-cos values; latents up to 64×64, i.e. 512 px),
    no qk-norm. Why: detection reads depth from x_embedder's width (hidden // 64) and SD3.matches only
    wants in_channels 16; depth 1 (0.6 M) is also detected but its only block is the pre-only last block
    (no context proj/MLP), so depth 2 keeps one full joint block plus the pre-only one for LoRA keys.
    Parameters 2.0 M, file 3.8 MiB, generation 0.1 s [0.2 s], load 0.02 s [0.1 s], forward on a
    1x16x16x16 latent < 10 ms.

``cached_tiny_sd3_text_encoders(seed=0)`` -> (<repo>/.cache/fewstep_tiny_sd3_clip_l.safetensors,
<repo>/.cache/fewstep_tiny_sd3_clip_g.safetensors) and ``cached_tiny_sd3_vae(seed=0)`` ->
<repo>/.cache/fewstep_tiny_sd3_vae.safetensors
    The separate files an SD3 user loads beside the MMDiT: CLIP-L and CLIP-G each alone in the HF layout
    (``text_model.*`` and ``text_projection.weight``, no prefix; what DualCLIPLoader / ``comfy.sd.load_clip``
    reads, the layout of the released clip_l / clip_g files), float8_e4m3fn like the SDXL checkpoint's text
    encoders, and a TAESD-style 16-channel VAE (``taesd_encoder.*``, ``taesd_decoder.*``, float16, with
    ``vae_scale`` 1.5305 and ``vae_shift`` 0.0609 as VAELoader gives taesd3). ``comfy.sd.load_clip`` with
    ``CLIPType.SD3`` detects CLIP-L and CLIP-G (``detect_te_model``: layer 30 makes CLIP-G) and builds SD3's text
    encoder without T5, which pads the L+G context to 4096 and pools 2048 (l 768 + g 1280): the tiny MMDiT's
    widths. ``comfy.sd.VAE`` reads the latent channels from ``taesd_decoder.1.weight``. Neither text encoder can
    shrink: ComfyUI builds CLIP-L and CLIP-G from its fixed configs (sd1_clip_config.json, clip_config_bigg.json)
    whatever the file holds, and CLIP-G is detected by its 31st layer, so a reduced file would leave weights
    unset. CLIP-L 123.7 M parameters, CLIP-G 694.7 M (fp8: 118 + 663 MiB); the VAE 2.5 M (4.7 MiB). Generation
    of all three about 15 s; load_clip of L + G 5.1 s (float16 on CPU, 1.56 GB), the first prompt 6 s.

``cached_tiny_flux(seed=0)`` -> <repo>/.cache/fewstep_tiny_flux_dit.safetensors
    Diffusion-model-only FLUX.1-dev-style file (``double_blocks.*``, ``single_blocks.*``, ``guidance_in.*``,
    ``vector_in.*``, ``txt_in.*``, ``img_in.*``, no prefix), bfloat16 like the released dev weights.
    Detected as ``comfy.supported_models.Flux`` (guidance_embed True) -> ``comfy.model_base.Flux``.
    Config (``FLUX_DIT_CONFIG``): hidden 3072, 24 heads, mlp_ratio 4, 1 double block, 1 single block,
    vec_in_dim 768, context_in_dim 4096, guidance embedding. Why: FLUX detection hard-codes num_heads 24
    and axes_dim [16, 56, 56] (head dim 128) and the model requires hidden = heads × 128, so hidden 3072
    is forced; only the block counts can shrink. Detection needs double_blocks.0; zero single blocks
    would also be detected (404.0 M) but one is kept for single-block (linear1/linear2) LoRA targets.
    Parameters 545.5 M (192.7 M of them act once per sample: adaLN modulation, time/guidance/vector
    embedders), file 1,041 MiB, generation 4.6-9 s [8.7 s] (about half of it safetensors serialising 1 GB),
    load 2.1 s [2.0 s] (float32 on CPU: 2.2 GB of RAM), forward on a 1x16x16x16 latent with 256 text tokens
    1.0 s [3.0 s].

tests/host/test_tiny_models.py loads all four through comfy.sd: 34 s with nothing cached (idle machine), 17 s
with the files cached (10 s when the page cache is hot), ComfyUI start-up included.

Command line: ``python tests/support/tiny_models.py {sdxl,sdxl_unet,sd3,sd3_clip_l,sd3_clip_g,sd3_vae,flux}
OUT.safetensors [--seed N]``.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

if __package__:
    from .tiny_checkpoint import _REPO_ROOT, _import_comfy, _meta_shapes, save_atomic
else:  # run as a script
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from support.tiny_checkpoint import _REPO_ROOT, _import_comfy, _meta_shapes, save_atomic

FORMAT_VERSION = "1"
LATENT_CHANNELS = {"sd15": 4, "sdxl": 4, "sd3": 16, "flux": 16}
TEXT_WIDTHS = {"sdxl": (2048, 1280), "sd3": (4096, 2048), "flux": (4096, 768)}  # (context, pooled_output) widths


def seeded_conditioning(arch, tokens, generator, extra=None):
    """A CONDITIONING shaped as CLIPTextEncode gives it for `arch` (context + pooled_output), drawn from `generator`:
    the big models' text encoders are not needed to train or sample their tiny UNet/DiT."""
    import torch

    width, pooled = TEXT_WIDTHS[arch]
    return [[torch.randn(1, tokens, width, generator=generator),
             {"pooled_output": torch.randn(1, pooled, generator=generator), **(extra or {})}]]


SDXL_UNET_CONFIG = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 1, 1],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 2048,
    "num_heads": -1,
    "num_head_channels": 64,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "legacy": False,
    "adm_in_channels": 2816,
    "num_classes": "sequential",
    "use_checkpoint": False,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

SD3_DIT_CONFIG = {
    "input_size": None,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "depth": 2,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    "num_patches": 32 * 32,
    "pos_embed_max_size": 32,
    "pos_embed_scaling_factor": None,
}

FLUX_DIT_CONFIG = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 768,
    "context_in_dim": 4096,
    "hidden_size": 3072,
    "mlp_ratio": 4.0,
    "num_heads": 24,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [16, 56, 56],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": True,
}

# ComfyUI's VAELoader gives a standalone taesdxl this scale (and shift 0); the checkpoint's TAESD carries the same.
TAESD_XL_SCALE = 0.13025
# ... and taesd3 these (SD3's latent scale and shift).
TAESD_3_SCALE, TAESD_3_SHIFT = 1.5305, 0.0609
# OpenCLIP's trained logit scale, ln(100).
CLIP_LOGIT_SCALE = math.log(100.0)

# One random stream per part, so a part's values do not depend on which other parts a file holds.
_STREAMS = {"unet": 1, "clip_l": 2, "clip_g": 3, "vae": 4, "sd3": 5, "flux": 6, "sd3_clip_l": 7, "sd3_clip_g": 8,
            "sd3_vae": 9}

# Layers whose output is added to a residual stream or is the prediction: half gain keeps the variance in check.
_RESIDUAL_OUT = (".out_layers.3.", ".proj_out.", ".to_out.0.", ".ff.net.2.", "out.2.", "attn.proj.", "mlp.2.",
                 "mlp.fc2.", ".linear2.", "final_layer.linear.", "attn.out_proj.", "mlp.c_proj.")
# adaLN modulation (shift/scale/gate): quarter gain keeps the blocks close to identity.
_MODULATION = ("adaLN_modulation.", "_mod.lin.", "modulation.lin.")


def _stamp(seed: int) -> str:
    return "v{}-seed{}".format(FORMAT_VERSION, int(seed))


def _generator(seed: int, part: str):
    import torch

    return torch.Generator().manual_seed(int(seed) * 1000 + _STREAMS[part])


def _init(key: str, shape, gen):
    """Seeded value (float16) for one tensor: norm gains 1, biases small, weights fan-in scaled."""
    import torch

    name = key.rsplit(".", 1)[-1]
    if len(shape) == 1 and name in ("weight", "scale"):  # LayerNorm / GroupNorm gains, RMSNorm scales
        return torch.ones(shape, dtype=torch.float16)
    if name.endswith("bias"):
        std = 0.02
    elif "embedding" in key:  # token / position embeddings
        std = 0.01 if "position" in key else 0.02
    else:
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        gain = 1.0
        if any(p in key for p in _RESIDUAL_OUT):
            gain = 0.5
        if any(p in key for p in _MODULATION):
            gain = 0.25
        std = gain / fan_in ** 0.5
    # float16 draws are ~2.5x faster than float32 on CPU; the values are only ever stored at 16 bits or less.
    return torch.randn(shape, generator=gen, dtype=torch.float16).mul_(std)


def _draw(shapes, part, seed, prefix, store_dtype):
    """{prefix + key: seeded tensor} for {key: shape}, in sorted key order, from the part's own stream."""
    gen = _generator(seed, part)
    return {prefix + k: _init(k, shape, gen).to(store_dtype).contiguous() for k, shape in sorted(shapes.items())}


def _module_shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _sdxl_unet_shapes():
    import torch

    comfy, openaimodel, _ = _import_comfy()
    unet = openaimodel.UNetModel(**SDXL_UNET_CONFIG, dtype=torch.float32, device=torch.device("meta"),
                                 operations=comfy.ops.disable_weight_init)
    return _module_shapes(unet)


def _clip_g_openclip_shapes():
    """Shapes of the bigG text tower in OpenCLIP's layout, derived from ComfyUI's (HF-layout) CLIPTextModel."""
    hf = _hf_clip_shapes("clip_config_bigg.json")

    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
               "self_attn.out_proj": "attn.out_proj"}
    out = {
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        # OpenCLIP applies it as x @ P; ComfyUI transposes it into text_projection.weight. Square for bigG.
        "text_projection": tuple(reversed(hf["text_projection.weight"])),
    }
    layer_prefix = "text_model.encoder.layers."
    for key, shape in hf.items():
        if not key.startswith(layer_prefix):
            continue
        n, rest = key[len(layer_prefix):].split(".", 1)
        module, param = rest.rsplit(".", 1)
        if module in renames:
            out["transformer.resblocks.{}.{}.{}".format(n, renames[module], param)] = shape
        elif module == "self_attn.q_proj":  # q, k, v are one packed in_proj in OpenCLIP
            out["transformer.resblocks.{}.attn.in_proj_{}".format(n, param)] = (3 * shape[0],) + tuple(shape[1:])
        elif module not in ("self_attn.k_proj", "self_attn.v_proj"):
            raise RuntimeError("unexpected CLIP-G key " + key)
    return out


def _stamp_in(path: pathlib.Path, stamp_key: str):
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(stamp_key)
    except Exception:
        return None


def _write(path, seed, stamp_key, description, config, build):
    """Reuse ``path`` when its stamp matches, else write build() there atomically."""
    path = pathlib.Path(path)
    if path.is_file() and _stamp_in(path, stamp_key) == _stamp(seed):
        return path
    metadata = {stamp_key: _stamp(seed), "format": "pt", "description": description,
                "fewstep.config": json.dumps(config, sort_keys=True)}
    return save_atomic(build(), path, metadata)


def _cache_path(stem: str, seed: int, cache_dir) -> pathlib.Path:
    name = "{}.safetensors".format(stem) if int(seed) == 0 else "{}_seed{}.safetensors".format(stem, int(seed))
    return (pathlib.Path(cache_dir) if cache_dir else _REPO_ROOT / ".cache") / name


# ---------------------------------------------------------------------------------------------------------------
# SDXL

def _sdxl_unet_tensors(seed, prefix):
    import torch

    return _draw(_sdxl_unet_shapes(), "unet", seed, prefix, torch.float16)


def _sdxl_checkpoint_tensors(seed):
    import torch

    fp8 = torch.float8_e4m3fn
    tensors = _sdxl_unet_tensors(seed, "model.diffusion_model.")

    sd15_parts = _meta_shapes()  # CLIP-L and TAESD are the same modules as in the SD1.5 checkpoint
    clip_l = {k[len("cond_stage_model.transformer."):]: s for k, (part, s) in sd15_parts.items() if part == "clip"}
    tensors.update(_draw(clip_l, "clip_l", seed, "conditioner.embedders.0.transformer.", fp8))

    tensors.update(_draw(_clip_g_openclip_shapes(), "clip_g", seed, "conditioner.embedders.1.model.", fp8))
    tensors["conditioner.embedders.1.model.logit_scale"] = torch.tensor(CLIP_LOGIT_SCALE, dtype=torch.float32)

    vae = {k[len("first_stage_model."):]: s for k, (part, s) in sd15_parts.items() if part == "vae"
           and not k.endswith(("vae_scale", "vae_shift"))}
    tensors.update(_draw(vae, "vae", seed, "first_stage_model.", torch.float16))
    tensors["first_stage_model.vae_scale"] = torch.tensor(TAESD_XL_SCALE, dtype=torch.float32)
    tensors["first_stage_model.vae_shift"] = torch.tensor(0.0, dtype=torch.float32)
    return tensors


def write_tiny_sdxl(path, seed: int = 0) -> pathlib.Path:
    """Write (or reuse) the tiny SDXL single-file checkpoint at ``path`` for ``seed``; returns the path."""
    return _write(path, seed, "fewstep.tiny_sdxl",
                  "random-weight SDXL-architecture test checkpoint: reduced UNet, fp8 CLIP-L/G, TAESD-XL "
                  "(fewstep tests)",
                  {"unet": SDXL_UNET_CONFIG}, lambda: _sdxl_checkpoint_tensors(seed))


def write_tiny_sdxl_unet(path, seed: int = 0) -> pathlib.Path:
    """Write (or reuse) the tiny SDXL UNet alone (LDM names, no prefix) at ``path``; returns the path."""
    return _write(path, seed, "fewstep.tiny_sdxl_unet",
                  "random-weight SDXL-architecture UNet, LDM layout (fewstep tests)",
                  {"unet": SDXL_UNET_CONFIG}, lambda: _sdxl_unet_tensors(seed, ""))


def cached_tiny_sdxl(seed: int = 0, cache_dir=None) -> pathlib.Path:
    """<repo>/.cache/fewstep_tiny_sdxl.safetensors (other seeds get a suffix), written once, then reused."""
    return write_tiny_sdxl(_cache_path("fewstep_tiny_sdxl", seed, cache_dir), seed=seed)


def cached_tiny_sdxl_unet(seed: int = 0, cache_dir=None) -> pathlib.Path:
    """<repo>/.cache/fewstep_tiny_sdxl_unet.safetensors (other seeds get a suffix), written once, then reused."""
    return write_tiny_sdxl_unet(_cache_path("fewstep_tiny_sdxl_unet", seed, cache_dir), seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# SD3 (MMDiT)

def _sd3_tensors(seed):
    import torch

    comfy, _, _ = _import_comfy()
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit

    dit = mmdit.MMDiT(**SD3_DIT_CONFIG, dtype=torch.float32, device=torch.device("meta"),
                      operations=comfy.ops.disable_weight_init)
    shapes = _module_shapes(dit)
    shapes.pop("pos_embed")
    tensors = _draw(shapes, "sd3", seed, "", torch.float16)
    side = SD3_DIT_CONFIG["pos_embed_max_size"]
    pos = mmdit.get_2d_sincos_pos_embed_torch(dit.hidden_size, side, side)  # fixed, like the released weights
    tensors["pos_embed"] = pos.reshape(1, side * side, dit.hidden_size).to(torch.float16).contiguous()
    return tensors


def write_tiny_sd3(path, seed: int = 0) -> pathlib.Path:
    """Write (or reuse) the tiny SD3 MMDiT (diffusion model only, no key prefix) at ``path``; returns the path."""
    return _write(path, seed, "fewstep.tiny_sd3_dit", "random-weight SD3-architecture MMDiT (fewstep tests)",
                  SD3_DIT_CONFIG, lambda: _sd3_tensors(seed))


def cached_tiny_sd3(seed: int = 0, cache_dir=None) -> pathlib.Path:
    """<repo>/.cache/fewstep_tiny_sd3_dit.safetensors (other seeds get a suffix), written once, then reused."""
    return write_tiny_sd3(_cache_path("fewstep_tiny_sd3_dit", seed, cache_dir), seed=seed)


def _hf_clip_shapes(config_name):
    """{key: shape} of ComfyUI's CLIPTextModel for one of its configs, as a standalone HF-layout text encoder file
    holds it (``text_model.*`` and ``text_projection.weight``)."""
    import torch

    comfy, _, _ = _import_comfy()
    cfg_file = pathlib.Path(comfy.clip_model.__file__).resolve().parent / config_name
    with open(cfg_file) as f:
        cfg = json.load(f)
    model = comfy.clip_model.CLIPTextModel(cfg, torch.float32, torch.device("meta"), comfy.ops.manual_cast)
    return _module_shapes(model)


def write_tiny_sd3_clip_l(path, seed: int = 0) -> pathlib.Path:
    """Write (or reuse) a standalone CLIP-L text encoder (HF layout, fp8) at ``path``; returns the path."""
    import torch

    return _write(path, seed, "fewstep.tiny_sd3_clip_l", "random-weight CLIP-L text encoder, HF layout (fewstep tests)",
                  {"config": "sd1_clip_config.json"},
                  lambda: _draw(_hf_clip_shapes("sd1_clip_config.json"), "sd3_clip_l", seed, "", torch.float8_e4m3fn))


def write_tiny_sd3_clip_g(path, seed: int = 0) -> pathlib.Path:
    """Write (or reuse) a standalone CLIP-G (bigG) text encoder (HF layout, fp8) at ``path``; returns the path."""
    import torch

    return _write(path, seed, "fewstep.tiny_sd3_clip_g", "random-weight CLIP-G text encoder, HF layout (fewstep tests)",
                  {"config": "clip_config_bigg.json"},
                  lambda: _draw(_hf_clip_shapes("clip_config_bigg.json"), "sd3_clip_g", seed, "", torch.float8_e4m3fn))


def _sd3_vae_tensors(seed):
    import torch

    _, _, taesd = _import_comfy()
    with torch.device("meta"):
        vae = taesd.TAESD(latent_channels=LATENT_CHANNELS["sd3"])
    shapes = {k: s for k, s in _module_shapes(vae).items() if k not in ("vae_scale", "vae_shift")}
    tensors = _draw(shapes, "sd3_vae", seed, "", torch.float16)
    tensors["vae_scale"] = torch.tensor(TAESD_3_SCALE, dtype=torch.float32)
    tensors["vae_shift"] = torch.tensor(TAESD_3_SHIFT, dtype=torch.float32)
    return tensors


def write_tiny_sd3_vae(path, seed: int = 0) -> pathlib.Path:
    """Write (or reuse) a 16-channel TAESD-style VAE file (VAELoader's taesd3 layout, fp16) at ``path``."""
    return _write(path, seed, "fewstep.tiny_sd3_vae", "random-weight 16-channel TAESD VAE (fewstep tests)",
                  {"latent_channels": LATENT_CHANNELS["sd3"], "vae_scale": TAESD_3_SCALE, "vae_shift": TAESD_3_SHIFT},
                  lambda: _sd3_vae_tensors(seed))


def cached_tiny_sd3_text_encoders(seed: int = 0, cache_dir=None):
    """(CLIP-L, CLIP-G) paths under <repo>/.cache (other seeds get a suffix), written once, then reused."""
    return (write_tiny_sd3_clip_l(_cache_path("fewstep_tiny_sd3_clip_l", seed, cache_dir), seed=seed),
            write_tiny_sd3_clip_g(_cache_path("fewstep_tiny_sd3_clip_g", seed, cache_dir), seed=seed))


def cached_tiny_sd3_vae(seed: int = 0, cache_dir=None) -> pathlib.Path:
    """<repo>/.cache/fewstep_tiny_sd3_vae.safetensors (other seeds get a suffix), written once, then reused."""
    return write_tiny_sd3_vae(_cache_path("fewstep_tiny_sd3_vae", seed, cache_dir), seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# FLUX

def _flux_tensors(seed):
    import torch

    comfy, _, _ = _import_comfy()
    import comfy.ldm.flux.model as flux_model

    dit = flux_model.Flux(**FLUX_DIT_CONFIG, dtype=torch.float32, device=torch.device("meta"),
                          operations=comfy.ops.disable_weight_init)
    return _draw(_module_shapes(dit), "flux", seed, "", torch.bfloat16)


def write_tiny_flux(path, seed: int = 0) -> pathlib.Path:
    """Write (or reuse) the tiny FLUX.1-dev-style DiT (diffusion model only, no key prefix) at ``path``."""
    return _write(path, seed, "fewstep.tiny_flux_dit",
                  "random-weight FLUX.1-dev-architecture DiT, 1 double + 1 single block (fewstep tests)",
                  FLUX_DIT_CONFIG, lambda: _flux_tensors(seed))


def cached_tiny_flux(seed: int = 0, cache_dir=None) -> pathlib.Path:
    """<repo>/.cache/fewstep_tiny_flux_dit.safetensors (other seeds get a suffix), written once, then reused."""
    return write_tiny_flux(_cache_path("fewstep_tiny_flux_dit", seed, cache_dir), seed=seed)


WRITERS = {"sdxl": write_tiny_sdxl, "sdxl_unet": write_tiny_sdxl_unet, "sd3": write_tiny_sd3,
           "sd3_clip_l": write_tiny_sd3_clip_l, "sd3_clip_g": write_tiny_sd3_clip_g, "sd3_vae": write_tiny_sd3_vae,
           "flux": write_tiny_flux}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(WRITERS))
    parser.add_argument("out", type=pathlib.Path, help="output .safetensors path")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(argv)
    out = WRITERS[ns.model](ns.out, seed=ns.seed)
    print("{} ({:.1f} MiB)".format(out, out.stat().st_size / 2 ** 20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
