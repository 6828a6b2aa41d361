"""Fast-LoRA preset table and detection (pure: no ComfyUI)."""
import copy
import json
import pathlib
import re

import pytest

from fewstep.loras import presets

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE_SAMPLERS_SOURCE = ROOT / ".comfyui" / "comfy" / "samplers.py"

# file name (without .safetensors) → (preset id, family, variant, base_arch, steps, sampler, scheduler, cfg)
UNET_1STEP = ("hyper_sdxl_unet_1step", "hyper_sd", "unet_1step", "sdxl", 1, "lcm", "hyper_sd_1step", 1.0)
OFFICIAL_NAMES = {
    "pcm_sd15_smallcfg_2step_converted": ("pcm_sd15_smallcfg", "pcm", "smallcfg", "sd15", 2, "pcm", "pcm", 1.0),
    "pcm_sd15_smallcfg_4step_converted": ("pcm_sd15_smallcfg", "pcm", "smallcfg", "sd15", 4, "pcm", "pcm", 1.0),
    "pcm_sd15_smallcfg_16step_converted": ("pcm_sd15_smallcfg", "pcm", "smallcfg", "sd15", 16, "pcm", "pcm", 1.0),
    "pcm_sd15_normalcfg_4step_converted": ("pcm_sd15_normalcfg", "pcm", "normalcfg", "sd15", 4, "pcm", "pcm", 3.0),
    "pcm_sd15_normalcfg_8step_converted": ("pcm_sd15_normalcfg", "pcm", "normalcfg", "sd15", 8, "pcm", "pcm", 4.5),
    "pcm_sd15_lcmlike_lora_converted": ("pcm_sd15_lcmlike", "pcm", "lcmlike", "sd15", 4, "lcm", "lcm", 1.0),
    "pcm_sdxl_smallcfg_8step_converted": ("pcm_sdxl_smallcfg", "pcm", "smallcfg", "sdxl", 8, "pcm", "pcm", 1.0),
    "pcm_sdxl_normalcfg_8step_converted": ("pcm_sdxl_normalcfg", "pcm", "normalcfg", "sdxl", 8, "pcm", "pcm", 4.5),
    "pcm_sdxl_normalcfg_16step_converted": ("pcm_sdxl_normalcfg", "pcm", "normalcfg", "sdxl", 16, "pcm", "pcm", 4.5),
    "pcm_sdxl_lcmlike_lora_converted": ("pcm_sdxl_lcmlike", "pcm", "lcmlike", "sdxl", 4, "lcm", "lcm", 1.0),
    "pcm_sdxl_smallcfg_4step": ("pcm_sdxl_smallcfg", "pcm", "smallcfg", "sdxl", 4, "pcm", "pcm", 1.0),
    "pcm_sdxl_normalcfg_8step": ("pcm_sdxl_normalcfg", "pcm", "normalcfg", "sdxl", 8, "pcm", "pcm", 4.5),
    "pcm_deterministic_2step_shift1": ("pcm_sd3_deterministic", "pcm", "deterministic", "sd3", 2, "pcm", "lcm", 1.2),
    "pcm_deterministic_4step_shift1": ("pcm_sd3_deterministic", "pcm", "deterministic", "sd3", 4, "pcm", "lcm", 1.2),
    "pcm_deterministic_4step_shift3": ("pcm_sd3_deterministic", "pcm", "deterministic", "sd3", 4, "pcm", "lcm", 1.2),
    "pcm_2step_deterministic_shift1": ("pcm_sd3_deterministic", "pcm", "deterministic", "sd3", 2, "pcm", "lcm", 1.2),
    "pcm_stochastic_shift3": ("pcm_sd3_stochastic", "pcm", "stochastic", "sd3", 4, "lcm", "lcm", 1.2),
    "Hyper-SD15-1step-lora": ("hyper_sd15_1step_unified", "hyper_sd", "unified_1step", "sd15", 1, "tcd", "lcm", 1.0),
    "Hyper-SD15-2steps-lora": ("hyper_sd15_nstep", "hyper_sd", "nstep", "sd15", 2, "pcm", "pcm", 1.0),
    "Hyper-SD15-4steps-lora": ("hyper_sd15_nstep", "hyper_sd", "nstep", "sd15", 4, "pcm", "pcm", 1.0),
    "Hyper-SD15-8steps-lora": ("hyper_sd15_nstep", "hyper_sd", "nstep", "sd15", 8, "pcm", "pcm", 1.0),
    "Hyper-SD15-8steps-CFG-lora": ("hyper_sd15_cfg", "hyper_sd", "cfg_preserved", "sd15", 8, "pcm", "pcm", 6.0),
    "Hyper-SD15-12steps-CFG-lora": ("hyper_sd15_cfg", "hyper_sd", "cfg_preserved", "sd15", 12, "pcm", "pcm", 6.0),
    "Hyper-SDXL-1step-lora": ("hyper_sdxl_1step_unified", "hyper_sd", "unified_1step", "sdxl", 1, "tcd", "lcm", 1.0),
    "Hyper-SDXL-2steps-lora": ("hyper_sdxl_nstep", "hyper_sd", "nstep", "sdxl", 2, "pcm", "pcm", 1.0),
    "Hyper-SDXL-4steps-lora": ("hyper_sdxl_nstep", "hyper_sd", "nstep", "sdxl", 4, "pcm", "pcm", 1.0),
    "Hyper-SDXL-8steps-lora": ("hyper_sdxl_nstep", "hyper_sd", "nstep", "sdxl", 8, "pcm", "pcm", 1.0),
    "Hyper-SDXL-8steps-CFG-lora": ("hyper_sdxl_cfg", "hyper_sd", "cfg_preserved", "sdxl", 8, "pcm", "pcm", 6.0),
    "Hyper-SDXL-12steps-CFG-lora": ("hyper_sdxl_cfg", "hyper_sd", "cfg_preserved", "sdxl", 12, "pcm", "pcm", 6.0),
    "Hyper-SD3-4steps-CFG-lora": ("hyper_sd3_cfg", "hyper_sd", "cfg_preserved", "sd3", 4, "euler", "simple", 3.0),
    "Hyper-SD3-8steps-CFG-lora": ("hyper_sd3_cfg", "hyper_sd", "cfg_preserved", "sd3", 8, "euler", "simple", 5.0),
    "Hyper-SD3-16steps-CFG-lora": ("hyper_sd3_cfg", "hyper_sd", "cfg_preserved", "sd3", 16, "euler", "simple", 7.0),
    "Hyper-FLUX.1-dev-8steps-lora": ("hyper_flux_nstep", "hyper_sd", "nstep", "flux", 8, "euler", "simple", 1.0),
    "Hyper-FLUX.1-dev-16steps-lora": ("hyper_flux_nstep", "hyper_sd", "nstep", "flux", 16, "euler", "simple", 1.0),
    "Hyper-SDXL-1step-Unet": UNET_1STEP,
    "Hyper-SDXL-1step-Unet-Comfyui.fp16": UNET_1STEP,
    "TCD-SD15-LoRA": ("tcd_sd15", "tcd", "tcd", "sd15", 4, "tcd", "lcm", 1.0),
    "TCD-SDXL-LoRA": ("tcd_sdxl", "tcd", "tcd", "sdxl", 4, "tcd", "lcm", 1.0),
    "tcd_sdxl": ("tcd_sdxl", "tcd", "tcd", "sdxl", 4, "tcd", "lcm", 1.0),
    "lcm-lora-sdv1-5": ("lcm_sd15", "lcm", "lcm", "sd15", 4, "lcm", "lcm", 1.0),
    "lcm_lora_sdxl": ("lcm_sdxl", "lcm", "lcm", "sdxl", 4, "lcm", "lcm", 1.0),
    "lcm-lora-sdxl": ("lcm_sdxl", "lcm", "lcm", "sdxl", 4, "lcm", "lcm", 1.0),
    "lcm-lora-ssd-1b": ("lcm_ssd1b", "lcm", "lcm", "ssd1b", 4, "lcm", "lcm", 1.0),
    "sdxl_lightning_2step_lora": ("lightning_sdxl", "lightning", "nstep", "sdxl", 2, "euler", "sgm_uniform", 1.0),
    "sdxl_lightning_4step_lora": ("lightning_sdxl", "lightning", "nstep", "sdxl", 4, "euler", "sgm_uniform", 1.0),
    "sdxl_lightning_8step_lora": ("lightning_sdxl", "lightning", "nstep", "sdxl", 8, "euler", "sgm_uniform", 1.0),
    "dmd2_sdxl_4step_lora_fp16": ("dmd2_sdxl", "dmd2", "4step", "sdxl", 4, "lcm", "pcm", 1.0),
    "dmd2_sdxl_4step_lora": ("dmd2_sdxl", "dmd2", "4step", "sdxl", 4, "lcm", "pcm", 1.0),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_NAMES))
def test_official_names_map_to_their_preset(name):
    pid, family, variant, arch, steps, sampler, scheduler, cfg = OFFICIAL_NAMES[name]
    preset = presets.preset_from_filename(name + ".safetensors")
    assert preset is not None, name
    got = (preset.preset_id, preset.family, preset.variant, preset.base_arch, preset.steps,
           preset.sampler, preset.scheduler, preset.cfg)
    assert got == (pid, family, variant, arch, steps, sampler, scheduler, cfg)
    assert preset.source == "filename"
    assert preset.cfg_min <= preset.cfg <= preset.cfg_max
    assert "(from file name)" in preset.message and f"sampler {sampler}" in preset.message


# ComfyUI-Manager installs these under loras/SDXL-Lightning and loras/DMD2 (model-list.json). Cards: Lightning N steps,
# Euler, sgm_uniform in ComfyUI (trailing in diffusers), guidance 0; DMD2 LCMScheduler on 999/749/499/249, guidance 0.
@pytest.mark.parametrize("name,label,steps,sampler,scheduler", [
    ("SDXL-Lightning/sdxl_lightning_2step_lora.safetensors", "SDXL-Lightning 2-step LoRA", 2, "euler", "sgm_uniform"),
    ("SDXL-Lightning/sdxl_lightning_4step_lora.safetensors", "SDXL-Lightning 4-step LoRA", 4, "euler", "sgm_uniform"),
    ("SDXL-Lightning/sdxl_lightning_8step_lora.safetensors", "SDXL-Lightning 8-step LoRA", 8, "euler", "sgm_uniform"),
    ("DMD2/dmd2_sdxl_4step_lora_fp16.safetensors", "DMD2 SDXL 4-step LoRA", 4, "lcm", "pcm"),
    ("DMD2/dmd2_sdxl_4step_lora.safetensors", "DMD2 SDXL 4-step LoRA", 4, "lcm", "pcm"),
])
def test_lightning_and_dmd2_loras_get_their_card_settings(name, label, steps, sampler, scheduler):
    preset = presets.preset_for(name, None, "sdxl", 64)
    assert (preset.source, preset.base_arch, preset.steps, preset.cfg, preset.strength) == ("filename", "sdxl", steps, 1.0, 1.0)
    assert not preset.negatives and preset.gamma is None
    assert preset.message == (f"{label} (from file name): sampler {sampler}, scheduler {scheduler}, {steps} steps, "
                              "CFG 1.0")


def test_dmd2_schedule_is_the_cards_timesteps():
    """The DMD2 card samples t = 999/749/499/249; the preset's scheduler must give those (the lcm grid would give
    999/759/499/259)."""
    from fewstep.schedulers.pcm import pcm_timesteps

    preset = presets.preset_from_filename("dmd2_sdxl_4step_lora_fp16.safetensors")
    assert preset.scheduler == "pcm" and pcm_timesteps(preset.steps) == [999, 749, 499, 249]


@pytest.mark.parametrize("name", [
    "sdxl_lightning_1step_unet_x0.safetensors",   # the 1-step model is a UNet ("sample" prediction), no LoRA
    "sdxl_lightning_4step_unet.safetensors",
    "dmd2_sdxl_4step_unet_fp16.safetensors",
])
def test_lightning_and_dmd2_unets_are_not_taken_for_loras(name):
    assert presets.preset_from_filename(name) is None


def test_family_specific_settings():
    tcd = presets.preset_from_filename("TCD-SD15-LoRA.safetensors")
    assert tcd.gamma == 0.3 and not tcd.negatives
    unified = presets.preset_from_filename("Hyper-SDXL-1step-lora.safetensors")
    assert unified.gamma == 1.0  # the card's TCD eta 1.0 is γ
    assert presets.preset_from_filename("Hyper-SD3-8steps-CFG-lora.safetensors").strength == 0.125
    assert presets.preset_from_filename("Hyper-FLUX.1-dev-8steps-lora.safetensors").strength == 0.125
    assert presets.preset_from_filename("Hyper-SDXL-8steps-CFG-lora.safetensors").negatives
    assert not presets.preset_from_filename("Hyper-SDXL-8steps-lora.safetensors").negatives
    assert presets.preset_from_filename("pcm_sd15_lcmlike_lora_converted.safetensors").phases is None
    assert presets.preset_from_filename("lcm-lora-sdv1-5.safetensors").gamma is None


@pytest.mark.parametrize("steps", range(1, 17))
@pytest.mark.parametrize("arch,k", [("sd15", 50), ("sdxl", 40)])
@pytest.mark.parametrize("mode", ["smallcfg", "normalcfg"])
def test_pcm_step_numbers_become_steps_and_phases(steps, arch, k, mode):
    preset = presets.preset_from_filename(f"pcm_{arch}_{mode}_{steps}step_converted.safetensors")
    got = (preset.preset_id, preset.steps, preset.phases, preset.ddim_timesteps)
    assert got == (f"pcm_{arch}_{mode}", steps, steps, k)
    assert f"{steps}-step" in preset.message


@pytest.mark.parametrize("steps", range(2, 17))
def test_hyper_step_numbers(steps):
    assert presets.preset_from_filename(f"Hyper-SDXL-{steps}steps-lora.safetensors").steps == steps
    assert presets.preset_from_filename(f"Hyper-SD15-{steps}steps-CFG-lora.safetensors").steps == steps


def test_sd3_shift_comes_from_the_name():
    assert presets.preset_from_filename("pcm_deterministic_4step_shift3.safetensors").shift == 3.0
    assert presets.preset_from_filename("pcm_deterministic_2step_shift1.safetensors").shift == 1.0
    assert presets.preset_from_filename("pcm_stochastic_shift3.safetensors").shift == 3.0
    assert presets.preset_from_filename("Hyper-SD3-4steps-CFG-lora.safetensors").shift == 3.0  # SD3 default


def test_impossible_step_count_is_not_taken():
    assert presets.preset_from_filename("pcm_sd15_smallcfg_0step.safetensors") is None


@pytest.mark.parametrize("name", [
    "PCM_SD15_SMALLCFG_4STEP_CONVERTED.SAFETENSORS",
    "hyper-sdxl-8steps-lora.safetensors",
    "loras/fast/Hyper-SDXL-8steps-lora.safetensors",
    "C:\\ComfyUI\\models\\loras\\Hyper-SDXL-8steps-lora.safetensors",
    "/home/u/ComfyUI/models/loras/sdxl/Hyper-SDXL-8steps-lora.safetensors",
])
def test_case_and_folders_do_not_matter(name):
    preset = presets.preset_from_filename(name)
    assert preset is not None and preset.steps in (4, 8)


def test_folder_names_are_not_matched():
    # only the base name counts: a folder called like a LoRA does not make its files one
    assert presets.preset_from_filename("loras/Hyper-SDXL-8steps-lora/my_style.safetensors") is None


def test_renamed_community_files():
    assert presets.preset_from_filename("sdxl_lcm_lora.safetensors").preset_id == "lcm_sdxl"
    assert presets.preset_from_filename("LCM_SD1.5.safetensors").preset_id == "lcm_sd15"
    assert presets.preset_from_filename("sdxl_hyper_sd_4step_lora.safetensors").preset_id == "hyper_sdxl_nstep"
    assert presets.preset_from_filename("Hyper-SDXL-8steps-lora_rank1.safetensors").steps == 8
    assert presets.preset_from_filename("pytorch_lora_weights.safetensors") is None


# ComfyUI-Manager's save paths (model-list.json: loras/SD1.5/lcm, loras/SDXL/lcm, loras/SSD-1B/lcm; names are relative
# to models/loras) and the Hugging Face repository names a download keeps as its folder. Every one of these
# repositories ships the one generic file pytorch_lora_weights.safetensors.
# name → (preset id, family, base_arch, structural arch, steps, sampler, scheduler, cfg)
FOLDER_NAMES = {
    "SD1.5/lcm/pytorch_lora_weights.safetensors": ("lcm_sd15", "lcm", "sd15", "sd15", 4, "lcm", "lcm", 1.0),
    "SDXL/lcm/pytorch_lora_weights.safetensors": ("lcm_sdxl", "lcm", "sdxl", "sdxl", 4, "lcm", "lcm", 1.0),
    "SSD-1B/lcm/pytorch_lora_weights.safetensors": ("lcm_ssd1b", "lcm", "ssd1b", "sdxl", 4, "lcm", "lcm", 1.0),
    "SDXL\\lcm\\pytorch_lora_weights.safetensors": ("lcm_sdxl", "lcm", "sdxl", "sdxl", 4, "lcm", "lcm", 1.0),
    "lcm-lora-sdv1-5/pytorch_lora_weights.safetensors": ("lcm_sd15", "lcm", "sd15", "sd15", 4, "lcm", "lcm", 1.0),
    "latent-consistency/lcm-lora-sdxl/pytorch_lora_weights.safetensors":
        ("lcm_sdxl", "lcm", "sdxl", "sdxl", 4, "lcm", "lcm", 1.0),
    "lcm-lora-ssd-1b/pytorch_lora_weights.safetensors": ("lcm_ssd1b", "lcm", "ssd1b", "sdxl", 4, "lcm", "lcm", 1.0),
    "TCD-SD15-LoRA/pytorch_lora_weights.safetensors": ("tcd_sd15", "tcd", "sd15", "sd15", 4, "tcd", "lcm", 1.0),
    "h1t/TCD-SDXL-LoRA/pytorch_lora_weights.safetensors": ("tcd_sdxl", "tcd", "sdxl", "sdxl", 4, "tcd", "lcm", 1.0),
    "C:\\ComfyUI\\models\\loras\\SD1.5\\lcm\\pytorch_lora_weights.safetensors":
        ("lcm_sd15", "lcm", "sd15", "sd15", 4, "lcm", "lcm", 1.0),
}


@pytest.mark.parametrize("name", sorted(FOLDER_NAMES))
def test_generic_file_names_are_recognised_by_their_folder(name):
    pid, family, arch, keys_arch, steps, sampler, scheduler, cfg = FOLDER_NAMES[name]
    preset = presets.preset_for(name, None, keys_arch, 64)
    got = (preset.preset_id, preset.family, preset.base_arch, preset.steps, preset.sampler, preset.scheduler, preset.cfg)
    assert got == (pid, family, arch, steps, sampler, scheduler, cfg)
    assert preset.source == "folder"
    assert "recognised by its folder" in preset.message and "pytorch_lora_weights being a generic file name" in preset.message
    assert f"sampler {sampler}, scheduler {scheduler}" in preset.message


@pytest.mark.parametrize("name,folder_text", [
    ("pytorch_lora_weights.safetensors", "it sits in no folder"),
    ("my_loras/pytorch_lora_weights.safetensors", "its folder my_loras/ names no known LoRA"),
    ("/home/u/ComfyUI/models/loras/misc/adapter_model.safetensors", "its folder misc/ names no known LoRA"),
])
def test_a_generic_name_in_an_unknown_folder_is_conservative_and_says_why(name, folder_text):
    preset = presets.preset_for(name, None, "sdxl", 64)
    assert (preset.preset_id, preset.source) == ("conservative_sdxl", "structure")
    assert "is a generic file name" in preset.message and folder_text in preset.message
    assert "conservative settings" in preset.message


def test_a_folder_that_contradicts_the_keys_is_not_trusted():
    preset = presets.preset_for("SD1.5/lcm/pytorch_lora_weights.safetensors", None, "sdxl", 64)
    assert (preset.preset_id, preset.source) == ("conservative_sdxl", "structure")
    assert "the folder SD1.5/lcm/ says LCM-LoRA SD1.5 but the keys are SDXL" in preset.message


def test_only_generic_names_look_at_their_folder():
    assert presets.preset_from_filename("SDXL/lcm/my_style.safetensors") is None
    # a recognised name wins over its folder (ComfyUI-Manager puts Hyper-SD15-4steps-lora under HyperSD/SDXL)
    assert presets.preset_from_filename("HyperSD/SDXL/Hyper-SD15-4steps-lora.safetensors").preset_id == "hyper_sd15_nstep"


def test_family_only_names_need_the_structure():
    assert presets.preset_from_filename("tcd.safetensors") is None
    assert presets.preset_from_filename("tcd.safetensors", base_arch="sdxl").preset_id == "tcd_sdxl"
    assert presets.preset_from_filename("my_lcm_lora.safetensors", base_arch="sd15").preset_id == "lcm_sd15"
    assert presets.preset_for("tcd.safetensors", None, "sd15").preset_id == "tcd_sd15"


# ---------------------------------------------------------------- trainer metadata

def _trainer_metadata(**overrides):
    meta = {
        presets.META_METHOD: "pcm", presets.META_PHASES: "4", presets.META_DDIM_TIMESTEPS: "50",
        presets.META_CFG_MODE: "small", presets.META_W_MIN: "4", presets.META_W_MAX: "5",
        presets.META_BASE_ARCH: "sd15", presets.META_STEPS_TRAINED: "2000", presets.META_VERSION: "0.1.0",
    }
    meta.update(overrides)
    return meta


def test_trainer_metadata_keys_are_exported():
    assert all(k.startswith(presets.TRAINER_METADATA_PREFIX) for k in presets.TRAINER_METADATA_KEYS)
    assert len(set(presets.TRAINER_METADATA_KEYS)) == 9
    # TSCD's own keys are optional: a PCM LoRA without them must still count as the trainer's (host/output_files.py)
    assert not {presets.META_STAGES, presets.META_STAGE} & set(presets.TRAINER_METADATA_KEYS)


def test_metadata_small_and_normal_cfg():
    small = presets.preset_from_metadata(_trainer_metadata())
    assert (small.family, small.sampler, small.scheduler, small.steps, small.phases, small.ddim_timesteps) == \
        ("fewstep", "pcm", "pcm", 4, 4, 50)
    assert (small.cfg, small.cfg_min, small.cfg_max, small.negatives) == (1.0, 1.0, 2.0, False)
    assert small.source == "metadata" and "trainer metadata" in small.message
    normal = presets.preset_from_metadata(_trainer_metadata(**{presets.META_CFG_MODE: "normal"}))
    assert (normal.cfg, normal.cfg_min, normal.cfg_max, normal.negatives) == (3.0, 2.0, 6.0, True)


def test_metadata_lcm_baseline():
    preset = presets.preset_from_metadata(_trainer_metadata(**{presets.META_METHOD: "lcm", presets.META_PHASES: "1"}))
    assert (preset.sampler, preset.scheduler, preset.phases) == ("lcm", "lcm", 1)


def test_metadata_tcd_is_the_unified_preset():
    """A TCD LoRA maps to any earlier point: the tcd sampler with the TCD card's gamma and steps, no phase edges."""
    preset = presets.preset_from_metadata(_trainer_metadata(**{presets.META_METHOD: "tcd", presets.META_PHASES: "1"}))
    assert (preset.sampler, preset.scheduler, preset.steps, preset.gamma, preset.phases, preset.ddim_timesteps) == \
        ("tcd", "lcm", 4, 0.3, None, None)
    assert preset.variant == "tcd_smallcfg" and "gamma 0.3" in preset.message and "Unified" in preset.notes


@pytest.mark.parametrize("stage,phases,expected", [
    ("1", "8", ("pcm", "pcm", 8, None, 8, 50)),
    ("3", "2", ("pcm", "pcm", 2, None, 2, 50)),
    ("4", "1", ("tcd", "lcm", 1, 1.0, None, None)),  # ended on one segment: Hyper-SD's unified LoRA
])
def test_metadata_tscd_gives_the_stage_reached(stage, phases, expected):
    meta = _trainer_metadata(**{presets.META_METHOD: "tscd", presets.META_STAGES: "8,4,2,1", presets.META_STAGE: stage,
                                presets.META_PHASES: phases})
    preset = presets.preset_from_metadata(meta)
    assert (preset.sampler, preset.scheduler, preset.steps, preset.gamma, preset.phases, preset.ddim_timesteps) == \
        expected
    assert "stages 8,4,2,1" in preset.label and preset.source == "metadata"
    assert preset.variant == ("tscd_unified_smallcfg" if phases == "1" else "tscd_smallcfg")


@pytest.mark.parametrize("stages", ["8,3,1", "8,x", "4,8", "8,4"])  # 8,4 lacks the phases (2) written beside it
def test_malformed_tscd_stages_raise(stages):
    meta = _trainer_metadata(**{presets.META_METHOD: "tscd", presets.META_STAGES: stages, presets.META_PHASES: "2"})
    with pytest.raises(ValueError, match="fewstep.stages"):
        presets.preset_from_metadata(meta)


@pytest.mark.parametrize("arch", ["sd15", "sd2", "sdxl", "sd3", "flux"])
def test_metadata_of_every_trainable_architecture_is_read(arch):
    """The trainer writes fewstep.base_arch for every model it trains, SD2 included (it was refused as malformed,
    so an SD2 LoRA of this pack fell back to the conservative preset)."""
    from fewstep.loras.architectures import TRAINABLE_ARCHS

    assert arch in TRAINABLE_ARCHS
    preset = presets.preset_for("my_lora.safetensors", _trainer_metadata(**{presets.META_BASE_ARCH: arch}), arch, 16)
    assert (preset.source, preset.base_arch, preset.phases) == ("metadata", arch, 4)


@pytest.mark.parametrize("w_min,w_max", [("nan", "5"), ("4", "inf"), ("-1", "5"), ("9", "2"), ("four", "5")])
def test_nonsense_guidance_in_metadata_is_ignored_and_said(w_min, w_max):
    meta = _trainer_metadata(**{presets.META_W_MIN: w_min, presets.META_W_MAX: w_max})
    preset = presets.preset_for("my_lora.safetensors", meta, "sd15", 16)
    assert preset.source == "structure" and "trainer metadata ignored (fewstep.w_" in preset.message, preset.message


def test_metadata_that_is_not_ours():
    assert presets.preset_from_metadata(None) is None
    assert presets.preset_from_metadata({"ss_network_dim": "64"}) is None


@pytest.mark.parametrize("override", [
    {presets.META_METHOD: "dmd"}, {presets.META_PHASES: "four"}, {presets.META_PHASES: "0"},
    {presets.META_BASE_ARCH: "sd21"}, {presets.META_CFG_MODE: "huge"}, {presets.META_DDIM_TIMESTEPS: "2"},
])
def test_malformed_metadata_raises(override):
    with pytest.raises(ValueError):
        presets.preset_from_metadata(_trainer_metadata(**override))


def test_metadata_beats_the_file_name():
    preset = presets.preset_for("Hyper-SDXL-8steps-lora.safetensors", _trainer_metadata(), "sd15", 64)
    assert preset.source == "metadata" and preset.family == "fewstep"


def test_malformed_metadata_falls_back_and_says_so():
    broken = _trainer_metadata(**{presets.META_PHASES: "x"})
    named = presets.preset_for("Hyper-SD15-4steps-lora.safetensors", broken, "sd15")
    assert named.source == "filename" and "metadata ignored" in named.message
    unnamed = presets.preset_for("mine.safetensors", broken, "sd15")
    assert unnamed.source == "structure" and "metadata ignored" in unnamed.message


# ---------------------------------------------------------------- preset_for fallbacks

def test_name_and_structure_agree():
    preset = presets.preset_for("Hyper-SDXL-8steps-lora.safetensors", None, "sdxl", 64)
    assert preset.preset_id == "hyper_sdxl_nstep" and preset.source == "filename"


def test_sdxl_and_ssd1b_do_not_contradict():
    assert presets.preset_for("lcm-lora-ssd-1b.safetensors", None, "sdxl").preset_id == "lcm_ssd1b"


def test_arch_contradiction_falls_back_to_structure():
    preset = presets.preset_for("Hyper-SDXL-8steps-lora.safetensors", None, "sd15", 64)
    assert preset.source == "structure" and preset.base_arch == "sd15" and preset.family == "unknown"
    assert "not trusted" in preset.message and "SD1.5" in preset.message and "conservative" in preset.message


@pytest.mark.parametrize("name,preset_id,steps,shift", [
    ("pcm_deterministic_2step_shift1.safetensors", "pcm_sd3_deterministic", 2, 1.0),
    ("pcm_deterministic_4step_shift1.safetensors", "pcm_sd3_deterministic", 4, 1.0),
    ("pcm_deterministic_4step_shift3.safetensors", "pcm_sd3_deterministic", 4, 3.0),
    ("pcm_stochastic_shift3.safetensors", "pcm_sd3_stochastic", 4, 3.0),
])
def test_pcm_sd3_files_are_recognised_from_mmdit_keys(name, preset_id, steps, shift):
    """The published PCM-SD3 files carry no pos_embed, so their keys say only "MMDiT" (SD3 or FLUX): that agrees
    with an SD3 name (it used to make the name distrusted, giving the conservative preset). Card: 2 / 4 steps,
    CFG 1.2, shift 1 or 3."""
    preset = presets.preset_for(name, None, "mmdit", 32)
    assert (preset.preset_id, preset.source, preset.base_arch) == (preset_id, "filename", "sd3")
    assert (preset.steps, preset.cfg, preset.shift) == (steps, 1.2, shift)
    assert "not trusted" not in preset.message


def test_mmdit_keys_still_contradict_a_unet_name():
    preset = presets.preset_for("pcm_sdxl_smallcfg_4step_converted.safetensors", None, "mmdit", 32)
    assert preset.source == "unknown" and "not trusted" in preset.message


def test_structure_only_gives_the_conservative_preset_for_that_arch():
    preset = presets.preset_for("my_fast_lora.safetensors", None, "sdxl", 32)
    assert (preset.preset_id, preset.source, preset.base_arch) == ("conservative_sdxl", "structure", "sdxl")
    assert "unknown family" in preset.message and "conservative" in preset.message and "rank 32" in preset.message


def test_unknown_file_is_conservative():
    preset = presets.preset_for("my_fast_lora.safetensors", None, None, None)
    assert (preset.preset_id, preset.source, preset.base_arch) == ("conservative", "unknown", None)
    assert (preset.sampler, preset.scheduler, preset.steps, preset.cfg, preset.strength) == ("pcm", "pcm", 8, 1.5, 1.0)
    assert "unknown" in preset.message and "conservative" in preset.message and "model card" in preset.message


def test_unsupported_arch_is_unknown():
    preset = presets.preset_for("x.safetensors", None, "sd21")
    assert preset.source == "unknown" and "sd21" in preset.message


# ---------------------------------------------------------------- the table itself

def test_every_table_preset_is_consistent():
    table = presets.all_presets()
    assert len(table) >= 20
    for pid, p in table.items():
        assert p.preset_id == pid and p.source == "table"
        assert p.steps >= 1 and p.cfg_min <= p.cfg <= p.cfg_max and p.strength > 0
        assert (p.gamma is not None) == (p.sampler == "tcd"), pid
        assert p.sampler in presets.SAMPLER_NAMES and p.scheduler in presets.SCHEDULER_NAMES, pid
        assert not (p.cfg == 1.0 and p.negatives), pid


def test_every_arch_has_a_conservative_preset():
    for arch in presets.ARCHES:
        assert presets.conservative_preset(arch).base_arch == arch
    assert presets.conservative_preset(None).base_arch is None


def _raw_table():
    return json.loads(presets.TABLE_PATH.read_text(encoding="utf-8"))


def test_shipped_table_validates():
    presets.validate_table(_raw_table())


@pytest.mark.parametrize("breakage,expected", [
    (lambda t: t["families"]["tcd_sd15"].update(sampler="tcd_typo"), "tcd_sd15"),
    (lambda t: t["families"]["lcm_sdxl"].update(scheduler="sgm-uniform"), "lcm_sdxl"),
    (lambda t: t["families"]["hyper_sd15_nstep"].pop("strength"), "hyper_sd15_nstep"),
    (lambda t: t["families"]["pcm_sd15_smallcfg"]["cfg"].update(default=3.0), "pcm_sd15_smallcfg"),
    (lambda t: t["families"]["pcm_sdxl_smallcfg"].update(steps=0), "pcm_sdxl_smallcfg"),
    (lambda t: t["families"]["lcm_sd15"].update(base_arch="sd21"), "lcm_sd15"),
    (lambda t: t["families"]["tcd_sdxl"].update(gamma=None), "tcd_sdxl"),
    (lambda t: t["families"]["lcm_sd15"].update(negatives=True), "lcm_sd15"),
    (lambda t: t["families"]["lcm_sd15"].update(label="{arch} LoRA"), "lcm_sd15"),
    (lambda t: t["families"]["lcm_sd15"].update(sources=["nowhere"]), "lcm_sd15"),
    (lambda t: t["filename_patterns"].append({"regex": "tcd(", "preset": "tcd_sd15"}), "bad regex"),
    (lambda t: t["filename_patterns"].append({"regex": "x", "preset": "missing_preset"}), "missing_preset"),
    (lambda t: t["filename_patterns"].append({"regex": "(?P<n>x)", "preset": "tcd_sd15"}), "groups"),
    (lambda t: t["generic_file_names"].update(names=[]), "generic_file_names"),
    (lambda t: t["generic_file_names"].update(sources=["nowhere"]), "generic_file_names"),
])
def test_validation_catches_a_broken_table(breakage, expected):
    table = copy.deepcopy(_raw_table())
    breakage(table)
    with pytest.raises(ValueError, match=re.escape(expected)):
        presets.validate_table(table)


def test_pack_names_are_the_registered_ones():
    source = "".join((ROOT / package / "registry.py").read_text(encoding="utf-8") for package in ("samplers", "schedulers"))
    for name in presets.PACK_SAMPLERS + presets.PACK_SCHEDULERS:
        assert re.search(rf'"{name}"\s*:', source), name


@pytest.mark.skipif(not CORE_SAMPLERS_SOURCE.exists(), reason="no ComfyUI checkout under .comfyui/")
def test_core_names_exist_in_comfyui():
    source = CORE_SAMPLERS_SOURCE.read_text(encoding="utf-8")
    for name in presets.CORE_SAMPLERS + presets.CORE_SCHEDULERS:
        assert f'"{name}"' in source, name
