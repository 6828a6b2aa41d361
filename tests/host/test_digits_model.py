"""The embedded digits model (tests/support/digits_model.py) as ComfyUI 0.3.75 loads it, in-process.

What the quality tests (tests/e2e/test_digits_quality.py) build on: the checkpoint is detected as SD1.5 with no
key complaint; the hand-set TAESD is exactly "latent = the 8×8 digit"; the dense UNet ComfyUI runs is the
low-rank network that was trained; training is deterministic; the training image matches its prompts.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from support import digits_model
from support.log_capture import captured_log

KEY_COMPLAINTS = ("missing", "unexpected", "left over")
# An SD1.5 checkpoint has no CLIP text projection (real ones neither); ComfyUI notes it at DEBUG level.
SD15_ABSENT_CLIP_KEYS = "clip missing: ['clip_l.logit_scale', 'clip_l.transformer.text_projection.weight']"
SHIPPED_LIMIT = 10 * 2 ** 20  # the budget for shipped weights


@pytest.fixture(scope="module")
def loaded(comfy_host):
    import comfy.sd

    path = digits_model.cached_digits_sd15()
    with captured_log() as log:
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    return model, clip, vae, log


def test_detected_as_sd15_with_every_key_used(loaded):
    model, clip, vae, log = loaded
    assert type(model.model.model_config).__name__ == "SD15"
    assert type(model.model).__name__ == "BaseModel" and model.model.model_type.name == "EPS"
    complaints = [r.getMessage() for r in log.records if any(w in r.getMessage().lower() for w in KEY_COMPLAINTS)
                  and r.getMessage() != SD15_ABSENT_CLIP_KEYS]
    assert not complaints, complaints
    assert type(vae.first_stage_model).__name__ == "TAESD"


def test_vae_maps_the_latent_digit_to_its_picture_and_back(loaded):
    _, _, vae, _ = loaded
    ink, _ = digits_model.digits_split()["held"]
    ink = ink[:32]
    raw = digits_model.ink_to_latent(ink) / digits_model.TAESD_SD1_SCALE
    pictures = vae.decode(raw)  # [N, 64, 64, 3] in [0, 1]
    # the decoder draws 0.5 − clamp(u)/2 over each 8×8 block, clamp being TAESD's 3·tanh(u/3)
    expected = digits_model.ink_to_pixels(3 * torch.tanh(ink / 3)).unsqueeze(-1).expand(-1, -1, -1, 3)
    torch.testing.assert_close(pictures.float(), expected, atol=2e-6, rtol=0)
    latents = vae.encode(digits_model.ink_to_pixels(ink).unsqueeze(-1).expand(-1, -1, -1, 3))
    torch.testing.assert_close(latents.float() * digits_model.TAESD_SD1_SCALE, digits_model.ink_to_latent(ink),
                               atol=2e-6, rtol=0)


def test_comfyui_runs_the_trained_low_rank_network(loaded):
    model, _, _, _ = loaded
    low_rank = digits_model.load_factors(digits_model.low_rank_unet())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    context = torch.randn(3, 77, 768, generator=gen)
    t = torch.tensor([0.0, 400.0, 999.0])
    with torch.no_grad():
        ours = low_rank(x, timesteps=t, context=context)
        theirs = model.model.diffusion_model(x, timesteps=t, context=context)
    scale = float(ours.abs().max())
    assert float((ours - theirs).abs().max()) < 1e-5 * scale, float((ours - theirs).abs().max())


def test_training_is_deterministic(comfy_host):
    settings = {"steps": 2, "batch": 4, "threads": 1, "warmup": 1}
    first = digits_model.train_state(settings)
    second = digits_model.train_state(settings)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    initial = {k: v.to(torch.float16) for k, v in digits_model.low_rank_unet().state_dict().items()}
    assert sum(not torch.equal(first[k], initial[k]) for k in first) > len(first) // 2  # it did train


def test_training_image_matches_its_prompts(comfy_host, tmp_path):
    import numpy as np
    from PIL import Image, ImageSequence

    path = digits_model.write_training_images(tmp_path / digits_model.TRAINING_IMAGES)
    with Image.open(path) as image:
        frames = [np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0 for frame in ImageSequence.Iterator(image)]
    prompts = digits_model.training_prompts().splitlines()
    assert len(frames) == len(prompts) == 10 * digits_model.TRAINING_PER_DIGIT
    ink = digits_model.images_to_ink(torch.from_numpy(np.stack(frames)))
    labels = torch.tensor([int(p.rsplit(" ", 1)[1]) for p in prompts])
    expected, _ = digits_model.training_digits()
    assert float((ink - expected).abs().max()) <= 2.0 / 255  # one 8-bit step of the PNG
    assert float((digits_model.DigitClassifier().predict(ink) == labels).float().mean()) >= 0.95


def test_shipped_weights_fit_the_budget():
    files = [digits_model.FACTORS_PATH, digits_model.PCM_LORA_PATH, digits_model.DATA_PATH]
    total = sum(f.stat().st_size for f in files)
    assert total <= SHIPPED_LIMIT, {f.name: f.stat().st_size for f in files}
    meta = load_file(str(digits_model.FACTORS_PATH))
    assert all(v.dtype == torch.float16 for v in meta.values())
