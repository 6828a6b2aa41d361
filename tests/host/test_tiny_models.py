"""The tiny SDXL / SD3 / FLUX test models (tests/support/tiny_models.py) as a real ComfyUI 0.3.75 loads them.

Each model is loaded in-process through the same comfy.sd calls the core loader nodes make
(CheckpointLoaderSimple -> load_checkpoint_guess_config, UNETLoader -> load_diffusion_model), with every log
record captured: the detected supported-model class and model_base class are checked, no key may be reported
missing, unexpected or left over, and one forward pass of the diffusion model on a 16x16 latent must be finite.
"""
from __future__ import annotations

import ast
import gc
import logging
import os

import pytest
import torch
from safetensors.torch import load_file

from support.log_capture import captured_log
from support.tiny_models import (SD3_DIT_CONFIG, SDXL_UNET_CONFIG, TAESD_XL_SCALE, cached_tiny_flux, cached_tiny_sd3,
                                 cached_tiny_sdxl, cached_tiny_sdxl_unet, write_tiny_sd3)

KEY_COMPLAINTS = ("missing", "unexpected", "left over")
# The SDXL prefix map routes only conditioner.embedders.0.transformer.text_model* to clip_l, so no SDXL
# checkpoint can carry these two; ComfyUI reports them at DEBUG level only (real SDXL files do the same).
SDXL_UNREACHABLE_CLIP_KEYS = {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"}
# ModelPatcher.model_state_dict(): the network's weights plus buffers of the sampling schedule (and, for SDXL,
# of the unCLIP noise augmentor that model_base.SDXL always carries).
PATCHER_PREFIXES = ("diffusion_model.", "model_sampling.", "noise_augmentor.")


def key_complaints(log):
    """(level, message) of every record that reports missing / unexpected / left-over keys."""
    return [(r.levelno, r.getMessage()) for r in log.records
            if any(w in r.getMessage().lower() for w in KEY_COMPLAINTS)]


@pytest.fixture
def comfy_sd(comfy_host):
    """comfy.sd, with every model these tests load dropped again afterwards (they are large)."""
    import comfy.model_management
    import comfy.sd

    yield comfy.sd
    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()


def _latent(channels, seed=0):
    return torch.randn(1, channels, 16, 16, generator=torch.Generator().manual_seed(seed))


def _forward(model_patcher, x, sigma, **conds):
    with torch.no_grad():
        out = model_patcher.model.apply_model(x, torch.tensor([sigma]), **conds)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    return out


def test_tiny_sdxl_checkpoint_loads_as_sdxl(comfy_sd):
    import comfy.model_base
    import comfy.supported_models
    import comfy.taesd.taesd

    path = cached_tiny_sdxl(0)
    with captured_log() as log:
        model, clip, vae, _ = comfy_sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)

    assert type(model.model.model_config) is comfy.supported_models.SDXL
    assert type(model.model) is comfy.model_base.SDXL
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    unet_config = model.model.model_config.unet_config
    for k in ("transformer_depth", "transformer_depth_output", "transformer_depth_middle", "channel_mult",
              "num_res_blocks", "context_dim", "adm_in_channels"):
        assert unet_config[k] == SDXL_UNET_CONFIG[k], k

    complaints = key_complaints(log)
    assert [m for lvl, m in complaints if lvl >= logging.INFO] == []
    reported = set()
    for _, msg in complaints:
        assert msg.startswith("clip missing: "), msg
        reported |= set(ast.literal_eval(msg[len("clip missing: "):]))
    assert reported <= SDXL_UNREACHABLE_CLIP_KEYS

    unet_keys = list(model.model_state_dict())
    assert unet_keys and all(k.startswith(PATCHER_PREFIXES) for k in unet_keys)
    for k in ("diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
              "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight",
              "diffusion_model.output_blocks.3.1.transformer_blocks.0.ff.net.2.weight",
              "diffusion_model.label_emb.0.0.weight"):
        assert k in unet_keys, k
    clip_keys = list(clip.cond_stage_model.state_dict())
    text_models = {k.split(".text_model.")[0] for k in clip_keys if ".text_model." in k}
    assert text_models == {"clip_l.transformer", "clip_g.transformer"}
    assert "clip_g.transformer.text_model.encoder.layers.31.self_attn.q_proj.weight" in clip_keys
    assert "clip_g.transformer.text_projection.weight" in clip_keys

    assert isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD)
    assert float(vae.first_stage_model.vae_scale.detach()) == pytest.approx(TAESD_XL_SCALE)

    cond, pooled = clip.encode_from_tokens(clip.tokenize("a red fox standing in fresh snow"), return_pooled=True)
    assert cond.shape == (1, 77, 2048) and pooled.shape == (1, 1280)
    assert torch.isfinite(cond).all() and torch.isfinite(pooled).all()
    y = model.model.encode_adm(pooled_output=pooled, width=128, height=128)
    assert y.shape == (1, 2816)

    x = _latent(4)
    _forward(model, x, 1.0, c_crossattn=cond, y=y)
    image = vae.decode(x)
    assert image.shape == (1, 128, 128, 3) and torch.isfinite(image).all()


def test_tiny_sdxl_unet_file_loads_as_sdxl(comfy_sd):
    import comfy.model_base
    import comfy.supported_models
    from safetensors import safe_open

    path = cached_tiny_sdxl_unet(0)
    with captured_log() as log:
        model = comfy_sd.load_diffusion_model(str(path))
    assert type(model.model.model_config) is comfy.supported_models.SDXL
    assert type(model.model) is comfy.model_base.SDXL
    assert key_complaints(log) == []

    # Same seed, same UNet as the checkpoint's.
    with safe_open(str(path), framework="pt") as unet_file, safe_open(str(cached_tiny_sdxl(0)), framework="pt") as ckpt:
        keys = list(unet_file.keys())
        assert all(not k.startswith("model.") for k in keys)
        for k in keys[::37]:
            assert torch.equal(unet_file.get_tensor(k), ckpt.get_tensor("model.diffusion_model." + k)), k

    g = torch.Generator().manual_seed(1)
    _forward(model, _latent(4), 1.0, c_crossattn=torch.randn(1, 8, 2048, generator=g),
             y=torch.randn(1, 2816, generator=g))


def test_tiny_sd3_loads_as_sd3(comfy_sd, tmp_path):
    import comfy.model_base
    import comfy.supported_models

    path = cached_tiny_sd3(0)
    with captured_log() as log:
        model = comfy_sd.load_diffusion_model(str(path))
    assert type(model.model.model_config) is comfy.supported_models.SD3
    assert type(model.model) is comfy.model_base.SD3
    assert key_complaints(log) == []
    assert model.model.diffusion_model.hidden_size == 64 * SD3_DIT_CONFIG["depth"]
    keys = list(model.model_state_dict())
    assert all(k.startswith(PATCHER_PREFIXES) for k in keys)
    assert "diffusion_model.joint_blocks.0.context_block.mlp.fc2.weight" in keys  # a full joint block
    assert "diffusion_model.joint_blocks.1.context_block.attn.qkv.weight" in keys  # the pre-only last block

    g = torch.Generator().manual_seed(1)
    _forward(model, _latent(16), 0.5, c_crossattn=torch.randn(1, 8, 4096, generator=g),
             y=torch.randn(1, 2048, generator=g))

    # Seeded and stamped: same seed -> same tensors, and a stamped file is reused as is; another seed -> other values.
    a = load_file(write_tiny_sd3(tmp_path / "a.safetensors", seed=1))
    b = load_file(write_tiny_sd3(tmp_path / "b.safetensors", seed=1))
    c = load_file(write_tiny_sd3(tmp_path / "c.safetensors", seed=2))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["joint_blocks.0.x_block.attn.qkv.weight"], c["joint_blocks.0.x_block.attn.qkv.weight"])
    mtime = os.stat(tmp_path / "a.safetensors").st_mtime_ns
    write_tiny_sd3(tmp_path / "a.safetensors", seed=1)
    assert os.stat(tmp_path / "a.safetensors").st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]


def test_tiny_flux_loads_as_flux_dev(comfy_sd):
    import comfy.model_base
    import comfy.supported_models

    path = cached_tiny_flux(0)
    with captured_log() as log:
        model = comfy_sd.load_diffusion_model(str(path))
    assert type(model.model.model_config) is comfy.supported_models.Flux
    assert type(model.model) is comfy.model_base.Flux
    assert model.model.model_config.unet_config["guidance_embed"] is True
    assert key_complaints(log) == []
    keys = list(model.model_state_dict())
    assert all(k.startswith(PATCHER_PREFIXES) for k in keys)
    for k in ("diffusion_model.double_blocks.0.img_attn.qkv.weight", "diffusion_model.single_blocks.0.linear1.weight",
              "diffusion_model.guidance_in.in_layer.weight"):
        assert k in keys, k

    g = torch.Generator().manual_seed(1)
    _forward(model, _latent(16), 0.5, c_crossattn=torch.randn(1, 8, 4096, generator=g),
             y=torch.randn(1, 768, generator=g), guidance=torch.tensor([3.5]))
