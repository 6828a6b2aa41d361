"""The LoRA nodes in the real host: presets from names and metadata, refusals, Fast Sampler == core samplers."""
from __future__ import annotations

import json

import pytest
import torch

from support.lora_files import lora_layers, make_lora, write_lora


@pytest.fixture(scope="module")
def lora_dir(comfy_host, tmp_path_factory):
    """A models/loras folder registered with the host (and removed from it afterwards)."""
    folder = tmp_path_factory.mktemp("loras")
    fp = comfy_host.folder_paths
    fp.add_model_folder_path("loras", str(folder))
    yield folder
    fp.folder_names_and_paths["loras"][0].remove(str(folder))
    fp.cache_helper.clear() if hasattr(fp, "cache_helper") else None


def refresh(comfy_host):
    fp = comfy_host.folder_paths
    if hasattr(fp, "filename_list_cache"):
        fp.filename_list_cache.clear()


@pytest.fixture(scope="module")
def sd15_lora(tiny_models, lora_dir, comfy_host):
    """write(name, fmt="kohya", metadata=None) -> name: a seeded SD1.5 LoRA file in the loras folder."""
    layers = lora_layers(tiny_models.model, tiny_models.clip)

    def write(name, fmt="kohya", metadata=None, seed=3):
        tensors, md, _ = make_lora(layers, fmt, seed=seed, single_te=True)
        md.update(metadata or {})
        write_lora(lora_dir / name, tensors, md)
        refresh(comfy_host)
        return name

    return write


def load(run_node, tiny_models, name, clip=True, **kw):
    args = dict(model=tiny_models.model, lora_name=name, strength_model=1.0, strength_clip=1.0,
                use_recommended_strength=True)
    args.update(kw)
    if clip:
        args["clip"] = tiny_models.clip
    return run_node("FewStepLoraLoader", **args)


def validate(comfy_host, **inputs):
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS["FewStepLoraLoader"]
    return cls.VALIDATE_INPUTS(**inputs) if hasattr(cls, "VALIDATE_INPUTS") else cls.validate_inputs(**inputs)


# ---------------------------------------------------------------- what was loaded

@pytest.mark.parametrize("name,family,steps", [
    ("pcm_sd15_smallcfg_4step_converted.safetensors", "pcm", 4),
    ("pcm_sd15_smallcfg_8step_converted.safetensors", "pcm", 8),
    ("Hyper-SD15-2steps-lora.safetensors", "hyper_sd", 2),
    ("TCD-SD15-LoRA.safetensors", "tcd", None),
    ("lcm-lora-sdv1-5.safetensors", "lcm", None),
])
def test_official_names_give_their_preset(name, family, steps, sd15_lora, run_node, tiny_models):
    model, clip, preset, summary = load(run_node, tiny_models, sd15_lora(name))
    assert preset.family == family and preset.source == "filename" and preset.base_arch == "sd15"
    if steps is not None:
        assert preset.steps == steps
    assert "0 keys missed" in summary and "69 model + 72 text-encoder layers patched" in summary
    assert model is not tiny_models.model and clip is not tiny_models.clip


def test_trainer_metadata_beats_the_file_name(sd15_lora, run_node, tiny_models):
    md = {"fewstep.method": "pcm", "fewstep.phases": "2", "fewstep.ddim_timesteps": "50", "fewstep.cfg_mode": "small",
          "fewstep.w_min": "3", "fewstep.w_max": "5", "fewstep.base_arch": "sd15", "fewstep.steps_trained": "100",
          "fewstep.version": "0.1.0"}
    name = sd15_lora("pcm_sd15_smallcfg_8step_converted.safetensors".replace("8step", "8step_mine"), "peft", md)
    _, _, preset, _ = load(run_node, tiny_models, name)
    assert (preset.source, preset.family, preset.phases, preset.steps) == ("metadata", "fewstep", 2, 2)


def test_unknown_file_gets_conservative_preset_and_says_so(sd15_lora, run_node, tiny_models):
    _, _, preset, summary = load(run_node, tiny_models, sd15_lora("my_style.safetensors", "peft"))
    assert preset.source == "structure" and preset.base_arch == "sd15"
    assert "unknown" in summary.lower() or "conservative" in summary.lower()


def test_recommended_strength_is_used_only_when_asked(sd15_lora, run_node, tiny_models):
    name = sd15_lora("pcm_sd15_smallcfg_4step_converted.safetensors")
    model, _, preset, _ = load(run_node, tiny_models, name, clip=False, strength_model=0.3)
    strengths = {p[0] for patches in model.patches.values() for p in patches}
    assert strengths == {preset.strength}
    model, _, _, summary = load(run_node, tiny_models, name, clip=False, strength_model=0.3,
                                use_recommended_strength=False)
    assert {p[0] for patches in model.patches.values() for p in patches} == {0.3}
    assert "72 text-encoder layers skipped (no CLIP connected)" in summary


def test_lora_for_another_architecture_is_refused_naming_both(lora_dir, comfy_host, run_node, tiny_models):
    g = torch.Generator().manual_seed(0)
    sdxl = {}
    for i in range(3):  # SDXL cross-attention reads a 2048-wide text context
        n = f"lora_unet_down_blocks_1_attentions_0_transformer_blocks_{i}_attn2_to_k"
        sdxl[n + ".lora_down.weight"] = torch.randn(4, 2048, generator=g)
        sdxl[n + ".lora_up.weight"] = torch.randn(640, 4, generator=g)
    write_lora(lora_dir / "some_sdxl_lora.safetensors", sdxl, {})
    refresh(comfy_host)
    with pytest.raises(ValueError, match=r"is a LoRA for SDXL, but the model is SD1\.5"):
        load(run_node, tiny_models, "some_sdxl_lora.safetensors")


# ---------------------------------------------------------------- bad files
# (the pack's LoraFileError is a ValueError; the host loads the pack under its own module name)

def _bad_files(folder):
    good = folder / "good_for_cutting.safetensors"
    write_lora(good, {"a.lora_down.weight": torch.ones(4, 320), "a.lora_up.weight": torch.ones(320, 4)}, {})
    data = good.read_bytes()
    (folder / "bad_truncated.safetensors").write_bytes(data[:-64])
    (folder / "bad_empty.safetensors").write_bytes(b"")
    (folder / "bad_pickle.ckpt").write_bytes(b"\x80\x04cos\nsystem\n")
    (folder / "bad_garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")


@pytest.mark.parametrize("name,message", [
    ("bad_truncated.safetensors", "truncated"),
    ("bad_empty.safetensors", "empty"),
    ("bad_pickle.ckpt", "never unpickled"),
    ("bad_garbage.safetensors", "corrupt safetensors header"),
    ("../outside.safetensors", "not a file name inside models/loras"),
    ("missing.safetensors", "not found in models/loras"),
])
def test_bad_files_fail_validation_with_the_reason(name, message, lora_dir, comfy_host):
    _bad_files(lora_dir)
    refresh(comfy_host)
    verdict = validate(comfy_host, lora_name=name)
    assert verdict is not True and message in verdict


def test_a_full_unet_in_loras_is_refused_with_the_loader_to_use(lora_dir, comfy_host, run_node, tiny_models):
    """It used to pass validation, patch nothing, report every key missed and return the model unchanged."""
    unet = {"input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3), "input_blocks.0.0.bias": torch.zeros(4)}
    write_lora(lora_dir / "Hyper-SDXL-1step-Unet.safetensors", unet, {})
    refresh(comfy_host)
    verdict = validate(comfy_host, lora_name="Hyper-SDXL-1step-Unet.safetensors")
    assert verdict is not True and "is not a LoRA" in verdict and "Hyper-SDXL 1-Step UNet Loader" in verdict
    with pytest.raises(ValueError, match="is not a LoRA"):  # at run time too (a file swapped in after validation)
        load(run_node, tiny_models, "Hyper-SDXL-1step-Unet.safetensors")


def test_absurd_rank_fails_at_execution(lora_dir, comfy_host, run_node, tiny_models):
    n = "lora_unet_down_blocks_0_attentions_0_proj_in"
    nan = {n + ".lora_down.weight": torch.full((4, 320), float("nan")), n + ".lora_up.weight": torch.ones(320, 4)}
    write_lora(lora_dir / "bad_nan.safetensors", nan, {})
    rank = 3000
    huge = {n + ".lora_down.weight": torch.zeros(rank, 1), n + ".lora_up.weight": torch.zeros(1, rank)}
    write_lora(lora_dir / "bad_rank.safetensors", huge, {})
    refresh(comfy_host)
    with pytest.raises(ValueError, match="rank 3000"):
        load(run_node, tiny_models, "bad_rank.safetensors")


# ---------------------------------------------------------------- sampling from a preset

def _empty_latent(run_node, size=64, batch=1):
    (latent,) = run_node("EmptyLatentImage", width=size, height=size, batch_size=batch)
    return latent


def fast(run_node, model, preset, conds, latent, seed=7, steps=0, cfg=0.0, gamma=-1.0, denoise=1.0):
    (out,) = run_node("FewStepFastSampler", model=model, preset=preset, positive=conds[0], negative=conds[1],
                      latent_image=latent, seed=seed, steps=steps, cfg=cfg, gamma=gamma, denoise=denoise)
    return out["samples"]


@pytest.mark.parametrize("where", ["unet_down", "unet_up", "text_encoder", "alpha"])
def test_nan_or_inf_values_never_reach_an_image(where, lora_dir, comfy_host, run_node, tiny_models, conds):
    """The values are checked where they are first read: the model's when sampling first loads it (before any weight
    is patched), the text encoder's and the alphas at load. Either way the run stops with the file's name, and the
    same model without the LoRA still samples."""
    unet, te = "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    tensors = {unet + ".lora_down.weight": torch.ones(4, 320) * 0.01, unet + ".lora_up.weight": torch.ones(320, 4) * 0.01,
               unet + ".alpha": torch.tensor(4.0),
               te + ".lora_down.weight": torch.ones(4, 768) * 0.01, te + ".lora_up.weight": torch.ones(768, 4) * 0.01}
    bad = {"unet_down": unet + ".lora_down.weight", "unet_up": unet + ".lora_up.weight",
           "text_encoder": te + ".lora_down.weight", "alpha": unet + ".alpha"}[where]
    tensors[bad] = tensors[bad].clone()
    tensors[bad].view(-1)[0] = float("inf") if where == "unet_up" else float("nan")
    name = f"bad_values_{where}.safetensors"
    write_lora(lora_dir / name, tensors, {})
    refresh(comfy_host)
    latent = _empty_latent(run_node)
    with pytest.raises(ValueError, match=f"{name}.*NaN or Inf"):
        model, clip, preset, _ = load(run_node, tiny_models, name)
        fast(run_node, model, preset, conds, latent, steps=1)
    clean = fast(run_node, tiny_models.model, preset_for_tests(), conds, latent, steps=1)
    assert torch.isfinite(clean).all()


def preset_for_tests():
    from fewstep.loras import presets

    return presets.preset_for("pcm_sd15_smallcfg_2step_converted.safetensors")


def test_fast_sampler_equals_ksampler_with_the_preset_values(sd15_lora, run_node, tiny_models, conds):
    model, clip, preset, _ = load(run_node, tiny_models, sd15_lora("Hyper-SD15-2steps-lora.safetensors"))
    sampler_name, scheduler, steps, cfg, strength, note = run_node("FewStepPresetToKSampler", preset=preset)
    assert (sampler_name, scheduler, steps, cfg) == (preset.sampler, preset.scheduler, preset.steps, preset.cfg)
    latent = _empty_latent(run_node)
    (ks,) = run_node("KSampler", model=model, seed=7, steps=steps, cfg=cfg, sampler_name=sampler_name,
                     scheduler=scheduler, positive=conds[0], negative=conds[1], latent_image=latent, denoise=1.0)
    ours = fast(run_node, model, preset, conds, latent)
    assert torch.equal(ours, ks["samples"])
    other_seed = fast(run_node, model, preset, conds, latent, seed=8)
    assert not torch.equal(ours, other_seed)


def test_fast_sampler_uses_pcm_phase_edges_and_tcd_gamma(run_node, tiny_models, conds, comfy_host):
    """Against SamplerCustom with the pack's SIGMAS/SAMPLER nodes set by hand to the preset's values."""
    from dataclasses import replace

    from fewstep.loras import presets

    base = next(p for p in presets.all_presets().values() if p.family == "pcm" and p.sampler == "pcm")
    pcm = replace(base, phases=4, ddim_timesteps=50, steps=8, cfg=1.0)
    tcd = replace(base, sampler="tcd", scheduler="lcm", gamma=0.6, steps=4, cfg=1.5, phases=None)
    latent = _empty_latent(run_node)
    model = tiny_models.model

    def custom(sampler, sigmas, cfg):
        out = run_node("SamplerCustom", model=model, add_noise=True, noise_seed=7, cfg=cfg, positive=conds[0],
                       negative=conds[1], sampler=sampler, sigmas=sigmas, latent_image=latent)
        return out[0]["samples"]

    (sigmas,) = run_node("FewStepPCMScheduler", model=model, phases=4, ddim_timesteps=50, steps=8, denoise=1.0, end="zero")
    (sampler,) = run_node("FewStepPCMSampler")
    assert torch.equal(fast(run_node, model, pcm, conds, latent), custom(sampler, sigmas, 1.0))

    (sigmas,) = run_node("FewStepLCMScheduler", model=model, steps=4, denoise=1.0, original_steps=50, end="zero")
    (sampler,) = run_node("FewStepTCDSampler", gamma=0.6)
    assert torch.equal(fast(run_node, model, tcd, conds, latent), custom(sampler, sigmas, 1.5))
    # the overrides reach the sampler
    (sampler,) = run_node("FewStepTCDSampler", gamma=0.2)
    assert torch.equal(fast(run_node, model, tcd, conds, latent, gamma=0.2), custom(sampler, sigmas, 1.5))


def test_lcm_preset_samples_with_lcm_model_sampling(sd15_lora, run_node, tiny_models, conds):
    model, _, preset, _ = load(run_node, tiny_models, sd15_lora("lcm-lora-sdv1-5.safetensors"))
    latent = _empty_latent(run_node)
    (patched,) = run_node("ModelSamplingDiscrete", model=model, sampling="lcm", zsnr=False)
    (ks,) = run_node("KSampler", model=patched, seed=7, steps=preset.steps, cfg=preset.cfg, sampler_name="lcm",
                     scheduler="lcm", positive=conds[0], negative=conds[1], latent_image=latent, denoise=1.0)
    assert (preset.sampler, preset.scheduler) == ("lcm", "lcm")
    assert torch.equal(fast(run_node, model, preset, conds, latent), ks["samples"])


def test_preset_to_ksampler_notes_what_ksampler_cannot_do(run_node):
    from fewstep.loras import presets

    unified = [p for p in presets.all_presets().values() if p.sampler == "tcd" and p.gamma not in (None, 0.3)]
    assert unified, "the table has a TCD preset with γ ≠ 0.3 (Hyper-SD unified 1-step)"
    *_, note = run_node("FewStepPresetToKSampler", preset=unified[0])
    assert "γ 0.3" in note and "Fast Sampler" in note


# ---------------------------------------------------------------- Hyper-SDXL 1-step UNet, SDXL refusals

@pytest.fixture(scope="module")
def sdxl_files(comfy_host, tmp_path_factory):
    """The tiny SDXL UNet-only file under models/diffusion_models and the full checkpoint under models/checkpoints,
    with the official 1-step UNet's name (as a user's download would be named)."""
    from support.tiny_models import cached_tiny_sdxl, cached_tiny_sdxl_unet

    fp = comfy_host.folder_paths
    unets, ckpts = tmp_path_factory.mktemp("diffusion_models"), tmp_path_factory.mktemp("checkpoints_xl")
    (unets / "Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors").symlink_to(cached_tiny_sdxl_unet())
    (ckpts / "hyper_sdxl_1step_full.safetensors").symlink_to(cached_tiny_sdxl())
    fp.add_model_folder_path("diffusion_models", str(unets))
    fp.add_model_folder_path("checkpoints", str(ckpts))
    refresh(comfy_host)
    yield
    fp.folder_names_and_paths["diffusion_models"][0].remove(str(unets))
    fp.folder_names_and_paths["checkpoints"][0].remove(str(ckpts))
    refresh(comfy_host)


@pytest.mark.parametrize("name", ["diffusion_models/Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors",
                                  "checkpoints/hyper_sdxl_1step_full.safetensors"])
def test_one_step_unet_loads_with_its_preset(name, sdxl_files, run_node, arch_models):
    import comfy.model_base

    model, preset, summary = run_node("FewStepHyperSD1StepUNetLoader", unet_name=name)
    assert isinstance(model.model, comfy.model_base.SDXL)
    assert (preset.scheduler, preset.steps, preset.cfg) == ("hyper_sd_1step", 1, 1.0)
    # the same UNet weights as the tiny SDXL checkpoint's (one seed, two layouts)
    reference = arch_models("sdxl")[0].model.state_dict()
    loaded = model.model.state_dict()
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(loaded[key].float(), reference[key].float())
    assert "SDXL UNet loaded" in summary


def test_one_step_unet_loader_refuses_other_architectures(sdxl_files, run_node):
    with pytest.raises(ValueError, match=r"SD1\.5 model, but the Hyper-SD 1-step UNet is SDXL"):
        run_node("FewStepHyperSD1StepUNetLoader", unet_name="checkpoints/" + "fewstep_tiny_sd15.safetensors")


def test_sd15_lora_on_sdxl_is_refused(sd15_lora, run_node, arch_models):
    model, clip = arch_models("sdxl")
    name = sd15_lora("pcm_sd15_smallcfg_4step_converted.safetensors")
    with pytest.raises(ValueError, match=r"LoRA for SD1\.5, but the model is SDXL"):
        run_node("FewStepLoraLoader", model=model, clip=clip, lora_name=name, strength_model=1.0, strength_clip=1.0,
                 use_recommended_strength=True)
