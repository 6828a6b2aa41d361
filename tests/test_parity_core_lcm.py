"""ComfyUI's core `lcm` sampler reproduces LCMScheduler and SD3's stochastic PCM update exactly,
so the pack needs no extra stochastic phased sampler (imports the real host's sampling module)."""
import os
import pathlib
import sys

import pytest

import parity_cases as pc

COMFY = pathlib.Path(os.environ.get("COMFYUI_PATH", pathlib.Path(__file__).resolve().parents[1] / ".comfyui"))


@pytest.fixture(scope="module")
def sample_lcm():
    if not (COMFY / "comfy" / "samplers.py").exists():
        pytest.skip(f"no ComfyUI at {COMFY}: run `make setup` or set COMFYUI_PATH")
    if str(COMFY) not in sys.path:
        sys.path.insert(0, str(COMFY))
    from comfy.cli_args import args

    args.cpu = True
    from comfy.k_diffusion.sampling import sample_lcm

    return sample_lcm


@pytest.mark.parametrize("steps", pc.STEP_COUNTS)
def test_core_lcm_with_lcm_schedule_and_boundary_equals_lcm_scheduler(sample_lcm, steps):
    # diffusers evaluates c_skip/c_out in float32, hence ~1e-7 rather than 1e-14.
    assert pc.core_lcm_vs_lcm(sample_lcm, steps) <= 1e-5


@pytest.mark.parametrize("steps", pc.STEP_COUNTS)
def test_comfy_lcm_boundary_form_is_within_tolerance_too(sample_lcm, steps):
    # ComfyUI's LCM model sampling applies c_skip to the σ-space input, diffusers to the VP sample;
    # c_skip < 1e-6 at every grid timestep ≥ 19, so the two agree to well under the tolerance.
    assert pc.core_lcm_vs_lcm(sample_lcm, steps, comfy_form=True) <= 1e-5


@pytest.mark.parametrize("steps", pc.STEP_COUNTS)
def test_core_lcm_on_flow_equals_sd3_stochastic_update(sample_lcm, steps):
    assert pc.sd3_stochastic(sample_lcm, steps) <= 1e-6
