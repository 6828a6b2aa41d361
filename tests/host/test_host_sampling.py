"""The pack inside a real ComfyUI 0.3.75: core KSampler / KSamplerAdvanced, SamplerCustomAdvanced, our nodes.

Everything runs on the tiny random-weight SD1.5 checkpoint (tests/support/tiny_checkpoint.py) at 64×64
pixels (8×8 latents), 1–4 steps, on CPU. Nothing from comfy is mocked.

The reference checks re-compute a deterministic run independently: the SD1.5 σ table from its β schedule,
ε straight from the UNet (`model.model.diffusion_model`) at each σ, the CFG combination and the DDIM update
x' = D + σ'·(x − D)/σ done here in float64, from ComfyUI's initial noise (torch.manual_seed(seed) randn,
times √(1 + σ0²) when the schedule starts at σ_max, else σ0) and its latent scaling (×0.18215 in, ÷ out).
"""
from __future__ import annotations

import inspect
import itertools
import math
import pathlib

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

PACK_SAMPLERS = ("pcm", "tcd", "ctm_gamma")
PACK_SCHEDULERS = ("pcm", "lcm", "hyper_sd_1step")
PACK_NODE_IDS = ("FewStepPCMScheduler", "FewStepLCMScheduler", "FewStepHyperSD1StepScheduler", "FewStepTCDSampler",
                 "FewStepCTMGammaSampler", "FewStepPCMSampler", "FewStepSchedulePreview")
STEPS_FOR = {"pcm": 4, "lcm": 3, "hyper_sd_1step": 2}

SD15_LATENT_SCALE = 0.18215  # SD1.5's latent scale factor (ComfyUI: process_latent_in multiplies, _out divides)

# Measured on the tiny checkpoint: max |sampler − float64 reference| / max |reference| is 1.1e-7 … 4.0e-7 over
# the reference cases below (the largest at cfg 2.5); both sides evaluate the UNet in float32, the rest is
# float32 vs float64 arithmetic. For scale: one σ of the chain off by one training timestep moves the result
# by 9e-5, the other initial-noise rule (σ0 instead of √(1 + σ0²)) by 2e-3, the negative prompt for the
# positive one by 4e-2.
REFERENCE_RTOL = 5e-6


# ----------------------------------------------------------------------------------------------------------------
# Independent pieces: SD1.5 σ table, initial-noise rule, the float64 DDIM re-computation.

def sd15_sigma_table():
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) of SD1.5's scaled_linear β schedule (0.00085 → 0.012, 1000 steps), float64."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


SIGMA_TABLE = sd15_sigma_table()


def sigmas_at(timesteps):
    return torch.cat([SIGMA_TABLE[list(timesteps)], torch.zeros(1, dtype=torch.float64)])


def timestep_of(sigma):
    return int((SIGMA_TABLE.log() - math.log(float(sigma))).abs().argmin())


def comfy_noise(shape, seed):
    """ComfyUI's noise for a seed: one CPU generator, torch.manual_seed(seed), randn of the whole latent batch."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def reference_ddim(unet, sigmas, noise, latent, cond, uncond=None, cfg=1.0, add_noise=True):
    """Deterministic DDIM chain in float64 with ε from the UNet; returns every x_i in model latent space."""
    sigmas = [float(s) for s in sigmas]
    latent64 = latent.double() * SD15_LATENT_SCALE if torch.count_nonzero(latent) > 0 else latent.double()
    s0, sigma_max = sigmas[0], float(SIGMA_TABLE[-1])
    starts_at_max = math.isclose(s0, sigma_max, rel_tol=1e-5) or s0 > sigma_max
    scale = math.sqrt(1.0 + s0 * s0) if starts_at_max else s0
    x = latent64 + (noise.double() * scale if add_noise else 0.0)
    batch = x.shape[0]
    cond = cond.expand(batch, -1, -1)
    uncond = None if uncond is None else uncond.expand(batch, -1, -1)
    xs = [x]
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            t = torch.full((batch,), float(timestep_of(sigma)))
            x_in = (x / math.sqrt(1.0 + sigma * sigma)).float()
            eps_c = unet(x_in, timesteps=t, context=cond).double()
            denoised = x - sigma * eps_c
            if cfg != 1.0:
                eps_u = unet(x_in, timesteps=t, context=uncond).double()
                denoised_u = x - sigma * eps_u
                denoised = denoised_u + cfg * (denoised - denoised_u)
            x = denoised + sigma_next * (x - denoised) / sigma
            xs.append(x)
    return xs


def rel_err(out, ref):
    return float((out.double() - ref).abs().max() / ref.abs().max())


# ----------------------------------------------------------------------------------------------------------------
# Small wrappers over the real nodes.

@pytest.fixture(scope="module")
def host(comfy_host, tiny_models, conds, run_node):
    class Host:
        model = tiny_models.model
        positive, negative = conds
        run = staticmethod(run_node)
        comfy = comfy_host.comfy
        nodes = comfy_host.nodes

        @staticmethod
        def latent(batch=1):
            return run_node("EmptyLatentImage", width=64, height=64, batch_size=batch)[0]

        @staticmethod
        def image_latent(batch=1, seed=1234):
            """A non-empty 'encoded image' latent for img2img, on the scale of real SD1.5 VAE latents."""
            samples = torch.randn((batch, 4, 8, 8), generator=torch.Generator().manual_seed(seed)) * 4.0
            return {"samples": samples}

        memo = {}

        @classmethod
        def ksampler_cached(cls, sampler, scheduler, steps, seed=0, cfg=1.0):
            """KSampler on the empty 64×64 latent, run once per argument set in this module (tests share runs)."""
            key = (sampler, scheduler, steps, seed, cfg)
            if key not in cls.memo:
                cls.memo[key] = cls.ksampler(sampler, scheduler, steps, seed=seed, cfg=cfg)
            return cls.memo[key]

        @classmethod
        def ksampler(cls, sampler, scheduler, steps, seed=0, cfg=1.0, latent=None, denoise=1.0):
            latent = cls.latent() if latent is None else latent
            return run_node("KSampler", model=cls.model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
                            scheduler=scheduler, positive=cls.positive, negative=cls.negative, latent_image=latent,
                            denoise=denoise)[0]["samples"]

        @classmethod
        def ksampler_advanced(cls, sampler, scheduler, steps, start, end, seed=0, cfg=1.0, latent=None,
                              add_noise=True, leftover=False):
            latent = cls.latent() if latent is None else latent
            return run_node("KSamplerAdvanced", model=cls.model, add_noise="enable" if add_noise else "disable",
                            noise_seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler,
                            positive=cls.positive, negative=cls.negative, latent_image=latent, start_at_step=start,
                            end_at_step=end, return_with_leftover_noise="enable" if leftover else "disable")[0]["samples"]

        @classmethod
        def guider(cls, cfg):
            if cfg is None:
                return run_node("BasicGuider", model=cls.model, conditioning=cls.positive)[0]
            return run_node("CFGGuider", model=cls.model, positive=cls.positive, negative=cls.negative, cfg=cfg)[0]

        @classmethod
        def custom(cls, sampler, sigmas, seed=0, cfg=None, latent=None):
            latent = cls.latent() if latent is None else latent
            (noise,) = run_node("RandomNoise", noise_seed=seed)
            out, _denoised = run_node("SamplerCustomAdvanced", noise=noise, guider=cls.guider(cfg), sampler=sampler,
                                      sigmas=sigmas, latent_image=latent)
            return out["samples"]

        @classmethod
        def sampler_node(cls, kind):
            if kind == "pcm":
                return run_node("FewStepPCMSampler")[0]
            if kind == "tcd":
                return run_node("FewStepTCDSampler", gamma=0.3)[0]
            if kind == "ctm_gamma":
                return run_node("FewStepCTMGammaSampler", gamma=0.5)[0]
            raise KeyError(kind)

        @classmethod
        def sigmas_node(cls, kind, steps, denoise=1.0):
            if kind == "pcm":
                return run_node("FewStepPCMScheduler", model=cls.model, phases=4, ddim_timesteps=50, steps=steps,
                                denoise=denoise, end="zero")[0]
            if kind == "lcm":
                return run_node("FewStepLCMScheduler", model=cls.model, steps=steps, denoise=denoise, original_steps=50,
                                end="zero")[0]
            if kind == "hyper_sd_1step":
                return run_node("FewStepHyperSD1StepScheduler", model=cls.model, steps=steps, denoise=denoise)[0]
            raise KeyError(kind)

        @classmethod
        def unet(cls):
            return cls.model.model.diffusion_model

        @classmethod
        def cond_tensors(cls):
            return cls.positive[0][0], cls.negative[0][0]

    return Host


def assert_sane(out, shape):
    assert tuple(out.shape) == tuple(shape)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all(), "non-finite values in the sampler output"
    assert float(out.std()) > 1e-3, "the output is constant"


# ----------------------------------------------------------------------------------------------------------------
# The host and the checkpoint.

def test_checkpoint_loads_as_sd15_with_no_missing_keys(comfy_host, tiny_models, conds):
    model, vae = tiny_models.model, tiny_models.vae
    assert type(model.model.model_config).__name__ == "SD15"
    import comfy.model_sampling

    assert isinstance(model.model.model_sampling, comfy.model_sampling.ModelSamplingDiscrete)
    assert isinstance(model.model.model_sampling, comfy.model_sampling.EPS)
    assert type(vae.first_stage_model).__name__ == "TAESD"
    table = model.model.model_sampling.sigmas.double()
    assert torch.allclose(table, SIGMA_TABLE, rtol=1e-6, atol=0), "host σ table is not SD1.5's scaled_linear schedule"
    assert math.isclose(model.model.latent_format.scale_factor, SD15_LATENT_SCALE)
    log = tiny_models.load_log.messages()
    assert not [m for m in log if m.lower().startswith(("unet missing", "missing vae keys", "vae missing"))]
    clip_missing = [m for m in log if m.startswith("clip missing")]
    # The only CLIP keys an SD1.5 single-file checkpoint cannot carry (ComfyUI filters exactly these two).
    assert all("logit_scale" in m and "text_projection" in m and m.count("'") == 4 for m in clip_missing), clip_missing
    positive, negative = conds
    assert positive[0][0].shape == (1, 77, 768) and torch.isfinite(positive[0][0]).all()
    assert not torch.equal(positive[0][0], negative[0][0])


def test_checkpoint_generator_is_cached_and_seeded(comfy_host, tmp_path):
    from support.tiny_checkpoint import _read_stamp, write_tiny_sd15

    cached = comfy_host.checkpoint_file
    before = cached.stat().st_mtime_ns
    assert write_tiny_sd15(cached, seed=0) == cached
    assert cached.stat().st_mtime_ns == before, "a matching cached checkpoint was rewritten"
    assert _read_stamp(cached).endswith("seed0")
    assert 150 * 2 ** 20 < cached.stat().st_size < 200 * 2 ** 20


def test_pack_loads_and_registers_everywhere(comfy_host):
    nodes, comfy = comfy_host.nodes, comfy_host.comfy
    log = comfy_host.startup_log.messages()
    assert not [m for m in log if "IMPORT FAILED" in m], [m for m in log if "IMPORT FAILED" in m]
    for node_id in PACK_NODE_IDS:
        assert node_id in nodes.NODE_CLASS_MAPPINGS, node_id
    ksampler_inputs = nodes.KSampler.INPUT_TYPES()["required"]
    advanced_inputs = nodes.KSamplerAdvanced.INPUT_TYPES()["required"]
    select_inputs = nodes.NODE_CLASS_MAPPINGS["KSamplerSelect"].INPUT_TYPES()["required"]
    basic_inputs = nodes.NODE_CLASS_MAPPINGS["BasicScheduler"].INPUT_TYPES()["required"]

    def options(spec):  # V1 combos are (list, {...}); V3 combos are ("COMBO", {"options": list})
        return spec[0] if isinstance(spec[0], list) else spec[1]["options"]

    for name in PACK_SAMPLERS:
        assert name in options(ksampler_inputs["sampler_name"])
        assert name in options(advanced_inputs["sampler_name"])
        assert name in options(select_inputs["sampler_name"])
        fn = getattr(comfy.k_diffusion.sampling, "sample_" + name)
        # The dropdown entry runs this repository's sampler (KSampler silently falls back to euler for unknown names).
        assert pathlib.Path(inspect.getsourcefile(inspect.unwrap(fn))).resolve().parent == REPO_ROOT / "samplers"
        assert comfy.samplers.ksampler(name).sampler_function is fn
    for name in PACK_SCHEDULERS:
        assert name in options(ksampler_inputs["scheduler"])
        assert name in options(advanced_inputs["scheduler"])
        assert name in options(basic_inputs["scheduler"])
    for names in (comfy.samplers.KSampler.SAMPLERS, comfy.samplers.KSampler.SCHEDULERS):
        assert len(names) == len(set(names)), "a name was registered twice"


# ----------------------------------------------------------------------------------------------------------------
# Every sampler × scheduler through the core nodes.

@pytest.mark.parametrize("sampler,scheduler", list(itertools.product(PACK_SAMPLERS, PACK_SCHEDULERS)))
def test_ksampler_every_sampler_scheduler(host, sampler, scheduler):
    steps = STEPS_FOR[scheduler]
    a = host.ksampler_cached(sampler, scheduler, steps, seed=11)
    assert_sane(a, (1, 4, 8, 8))
    assert torch.equal(a, host.ksampler(sampler, scheduler, steps, seed=11)), "same seed gave a different result"
    b = host.ksampler_cached(sampler, scheduler, steps, seed=12)
    assert_sane(b, (1, 4, 8, 8))
    assert (a - b).abs().max() > 1e-2 * a.abs().max(), "a different seed gave (nearly) the same result"


def test_ksampler_samplers_are_distinct(host):
    outs = {name: host.ksampler_cached(name, "pcm", 4, seed=11) for name in PACK_SAMPLERS}
    euler = host.ksampler("euler", "pcm", 4, seed=11)
    # Deterministic DDIM is Euler in σ-space for an ε model: pcm must agree with core euler to float32 rounding...
    assert rel_err(outs["pcm"], euler.double()) < 1e-5
    # ...and the stochastic samplers must not.
    for name in ("tcd", "ctm_gamma"):
        assert rel_err(outs[name], outs["pcm"].double()) > 1e-2, name
    assert rel_err(outs["tcd"], outs["ctm_gamma"].double()) > 1e-2


@pytest.mark.parametrize("sampler,schedule", list(itertools.product(PACK_SAMPLERS, PACK_SCHEDULERS)))
def test_sampler_custom_advanced_with_pack_nodes(host, sampler, schedule):
    steps = STEPS_FOR[schedule]
    cfg = 2.0 if sampler == "pcm" else None  # CFGGuider on one row, BasicGuider on the others
    sampler_obj = host.sampler_node(sampler)
    sigmas = host.sigmas_node(schedule, steps)
    assert sigmas.shape == (steps + 1,)
    a = host.custom(sampler_obj, sigmas, seed=21, cfg=cfg)
    assert_sane(a, (1, 4, 8, 8))
    assert torch.equal(a, host.custom(sampler_obj, sigmas, seed=21, cfg=cfg))
    b = host.custom(sampler_obj, sigmas, seed=22, cfg=cfg)
    assert (a - b).abs().max() > 1e-2 * a.abs().max()


@pytest.mark.parametrize("sampler,scheduler", list(itertools.product(PACK_SAMPLERS, PACK_SCHEDULERS)))
def test_ksampler_select_and_basic_scheduler(host, sampler, scheduler):
    steps = STEPS_FOR[scheduler]
    (sampler_obj,) = host.run("KSamplerSelect", sampler_name=sampler)
    assert isinstance(sampler_obj, host.comfy.samplers.KSAMPLER)
    assert sampler_obj.sampler_function is getattr(host.comfy.k_diffusion.sampling, "sample_" + sampler)
    (sigmas,) = host.run("BasicScheduler", model=host.model, scheduler=scheduler, steps=steps, denoise=1.0)
    ms = host.model.get_model_object("model_sampling")
    assert torch.equal(sigmas.float(), host.comfy.samplers.calculate_sigmas(ms, scheduler, steps).float())
    # With the same noise, σ's, sampler and cfg 1, SamplerCustomAdvanced reproduces KSampler for both seeds
    # (which differ from each other: see test_ksampler_every_sampler_scheduler).
    for seed in (11, 12):
        a = host.custom(sampler_obj, sigmas, seed=seed, cfg=None)
        assert_sane(a, (1, 4, 8, 8))
        k = host.ksampler_cached(sampler, scheduler, steps, seed=seed)
        assert torch.allclose(a, k, rtol=1e-5, atol=1e-5 * float(k.abs().max())), (seed, rel_err(a, k.double()))


# ----------------------------------------------------------------------------------------------------------------
# The ε the sampler sees is the model's: float64 DDIM re-computation.

REFERENCE_CASES = {
    # id: (how to run, sampler, schedule, steps, cfg, denoise, expected training timesteps)
    "ksampler-pcm-pcm-cfg1": ("ksampler", "pcm", "pcm", 4, 1.0, 1.0, [999, 749, 499, 249]),
    "ksampler-pcm-pcm-cfg2.5": ("ksampler", "pcm", "pcm", 4, 2.5, 1.0, [999, 749, 499, 249]),
    "ksampler-pcm-lcm": ("ksampler", "pcm", "lcm", 4, 1.0, 1.0, [999, 759, 499, 259]),
    "ksampler-pcm-hyper": ("ksampler", "pcm", "hyper_sd_1step", 2, 1.0, 1.0, [800, 400]),
    "ksampler-pcm-pcm-img2img": ("ksampler", "pcm", "pcm", 4, 1.0, 0.5, [499, 374, 249, 124]),
    "ksampler-pcm-lcm-img2img": ("ksampler", "pcm", "lcm", 4, 1.0, 0.5, [499, 379, 259, 139]),
    "custom-tcd0-lcmnode-cfg2": ("custom", "tcd0", "lcm", 4, 2.0, 1.0, [999, 759, 499, 259]),
    "custom-ctm0-pcmnode": ("custom", "ctm0", "pcm", 4, 1.0, 1.0, [999, 739, 499, 239]),
    "custom-pcm-hypernode": ("custom", "pcm", "hyper_sd_1step", 2, None, 1.0, [800, 400]),
    "custom-pcm-pcmnode-img2img": ("custom", "pcm", "pcm", 4, 1.5, 0.5, [499, 369, 239, 119]),
    "custom-tcd0-lcmnode-img2img": ("custom", "tcd0", "lcm", 4, 1.0, 0.5, [499, 379, 259, 139]),
    "custom-pcm-hypernode-img2img": ("custom", "pcm", "hyper_sd_1step", 2, 1.0, 0.5, [400, 200]),
}

MEASURED = {}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_deterministic_samplers_match_float64_ddim(host, case):
    how, sampler, schedule, steps, cfg, denoise, timesteps = REFERENCE_CASES[case]
    seed = 41
    latent = host.latent() if denoise == 1.0 else host.image_latent()
    expected_sigmas = sigmas_at(timesteps)
    if how == "ksampler":
        k = host.comfy.samplers.KSampler(host.model, steps=steps, device="cpu", sampler=sampler, scheduler=schedule,
                                         denoise=denoise)
        assert torch.allclose(k.sigmas.double(), expected_sigmas, rtol=1e-5, atol=0), k.sigmas
        out = host.ksampler(sampler, schedule, steps, seed=seed, cfg=cfg, latent=latent, denoise=denoise)
    else:
        sampler_obj = {"tcd0": lambda: host.run("FewStepTCDSampler", gamma=0.0)[0],
                       "ctm0": lambda: host.run("FewStepCTMGammaSampler", gamma=0.0)[0],
                       "pcm": lambda: host.run("FewStepPCMSampler")[0]}[sampler]()
        sigmas = host.sigmas_node(schedule, steps, denoise)
        assert torch.allclose(sigmas.double(), expected_sigmas, rtol=1e-5, atol=0), sigmas
        out = host.custom(sampler_obj, sigmas, seed=seed, cfg=cfg, latent=latent)
    cond, uncond = host.cond_tensors()
    ref = reference_ddim(host.unet(), expected_sigmas, comfy_noise(out.shape, seed), latent["samples"], cond, uncond,
                         cfg=1.0 if cfg is None else cfg)[-1]
    err = rel_err(out * SD15_LATENT_SCALE, ref)
    MEASURED[case] = err
    assert err < REFERENCE_RTOL, f"{case}: relative deviation {err:.3g} from the float64 DDIM re-computation"
    # Guard against a vacuous comparison: the result is far from the initial noise and from the input latent.
    assert rel_err(out * SD15_LATENT_SCALE, comfy_noise(out.shape, seed).double() * float(expected_sigmas[0])) > 0.05


def test_stochastic_gamma_changes_the_result(host):
    """γ > 0 must re-noise: TCD/CTM at γ = 0 equal DDIM, at γ > 0 they move away from it."""
    sigmas = host.sigmas_node("lcm", 4)
    ddim = host.custom(host.run("FewStepPCMSampler")[0], sigmas, seed=51)
    for node, key in (("FewStepTCDSampler", "gamma"), ("FewStepCTMGammaSampler", "gamma")):
        zero = host.custom(host.run(node, **{key: 0.0})[0], sigmas, seed=51)
        assert rel_err(zero, ddim.double()) < 1e-5, node
        for gamma in (0.3, 1.0):
            noisy = host.custom(host.run(node, **{key: gamma})[0], sigmas, seed=51)
            assert torch.isfinite(noisy).all()
            assert rel_err(noisy, ddim.double()) > 1e-2, (node, gamma)


# ----------------------------------------------------------------------------------------------------------------
# img2img, KSamplerAdvanced, batches, masks.

@pytest.mark.parametrize("sampler", PACK_SAMPLERS)
@pytest.mark.parametrize("scheduler", PACK_SCHEDULERS)
def test_ksampler_img2img_denoise(host, sampler, scheduler):
    steps = 2
    latent = host.image_latent()
    half = host.ksampler(sampler, scheduler, steps, seed=61, latent=latent, denoise=0.5)
    full = host.ksampler(sampler, scheduler, steps, seed=61, latent=latent, denoise=1.0)
    assert_sane(half, (1, 4, 8, 8))
    assert rel_err(half, full.double()) > 1e-2, "denoise had no effect"
    # denoise 0 samples nothing: ComfyUI returns the input latent.
    untouched = host.ksampler(sampler, scheduler, steps, seed=61, latent=latent, denoise=0.0)
    assert torch.equal(untouched, latent["samples"])


@pytest.mark.parametrize("schedule", PACK_SCHEDULERS)
def test_scheduler_nodes_denoise_keeps_the_tail(host, schedule):
    steps = 3 if schedule != "lcm" else 4
    full = host.sigmas_node(schedule, steps, 1.0)
    for denoise in (0.75, 0.5, 0.25):
        part = host.sigmas_node(schedule, steps, denoise)
        assert part.shape == (steps + 1,)
        assert float(part[-1]) == 0.0
        assert float(part[0]) < float(full[0]), (denoise, part, full)
        assert bool((part[:-1] > part[1:]).all())
        if schedule != "lcm":  # ComfyUI's rule: build int(steps/denoise) steps, keep the last `steps`
            longer = host.sigmas_node(schedule, int(steps / denoise), 1.0)
            assert torch.equal(part, longer[-(steps + 1):])
    out = host.custom(host.sampler_node("tcd"), host.sigmas_node(schedule, steps, 0.5), seed=62,
                      latent=host.image_latent())
    assert_sane(out, (1, 4, 8, 8))


def test_ksampler_advanced_split_equals_full_run(host):
    cond, uncond = host.cond_tensors()
    seed, steps = 71, 4
    expected_sigmas = sigmas_at([999, 749, 499, 249])
    chain = reference_ddim(host.unet(), expected_sigmas, comfy_noise((1, 4, 8, 8), seed), host.latent()["samples"], cond)
    first = host.ksampler_advanced("pcm", "pcm", steps, 0, 2, seed=seed, leftover=True)
    assert rel_err(first * SD15_LATENT_SCALE, chain[2]) < REFERENCE_RTOL, "leftover-noise output is not x at σ_2"
    second = host.ksampler_advanced("pcm", "pcm", steps, 2, 10000, seed=seed, add_noise=False,
                                    latent={"samples": first})
    full = host.ksampler("pcm", "pcm", steps, seed=seed)
    assert rel_err(second, full.double()) < 1e-5, "split run differs from the full run"
    assert rel_err(second * SD15_LATENT_SCALE, chain[-1]) < REFERENCE_RTOL
    # Without leftover noise the last σ is forced to 0: a clean x̂0 after two steps.
    early = host.ksampler_advanced("pcm", "pcm", steps, 0, 2, seed=seed, leftover=False)
    forced = reference_ddim(host.unet(), torch.cat([expected_sigmas[:2], torch.zeros(1, dtype=torch.float64)]),
                            comfy_noise((1, 4, 8, 8), seed), host.latent()["samples"], cond)[-1]
    assert rel_err(early * SD15_LATENT_SCALE, forced) < REFERENCE_RTOL
    assert rel_err(early, first.double()) > 1e-2
    # Stochastic samplers through the same split: finite, seeded.
    for sampler in ("tcd", "ctm_gamma"):
        a = host.ksampler_advanced(sampler, "lcm", steps, 0, 2, seed=seed, leftover=True)
        b = host.ksampler_advanced(sampler, "lcm", steps, 2, 10000, seed=seed, add_noise=False, latent={"samples": a})
        assert_sane(b, (1, 4, 8, 8))
        assert torch.equal(b, host.ksampler_advanced(sampler, "lcm", steps, 2, 10000, seed=seed, add_noise=False,
                                                     latent={"samples": a}))


def test_batch_of_two(host):
    for sampler in PACK_SAMPLERS:
        out = host.ksampler(sampler, "pcm", 3, seed=81, latent=host.latent(batch=2))
        assert_sane(out, (2, 4, 8, 8))
        assert rel_err(out[0], out[1].double()) > 1e-2, f"{sampler}: both batch items came out the same"
        assert torch.equal(out, host.ksampler(sampler, "pcm", 3, seed=81, latent=host.latent(batch=2)))
    # Deterministic: item 0 of the batch is the single-image run (ComfyUI draws the batch noise from one generator).
    batch = host.ksampler("pcm", "pcm", 3, seed=81, latent=host.latent(batch=2), cfg=2.0)
    single = host.ksampler("pcm", "pcm", 3, seed=81, latent=host.latent(batch=1), cfg=2.0)
    assert rel_err(batch[:1], single.double()) < 1e-5
    cond, uncond = host.cond_tensors()
    ref = reference_ddim(host.unet(), sigmas_at([999, 666, 332]), comfy_noise((2, 4, 8, 8), 81),
                         host.latent(batch=2)["samples"], cond, uncond, cfg=2.0)[-1]
    assert rel_err(batch * SD15_LATENT_SCALE, ref) < REFERENCE_RTOL


@pytest.mark.parametrize("sampler", PACK_SAMPLERS)
def test_noise_mask_keeps_the_unmasked_region(host, sampler):
    latent = host.image_latent()
    mask = torch.zeros((1, 64, 64))
    mask[:, :, :32] = 1.0  # resample the left half, keep the right half
    (masked,) = host.run("SetLatentNoiseMask", samples=latent, mask=mask)
    out = host.ksampler(sampler, "pcm", 3, seed=91, latent=masked)
    assert_sane(out, (1, 4, 8, 8))
    keep, src = out[..., 4:], latent["samples"][..., 4:]
    assert torch.allclose(keep, src, rtol=1e-6, atol=1e-6 * float(src.abs().max())), \
        f"{sampler}: masked-out region changed by {float((keep - src).abs().max()):.3g}"
    assert rel_err(out[..., :4], latent["samples"][..., :4].double()) > 1e-2, "the masked region was not resampled"
    # Through SamplerCustomAdvanced with our SAMPLER node as well.
    out2 = host.custom(host.sampler_node(sampler), host.sigmas_node("lcm", 3), seed=91, latent=masked)
    assert torch.allclose(out2[..., 4:], src, rtol=1e-6, atol=1e-6 * float(src.abs().max()))


# ----------------------------------------------------------------------------------------------------------------
# Schedules for every step count, through the host's own entry points.

def assert_valid_schedule(sigmas, steps, sigma_max, what):
    assert sigmas.ndim == 1 and sigmas.shape[0] == steps + 1, f"{what}: shape {tuple(sigmas.shape)}"
    values = sigmas.double()
    assert torch.isfinite(values).all(), what
    assert float(values[-1]) == 0.0, f"{what}: does not end at 0"
    assert bool((values[:-1] > 0).all()), f"{what}: non-positive σ before the end"
    assert bool((values[:-1] > values[1:]).all()), f"{what}: not strictly decreasing: {values.tolist()}"
    assert float(values[0]) <= sigma_max * (1 + 1e-6), f"{what}: starts above σ_max"


def test_schedulers_valid_for_every_step_count(host):
    ms = host.model.get_model_object("model_sampling")
    sigma_max = float(ms.sigma_max)
    calculate = host.comfy.samplers.calculate_sigmas
    for name in PACK_SCHEDULERS:
        for steps in range(1, 51):
            assert_valid_schedule(calculate(ms, name, steps), steps, sigma_max, f"{name} steps={steps}")
    for steps in range(1, 51):
        assert_valid_schedule(host.sigmas_node("pcm", steps), steps, sigma_max, f"PCM node steps={steps}")
        assert_valid_schedule(host.sigmas_node("lcm", steps), steps, sigma_max, f"LCM node steps={steps}")
        assert_valid_schedule(host.sigmas_node("hyper_sd_1step", steps), steps, sigma_max, f"Hyper node steps={steps}")
    # Where they start: σ_max for pcm/lcm, σ(800) for Hyper-SD.
    assert math.isclose(float(calculate(ms, "pcm", 4)[0]), sigma_max, rel_tol=1e-6)
    assert math.isclose(float(calculate(ms, "lcm", 4)[0]), sigma_max, rel_tol=1e-6)
    assert math.isclose(float(calculate(ms, "hyper_sd_1step", 1)[0]), float(SIGMA_TABLE[800]), rel_tol=1e-5)
    # BasicScheduler (what the UI offers) gives the same lists, with its own denoise rule.
    for name in PACK_SCHEDULERS:
        (sig,) = host.run("BasicScheduler", model=host.model, scheduler=name, steps=4, denoise=1.0)
        assert torch.equal(sig.float(), calculate(ms, name, 4).float())
        (half,) = host.run("BasicScheduler", model=host.model, scheduler=name, steps=4, denoise=0.5)
        assert torch.equal(half.float(), calculate(ms, name, 8).float()[-5:])


def test_hyper_sd_1step_on_a_distilled_sigma_table_uses_the_models_own_sigma_800(host):
    """Core ModelSamplingDiscrete with sampling "lcm" keeps 50 σ's (timesteps 19, 39, …, 999); hyper_sd_1step then
    starts at that model's own σ(800), as ByteDance's node reads it, and is unchanged on the 1000-entry table."""
    (lcm_model,) = host.run("ModelSamplingDiscrete", model=host.model, sampling="lcm", zsnr=False)
    ms = lcm_model.get_model_object("model_sampling")
    assert len(ms.sigmas) == 50
    # Independent: 800 lies 1/20 of the way from timestep 799 to 819 (table entries 39 and 40), log-linear in σ.
    expected = math.exp(0.95 * math.log(float(SIGMA_TABLE[799])) + 0.05 * math.log(float(SIGMA_TABLE[819])))
    own = float(ms.sigma(torch.tensor([800]))[0])  # what the reference node computes
    assert math.isclose(own, expected, rel_tol=1e-5)
    via_dropdown = host.comfy.samplers.calculate_sigmas(ms, "hyper_sd_1step", 1)
    (via_node,) = host.run("FewStepHyperSD1StepScheduler", model=lcm_model, steps=1, denoise=1.0)
    for sigmas in (via_dropdown, via_node):
        assert sigmas.tolist() == [own, 0.0]
    (two,) = host.run("FewStepHyperSD1StepScheduler", model=lcm_model, steps=2, denoise=1.0)
    assert two.tolist() == [own, float(ms.sigma(torch.tensor([400]))[0]), 0.0]
    (guider,) = host.run("BasicGuider", model=lcm_model, conditioning=host.positive)
    (noise,) = host.run("RandomNoise", noise_seed=5)
    out, _ = host.run("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=host.sampler_node("tcd"),
                      sigmas=via_node, latent_image=host.latent())
    assert_sane(out["samples"], (1, 4, 8, 8))
    # The 1000-entry table: still its own entry 800, bit for bit.
    plain = host.model.get_model_object("model_sampling")
    assert torch.equal(host.comfy.samplers.calculate_sigmas(plain, "hyper_sd_1step", 1),
                       torch.cat([plain.sigmas[800:801], torch.zeros(1)]).cpu())


# ----------------------------------------------------------------------------------------------------------------
# Schedule preview.

@pytest.mark.parametrize("with_model", [True, False])
def test_schedule_preview_image(host, with_model):
    def preview(sigmas, **extra):
        kwargs = {"sigmas": sigmas, "width": 320, "height": 200, **extra}
        if with_model:
            kwargs.setdefault("model", host.model)
        (image,) = host.run("FewStepSchedulePreview", **kwargs)
        return image

    image = preview(host.sigmas_node("pcm", 6), **({"phases": 4, "ddim_timesteps": 50} if with_model else {}))
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
    assert tuple(image.shape) == (1, 200, 320, 3)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert float(image.std()) > 0.02, "blank preview"
    drawn = float((image < 0.9).any(dim=-1).float().mean())
    assert 0.005 < drawn < 0.6, f"{drawn:.3f} of the pixels are drawn"
    colour = (image.max(dim=-1).values - image.min(dim=-1).values) > 0.3
    assert int(colour.sum()) > 20, "no coloured curve in the plot"
    # The picture depends on its input: another schedule (and, with a model, the phase edges) changes it.
    assert not torch.equal(image, preview(host.sigmas_node("lcm", 2), **({"phases": 4, "ddim_timesteps": 50} if with_model else {})))
    if with_model:
        assert not torch.equal(image, preview(host.sigmas_node("pcm", 6), phases=0, ddim_timesteps=50))


# ----------------------------------------------------------------------------------------------------------------
# The whole thing as a prompt: validation (dropdown names, the pack's input screen) and the executor.

class _StubServer:
    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def _prompt(ckpt, sampler="tcd", scheduler="lcm", phases=4, ddim=50):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a lighthouse at dusk"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 3, "steps": 3, "cfg": 1.0,
                                                   "sampler_name": sampler, "scheduler": scheduler, "positive": ["2", 0],
                                                   "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
        "8": {"class_type": "FewStepPCMScheduler", "inputs": {"model": ["1", 0], "phases": phases, "ddim_timesteps": ddim,
                                                              "steps": 4, "denoise": 1.0, "end": "zero"}},
        "9": {"class_type": "FewStepCTMGammaSampler", "inputs": {"gamma": 0.5}},
        "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": 4}},
        "11": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                     "cfg": 2.0}},
        "12": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["10", 0], "guider": ["11", 0],
                                                                 "sampler": ["9", 0], "sigmas": ["8", 0],
                                                                 "latent_image": ["4", 0]}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["1", 2]}},
        "14": {"class_type": "PreviewImage", "inputs": {"images": ["13", 0]}},
        "15": {"class_type": "FewStepSchedulePreview", "inputs": {"sigmas": ["8", 0], "model": ["1", 0], "phases": 4,
                                                                  "ddim_timesteps": 50, "width": 256, "height": 192}},
        "16": {"class_type": "PreviewImage", "inputs": {"images": ["15", 0]}},
    }


def test_prompt_validates_and_executes(comfy_host):
    import asyncio

    from fewstep.host.input_checks import screen_prompt
    from fewstep.nodes import NODES

    execution = comfy_host.execution
    good = _prompt(comfy_host.checkpoint)
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("v1", good, None))
    assert valid, (error, node_errors)
    assert sorted(outputs) == ["14", "16", "7"]

    # A bad value drops exactly the outputs that depend on it (what /prompt does before queueing).
    for bad, where, dropped in ((_prompt(comfy_host.checkpoint, sampler="no_such_sampler"), "5", "7"),
                                (_prompt(comfy_host.checkpoint, scheduler="no_such_scheduler"), "5", "7"),
                                (_prompt(comfy_host.checkpoint, phases=20, ddim=10), "8", "14")):
        screen_prompt(bad, {cls.define_schema().node_id: cls for cls in NODES})  # as POST /prompt does first
        _valid, _error, bad_outputs, node_errors = asyncio.run(execution.validate_prompt("v2", bad, None))
        assert where in node_errors and dropped not in bad_outputs, (where, node_errors, bad_outputs)
        if where == "8":  # the pack's own rule between inputs, not a range check
            assert "cannot exceed ddim_timesteps" in str(node_errors["8"]), node_errors["8"]

    server = _StubServer()
    executor = execution.PromptExecutor(server, cache_type=False, cache_args={"lru": 0, "ram": 0})
    executor.execute(good, "run-1", {}, outputs)
    errors = [m for m in executor.status_messages if m[0] == "execution_error"]
    assert executor.success and not errors, errors
    for node_id in ("7", "14", "16"):
        images = executor.history_result["outputs"][node_id]["images"]
        assert len(images) == 1
        path = pathlib.Path(comfy_host.folder_paths.get_temp_directory()) / images[0]["subfolder"] / images[0]["filename"]
        assert path.is_file() and path.stat().st_size > 100
