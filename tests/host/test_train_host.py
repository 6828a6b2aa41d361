"""host/training_model.py in a real ComfyUI: the engine's denoiser, σ table, conditioning and LoRA targets.

The reference is what sampling computes: `process_conds` + `calc_cond_batch` (the function every sampler's model
call ends in) on the same x, σ and CONDITIONING, with a model_function_wrapper that records the kwargs sampling
hands `apply_model`. A LoraSet trained through the denoiser must give what core's LoRA loading of its
`lora_state_dict()` file gives, and what the pack's student loader gives. SD1.5 prompts go through the
checkpoint's CLIP (a 77- and a 154-token one); SDXL (the UNet-only file: its CLIP-G would cost more than the rest
of this file), SD3 and FLUX get seeded tensors of CLIP/T5 width where CLIPTextEncode puts its outputs.
Latents are 8×8, batches 1-2: the whole file takes about 20 s on an idle 2-core CPU.
"""
import logging

import pytest
import torch
from safetensors.torch import save_file

from support.log_capture import captured_log
from support.tiny_models import LATENT_CHANNELS, seeded_conditioning

from fewstep.distill.lora import LoraSet

ARCHS = ["sd15", "sdxl", "sd3", "flux"]
LATENT_HW = (8, 8)
LONG_PROMPT = " ".join(["a fox in the snow"] * 20)  # > 75 CLIP tokens: a 154-token conditioning


@pytest.fixture(scope="module")
def th(comfy_host):
    from fewstep.host import training_model

    return training_model


@pytest.fixture(scope="module")
def models(arch_models):
    """models(arch) -> (ModelPatcher, CLIP or None). SDXL is the UNet-only file (same UNet as the checkpoint):
    its CLIP-G would cost more than the rest of this file."""
    loaded = {}

    def get(arch):
        if arch not in loaded:
            if arch == "sdxl":
                import comfy.sd
                from support.tiny_models import cached_tiny_sdxl_unet

                loaded[arch] = (comfy.sd.load_diffusion_model(str(cached_tiny_sdxl_unet())), None)
            else:
                loaded[arch] = arch_models(arch)
        return loaded[arch]

    return get


@pytest.fixture(scope="module")
def arch_conds(models, th):
    """arch_conds(arch) -> (cond_a, cond_b): two different CONDITIONINGs for the model."""
    made = {}

    def get(arch):
        if arch not in made:
            model, clip = models(arch)
            if arch == "sd15":  # a 77- and a 154-token prompt: the batch repeats the short one to 154
                made[arch] = tuple(th.encode_prompts(clip, ["a red fox, photograph", LONG_PROMPT]))
            else:  # what CLIPTextEncode gives (context, pooled_output), seeded and short; SDXL's b with CLIPTextEncodeSDXL sizes
                g = torch.Generator().manual_seed(3)

                def cond(tokens, extra):
                    return seeded_conditioning(arch, tokens, g, extra)

                extra_b = {"sdxl": {"width": 1024, "height": 768, "crop_w": 16, "crop_h": 0, "target_width": 896,
                                    "target_height": 640},
                           "flux": {"guidance": 2.0}}.get(arch, {})
                # SDXL's cross-attention rows may differ in length (8 and 16 share a batch at 16); SD3/FLUX's may not
                made[arch] = (cond(8, {}), cond(16 if arch == "sdxl" else 8, extra_b))
        return made[arch]

    return get


def load(model):
    import comfy.model_management as mm

    mm.load_models_gpu([model], force_full_load=True)


def unload_all():
    import comfy.model_management as mm

    mm.unload_all_models()


def sampled(model, conditionings, x, sigma):
    """(D per conditioning, kwargs sampling handed apply_model): process_conds + calc_cond_batch, as a sampler."""
    import comfy.model_patcher
    import comfy.sampler_helpers
    import comfy.samplers

    names = [f"c{i}" for i in range(len(conditionings))]
    conds = {n: comfy.sampler_helpers.convert_cond(c) for n, c in zip(names, conditionings)}
    conds = comfy.samplers.process_conds(model.model, x, conds, x.device, latent_image=torch.zeros_like(x))
    seen = []

    def record(apply_model, args):
        seen.append(dict(args["c"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    options = comfy.model_patcher.create_model_options_clone(model.model_options)
    options["model_function_wrapper"] = record
    model.pre_run()
    try:
        out = comfy.samplers.calc_cond_batch(model.model, [conds[n] for n in names], x, sigma, options)
    finally:
        model.cleanup()
    return out, seen


def latents(arch, batch, seed):
    return torch.randn((batch, LATENT_CHANNELS[arch]) + LATENT_HW, generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("arch", ARCHS)
def test_denoiser_and_conditioning_equal_sampling(arch, models, arch_conds, th):
    model, _ = models(arch)
    cond_a, cond_b = arch_conds(arch)
    unload_all()
    load(model)
    training_model = th.TrainingModel(model)
    denoise = training_model.denoiser()
    table, _ = training_model.sigmas()
    shape = (2, LATENT_CHANNELS[arch]) + LATENT_HW

    # Same x and σ for two conditionings: sampling runs both in one batch-2 forward, rows in the order it recorded.
    x1, s1 = latents(arch, 1, 0) * 2.0, table[len(table) * 3 // 5].reshape(1)
    (d_a, d_b), seen = sampled(model, [cond_a, cond_b], x1, s1)
    assert len(seen) == 1
    order = [cond_b, cond_a]  # calc_cond_batch pops its batch last-first
    batch = training_model.conditioning_batch(order, shape)
    fed = {k: v for k, v in seen[0].items() if k != "transformer_options"}
    assert set(batch) == set(fed)
    for key, value in fed.items():
        assert torch.equal(batch[key], value), key
    assert all(v.shape[0] == 2 for v in batch.values())
    with torch.no_grad():
        got = denoise(x1.repeat(2, 1, 1, 1), s1.repeat(2), batch)
    assert torch.equal(got[0:1], d_b) and torch.equal(got[1:2], d_a)

    # Per-sample rows: each row its own x, σ and conditioning; each equals sampling that row alone.
    x = latents(arch, 2, 1)
    sigma = torch.stack([table[len(table) // 10], table[-1]])
    x = x * sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        got = denoise(x, sigma, batch)
    for i, cond in enumerate(order):
        (ref,), _ = sampled(model, [cond], x[i:i + 1], sigma[i:i + 1])
        assert rel_err(got[i:i + 1], ref) < 1e-5, (arch, i)
    assert rel_err(got[0:1], got[1:2]) > 1e-2  # the rows really differ


def _base_state(model, copy_values):
    """name -> (parameter object, version counter, a copy of the values or None). Any in-place write bumps the
    version; the copies (small models only: FLUX's would be 2.2 GB) also catch writes through .data."""
    return {k: (p, p._version, p.detach().clone() if copy_values else None)
            for k, p in model.model.diffusion_model.named_parameters()}


def _unchanged(model, state):
    now = dict(model.model.diffusion_model.named_parameters())
    return now.keys() == state.keys() and all(
        now[k] is p and p._version == v and (c is None or torch.equal(p, c)) for k, (p, v, c) in state.items())


LORA_UP_STD = {"sd15": 0.05, "sdxl": 0.05, "sd3": 2.0, "flux": 0.5}


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_set_equals_core_lora_loading_and_the_student(arch, models, arch_conds, th, tmp_path):
    import comfy.sd
    import comfy.utils

    model, _ = models(arch)
    cond_a, cond_b = arch_conds(arch)
    unload_all()
    load(model)
    training_model = th.TrainingModel(model)
    denoise = training_model.denoiser()
    table, _ = training_model.sigmas()
    batch = training_model.conditioning_batch([cond_a, cond_b], (2, LATENT_CHANNELS[arch]) + LATENT_HW)
    sigma = torch.stack([table[len(table) // 4], table[len(table) * 3 // 4]])
    x = latents(arch, 2, 2) * sigma.view(-1, 1, 1, 1)

    names = training_model.lora_target_names()
    lora = LoraSet(model.model.diffusion_model, names, rank=4, alpha=2.0, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, branch in lora.items():
            branch.up.normal_(0.0, LORA_UP_STD[arch], generator=g)
    state = _base_state(model, copy_values=arch in ("sd15", "sd3"))
    try:
        optimizer = torch.optim.SGD(lora.parameters(), lr=0.5)
        out = denoise(x, sigma, batch)
        out.square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.parameters())
        assert all(not p.requires_grad and p.grad is None for p, _, _ in state.values())
        optimizer.step()
        assert _unchanged(model, state)
        with torch.no_grad():
            trained = denoise(x, sigma, batch)
            with lora.disabled():
                teacher = denoise(x, sigma, batch)
        tensors = lora.lora_state_dict()
    finally:
        lora.remove()
    assert rel_err(trained, teacher) > 1e-2  # the LoRA matters far beyond the tolerance below

    path = tmp_path / "student.safetensors"
    save_file(tensors, str(path))
    with captured_log(logging.DEBUG) as log:
        core_model, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(path)), 1.0, 0.0)
    assert not [m for m in log.messages() if "lora key not loaded" in m]
    assert len(core_model.patches) == len(names)
    students = [training_model.student(str(path), "student.safetensors")]
    if arch == "sd15":  # the in-memory tensors give the same student
        students.append(training_model.student(tensors, "student.safetensors"))
    try:
        for patched in [core_model] + students:
            load(patched)
            with torch.no_grad():
                got = th.TrainingModel(patched).denoiser()(x, sigma, batch)
            assert rel_err(got, trained) < 1e-5, arch  # W·x + s·up(down(x)) vs (W + s·up@down)·x: rounding only
    finally:
        unload_all()


def wrap_in_checkpoints(blocks, calls):
    """A plain wrapper, as the engine's: each block's forward through a non-reentrant checkpoint, counting runs."""
    def wrap(module):
        forward = module.forward

        def counted(*args, **kwargs):
            calls[id(module)] = calls.get(id(module), 0) + 1
            return forward(*args, **kwargs)

        module.forward = lambda *a, **k: torch.utils.checkpoint.checkpoint(counted, *a, use_reentrant=False, **k)

    for block in blocks:
        wrap(block)


@pytest.mark.parametrize("arch", ["sd15", "flux"])  # FLUX: its blocks add into their own arguments in place
def test_checkpointed_blocks_give_the_same_gradients(arch, models, arch_conds, th):
    model, _ = models(arch)
    unload_all()
    load(model)
    training_model = th.TrainingModel(model)
    denoise = training_model.denoiser()
    table, _ = training_model.sigmas()
    batch = training_model.conditioning_batch(list(arch_conds(arch)), (2, LATENT_CHANNELS[arch]) + LATENT_HW)
    sigma = torch.stack([table[len(table) // 10], table[len(table) * 7 // 10]])
    x = latents(arch, 2, 4) * sigma.view(-1, 1, 1, 1)
    lora = LoraSet(model.model.diffusion_model, training_model.lora_target_names(), rank=4, alpha=4.0, seed=5)
    blocks = training_model.checkpoint_blocks()
    calls = {}
    try:
        with torch.no_grad():
            for _, branch in lora.items():
                branch.up.normal_(0.0, LORA_UP_STD[arch], generator=torch.Generator().manual_seed(6))

        def grads():
            lora.zero_grad(set_to_none=True)
            out = denoise(x, sigma, batch)
            out.square().mean().backward()
            return out.detach(), [p.grad.clone() for p in lora.parameters()]

        plain_out, plain = grads()
        wrap_in_checkpoints(blocks, calls)
        ckpt_out, ckpt = grads()
    finally:
        lora.remove()
        for block in blocks:
            block.__dict__.pop("forward", None)
        unload_all()
    # every block ran inside its checkpoint and once more for the backward: none is bypassed
    assert len(blocks) > 0 and all(calls.get(id(b)) == 2 for b in blocks)
    assert torch.equal(ckpt_out, plain_out)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(ckpt, plain))  # summation order of the backward only


def test_model_loaded_in_inference_mode_trains_and_autocast_works(th):
    """Inside a node everything is loaded and encoded under torch.inference_mode; training must still work."""
    import comfy.sd
    from support.tiny_models import cached_tiny_sd3

    unload_all()
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(str(cached_tiny_sd3()))
        g = torch.Generator().manual_seed(8)
        conds = [[[torch.randn(1, 8, 4096, generator=g), {"pooled_output": torch.randn(1, 2048, generator=g)}]]
                 for _ in range(2)]
        load(model)  # as a sampler in the same workflow would have left it
    assert next(model.model.diffusion_model.parameters()).is_inference()
    try:
        with torch.inference_mode(False):
            training_model = th.TrainingModel(model)
            denoise = training_model.denoiser()
            batch = training_model.conditioning_batch(conds, (2, 16) + LATENT_HW)
            assert not any(v.is_inference() for v in batch.values())
            assert not any(p.is_inference() for p in model.model.parameters())
            table, kind = training_model.sigmas()
            assert kind == "flow" and not table.is_inference()
            sigma = torch.stack([table[200], table[800]])
            x = latents("sd3", 2, 9)
            lora = LoraSet(model.model.diffusion_model, training_model.lora_target_names(), rank=4, alpha=4.0, seed=3)
            with torch.no_grad():
                for _, branch in lora.items():
                    branch.up.normal_(0.0, 0.5, generator=g)
            out = denoise(x, sigma, batch)
            out.square().mean().backward()
            full = [p.grad.clone() for p in lora.parameters()]
            lora.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = denoise(x, sigma, batch)
            assert half.dtype == torch.float32 and torch.isfinite(half).all()
            assert rel_err(half, out.detach()) < 5e-2
            half.square().mean().backward()
            for a, b in zip(full, (p.grad for p in lora.parameters())):
                assert b is not None and torch.isfinite(b).all() and rel_err(b, a) < 0.2
            lora.remove()
    finally:
        unload_all()


def test_denoiser_honours_the_models_patches_and_refuses_unloaded_weights(models, arch_conds, th):
    model, _ = models("sd15")
    cond_a, cond_b = arch_conds("sd15")
    seen = []

    def sharpen_queries(q, k, v, extra_options):
        seen.append(list(extra_options["cond_or_uncond"]))
        return q * 1.5, k, v

    patched = model.clone()
    patched.set_model_attn1_patch(sharpen_queries)
    unload_all()
    load(patched)
    training_model = th.TrainingModel(patched)
    denoise = training_model.denoiser()
    table, _ = training_model.sigmas()
    x, s = latents("sd15", 1, 5), table[500].reshape(1)
    (ref_a, ref_b), _ = sampled(patched, [cond_a, cond_b], x, s)
    seen.clear()
    with torch.no_grad():
        got = denoise(x.repeat(2, 1, 1, 1), s.repeat(2), training_model.conditioning_batch([cond_b, cond_a], (2, 4, 8, 8)))
    assert seen and all(c == [0] for c in seen)
    assert torch.equal(got[0:1], ref_b) and torch.equal(got[1:2], ref_a)

    def halve(apply_model, args):  # a model_function_wrapper sees the whole batch as one 'cond' chunk
        assert args["cond_or_uncond"] == [0] and args["input"].shape[0] == 2
        return apply_model(args["input"], args["timestep"], **args["c"]) * 0.5

    patched.set_model_unet_function_wrapper(halve)
    with torch.no_grad():
        halved = denoise(x.repeat(2, 1, 1, 1), s.repeat(2), training_model.conditioning_batch([cond_b, cond_a], (2, 4, 8, 8)))
    assert torch.equal(halved, got * 0.5)

    unload_all()
    with pytest.raises(RuntimeError, match="load_models_gpu"):
        denoise(x, s, training_model.conditioning_batch([cond_a], (1, 4, 8, 8)))


def test_training_sigmas_follow_the_model_sampling(models, th, run_node):
    import comfy.model_sampling

    sd15, _ = models("sd15")
    table, kind = th.TrainingModel(sd15).sigmas()
    assert kind == "vp" and table.dtype == torch.float32 and len(table) == 1000
    assert torch.equal(table, sd15.model.model_sampling.sigmas.float()) and bool((table.diff() > 0).all())

    sd3, _ = models("sd3")
    table, kind = th.TrainingModel(sd3).sigmas()
    assert kind == "flow" and 0 < table[0] < table[-1] <= 1
    (shifted,) = run_node("ModelSamplingSD3", model=sd3, shift=6.0)
    expected = comfy.model_sampling.ModelSamplingDiscreteFlow()
    expected.set_parameters(shift=6.0)
    assert torch.equal(th.TrainingModel(shifted).sigmas()[0], expected.sigmas.float())

    flux, _ = models("flux")
    assert th.TrainingModel(flux).sigmas()[1] == "flow"

    (edm,) = run_node("ModelSamplingContinuousEDM", model=sd15, sampling="edm", sigma_max=80.0, sigma_min=0.002)
    with pytest.raises(ValueError, match="ModelSamplingContinuousEDM"):
        th.TrainingModel(edm).sigmas()
    (vpred,) = run_node("ModelSamplingDiscrete", model=sd15, sampling="v_prediction", zsnr=True)
    assert th.TrainingModel(vpred).sigmas()[1] == "vp"


def test_lora_targets_per_architecture(models, th):
    import comfy.lora

    sd15 = th.TrainingModel(models("sd15")[0]).lora_target_names()
    for family in ("attn1.to_q", "attn2.to_k", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                   "in_layers.2", "out_layers.3", "emb_layers.1"):
        assert any(n.endswith(family) for n in sd15), family
    assert not any(n.startswith("input_blocks.0.") for n in sd15)  # conv_in stays frozen, as in LCM-LoRA
    sdxl = th.TrainingModel(models("sdxl")[0]).lora_target_names()
    assert any(n.startswith("middle_block.1.") for n in sdxl) and any(n.endswith(".op") for n in sdxl)
    assert any(n.endswith("skip_connection") for n in sdxl) or not any(
        "skip_connection" in k for k in models("sdxl")[0].model.diffusion_model.state_dict())
    sd3 = th.TrainingModel(models("sd3")[0]).lora_target_names()
    assert {n.split(".", 3)[3] for n in sd3} == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    flux = th.TrainingModel(models("flux")[0]).lora_target_names()
    assert {n.split(".", 2)[2] for n in flux} == {"img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
                                                  "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2",
                                                  "linear1", "linear2"}
    for arch, names in (("sd15", sd15), ("sdxl", sdxl), ("sd3", sd3), ("flux", flux)):
        key_map = comfy.lora.model_lora_keys_unet(models(arch)[0].model, {})
        assert all(key_map["lora_unet_" + n.replace(".", "_")] == f"diffusion_model.{n}.weight" for n in names)


def test_conditioning_batch_refuses_what_one_row_cannot_hold(models, arch_conds, th):
    sd15, _ = models("sd15")
    sd3, _ = models("sd3")
    cond_a, cond_b = arch_conds("sd15")
    shape = (2, 4, 8, 8)
    with pytest.raises(ValueError, match="entries"):
        th.TrainingModel(sd15).conditioning_batch([cond_a + cond_b], shape)  # ConditioningCombine
    with pytest.raises(ValueError, match="area"):
        th.TrainingModel(sd15).conditioning_batch([[[cond_a[0][0], {"area": (4, 4, 0, 0), "strength": 1.0}]]], shape)
    with pytest.raises(ValueError, match="token lengths"):  # 77 and 462 tokens: more than CONDCrossAttn's 4x
        th.TrainingModel(sd15).conditioning_batch([cond_a, [[torch.zeros(1, 462, 768), {}]]], shape)
    ctx = torch.zeros(1, 8, 4096)
    with pytest.raises(ValueError, match="token lengths"):  # SD3's context is a CONDRegular: equal shapes only
        th.TrainingModel(sd3).conditioning_batch([[[ctx, {"pooled_output": torch.zeros(1, 2048)}]],
                                                  [[torch.zeros(1, 16, 4096), {"pooled_output": torch.zeros(1, 2048)}]]],
                                                 (2, 16, 8, 8))
    with pytest.raises(ValueError, match="pooled_output"):
        th.TrainingModel(sd3).conditioning_batch([[[ctx, {}]]], (1, 16, 8, 8))


def test_encode_prompts_is_clip_text_encode(models, th, run_node):
    _, clip = models("sd15")
    empty, fox = th.encode_prompts(clip, ["", "a fox"], extra={"guidance": 2.5})
    (node_empty,) = run_node("CLIPTextEncode", clip=clip, text="")
    assert torch.equal(empty[0][0], node_empty[0][0])
    assert torch.equal(th.empty_conditioning(clip)[0][0], node_empty[0][0])
    assert fox[0][1]["guidance"] == 2.5 and not torch.equal(fox[0][0], empty[0][0])


def test_latent_preview_images(models, th):
    sd15, _ = models("sd15")
    sd3, _ = models("sd3")
    lat = latents("sd15", 2, 7)
    images = th.TrainingModel(sd15).latent_preview_images(lat)
    assert images.shape == (2, 64, 64, 3) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    factors = torch.tensor(sd15.model.latent_format.latent_rgb_factors)  # [C, 3]
    pixel = ((lat[1, :, 2, 5] @ factors + 1) / 2).clamp(0, 1)
    assert torch.allclose(images[1, 16:24, 40:48], pixel.expand(8, 8, 3), atol=1e-6)

    fmt = sd3.model.latent_format
    lat = latents("sd3", 1, 8)
    images = th.TrainingModel(sd3).latent_preview_images(lat, model_space=False)
    pixel = ((fmt.process_in(lat)[0, :, 0, 0] @ torch.tensor(fmt.latent_rgb_factors)
              + torch.tensor(fmt.latent_rgb_factors_bias) + 1) / 2).clamp(0, 1)
    assert torch.allclose(images[0, 0, 0], pixel, atol=1e-6)
    with pytest.raises(ValueError, match="16"):
        th.TrainingModel(sd3).latent_preview_images(latents("sd15", 1, 8))
