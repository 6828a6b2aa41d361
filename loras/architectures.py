"""The pack's one vocabulary of model architectures: names, labels, and which parts of the pack cover which.

Every architecture name the pack uses is one of these: the key-structure guess of a LoRA file
(loras/formats.py guess_base_arch), the architecture of a loaded model (host/lora_patches.py model_arch), the
preset table's base_arch and by_arch keys (loras/presets.json, checked by loras/presets.py), the fewstep.base_arch
metadata the trainer writes, and the models the trainer supports (host/training_model.py). Pure Python.
"""

SD15, SD2, SDXL, SSD1B, SD3, FLUX, MMDIT = "sd15", "sd2", "sdxl", "ssd1b", "sd3", "flux", "mmdit"

LABELS = {SD15: "SD1.5", SD2: "SD2.x", SDXL: "SDXL", SSD1B: "SSD-1B", SD3: "SD3", FLUX: "FLUX", MMDIT: "SD3/FLUX"}

# What model_arch names; any other model is named by its ComfyUI model config's class name (lower case).
# SSD-1B loads as an SDXL model in ComfyUI, so a loaded model is never "ssd1b".
MODEL_ARCHS = (SD15, SD2, SDXL, SD3, FLUX)
# What guess_base_arch names: the model architectures, and "mmdit" when a LoRA's names fit SD3 and FLUX alike.
LORA_ARCHS = MODEL_ARCHS + (MMDIT,)
# The architectures the preset table has presets for (the trainer-metadata reader accepts these).
PRESET_ARCHS = (SD15, SDXL, SSD1B, SD3, FLUX)
# UNet models (the trainer's UNet path and the adversarial term), and all the trainer supports.
UNET_ARCHS = (SD15, SD2, SDXL)
TRAINABLE_ARCHS = UNET_ARCHS + (SD3, FLUX)
# The UNet families by the width of their text context (cross-attention key/value input).
CONTEXT_DIM_ARCHS = {768: SD15, 1024: SD2, 2048: SDXL}


def arch_label(arch) -> str:
    """"SD1.5", "SD3/FLUX", ...; an unknown name as it is, None as "unknown"."""
    return LABELS.get(arch, arch or "unknown")


def arch_fits(lora_arch, target_arch) -> bool:
    """Whether a LoRA guessed as lora_arch may be applied to a model of target_arch (None: not known, allowed)."""
    if lora_arch is None or target_arch is None or lora_arch == target_arch:
        return True
    return lora_arch == MMDIT and target_arch in (SD3, FLUX)


def same_family(named_arch, structural_arch) -> bool:
    """Whether a file name's architecture agrees with the key structure's (None: not known, agrees).

    SSD-1B is a pruned SDXL: a key-structure check may report either for the same file. MMDiT keys without the
    layers that tell SD3 from FLUX (the published PCM-SD3 files carry no pos_embed) agree with a name of either.
    """
    if structural_arch is None or named_arch == structural_arch:
        return True
    if structural_arch == MMDIT:
        return named_arch in (SD3, FLUX)
    return {named_arch, structural_arch} == {SDXL, SSD1B}


def label_list(archs) -> str:
    """"SD1.5, SD2.x, SDXL, SD3 and FLUX"."""
    labels = [arch_label(a) for a in archs]
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]
