"""SIGKILL during the trainer's saves: nothing left behind, the LoRA back in step with its state, resume exact.

`python -m fewstep.distill` (tests/support/kill_during_save.py around it) kills itself with SIGKILL at points
inside the save: in the middle of the state's bytes, after them before the rename, between the state and the
LoRA, in the middle of the LoRA's bytes, after them, and inside the next start's repair of the LoRA. Each next
start resumes the one before. At every start, after its sweep and repair, the child reports what is on disk; a
planted live temporary file of another training (locked, as a writer holds it) and another program's
temporary file must survive every start. About 100 s on a quiet 2-core CPU (8 processes of ~12 s).
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from support.server import comfyui_path
from support.tiny_checkpoint import cached_tiny_sd15

REPO = pathlib.Path(__file__).resolve().parents[2]
ARGS = ["--resolution", "64", "--cpu", "--steps", "4", "--learning-rate", "1e-3", "--phases", "2", "--ddim-timesteps",
        "10", "--batch-size", "2", "--rank", "4", "--precision", "fp32", "--prompt", "a coloured square",
        "--save-every", "1", "--resume"]
STATE, LORA = "kill.state.safetensors", "kill.safetensors"
# (point, file, n): the start dies the n-th time the writer reaches `point` for `file`. Saves: steps 1, 2, 3, 4.
KILL_CHAIN = [
    ("partial", STATE, 2),   # inside the state's bytes at step 2 (step 1 saved whole)
    ("written", STATE, 1),   # the state's temporary file complete, not renamed (resumed at 1, saving 2)
    ("replaced", STATE, 1),  # between the two writes: state at 2, LoRA still at 1
    ("start-partial", LORA, 1),  # inside the next start's repair of that LoRA (no report: it dies before)
    ("partial", LORA, 1),    # inside the LoRA's bytes: state at 3, LoRA at 2 (after the start's repair)
    ("written", LORA, 1),    # the LoRA complete, not renamed, at the last save: state at 4, LoRA at 3
]
REPORTED = [1, 1, 2, 3, 4]  # the state's step at each start that reported, after the first


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("kill")
    (root / "pkg").mkdir()
    (root / "pkg" / "fewstep").symlink_to(REPO, target_is_directory=True)
    images = root / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "navy", "olive", "orange"]):
        Image.new("RGB", (80, 64), colour).save(images / f"{i}.png")
    return root


def start(workspace, output, report, kill=("none", "", 0)):
    env = {**os.environ, "PYTHONPATH": str(workspace / "pkg"), "COMFYUI_PATH": str(comfyui_path()),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "tests" / "support" / "kill_during_save.py"), str(report), kill[0], kill[1],
               str(kill[2]), "--", "--checkpoint", str(cached_tiny_sd15()), "--images", str(workspace / "images"),
               *ARGS, "--output", str(output)]
    return subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=300)


def metadata(path):
    with safe_open(str(path), "pt") as handle:
        return handle.metadata() or {}


@pytest.mark.subprocess
def test_sigkill_inside_saves_leaves_nothing_and_resume_stays_exact(workspace):
    import fcntl

    from fewstep.host import output_files

    straight = start(workspace, workspace / "straight" / "kill.safetensors", workspace / "straight.jsonl")
    assert straight.returncode == 0, straight.stderr[-3000:]

    out, report = workspace / "out", workspace / "report.jsonl"
    out.mkdir()
    foreign = out / ".tmp-another-program.part"  # not ours: stays
    foreign.write_bytes(b"another program's temporary file")
    live = out / f"{output_files.TEMP_PREFIX}0000live-other_name.safetensors"  # a concurrent training's, locked
    with open(live, "wb") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        runs = [start(workspace, out / LORA, report, kill) for kill in KILL_CHAIN]
        last = start(workspace, out / LORA, report)
        assert live.exists()
    assert foreign.read_bytes() == b"another program's temporary file"

    starts = [json.loads(line) for line in report.read_text().splitlines()]  # checked first: they say the most
    planted = {foreign.name, live.name}
    assert set(starts[0]["files"]) == planted  # the first start: nothing of ours yet
    for i, seen in enumerate(starts[1:], 1):  # each start after a kill, once swept and repaired
        assert set(seen["files"]) == planted | {LORA, STATE}, (i, seen)  # no temporary file of ours left
        assert seen["lora_step"] == seen["state_step"], (i, seen)
        assert seen["lora_hash"] == seen["recorded_hash"] is not None, (i, seen)
    assert len(starts) == len(KILL_CHAIN)  # every start but the one killed in its repair
    assert [s["state_step"] for s in starts[1:]] == [str(step) for step in REPORTED]
    for kill, run in zip(KILL_CHAIN, runs):
        assert run.returncode == -9, (kill, run.returncode, run.stderr[-3000:])  # died there, by SIGKILL
    assert last.returncode == 0, last.stderr[-3000:]

    assert output_files.sweep(out, out) == 1  # the other training's writer is gone now: its file goes
    assert sorted(p.name for p in out.rglob("*")) == sorted([foreign.name, LORA, STATE])
    assert metadata(out / LORA)["fewstep.steps_trained"] == metadata(out / STATE)["step"] == "4"
    for name in (LORA, STATE):  # the killed chain ends where the uninterrupted run does, bit for bit
        a, b = load_file(workspace / "straight" / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert metadata(out / LORA) == metadata(workspace / "straight" / LORA)
