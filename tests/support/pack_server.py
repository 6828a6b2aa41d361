"""The ComfyUI server the e2e and browser tiers share the setup of (one per tier, per test session).

It holds the tiny random SD1.5 checkpoint with LoRAs named like published files (plumbing tests), and the
embedded digits model with its shipped PCM LoRA and the training workflow's digits image (what the shipped
workflows load), and the tiny random SDXL checkpoint and UNet under the names the Hyper-SDXL 1-step UNet workflow
loads (it runs, to noise: no SDXL-sized real model ships). `ServerSession` is what a tier's conftest wires into a session fixture and a report hook:
when a test fails, the last lines of the server log are attached to its report, and the server's temporary
base directory (log, output images) is kept for a look instead of being deleted.
"""
from __future__ import annotations

from pathlib import Path

from . import digits_model
from .lora_files import cached_demo_loras
from .server import REPO_ROOT, ComfyServer
from .tiny_checkpoint import cached_tiny_sd15
from .tiny_models import cached_tiny_sdxl, cached_tiny_sdxl_unet
from .workflow_catalog import HYPER_SDXL_UNET, SDXL_BASE


def pack_server(checkpoint: Path | None = None, digits_checkpoint: Path | None = None) -> ComfyServer:
    """A ComfyServer (not started) with the tiny checkpoint, the digits model, their LoRAs and the training image."""
    checkpoint = checkpoint or cached_tiny_sd15()
    digits_checkpoint = digits_checkpoint or digits_model.cached_digits_sd15()
    training_images = digits_model.write_training_images(REPO_ROOT / ".cache" / digits_model.TRAINING_IMAGES)
    sdxl = {f"checkpoints/{SDXL_BASE}": cached_tiny_sdxl(), f"diffusion_models/{HYPER_SDXL_UNET}": cached_tiny_sdxl_unet()}
    return ComfyServer(checkpoints=[checkpoint, digits_checkpoint], inputs=[training_images],
                       loras=cached_demo_loras(checkpoint), lora_copies=[digits_model.PCM_LORA_PATH], model_links=sdxl)


class ServerSession:
    """Book-keeping for one tier's session server: start/stop around the session, log tail on failures."""

    def __init__(self):
        self.server: ComfyServer | None = None
        self.failures: list[str] = []

    def serve(self, instance: ComfyServer):
        """Generator body of a session fixture: yields the started server, then stops it (keeps its files on failure)."""
        self.server = instance
        instance.start()
        try:
            yield instance
        finally:
            instance.stop()
            self.server = None
            if self.failures:
                print(f"\nComfyUI base dir kept for inspection: {instance.base_dir}")
            else:
                instance.cleanup()

    def record(self, item, report, lines: int = 60):
        """From pytest_runtest_makereport: note a failure and attach the server log's tail to its report."""
        if not report.failed:
            return
        self.failures.append(item.nodeid)
        if self.server is not None:
            report.sections.append((f"ComfyUI server log, last lines ({self.server.log_path})",
                                    self.server.log_tail(lines)))
