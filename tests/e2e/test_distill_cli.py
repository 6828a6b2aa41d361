"""The headless CLI, `python -m fewstep.distill`, in fresh processes: one process, and torchrun with 2 gloo processes.

Both load the tiny SD1.5 checkpoint with ComfyUI's own loader in-process and train on the same image folder.
At the same global batch the data-parallel run must compute the same training: equal losses, and LoRA weights
that agree to a small fraction of what training moved them (AdamW turns rounding-level gradient differences on
near-zero-gradient elements into ±lr steps, so bitwise equality is not expected).
"""
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


def cli(workspace, *args, nproc=1):
    env = {**os.environ, "PYTHONPATH": str(workspace / "pkg"), "COMFYUI_PATH": str(comfyui_path()),
           "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
         str(free_port()), "-m"]
    return subprocess.run(launcher + ["fewstep.distill", *args], cwd=workspace, env=env, capture_output=True,
                          text=True, timeout=300)


def losses(output):
    return [float(v) for v in re.findall(r"step \d+/\d+\s+loss (\S+)", output)]


def test_two_gloo_processes_match_one_process(workspace):
    checkpoint = str(cached_tiny_sd15())
    common = ["--checkpoint", checkpoint, "--images", str(workspace / "images"), *ARGS]
    one = cli(workspace, *common, "--output", str(workspace / "out" / "one.safetensors"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli(workspace, *common, "--output", str(workspace / "out" / "two.safetensors"), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "data parallel: 2 processes (gloo), global batch 2, 1 per process" in two.stderr
    assert len(losses(one.stderr)) == 3 and len(losses(two.stderr)) == 3  # rank 0 logs; one line per step
    assert losses(two.stderr) == pytest.approx(losses(one.stderr), rel=1e-4)

    a, b = load_file(workspace / "out" / "one.safetensors"), load_file(workspace / "out" / "two.safetensors")
    assert a.keys() == b.keys()
    ups = [k for k in a if k.endswith("lora_up.weight")]  # zero at the start: their norm is all that training moved
    moved = torch.cat([a[k].flatten() for k in ups]).norm()
    differ = torch.cat([(a[k] - b[k]).flatten() for k in ups]).norm()
    assert moved > 0 and differ < 1e-3 * moved, (float(differ), float(moved))
    # elementwise: all but a few rounding-sensitive elements agree to 1e-6, and none by more than AdamW's 2·lr·steps
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diff > 1e-6).sum() <= 1e-3 * diff.numel(), int((diff > 1e-6).sum())
    assert diff.max() <= 2 * 1e-4 * 3


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
    assert not (tmp_path / "x.safetensors").exists()


def test_adversarial_weight_switches_the_term_on(workspace, tmp_path):
    from fewstep.distill.io import load_safetensors

    out = tmp_path / "adv.safetensors"
    run = cli(workspace, "--checkpoint", str(cached_tiny_sd15()), "--images", str(workspace / "images"), "--output",
              str(out), *ARGS, "--steps", "2", "--adversarial-weight", "0.1")
    assert run.returncode == 0, run.stderr[-3000:]
    tensors, meta = load_safetensors(out.with_name("adv.state.safetensors"))
    assert tensors["adv.history"].shape == (2, 2) and torch.isfinite(tensors["adv.history"]).all()
    assert '"adversarial_weight": 0.1' in meta["config"]
