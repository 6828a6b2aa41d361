"""The headless CLI, `python -m fewstep.distill`, in fresh processes: one process, and torchrun with 2 gloo processes.

Both load the tiny SD1.5 checkpoint with ComfyUI's own loader in-process and train on the same image folder; the
SD3 tests load the tiny MMDiT, CLIP-L, CLIP-G and 16-channel VAE as separate files (--diffusion-model,
--text-encoder ×2, --clip-type sd3, --vae), and core LoraLoader's call applies the written LoRAs in a fresh process
(tests/support/core_lora_load.py).
A 2-process run must equal one process computing the same 2 ranks (`--virtual-ranks 2`) bit for bit: that
checks the launch, the slicing, the all-reduce and rank 0's files. That the ranks together compute the global
batch's loss and gradient is checked to float64 rounding on the engine (tests/test_distill_engine.py); here the
first step's loss of one process at the global batch agrees to the log's 5 significant digits. Later steps are
not compared: AdamW turns rounding-level gradient differences into ±lr moves.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from support.server import comfyui_path, free_port
from support.tiny_checkpoint import cached_tiny_sd15
from support.tiny_models import cached_tiny_sd3, cached_tiny_sd3_text_encoders, cached_tiny_sd3_vae

REPO = pathlib.Path(__file__).resolve().parents[2]
ARGS = ["--resolution", "64", "--cpu", "--steps", "3", "--learning-rate", "1e-4", "--phases", "2", "--ddim-timesteps", "10", "--batch-size", "2",
        "--rank", "4", "--precision", "fp32", "--prompt", "a coloured square"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("cli")
    (root / "pkg").mkdir()
    (root / "pkg" / "fewstep").symlink_to(REPO, target_is_directory=True)  # importable as `fewstep`
    images = root / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "navy", "olive", "orange"]):
        Image.new("RGB", (80, 64), colour).save(images / f"{i}.png")
    return root


def cli_env(workspace):
    return {**os.environ, "PYTHONPATH": str(workspace / "pkg"), "COMFYUI_PATH": str(comfyui_path()),
            "OMP_NUM_THREADS": "1"}


def cli(workspace, *args, nproc=1):
    launcher = [sys.executable, "-m"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
         str(free_port()), "-m"]
    return subprocess.run(launcher + ["fewstep.distill", *args], cwd=workspace, env=cli_env(workspace),
                          capture_output=True, text=True, timeout=300)


def core_load(workspace, model_args, loras):
    """{LoRA path: core's record} from tests/support/core_lora_load.py in a fresh process (see its docstring)."""
    script = REPO / "tests" / "support" / "core_lora_load.py"
    run = subprocess.run([sys.executable, str(script), *model_args, *map(str, loras)], cwd=workspace,
                         env=cli_env(workspace), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {pathlib.Path(r["lora"]): r for r in records}


def assert_core_applies_every_key(record):
    assert record["warnings"] == [], record["warnings"]  # no "lora key not loaded", no "NOT LOADED"
    assert record["tensors"] > 0 and record["tensors"] % 3 == 0 and record["patches"] == record["tensors"] // 3


def losses(output):
    return [float(v) for v in re.findall(r"step \d+/\d+\s+loss (\S+)", output)]


def train(workspace, name, *extra, nproc=1):
    common = ["--checkpoint", str(cached_tiny_sd15()), "--images", str(workspace / "images"), *ARGS]
    run = cli(workspace, *common, "--output", str(workspace / "out" / f"{name}.safetensors"), *extra, nproc=nproc)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def files(workspace, name):
    lora = load_file(workspace / "out" / f"{name}.safetensors")
    state = load_file(workspace / "out" / f"{name}.state.safetensors")
    return {**{"lora:" + k: v for k, v in lora.items()}, **{"state:" + k: v for k, v in state.items()}}


@pytest.mark.subprocess
def test_two_gloo_processes_equal_two_virtual_ranks_to_the_bit(workspace):
    two = train(workspace, "two", nproc=2)
    assert "data parallel: 2 processes (gloo), global batch 2, 1 per process" in two.stderr
    virtual = train(workspace, "virtual", "--virtual-ranks", "2")
    assert len(losses(two.stderr)) == 3 and losses(two.stderr) == losses(virtual.stderr)  # rank 0 logs, one line a step
    a, b = files(workspace, "two"), files(workspace, "virtual")
    assert a.keys() == b.keys() and any(k.startswith("state:optim.") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    ups = [k for k in a if k.startswith("lora:") and k.endswith("lora_up.weight")]  # zero at the start
    assert any(a[k].abs().sum() > 0 for k in ups)


@pytest.mark.subprocess
def test_one_process_at_the_global_batch_takes_the_same_first_step(workspace):
    one = train(workspace, "one")
    virtual = train(workspace, "virtual_b", "--virtual-ranks", "2")
    first_one, first_two = losses(one.stderr)[0], losses(virtual.stderr)[0]
    assert abs(first_one - first_two) <= 1e-4 * abs(first_one), (first_one, first_two)  # one unit of "%.5g" at most


@pytest.mark.subprocess
def test_bad_arguments_exit_with_the_reason(workspace, tmp_path):
    checkpoint = str(cached_tiny_sd15())
    empty = tmp_path / "no_images"
    empty.mkdir()
    run = cli(workspace, "--checkpoint", checkpoint, "--images", str(empty), "--output", str(tmp_path / "x.safetensors"),
              *ARGS)
    assert run.returncode != 0 and "has no images" in run.stderr
    run = cli(workspace, "--checkpoint", checkpoint, "--images", str(workspace / "images"), "--output",
              str(tmp_path / "x.safetensors"), *ARGS, "--batch-size", "8")  # the last one wins: 8 > 4 images
    assert run.returncode != 0 and "batch_size (8) is larger than the data (4 latents)" in run.stderr
    run = cli(workspace, "--checkpoint", checkpoint, "--images", str(workspace / "images"), "--output",
              str(tmp_path / "x.safetensors"), *ARGS, "--virtual-ranks", "0")
    assert run.returncode == 2 and "virtual_ranks must be 1 under torch.distributed (1 processes) and at least 1" in run.stderr
    run = cli(workspace, "--diffusion-model", str(cached_tiny_sd3()), "--images", str(workspace / "images"), "--output",
              str(tmp_path / "x.safetensors"), *ARGS)
    assert run.returncode == 2 and "--diffusion-model needs --text-encoder, --clip-type, --vae" in run.stderr
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.subprocess
def test_adversarial_weight_switches_the_term_on(workspace, tmp_path):
    from fewstep.distill.io import load_safetensors

    out = tmp_path / "adv.safetensors"
    run = cli(workspace, "--checkpoint", str(cached_tiny_sd15()), "--images", str(workspace / "images"), "--output",
              str(out), *ARGS, "--steps", "2", "--adversarial-weight", "0.1")
    assert run.returncode == 0, run.stderr[-3000:]
    tensors, meta = load_safetensors(out.with_name("adv.state.safetensors"))
    assert tensors["adv.history"].shape == (2, 2) and torch.isfinite(tensors["adv.history"]).all()
    assert '"adversarial_weight": 0.1' in meta["config"]


@pytest.mark.subprocess
@pytest.mark.parametrize("method,extra,expected", [
    ("tscd", ["--tscd-segments", "2,1"], {"fewstep.method": "tscd", "fewstep.stages": "2,1", "fewstep.stage": "2",
                                          "fewstep.phases": "1", "sampler": "tcd", "gamma": 1.0}),
    ("tcd", [], {"fewstep.method": "tcd", "fewstep.phases": "1", "sampler": "tcd", "gamma": 0.3}),
])
def test_methods_write_a_lora_whose_metadata_gives_the_preset(workspace, tmp_path, method, extra, expected):
    """--method tscd (2 → 1 segments, one step each) and --method tcd: the LoRA's metadata reads back as the unified
    preset; the TSCD state holds the stage and the frozen stage-1 LoRA it trained the last step against."""
    from safetensors import safe_open

    from fewstep.distill.io import load_safetensors
    from fewstep.loras import presets

    out = tmp_path / f"{method}.safetensors"
    run = cli(workspace, "--checkpoint", str(cached_tiny_sd15()), "--images", str(workspace / "images"), "--output",
              str(out), *ARGS, "--steps", "2", "--method", method, *extra)
    assert run.returncode == 0, run.stderr[-3000:]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    preset = presets.preset_from_metadata(meta)
    assert {k: meta.get(k) for k in expected if k.startswith("fewstep.")} == \
        {k: v for k, v in expected.items() if k.startswith("fewstep.")}
    assert (preset.sampler, preset.gamma, preset.source) == (expected["sampler"], expected["gamma"], "metadata")
    tensors, state_meta = load_safetensors(out.with_name(f"{method}.state.safetensors"))
    assert f'"method": "{method}"' in state_meta["config"]
    if method == "tscd":
        assert state_meta["stage"] == "1" and any(k.startswith("previous.") for k in tensors)
    assert_core_applies_every_key(core_load(workspace, ["--checkpoint", str(cached_tiny_sd15())], [out])[out])


def sd3_model_args():
    clip_l, clip_g = cached_tiny_sd3_text_encoders()
    return ["--diffusion-model", str(cached_tiny_sd3()), "--text-encoder", str(clip_l), "--text-encoder", str(clip_g),
            "--clip-type", "sd3", "--vae", str(cached_tiny_sd3_vae())]


# method: (extra CLI options, the preset's (sampler, scheduler, gamma, phases, ddim_timesteps))
SD3_METHODS = {
    "pcm": ([], ("pcm", "pcm", None, 2, 10)),
    "tcd": ([], ("tcd", "lcm", 0.3, None, None)),
    "tscd": (["--tscd-segments", "2,1"], ("tcd", "lcm", 1.0, None, None)),
}


@pytest.fixture(scope="module")
def sd3_runs(workspace):
    """Each method trained 2 steps on the tiny SD3 files (three CLI processes side by side), then every written
    LoRA applied by core in one process: {method: (CompletedProcess-like run, LoRA metadata, core's record)}."""
    from safetensors import safe_open

    model_args = sd3_model_args()
    out = workspace / "sd3"
    procs = {}
    for method, (extra, _) in SD3_METHODS.items():
        args = [*model_args, "--images", str(workspace / "images"), *ARGS, "--steps", "2", "--method", method, *extra,
                "--output", str(out / f"{method}.safetensors")]
        procs[method] = subprocess.Popen([sys.executable, "-m", "fewstep.distill", *args], cwd=workspace,
                                         env=cli_env(workspace), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)
    runs = {}
    for method, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        runs[method] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    written = [out / f"{m}.safetensors" for m in SD3_METHODS if (out / f"{m}.safetensors").is_file()]
    core = core_load(workspace, ["--diffusion-model", str(cached_tiny_sd3())], written) if written else {}
    result = {}
    for method, run in runs.items():
        path = out / f"{method}.safetensors"
        meta = None
        if path.is_file():
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
        result[method] = (run, meta, core.get(path))
    return result


@pytest.mark.subprocess
@pytest.mark.parametrize("method", list(SD3_METHODS))
def test_sd3_from_separate_files_trains_each_method_loads_in_core_and_gives_its_preset(sd3_runs, method):
    """The FLOW model route: MMDiT, CLIP-L + CLIP-G (SD3's text encoder without T5) and a 16-channel VAE as separate
    files. Each method's LoRA is applied by core LoraLoader with zero missed keys and reads back as its preset."""
    from fewstep.loras import presets

    run, meta, core = sd3_runs[method]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "clip missing" not in run.stderr  # both tiny text encoders load whole
    assert len(losses(run.stderr)) == 2 and all(loss == loss for loss in losses(run.stderr))
    assert meta["fewstep.method"] == method and meta["fewstep.base_arch"] == "sd3"
    assert_core_applies_every_key(core)
    preset = presets.preset_from_metadata(meta)
    assert (preset.sampler, preset.scheduler, preset.gamma, preset.phases, preset.ddim_timesteps) == \
        SD3_METHODS[method][1], preset.message
    assert preset.source == "metadata" and preset.base_arch == "sd3"


@pytest.mark.parametrize("argv,message", [
    ([], "no model: give --checkpoint FILE"),
    (["--checkpoint", "{ckpt}", "--diffusion-model", "{dit}"], "--checkpoint and --diffusion-model exclude each other"),
    (["--checkpoint", "{ckpt}", "--vae", "{vae}"], "--vae goes only with --diffusion-model"),
    (["--diffusion-model", "{dit}", "--clip-type", "sd3", "--vae", "{vae}"], "--diffusion-model needs --text-encoder"),
    (["--diffusion-model", "{dit}", "--text-encoder", "{dit}", "--vae", "{vae}"],
     "--diffusion-model needs --clip-type"),
    (["--diffusion-model", "{dit}", "--text-encoder", "{dit}", "--clip-type", "sd3"], "--diffusion-model needs --vae"),
    (["--diffusion-model", "{dit}", "--text-encoder", "{dit}", "--clip-type", "sd4", "--vae", "{vae}"],
     "argument --clip-type: invalid choice: 'sd4'"),
])
def test_model_file_options_are_checked_before_anything_loads(argv, message, tmp_path, capsys):
    """Argument errors (argparse's exit 2, usage and the reason) need no ComfyUI and name the fix."""
    from fewstep.host.distill_cli import parse_args

    files = {name: tmp_path / f"{name}.safetensors" for name in ("ckpt", "dit", "vae")}
    for path in files.values():
        path.write_bytes(b"")
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        parse_args([*argv, "--images", str(tmp_path), "--output", str(tmp_path / "x.safetensors"), "--prompt", "p"])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_an_absent_model_file_is_named_before_anything_loads(tmp_path, capsys):
    from fewstep.host.distill_cli import main

    (tmp_path / "dit.safetensors").write_bytes(b"")
    code = main(["--diffusion-model", str(tmp_path / "dit.safetensors"), "--text-encoder", "nowhere.safetensors",
                 "--clip-type", "sd3", "--vae", str(tmp_path / "dit.safetensors"), "--images", str(tmp_path),
                 "--output", str(tmp_path / "x.safetensors"), "--prompt", "p"])
    assert code == 2 and "--text-encoder nowhere.safetensors: no such file." in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
