"""Each vocabulary has one source, and the places that use it read it (pure: no ComfyUI).

The node-side halves (widget defaults, validate_inputs) are in tests/host/test_vocabulary_host.py.
"""
import copy
import dataclasses
import inspect
import json
import pathlib

import pytest

from fewstep import samplers
from fewstep.distill.engine import DistillConfig
from fewstep.loras import architectures, presets
from fewstep.samplers.registry import SAMPLERS
from fewstep.schedulers import check_phases, pcm_phase_edges, pcm_sigmas, phases_problem
from support.model_sampling import DiscreteVPSampling
from fewstep.schedulers.registry import SCHEDULERS

# ---------------------------------------------------------------- the phases ≤ K rule


@pytest.mark.parametrize("phases,k", [(4, 50), (1, 1), (40, 40), (1, 1000)])
def test_phases_within_k_pass_everywhere(phases, k):
    assert phases_problem(phases, k) is None
    check_phases(phases, k)
    DistillConfig(phases=phases, ddim_timesteps=k).check()
    assert len(pcm_phase_edges(phases, k)) == phases + 1


@pytest.mark.parametrize("phases,k", [(11, 10), (48, 40), (0, 50)])
def test_phases_beyond_k_give_one_message_in_scheduler_engine_and_presets(phases, k):
    message = phases_problem(phases, k)
    assert message.startswith(f"phases ({phases}) must be between 1 and ddim_timesteps K ({k})")
    for refused in (lambda: check_phases(phases, k), lambda: pcm_phase_edges(phases, k),
                    lambda: pcm_sigmas(DiscreteVPSampling(), 4, phases, k),
                    lambda: DistillConfig(phases=phases, ddim_timesteps=k).check()):
        with pytest.raises(ValueError) as error:
            refused()
        assert str(error.value) == message


def test_phases_beyond_k_in_the_preset_table_and_trainer_metadata_give_the_message():
    with open(presets.TABLE_PATH, encoding="utf-8") as handle:
        table = json.load(handle)
    broken = copy.deepcopy(table)
    broken["families"]["pcm_sdxl_smallcfg"].update(phases=48)  # K = 40
    with pytest.raises(ValueError) as error:
        presets.validate_table(broken)
    assert str(error.value) == f"preset 'pcm_sdxl_smallcfg': {phases_problem(48, 40)}"

    metadata = {presets.META_METHOD: "pcm", presets.META_PHASES: "12", presets.META_DDIM_TIMESTEPS: "10",
                presets.META_BASE_ARCH: "sd15"}
    with pytest.raises(ValueError) as error:
        presets.preset_from_metadata(metadata)
    assert str(error.value).endswith(phases_problem(12, 10))
    found = presets.preset_for("mine.safetensors", metadata, "sd15")
    assert found.source == "structure" and phases_problem(12, 10) in found.message


# ---------------------------------------------------------------- dropdown samplers and schedulers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def keyword_defaults(function):
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_dropdown_sampler_options_are_its_functions_defaults(name):
    entry = SAMPLERS[name]
    defaults = keyword_defaults(entry.function)
    assert {k: defaults[k] for k in entry.options} == dict(entry.options)
    assert entry.function is getattr(samplers, entry.function.__name__)


def test_dropdown_sampler_defaults_are_tcd_03_and_ctm_05():
    assert dict(SAMPLERS["tcd"].options) == {"gamma": 0.3} and dict(SAMPLERS["ctm_gamma"].options) == {"gamma": 0.5}
    assert dict(SAMPLERS["pcm"].options) == {}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_dropdown_scheduler_defaults_are_its_functions_defaults(name):
    entry = SCHEDULERS[name]
    defaults = keyword_defaults(entry.function)
    assert {k: defaults[k] for k in entry.defaults} == dict(entry.defaults)
    assert list(inspect.signature(entry.function).parameters)[:2] == ["model_sampling", "steps"]


def test_presets_and_registration_read_the_registries():
    assert presets.PACK_SAMPLERS == tuple(SAMPLERS) and presets.PACK_SCHEDULERS == tuple(SCHEDULERS)
    source = (ROOT / "host" / "registration.py").read_text(encoding="utf-8")
    assert "from ..samplers.registry import SAMPLERS" in source
    assert "from ..schedulers.registry import SCHEDULERS" in source
    for name in set(SAMPLERS) | set(SCHEDULERS):
        assert f'"{name}"' not in source, f"host/registration.py names {name!r} itself"


def _flat(path):
    return " ".join((ROOT / path).read_text(encoding="utf-8").split())


def test_readme_and_help_pages_state_the_registry_defaults():
    samplers_text = ", ".join(f"`{n}`" + (f" ({e.describe()})" if e.options else "") for n, e in SAMPLERS.items())
    schedulers_text = ", ".join(f"`{n}` ({e.summary})" for n, e in SCHEDULERS.items())
    assert f"Dropdown entries added: samplers {samplers_text}; schedulers {schedulers_text}." in _flat("README.md")
    tcd, ctm = SAMPLERS["tcd"].options["gamma"], SAMPLERS["ctm_gamma"].options["gamma"]
    assert f"γ = {tcd:g}: diffusers' default" in _flat("web/docs/FewStepTCDSampler/en.md")
    assert f"the `tcd` dropdown entry uses γ = {tcd:g}" in _flat("web/docs/FewStepPresetToKSampler/en.md")
    ctm_page = _flat("web/docs/FewStepCTMGammaSampler/en.md")
    assert f"default {ctm:g}." in ctm_page and f"same sampler with γ = {ctm:g}." in ctm_page


# ---------------------------------------------------------------- training defaults

CLI_ONLY = {"checkpoint", "images", "prompts", "prompt", "output", "resolution", "flip", "comfyui", "cpu",
            "no_gradient_checkpointing", "save_every", "resume", "virtual_ranks", "diffusion_model", "text_encoder",
            "clip_type", "vae"}


def test_cli_defaults_are_distill_configs():
    from fewstep.distill.lora import DEFAULT_ALPHA, DEFAULT_RANK
    from fewstep.host.distill_cli import parse_args  # imports no ComfyUI before start_host

    args = vars(parse_args(["--checkpoint", "m.safetensors", "--images", "in", "--output", "out.safetensors"]))
    config = dataclasses.asdict(DistillConfig())
    shared = {k: v for k, v in args.items() if k not in CLI_ONLY | {"rank", "alpha"}}
    assert shared == {k: config[k] for k in shared}
    # not settable there: the node and the CLI always train deterministically, with the engine's fixed optimiser
    # settings and dropout share
    assert set(config) - set(shared) == {"deterministic", "weight_decay", "grad_clip", "empty_prompt_prob"}
    assert (args["rank"], args["alpha"]) == (DEFAULT_RANK, DEFAULT_ALPHA)


def test_training_defaults_are_the_nodes_values():
    """The values the PCM Distillation node showed before the defaults had one source."""
    config = DistillConfig()
    assert (config.steps, config.phases, config.ddim_timesteps, config.batch_size, config.grad_accumulation,
            config.learning_rate, config.cfg_mode, config.w_min, config.w_max, config.huber_c, config.precision,
            config.seed, config.warmup_steps, config.ema_decay, config.adversarial_weight) == \
        (500, 4, 50, 2, 1, 1e-4, "small", 4.0, 5.0, 0.001, "bf16", 0, 0, 0.0, 0.0)
    config.check()


def test_readme_states_the_training_defaults():
    from fewstep.distill.lora import DEFAULT_ALPHA, DEFAULT_RANK

    c = DistillConfig()
    stated = (f"{c.steps} steps, {c.phases} phases, K {c.ddim_timesteps}, batch {c.batch_size}, lr {c.learning_rate:g}, "
              f"rank {DEFAULT_RANK}, alpha {DEFAULT_ALPHA:g}, {c.cfg_mode} CFG with w ∈ [{c.w_min:g}, {c.w_max:g}], "
              f"{c.precision}.")
    assert stated in _flat("README.md")


# ---------------------------------------------------------------- architectures

ARCH_USERS = ("loras/formats.py", "loras/presets.py", "host/lora_patches.py", "host/training_model.py",
              "host/training_job.py", "nodes/loras.py", "nodes/train.py")


def test_architecture_subsets_are_of_the_one_vocabulary():
    for subset in (architectures.MODEL_ARCHS, architectures.LORA_ARCHS, architectures.PRESET_ARCHS,
                   architectures.UNET_ARCHS, architectures.TRAINABLE_ARCHS, tuple(architectures.CONTEXT_DIM_ARCHS.values())):
        assert set(subset) <= set(architectures.LABELS), subset
    assert presets.ARCHES == architectures.PRESET_ARCHS
    assert architectures.label_list(architectures.TRAINABLE_ARCHS) == "SD1.5, SD2.x, SDXL, SD3 and FLUX"


def test_the_preset_tables_architectures_are_the_vocabularys():
    with open(presets.TABLE_PATH, encoding="utf-8") as handle:
        table = json.load(handle)
    named = {f["base_arch"] for f in table["families"].values()} - {None}
    named |= {a for p in table["filename_patterns"] for a in p.get("preset_by_arch", {})}
    named |= set(table["conservative"]["by_arch"])
    assert named == set(architectures.PRESET_ARCHS)


@pytest.mark.parametrize("path", ARCH_USERS)
def test_no_other_module_spells_an_architecture_name(path):
    source = (ROOT / path).read_text(encoding="utf-8")
    for name in architectures.LABELS:
        assert f'"{name}"' not in source and f"'{name}'" not in source, f"{path} spells {name!r} itself"
    for label in set(architectures.LABELS.values()) - {"SD3", "FLUX", "SDXL"}:  # prose may name those
        assert f'"{label}"' not in source, f"{path} spells the label {label!r} itself"


def test_labels_fits_and_families():
    assert architectures.arch_label(None) == "unknown" and architectures.arch_label("cosmos") == "cosmos"
    assert architectures.arch_fits("mmdit", "flux") and architectures.arch_fits("mmdit", "sd3")
    assert not architectures.arch_fits("sd15", "sdxl") and architectures.arch_fits(None, "sdxl")
    assert architectures.same_family("sdxl", "ssd1b") and not architectures.same_family("sd15", "sdxl")
