"""Where the trainer may write (host/output_files.py), in the real host: only inside models/loras and output/,
never over a file it did not write, and its temporary files swept only when their writer is gone.

The node runs as in tests/host/test_train_node.py (tiny SD1.5 checkpoint, a few steps); links are swapped in
while it trains from a logging handler on its progress line, so the swap lands between two saves, untimed.
"""
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from support.log_capture import captured_log
from tests.host.test_train_node import NODE, data, lora_file, read_lora, train  # noqa: F401  (data: a fixture)

REPO = pathlib.Path(__file__).resolve().parents[2]


def loras_root(comfy_host):
    return pathlib.Path(comfy_host.folder_paths.get_folder_paths("loras")[0])


def output_root(comfy_host):
    return pathlib.Path(comfy_host.folder_paths.get_output_directory())


class _AtStep(logging.Handler):
    """Runs `action` once when the node reports reaching `step` (just before that step's save)."""

    def __init__(self, step, action):
        super().__init__()
        self.marker, self.action = f"step {step}/", action

    def emit(self, record):
        if self.marker in record.getMessage() and self.action is not None:
            action, self.action = self.action, None
            action()


def train_with(action, step, *args, **kwargs):
    handler = _AtStep(step, action)
    logging.getLogger("fewstep").addHandler(handler)
    try:
        with captured_log(logging.INFO):  # the progress line is logged at INFO
            return train(*args, **kwargs)
    finally:
        logging.getLogger("fewstep").removeHandler(handler)


def everything_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_link_swapped_into_models_loras_while_training_is_refused(comfy_host, run_node, tiny_models, data,
                                                                     tmp_path):
    latents, positive, empty = data
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = loras_root(comfy_host) / "t_swap"

    def swap():  # the LoRA's folder (made and checked when the node started) becomes a link out of models/loras
        folder.rmdir()
        folder.symlink_to(elsewhere, target_is_directory=True)

    assert comfy_host.nodes.NODE_CLASS_MAPPINGS[NODE].validate_inputs(output_name="t_swap/lora") is True
    with pytest.raises(ValueError, match=r"Refusing to write into .*t_swap.*outside .*loras.*Remove the link"):
        train_with(swap, 1, run_node, tiny_models.model, latents, positive, empty, "t_swap/lora", steps=3,
                   save_every=1)
    assert everything_under(elsewhere) == []
    folder.unlink()


def test_a_link_at_the_state_folder_is_refused_before_training(comfy_host, run_node, tiny_models, data, tmp_path):
    latents, positive, empty = data
    elsewhere = tmp_path / "elsewhere_state"
    elsewhere.mkdir()
    (output_root(comfy_host) / "fewstep_training").mkdir(exist_ok=True)
    link = output_root(comfy_host) / "fewstep_training" / "t_state_link"
    link.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match=r"Refusing to write into .*t_state_link.*outside .*output"):
        train(run_node, tiny_models.model, latents, positive, empty, "t_state_link", steps=2, validate_every=1)
    assert everything_under(elsewhere) == [] and not lora_file(comfy_host, "t_state_link").exists()
    link.unlink()


def test_a_nested_folder_is_not_created_through_a_link(comfy_host, tmp_path):
    from fewstep.host.output_files import write_atomic

    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "sub").symlink_to(elsewhere, target_is_directory=True)
    (root / "inside").mkdir()
    (root / "alias").symlink_to(root / "inside", target_is_directory=True)  # a link that stays inside is fine
    with pytest.raises(ValueError, match="outside"):
        write_atomic(root, root / "sub" / "new" / "deeper" / "x.safetensors", b"data")
    assert everything_under(elsewhere) == []  # not even the folders
    write_atomic(root, root / "alias" / "made" / "x.bin", b"data")
    assert (root / "inside" / "made" / "x.bin").read_bytes() == b"data"
    assert everything_under(root / "inside") == ["made", "made/x.bin"]  # and no temporary file


def foreign_files(comfy_host):
    """A LoRA of someone else (no fewstep metadata), and a file that is not safetensors at all."""
    root = loras_root(comfy_host)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(root / "t_theirs.safetensors"),
              metadata={"ss_network_module": "networks.lora"})
    (root / "t_garbage.safetensors").write_bytes(b"not a safetensors file")
    return {name: (root / f"{name}.safetensors").read_bytes() for name in ("t_theirs", "t_garbage")}


def test_a_lora_the_trainer_did_not_write_is_never_replaced(comfy_host, run_node, tiny_models, data):
    latents, positive, empty = data
    before = foreign_files(comfy_host)
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS[NODE]
    for name, why in (("t_theirs", "it has no fewstep trainer metadata"),
                      ("t_garbage", "cannot be read as safetensors")):
        message = cls.validate_inputs(output_name=name)
        assert f"{name}.safetensors already exists and was not written by the fewstep trainer ({why}" in message
        assert "Pick another output_name, or move that file away" in message
        # and in the job itself: the file may appear after validation (the CLI has no validation)
        with pytest.raises(ValueError, match=rf"{name}\.safetensors already exists and was not written by the fewstep"):
            train(run_node, tiny_models.model, latents, positive, empty, name, steps=1)
        assert lora_file(comfy_host, name).read_bytes() == before[name]


def test_a_lora_that_appears_during_training_is_not_replaced(comfy_host, run_node, tiny_models, data):
    latents, positive, empty = data
    path = lora_file(comfy_host, "t_late")

    def appear():
        save_file({"x": torch.ones(3)}, str(path))

    with pytest.raises(ValueError, match=r"t_late\.safetensors already exists and was not written by the fewstep"):
        train_with(appear, 2, run_node, tiny_models.model, latents, positive, empty, "t_late", steps=3, save_every=1)
    assert set(read_lora(comfy_host, "t_late")[0]) == {"x"}


def test_the_trainers_own_files_are_replaced(comfy_host, run_node, tiny_models, data):
    """A previous run's LoRA, and the shipped digits LoRA (the e2e server copies it in; the shipped training
    workflow retrains that name)."""
    latents, positive, empty = data
    target = lora_file(comfy_host, "t_digits_copy")
    shutil.copyfile(REPO / "assets" / "digits" / "fewstep_digits_pcm.safetensors", target)
    assert comfy_host.nodes.NODE_CLASS_MAPPINGS[NODE].validate_inputs(output_name="t_digits_copy") is True
    for steps in (2, 1):
        train(run_node, tiny_models.model, latents, positive, empty, "t_digits_copy", steps=steps)
        assert read_lora(comfy_host, "t_digits_copy")[1]["fewstep.steps_trained"] == str(steps)


HOLDER = """
import fcntl, sys
handle = open(sys.argv[1], "wb")
fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_sweep_removes_only_our_temporary_files_whose_writer_is_gone(comfy_host, tmp_path):
    from fewstep.host.output_files import TEMP_PREFIX, sweep

    dead = tmp_path / f"{TEMP_PREFIX}00000000-a.safetensors"  # a killed writer's: nobody holds its lock
    dead.write_bytes(b"half")
    legacy = tmp_path / ".tmp-mine.safetensors-k3x_9q2a.part"  # what a kill left before the locked temp files
    legacy.write_bytes(b"half")
    live = tmp_path / f"{TEMP_PREFIX}11111111-b.safetensors"  # a concurrent training's, its writer alive
    others = [tmp_path / ".tmp-a.safetensors-x1y2.part", tmp_path / "mine.part"]  # not ours
    for other in others:
        other.write_bytes(b"keep")
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    (tmp_path / f"{TEMP_PREFIX}22222222-link").symlink_to(target)  # a link with our prefix: not followed, kept
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(live)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert sweep(tmp_path, tmp_path) == 2
        assert not dead.exists() and not legacy.exists() and live.exists() and all(o.read_bytes() == b"keep" for o in others)
        assert target.read_bytes() == b"keep" and (tmp_path / f"{TEMP_PREFIX}22222222-link").is_symlink()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert sweep(tmp_path, tmp_path) == 1 and not live.exists()  # its writer is gone now
    assert os.path.exists(target)
