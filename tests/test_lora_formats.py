"""Pure LoRA file handling: key formats, scale rules, names, architecture guess, refusing bad files."""
import json
import math
import struct

import pytest
import torch
from safetensors.torch import save_file

from fewstep.loras.formats import (MAX_RANK, LoraFileError, guess_base_arch, module_aliases, parse_lora,
                                   read_lora_file, read_safetensors_header)

UP_DOWN = {
    "kohya": (".lora_up.weight", ".lora_down.weight"),
    "peft": (".lora_B.weight", ".lora_A.weight"),
    "peft-default": (".lora_B.default.weight", ".lora_A.default.weight"),
    "lora.up": (".lora.up.weight", ".lora.down.weight"),
    "processor": ("_lora.up.weight", "_lora.down.weight"),
    "linear_layer": (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
}


def pair(name, style, out_dim=8, in_dim=6, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    up_s, down_s = UP_DOWN[style]
    return {name + up_s: torch.randn(out_dim, rank, generator=g), name + down_s: torch.randn(rank, in_dim, generator=g)}


@pytest.mark.parametrize("style", sorted(UP_DOWN))
def test_every_suffix_style_pairs_up(style):
    sd = pair("unet.down_blocks.0.attentions.0.proj_in", style)
    parsed = parse_lora(sd)
    assert [m.name for m in parsed.modules] == ["unet.down_blocks.0.attentions.0.proj_in"]
    assert parsed.unused == []
    m = parsed.modules[0]
    assert m.rank == 2 and m.delta_shape() == (8, 6) and m.scale == 1.0 and m.scale_rule == "none"


def test_alpha_key_gives_alpha_over_rank_and_is_consumed():
    sd = pair("lora_unet_mid_block_attentions_0_proj_in", "kohya", rank=4)
    sd["lora_unet_mid_block_attentions_0_proj_in.alpha"] = torch.tensor(1.0)
    (m,) = parse_lora(sd).modules
    assert m.scale == 0.25 and m.scale_rule == "alpha key"
    assert "lora_unet_mid_block_attentions_0_proj_in.alpha" in m.keys


def test_peft_metadata_scales_per_component_with_patterns():
    sd = {**pair("unet.a.to_q", "peft", rank=4), **pair("unet.b.to_k", "peft", rank=4, seed=1),
          **pair("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "peft", rank=4, seed=2)}
    config = {"unet.r": 4, "unet.lora_alpha": 2, "unet.alpha_pattern": {"b.to_k": 8},
              "text_encoder.r": 4, "text_encoder.lora_alpha": 1}
    parsed = parse_lora(sd, {"lora_adapter_metadata": json.dumps(config)})
    scales = {m.name: (m.scale, m.scale_rule) for m in parsed.modules}
    assert scales["unet.a.to_q"] == (0.5, "peft metadata")
    assert scales["unet.b.to_k"] == (2.0, "peft metadata")  # alpha_pattern wins for its module
    assert scales["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"] == (0.25, "peft metadata")


def test_peft_model_level_metadata_and_rslora():
    sd = pair("base_model.model.transformer_blocks.0.attn.to_q", "peft", rank=16)
    plain = parse_lora(sd, {"lora_adapter_metadata": json.dumps({"r": 16, "lora_alpha": 8})}).modules[0]
    rs = parse_lora(sd, {"lora_adapter_metadata": json.dumps({"r": 16, "lora_alpha": 8, "use_rslora": True})}).modules[0]
    assert plain.scale == 0.5
    assert math.isclose(rs.scale, 8 / 4.0)


def test_no_alpha_anywhere_is_scale_one_like_diffusers():
    (m,) = parse_lora(pair("transformer.single_transformer_blocks.0.proj_out", "peft", rank=8)).modules
    assert m.scale == 1.0


def test_orphans_and_extras_are_reported_by_name():
    sd = pair("unet.x.to_q", "peft")
    sd["unet.y.to_k.lora_A.weight"] = torch.zeros(2, 6)  # half a pair
    sd["unet.z.some_bias.diff_b"] = torch.zeros(3)
    parsed = parse_lora(sd)
    assert [m.name for m in parsed.modules] == ["unet.x.to_q"]
    assert parsed.unused == ["unet.y.to_k.lora_A.weight", "unet.z.some_bias.diff_b"]


def test_conv_lora_delta_shape():
    sd = {"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3),
          "lora_unet_conv_in.lora_up.weight": torch.zeros(320, 4, 1, 1)}
    (m,) = parse_lora(sd).modules
    assert m.delta_shape() == (320, 4, 3, 3)


def test_rank_mismatch_and_absurd_rank_are_refused():
    bad = {"x.lora_up.weight": torch.zeros(8, 3), "x.lora_down.weight": torch.zeros(2, 6)}
    with pytest.raises(LoraFileError, match="do not share a rank"):
        parse_lora(bad)
    huge = {"x.lora_up.weight": torch.zeros(2, MAX_RANK + 1), "x.lora_down.weight": torch.zeros(MAX_RANK + 1, 2)}
    with pytest.raises(LoraFileError, match=f"rank {MAX_RANK + 1}"):
        parse_lora(huge)


def test_aliases_cover_processor_and_peft_wrappers():
    assert "unet.a.attn1.to_q" in module_aliases("unet.a.attn1.processor.to_q")
    assert "unet.a.attn1.to_out.0" in module_aliases("unet.a.attn1.processor.to_out")
    assert "unet.down_blocks.0.x" in module_aliases("unet.base_model.model.down_blocks.0.x")
    assert "transformer_blocks.0.attn.to_q" in module_aliases("base_model.model.transformer_blocks.0.attn.to_q")
    assert "diffusion_model.input_blocks.1.1.proj_in" in module_aliases("model.diffusion_model.input_blocks.1.1.proj_in")


@pytest.mark.parametrize("names,in_dim,arch", [
    (["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"], 768, "sd15"),
    (["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"], 2048, "sdxl"),
    (["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v"], 1024, "sd2"),
    (["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"], 1280, "sdxl"),
    (["lora_unet_joint_blocks_0_x_block_attn_qkv"], 64, "sd3"),
    (["diffusion_model.x_embedder.proj", "diffusion_model.joint_blocks.0.x_block.mlp.fc1"], 64, "sd3"),
    (["transformer.x_embedder", "transformer.transformer_blocks.0.attn.to_q"], 64, "flux"),
    (["transformer.single_transformer_blocks.0.proj_out"], 64, "flux"),
    (["lora_unet_double_blocks_0_img_attn_qkv"], 64, "flux"),
    (["transformer.transformer_blocks.0.attn.add_q_proj"], 64, "mmdit"),
    (["lora_te_text_model_encoder_layers_0_self_attn_q_proj"], 768, "sd15"),
])
def test_base_arch_from_structure(names, in_dim, arch):
    sd = {}
    for n in names:
        sd[n + ".lora_down.weight"] = torch.zeros(2, in_dim)
        sd[n + ".lora_up.weight"] = torch.zeros(4, 2)
    assert guess_base_arch(parse_lora(sd)) == arch


# ---------------------------------------------------------------- files

def write(tmp_path, name, tensors, metadata=None):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_reads_a_good_file_with_metadata(tmp_path):
    path = write(tmp_path, "ok.safetensors", pair("unet.a.to_q", "peft"), {"fewstep.method": "pcm"})
    tensors, metadata = read_lora_file(str(path))
    assert set(tensors) == {"unet.a.to_q.lora_B.weight", "unet.a.to_q.lora_A.weight"}
    assert metadata["fewstep.method"] == "pcm"


@pytest.mark.parametrize("ext", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_files_are_refused_without_opening(tmp_path, ext):
    path = tmp_path / ("evil" + ext)
    path.write_bytes(b"not even read")
    path.chmod(0o000)  # proof that it is never opened
    try:
        with pytest.raises(LoraFileError, match="never unpickled"):
            read_lora_file(str(path))
    finally:
        path.chmod(0o644)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(LoraFileError, match="empty"):
        read_lora_file(str(path))


def test_truncated_file(tmp_path):
    path = write(tmp_path, "cut.safetensors", pair("unet.a.to_q", "peft", out_dim=64, in_dim=64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(LoraFileError, match="truncated"):
        read_lora_file(str(path))
    path.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(LoraFileError, match="truncated or corrupt"):
        read_lora_file(str(path))


def test_corrupt_header(tmp_path):
    path = tmp_path / "garbage.safetensors"
    body = b"{this is not json"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(LoraFileError, match="corrupt safetensors header"):
        read_safetensors_header(str(path))
    path.write_bytes(b"\xff" * 4096)  # random bytes: absurd header length
    with pytest.raises(LoraFileError, match="not a valid safetensors"):
        read_lora_file(str(path))


def test_no_tensors(tmp_path):
    path = write(tmp_path, "hollow.safetensors", {}, {"format": "pt"})
    with pytest.raises(LoraFileError, match="no tensors"):
        read_lora_file(str(path))


def test_nan_and_inf_are_refused_by_name(tmp_path):
    sd = pair("unet.a.to_q", "peft")
    sd["unet.a.to_q.lora_A.weight"][0, 0] = float("nan")
    sd.update(pair("unet.b.to_k", "peft", seed=3))
    sd["unet.b.to_k.lora_B.weight"][1, 1] = float("inf")
    path = write(tmp_path, "nan.safetensors", sd)
    with pytest.raises(LoraFileError, match=r"NaN or Inf values in 2 tensor\(s\) \(unet.a.to_q.lora_A.weight, unet.b.to_k"):
        read_lora_file(str(path))


def test_not_safetensors_extension(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(LoraFileError, match="only .safetensors"):
        read_lora_file(str(path))


def test_peft_patterns_match_on_dotted_suffixes_like_peft():
    """PEFT applies a pattern to every module whose path ends with it on a dot boundary."""
    sd = {**pair("transformer.proj_out", "peft", rank=4), **pair("transformer.single_transformer_blocks.0.proj_out",
                                                                   "peft", rank=4, seed=1),
          **pair("transformer.x_proj_out", "peft", rank=4, seed=2)}
    config = {"transformer.r": 4, "transformer.lora_alpha": 4, "transformer.alpha_pattern": {"proj_out": 8}}
    scales = {m.name: m.scale for m in parse_lora(sd, {"lora_adapter_metadata": json.dumps(config)}).modules}
    assert scales == {"transformer.proj_out": 2.0, "transformer.single_transformer_blocks.0.proj_out": 2.0,
                      "transformer.x_proj_out": 1.0}


def test_a_full_model_file_is_not_a_lora():
    """A UNet or checkpoint put in models/loras (e.g. Hyper-SDXL-1step-Unet.safetensors) has no LoRA pair: it gets a
    message naming the right loaders; LoRA and other adapter files do not."""
    from fewstep.loras.formats import not_a_lora_problem

    unet = ["input_blocks.0.0.weight", "input_blocks.0.0.bias", "out.2.weight"]
    message = not_a_lora_problem(unet, "Hyper-SDXL-1step-Unet.safetensors")
    assert "is not a LoRA" in message and "Hyper-SDXL 1-Step UNet Loader" in message and "diffusion_models" in message
    checkpoint = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"]
    assert "Load Checkpoint" in not_a_lora_problem(checkpoint, "x.safetensors")
    assert not_a_lora_problem(["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight"], "x") is None
    assert not_a_lora_problem(["lora_unet_a.hada_w1_a", "lora_unet_a.hada_w1_b"], "x") is None  # LoHa: another path
    assert not_a_lora_problem(["__metadata__"], "x") is None  # no tensors: refused elsewhere


# ---------------------------------------------------------------- PEFT save_pretrained files without their config

def test_pcm_sdxl_first_upload_gets_the_lora_alpha_it_was_trained_with(tmp_path):
    """The first PCM-SDXL files (base_model.model.… lora_A/lora_B, fp32, rank 64, no alpha, no metadata) were trained
    under PEFT's LoraConfig(r=64) with the default lora_alpha 8: scale 8/64. At scale 1 they were 8x too strong.
    diffusers never applied them at scale 1 (it refused or skipped the layout): docs/algorithms.md."""
    from support.lora_files import PCM_SDXL_FIRST_UPLOAD, published_lora, write_lora

    path = write_lora(tmp_path / "pcm_sdxl_smallcfg_4step.safetensors",
                      published_lora(PCM_SDXL_FIRST_UPLOAD, rank=64), {"format": "pt"})
    parsed = parse_lora(*read_lora_file(str(path)))
    assert (parsed.base_arch, parsed.key_formats, parsed.unused) == ("sdxl", ("peft",), [])
    assert len(parsed.modules) == len(PCM_SDXL_FIRST_UPLOAD)
    assert {(m.scale, m.scale_rule, m.up.dtype) for m in parsed.modules} == {(0.125, "peft default alpha", torch.float32)}


@pytest.mark.parametrize("prefix,metadata,scale,rule", [
    ("base_model.model.", {"lora_adapter_metadata": json.dumps({"r": 16, "lora_alpha": 16})}, 1.0, "peft metadata"),
    ("unet.", {}, 1.0, "none"),                    # diffusers' own PEFT save: no alpha means alpha = rank
    ("", {}, 1.0, "none"),
])
def test_peft_default_alpha_is_only_for_unet_saves_without_any_config(prefix, metadata, scale, rule):
    from support.lora_files import PCM_SDXL_FIRST_UPLOAD, published_lora

    layers = {prefix + name[len("base_model.model."):]: shape for name, shape in PCM_SDXL_FIRST_UPLOAD.items()}
    parsed = parse_lora(published_lora(layers, rank=16), metadata)
    assert {(m.scale, m.scale_rule) for m in parsed.modules} == {(scale, rule)}


def test_model_level_peft_transformer_without_config_keeps_scale_one():
    (m,) = parse_lora(pair("base_model.model.transformer_blocks.0.attn.to_q", "peft", rank=16)).modules
    assert (m.scale, m.scale_rule) == (1.0, "none")
