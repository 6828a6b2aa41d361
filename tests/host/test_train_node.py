"""The PCM Distillation node in the real host (in-process), on the tiny SD1.5 checkpoint and the other architectures.

Nodes run here under torch.inference_mode, as PromptExecutor runs them, with models loaded the same way.
"""
import logging
import pathlib

import pytest
import torch

from support.log_capture import captured_log
from support.tiny_models import LATENT_CHANNELS, seeded_conditioning

NODE = "FewStepPCMDistill"
SMALL = dict(steps=4, phases=2, ddim_timesteps=10, batch_size=2, grad_accumulation=1, learning_rate=1e-3, rank=4,
             alpha=4.0, cfg_mode="small", w_min=1.0, w_max=2.0, huber_c=0.001, seed=0, precision="fp32",
             gradient_checkpointing=True, save_every=0, validate_every=0, resume=False)


@pytest.fixture(scope="module")
def data(comfy_host, tiny_models, conds):
    g = torch.Generator().manual_seed(5)
    latents = {"samples": torch.randn(3, 4, 8, 8, generator=g) * 0.8}
    (empty,) = comfy_host.nodes.NODE_CLASS_MAPPINGS["CLIPTextEncode"]().encode(tiny_models.clip, "")
    return latents, conds[0], empty


def train(run_node, model, latents, positive, negative, name, **overrides):
    inputs = {**SMALL, **overrides}
    with torch.inference_mode():  # as PromptExecutor runs nodes
        return run_node(NODE, model=model, latents=latents, positive=positive, negative=negative, output_name=name,
                        **inputs)


def lora_file(comfy_host, name):
    return pathlib.Path(comfy_host.folder_paths.get_folder_paths("loras")[0]) / f"{name}.safetensors"


def state_of(comfy_host, name):
    from fewstep.distill.io import load_safetensors

    return load_safetensors(pathlib.Path(comfy_host.folder_paths.get_output_directory()) / "fewstep_training" / name
                            / "state.safetensors")


def read_lora(comfy_host, name):
    from fewstep.distill.io import load_safetensors

    return load_safetensors(lora_file(comfy_host, name))


def test_outputs_files_and_metadata(comfy_host, run_node, tiny_models, data):
    latents, positive, empty = data
    student, lora_name, curve, validation = train(run_node, tiny_models.model, latents, positive, empty, "t_outputs")
    assert lora_name == "t_outputs.safetensors"
    tensors, meta = read_lora(comfy_host, "t_outputs")
    assert meta["fewstep.method"] == "pcm" and meta["fewstep.phases"] == "2" and meta["fewstep.ddim_timesteps"] == "10"
    assert meta["fewstep.base_arch"] == "sd15" and meta["fewstep.steps_trained"] == "4"
    assert any(k.endswith(".lora_up.weight") and v.abs().max() > 0 for k, v in tensors.items())
    assert curve.shape[0] == 1 and curve.shape[-1] == 3
    assert validation.shape[0] == 3 and validation.shape[-1] == 3  # 1, 2, 4 steps
    assert student is not tiny_models.model
    # the loader reads the metadata back into a preset: pcm sampler on the trained phase edges
    _, _, preset, summary = run_node("FewStepLoraLoader", model=tiny_models.model, clip=tiny_models.clip,
                                     lora_name=lora_name, strength_model=1.0, strength_clip=1.0,
                                     use_recommended_strength=False)
    assert preset.sampler == "pcm" and preset.phases == 2 and preset.ddim_timesteps == 10
    assert "0 keys missed" in summary


def test_loss_falls_over_a_short_run(comfy_host, run_node, tiny_models, data):
    """The trained LoRA's losses against an untrained run's on the same draws: same seed, and a learning rate of
    1e-8 moves no weight measurably. The draws (timestep, noise) make single losses vary 2x, so a run compared
    with its own first steps had no margin (last/first 10 steps: 0.34-0.83 over seeds 0-3); paired, the draws
    cancel. Measured (last 10 steps, trained/untrained, 1 thread): 0.57, 0.58, 0.57, 0.60, 0.59 for seeds 0-4;
    seed 0 with 2 threads: 0.57 too. (lr 3e-3: 0.67-0.80, it overshoots first.) A run that does not train
    gives exactly 1."""
    latents, positive, empty = data
    for name, lr in (("t_falls", 1e-3), ("t_still", 1e-8)):
        train(run_node, tiny_models.model, latents, positive, empty, name, steps=40, learning_rate=lr, batch_size=3)
    trained, still = state_of(comfy_host, "t_falls")[0]["losses"], state_of(comfy_host, "t_still")[0]["losses"]
    assert trained[-10:].sum() < 0.8 * still[-10:].sum(), (trained, still)


def test_core_lora_loader_reproduces_the_student(comfy_host, run_node, tiny_models, data, conds):
    latents, positive, empty = data
    with captured_log(logging.WARNING) as log:
        student, lora_name, _, _ = train(run_node, tiny_models.model, latents, positive, empty, "t_core", steps=3)
        (core,) = run_node("LoraLoaderModelOnly", model=tiny_models.model, lora_name=lora_name, strength_model=1.0)
    assert not any("lora key not loaded" in m for m in log.messages())
    tensors, _ = read_lora(comfy_host, "t_core")
    assert len(tensors) == 3 * len([k for k in tensors if k.endswith(".alpha")])
    empty_latent = {"samples": torch.zeros(1, 4, 8, 8)}
    kwargs = dict(seed=3, steps=2, cfg=1.0, sampler_name="pcm", scheduler="pcm", positive=conds[0],
                  negative=conds[1], latent_image=empty_latent, denoise=1.0)
    (a,) = run_node("KSampler", model=student, **kwargs)
    (b,) = run_node("KSampler", model=core, **kwargs)
    (teacher,) = run_node("KSampler", model=tiny_models.model, **kwargs)
    torch.testing.assert_close(a["samples"], b["samples"], rtol=1e-4, atol=1e-5)
    assert (a["samples"] - teacher["samples"]).abs().max() > 1e-4  # the LoRA does something


class _CancelAt(logging.Handler):
    """Presses Cancel (what the UI's button does) when the node reports reaching `step`."""

    def __init__(self, step):
        super().__init__()
        self.marker = f"step {step}/"

    def emit(self, record):
        if self.marker in record.getMessage():
            import comfy.model_management

            comfy.model_management.interrupt_current_processing(True)


def test_cancel_then_resume_equals_an_uninterrupted_run(comfy_host, run_node, tiny_models, data):
    import comfy.model_management

    latents, positive, empty = data
    train(run_node, tiny_models.model, latents, positive, empty, "t_straight", steps=6)
    handler = _CancelAt(3)
    logging.getLogger("fewstep").addHandler(handler)
    try:
        with captured_log(logging.INFO), pytest.raises(comfy.model_management.InterruptProcessingException):
            train(run_node, tiny_models.model, latents, positive, empty, "t_resumed", steps=6)
    finally:
        logging.getLogger("fewstep").removeHandler(handler)
    assert not comfy.model_management.processing_interrupted()  # the flag is consumed, the next prompt runs
    tensors, meta = state_of(comfy_host, "t_resumed")
    assert meta["step"] == "3"
    assert read_lora(comfy_host, "t_resumed")[1]["fewstep.steps_trained"] == "3"
    train(run_node, tiny_models.model, latents, positive, empty, "t_resumed", steps=6, resume=True)
    straight, resumed = read_lora(comfy_host, "t_straight")[0], read_lora(comfy_host, "t_resumed")[0]
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert torch.equal(state_of(comfy_host, "t_straight")[0]["losses"], state_of(comfy_host, "t_resumed")[0]["losses"])


def test_teacher_is_untouched(comfy_host, run_node, tiny_models, data, conds):
    latents, positive, empty = data
    kwargs = dict(seed=1, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple", positive=conds[0],
                  negative=conds[1], latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0)
    (before,) = run_node("KSampler", model=tiny_models.model, **kwargs)
    train(run_node, tiny_models.model, latents, positive, empty, "t_untouched", steps=2)
    (after,) = run_node("KSampler", model=tiny_models.model, **kwargs)
    assert torch.equal(before["samples"], after["samples"])
    dm = tiny_models.model.model.diffusion_model
    assert not any(m._forward_hooks for m in dm.modules())  # the LoRA hooks are gone
    assert not any("forward" in vars(m) for m in dm.modules())  # and the checkpointing wrappers


def test_out_of_memory_is_caught_with_advice(comfy_host, run_node, tiny_models, data, conds):
    latents, positive, empty = data
    model = tiny_models.model.clone()
    calls = {"n": 0}

    def fails_on_third_call(apply_model, args):  # a model_function_wrapper, the host's own extension point
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(fails_on_third_call)
    with pytest.raises(RuntimeError, match=r"Out of memory .*Lower batch_size.*gradient_checkpointing"):
        train(run_node, model, latents, positive, empty, "t_oom")
    dm = tiny_models.model.model.diffusion_model
    assert not any(m._forward_hooks for m in dm.modules())
    train(run_node, tiny_models.model, latents, positive, empty, "t_after_oom", steps=1)  # the host carries on


@pytest.mark.parametrize("change,message", [
    ({"latents": {"samples": torch.zeros(0, 4, 8, 8)}}, "latents is empty"),
    ({"phases": 12}, r"phases \(12\) must be between 1 and ddim_timesteps K \(10\)"),
    ({"batch_size": 4}, r"batch_size \(4\) is larger than the data \(3 latents\)"),
    ({"output_name": "../escape"}, "not a plain file name inside models/loras"),
    ({"output_name": "blocked/lora"}, "Cannot write the LoRA into"),
    ({"positive": None}, "No prompts"),
])
def test_bad_inputs_are_refused_with_the_reason(comfy_host, run_node, tiny_models, data, change, message):
    latents, positive, empty = data
    blocker = pathlib.Path(comfy_host.folder_paths.get_folder_paths("loras")[0]) / "blocked"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the output folder would be")
    inputs = {"latents": latents, "positive": positive, "output_name": "t_bad", **change}
    name = inputs.pop("output_name")
    with pytest.raises(ValueError, match=message):
        train(run_node, tiny_models.model, inputs.pop("latents"), inputs.pop("positive"), empty, name, **inputs)
    assert not lora_file(comfy_host, "t_bad").exists()


def test_a_run_that_diverges_at_once_writes_no_lora(comfy_host, run_node, tiny_models, data):
    """Saving "the last good weights" of a run that never stepped would put an untrained, all-zero LoRA into
    models/loras under the user's name."""
    latents, positive, empty = data
    poisoned = {"samples": latents["samples"].clone()}
    poisoned["samples"][:, :, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="Nothing was trained, so no LoRA was written"):
        train(run_node, tiny_models.model, poisoned, positive, empty, "t_diverged")
    assert not lora_file(comfy_host, "t_diverged").exists()


def test_validate_inputs_names_the_problem(comfy_host):
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS[NODE]
    assert "cannot exceed ddim_timesteps" in cls.cross_checks({"phases": 8, "ddim_timesteps": 4})["phases"]
    assert "larger than w_max" in cls.cross_checks({"w_min": 5.0, "w_max": 4.0})["w_min"]
    assert cls.cross_checks({"phases": 4, "ddim_timesteps": 50, "w_min": 4.0, "w_max": 5.0}) == {}
    assert "not a plain file name" in cls.validate_inputs(output_name="/etc/passwd")
    assert "200 characters" in cls.validate_inputs(output_name="a" * 300)
    assert "200 characters" in cls.validate_inputs(output_name="/".join(["b" * 90] * 3))
    assert "each folder or file name to 100" in cls.validate_inputs(output_name="c" * 101)
    assert cls.validate_inputs(output_name="mine/pcm_4step") is True
    assert cls.validate_inputs(output_name="d" * 100) is True


def train_and_load_in_core(comfy_host, run_node, model, latents, conds, name, **settings):
    """Train, then load the LoRA with core LoraLoaderModelOnly: every key applied (no "lora key not loaded"), as many
    patches as the student has, finite validation images at 1, 2 and 4 steps. (lora_name, metadata)."""
    with captured_log(logging.WARNING) as log:
        student, lora_name, _, validation = train(run_node, model, latents, *conds, name, **settings)
        (core,) = run_node("LoraLoaderModelOnly", model=model, lora_name=lora_name, strength_model=1.0)
    assert not any("lora key not loaded" in m for m in log.messages())
    tensors, meta = read_lora(comfy_host, name)
    assert len(core.patches) == len(student.patches) == len(tensors) // 3
    assert validation.shape[0] == 3 and torch.isfinite(validation).all()
    return lora_name, meta


@pytest.mark.parametrize("arch", ["sdxl", "sd3", "flux"])
def test_each_architecture_trains_and_loads_in_core(arch, comfy_host, run_node, arch_models):
    """The smallest models ComfyUI's detection allows; conditioning shaped as CLIPTextEncode gives it, seeded."""
    if arch == "sdxl":  # the UNet-only file: its CLIP-G is not needed here
        import comfy.sd
        from support.tiny_models import cached_tiny_sdxl_unet

        model = comfy.sd.load_diffusion_model(str(cached_tiny_sdxl_unet()))
    else:
        model = arch_models(arch)[0]
    g = torch.Generator().manual_seed(9)

    def cond():
        return seeded_conditioning(arch, 8, g)

    latents = {"samples": torch.randn(2, LATENT_CHANNELS[arch], 8, 8, generator=g)}
    name = f"t_arch_{arch}"
    _, meta = train_and_load_in_core(comfy_host, run_node, model, latents, (cond(), cond()), name, steps=2, rank=2)
    assert meta["fewstep.base_arch"] == arch
    assert all(torch.isfinite(v) for v in state_of(comfy_host, name)[0]["losses"])


@pytest.mark.parametrize("arch", ["sd15", "sd3"])
@pytest.mark.parametrize("method,extra,preset", [
    ("tcd", {}, ("tcd", "lcm", 0.3)),
    ("tscd", {"tscd_segments": "2,1", "tscd_stage_steps": "2,2"}, ("tcd", "lcm", 1.0)),
    ("tscd", {"tscd_segments": "2,1", "tscd_stage_steps": "3,1", "steps": 4}, ("tcd", "lcm", 1.0)),
])
def test_each_method_trains_loads_in_core_and_gives_its_preset(arch, method, extra, preset, comfy_host, run_node,
                                                               arch_models, tiny_models, data):
    """The method setting reaches the engine: the LoRA's metadata names it, core LoraLoader applies every key, and
    the Fast LoRA Loader turns it into the method's preset (TCD's card settings; a TSCD run ending on 1 segment:
    the unified tcd preset)."""
    model = tiny_models.model if arch == "sd15" else arch_models(arch)[0]
    g = torch.Generator().manual_seed(4)
    latents = {"samples": torch.randn(2, LATENT_CHANNELS[arch], 8, 8, generator=g)}
    name = f"t_method_{method}_{arch}_{len(extra)}_{extra.get('tscd_stage_steps', '')}".replace(",", "-")
    conds = data[1:] if arch == "sd15" else (seeded_conditioning(arch, 8, g), seeded_conditioning(arch, 8, g))
    lora_name, meta = train_and_load_in_core(comfy_host, run_node, model, latents, conds, name, method=method,
                                             **{"rank": 2, **extra})
    assert meta["fewstep.method"] == method
    _, _, loaded_preset, summary = run_node("FewStepLoraLoader", model=model, lora_name=lora_name, strength_model=1.0,
                                            strength_clip=1.0, use_recommended_strength=True)
    assert (loaded_preset.sampler, loaded_preset.scheduler, loaded_preset.gamma) == preset, summary
    assert loaded_preset.source == "metadata", summary


def test_a_bad_stage_list_is_refused_before_any_file(comfy_host, run_node, tiny_models, data):
    latents, positive, empty = data
    with pytest.raises(ValueError, match="tscd_stage_steps .* sum to 3, but steps is 4"):
        train(run_node, tiny_models.model, latents, positive, empty, "t_bad_stages", method="tscd",
              tscd_segments="2,1", tscd_stage_steps="2,1")
    assert not lora_file(comfy_host, "t_bad_stages").exists()


def test_adversarial_term_trains_resumes_exactly_and_leaves_no_hooks(comfy_host, run_node, tiny_models, data):
    """adversarial_weight > 0: discriminator heads on the teacher's UNet encoder features (with checkpointing on)."""
    from fewstep.host.training_model import TrainingModel

    latents, positive, empty = data
    modules, channels = TrainingModel(tiny_models.model).adversarial_features()
    dm = tiny_models.model.model.diffusion_model
    assert modules[-1] is dm.middle_block[-1] and channels[-1] == dm.middle_block[-1].out_channels  # one level here
    train(run_node, tiny_models.model, latents, positive, empty, "t_adv_off", steps=4)
    train(run_node, tiny_models.model, latents, positive, empty, "t_adv", steps=4, adversarial_weight=0.1)
    tensors, meta = state_of(comfy_host, "t_adv")
    history = tensors["adv.history"]
    assert history.shape == (4, 2) and torch.isfinite(history).all() and (history[:, 1] > 0).all()  # [G, D] per step
    off, on = read_lora(comfy_host, "t_adv_off")[0], read_lora(comfy_host, "t_adv")[0]
    assert any(not torch.equal(off[k], on[k]) for k in off)  # the G loss moved the LoRA
    assert '"adversarial_weight": 0.1' in read_lora(comfy_host, "t_adv")[1]["fewstep.config"]
    assert not any(m._forward_hooks for m in dm.modules())  # feature hooks removed with the LoRA's
    # half, then resume: LoRA, heads and their optimiser as in the straight run
    train(run_node, tiny_models.model, latents, positive, empty, "t_adv_resumed", steps=2, adversarial_weight=0.1)
    train(run_node, tiny_models.model, latents, positive, empty, "t_adv_resumed", steps=4, adversarial_weight=0.1,
          resume=True)
    resumed_tensors = state_of(comfy_host, "t_adv_resumed")[0]
    assert all(torch.equal(tensors[k], resumed_tensors[k]) for k in tensors if k.startswith(("param.", "adv.")))
    assert all(torch.equal(on[k], v) for k, v in read_lora(comfy_host, "t_adv_resumed")[0].items())
    with pytest.raises(ValueError, match=r"other settings \(adversarial_weight 0.0 → 0.1\)"):
        train(run_node, tiny_models.model, latents, positive, empty, "t_adv_off", steps=6, adversarial_weight=0.1,
              resume=True)


@pytest.mark.parametrize("arch", ["sdxl", "sd3", "flux"])
def test_adversarial_term_per_architecture(arch, comfy_host, run_node, arch_models):
    """UNets (SDXL) train with it; SD3 and FLUX refuse it by name before anything is loaded or written."""
    if arch == "sdxl":
        import comfy.sd
        from support.tiny_models import cached_tiny_sdxl_unet

        model = comfy.sd.load_diffusion_model(str(cached_tiny_sdxl_unet()))
    else:
        model = arch_models(arch)[0]
    g = torch.Generator().manual_seed(11)
    latents = {"samples": torch.randn(2, LATENT_CHANNELS[arch], 8, 8, generator=g)}
    cond, uncond = seeded_conditioning(arch, 8, g), seeded_conditioning(arch, 8, g)
    name = f"t_adv_{arch}"
    if arch != "sdxl":
        with pytest.raises(ValueError, match=r"adversarial term is available for UNet models .*set adversarial_weight"
                                             r" to 0"):
            train(run_node, model, latents, cond, uncond, name, steps=1, rank=2, adversarial_weight=0.1)
        assert not lora_file(comfy_host, name).exists()
        return
    from fewstep.host.training_model import TrainingModel

    assert len(TrainingModel(model).adversarial_features()[0]) >= 2  # a Downsample per level but the last, and the middle block
    train(run_node, model, latents, cond, uncond, name, steps=2, rank=2, adversarial_weight=0.1)
    history = state_of(comfy_host, name)[0]["adv.history"]
    assert history.shape == (2, 2) and torch.isfinite(history).all()


def test_warmup_and_ema_target_are_node_settings_and_resume_exactly(comfy_host, run_node, tiny_models, data):
    latents, positive, empty = data
    extra = dict(warmup_steps=2, ema_decay=0.9)
    train(run_node, tiny_models.model, latents, positive, empty, "t_plain3", steps=3)
    train(run_node, tiny_models.model, latents, positive, empty, "t_ema", steps=3, **extra)
    tensors, meta = state_of(comfy_host, "t_ema")
    assert '"ema_decay": 0.9' in meta["config"] and '"warmup_steps": 2' in meta["config"]
    params = [k for k in tensors if k.startswith("param.")]
    assert len(params) > 0 and all(f"ema.{k[len('param.'):]}" in tensors for k in params)
    assert any(not torch.equal(tensors[k], tensors[f"ema.{k[len('param.'):]}"]) for k in params)  # EMA lags
    plain = read_lora(comfy_host, "t_plain3")[0]
    assert any(not torch.equal(plain[k], v) for k, v in read_lora(comfy_host, "t_ema")[0].items())
    train(run_node, tiny_models.model, latents, positive, empty, "t_ema_resumed", steps=1, **extra)
    train(run_node, tiny_models.model, latents, positive, empty, "t_ema_resumed", steps=3, resume=True, **extra)
    resumed = state_of(comfy_host, "t_ema_resumed")[0]
    assert all(torch.equal(tensors[k], resumed[k]) for k in tensors if k.startswith(("param.", "ema.", "optim.")))
