"""Scale rules against diffusers itself: the same file loaded by diffusers (+ peft) and by `parse_lora`.

A small SD1.5-shaped diffusers UNet takes a LoRA file through diffusers' own entry points
(`lora_state_dict` → `load_lora_into_unet`, which convert kohya files and read `lora_adapter_metadata`);
peft's `get_delta_weight` then gives the weight change diffusers applies to each layer. Ours must be
scale · up @ down with the scale `parse_lora` assigned — for `.alpha` keys, PEFT metadata with per-layer
patterns, and files with neither. One documented exception: kohya files whose attention layers carry alphas
other than the file's most common one (diffusers drops those, see below).
"""
import json

import pytest
import torch
from safetensors.torch import save_file

from fewstep.loras.formats import parse_lora

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

RANK = 4


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


def lora_targets(unet):
    """diffusers module name -> (out, in) of every attention/projection Linear (what LoRA trainers target)."""
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(s) for s in (
                "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj")):
            out[name] = (module.out_features, module.in_features)
    return out


def write(tmp_path, style, targets, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors, alphas = {}, {}
    for i, (name, (out_dim, in_dim)) in enumerate(sorted(targets.items())):
        down = torch.randn(RANK, in_dim, generator=g) * 0.1
        up = torch.randn(out_dim, RANK, generator=g) * 0.1
        if style.startswith("kohya"):
            key = "lora_unet_" + name.replace(".", "_")
            tensors[key + ".lora_down.weight"], tensors[key + ".lora_up.weight"] = down, up
            # kohya-mixed: per-layer alphas 1, 2, 3 (sd-scripts writes one alpha per layer; most files repeat it)
            tensors[key + ".alpha"] = torch.tensor(float(1 + i % 3) if style == "kohya-mixed" else 2.0)
        else:
            key = "unet." + name
            tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = down, up
    metadata = {"format": "pt"}
    if style == "peft-metadata":
        names = sorted(targets)
        pattern = {names[1]: 16.0, names[5]: 0.5}
        metadata["lora_adapter_metadata"] = json.dumps({
            "unet.r": RANK, "unet.lora_alpha": 2.0, "unet.alpha_pattern": pattern, "unet.rank_pattern": {},
            "unet.target_modules": names, "unet.lora_dropout": 0.0, "unet.use_dora": False, "unet.use_rslora": False,
            "unet.lora_bias": False, "unet.init_lora_weights": True})
    path = tmp_path / f"{style}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path, tensors, metadata


def diffusers_deltas(path):
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader

    unet = tiny_unet()
    state_dict, network_alphas, metadata = Loader.lora_state_dict(str(path), return_lora_metadata=True)
    Loader.load_lora_into_unet(state_dict, network_alphas, unet, adapter_name="x", metadata=metadata)
    deltas = {}
    for name, module in unet.named_modules():
        if hasattr(module, "get_delta_weight") and "x" in getattr(module, "lora_A", {}):
            deltas[name] = module.get_delta_weight("x").detach().double()
    return deltas


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.mark.parametrize("style", ["kohya", "kohya-mixed", "peft-metadata", "peft-no-alpha"])
def test_scale_equals_what_diffusers_applies(tmp_path, style):
    targets = lora_targets(tiny_unet())
    path, tensors, metadata = write(tmp_path, style, targets)
    reference = diffusers_deltas(path)
    assert set(reference) == set(targets)
    parsed = parse_lora(tensors, metadata)
    assert parsed.unused == [] and len(parsed.modules) == len(targets)
    scales = set()
    for module in parsed.modules:
        name = module.name.removeprefix("unet.").removeprefix("lora_unet_")
        if style.startswith("kohya"):  # kohya flattens dots; map back through the diffusers names
            name = next(t for t in targets if t.replace(".", "_") == name)
        ours = module.scale * (module.up.double() @ module.down.double())
        ratio = (reference[name].norm() / ours.norm()).item()
        err = ((ours - reference[name]).abs().max() / reference[name].abs().max()).item()
        if style == "kohya-mixed" and name.endswith(ATTENTION):
            # diffusers 0.42 writes these layers' alpha_pattern keys in the old "processor.to_q_lora" spelling,
            # peft ignores them (it warns) and applies the file's most common alpha (1) instead. We keep each
            # layer's own alpha, as kohya's sd-scripts, A1111 and ComfyUI core do.
            assert ratio == pytest.approx(1.0 / (module.scale * RANK), rel=1e-6), (module.name, ratio)
        else:
            assert err < 1e-6, (module.name, module.scale, err)
        scales.add(round(module.scale, 6))
    assert len(scales) > 1 or style in ("kohya", "peft-no-alpha")  # per-layer scales were exercised
