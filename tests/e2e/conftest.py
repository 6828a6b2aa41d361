"""One real ComfyUI server (subprocess, loopback, this pack) per test session.

It holds the tiny random SD1.5 checkpoint with LoRAs named like published files (plumbing tests), and the
embedded digits model with its shipped PCM LoRA and the training workflow's digits image (what the shipped
workflows load).

When a test fails, the last lines of the server log are attached to its report, and the server's
temporary base directory (log, output images) is kept for a look instead of being deleted.
"""
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from support.server import ComfyServer  # noqa: E402
from support.lora_files import cached_demo_loras  # noqa: E402
from support.tiny_checkpoint import cached_tiny_sd15  # noqa: E402
from support import digits_model  # noqa: E402

_servers = []
_failures = []


@pytest.fixture(scope="session")
def checkpoint():
    return cached_tiny_sd15()


@pytest.fixture(scope="session")
def digits_checkpoint():
    return digits_model.cached_digits_sd15()


@pytest.fixture(scope="session")
def server(checkpoint, digits_checkpoint):
    training_images = digits_model.write_training_images(TESTS_DIR.parent / ".cache" / digits_model.TRAINING_IMAGES)
    instance = ComfyServer(checkpoints=[checkpoint, digits_checkpoint], inputs=[training_images],
                           loras=cached_demo_loras(checkpoint), lora_copies=[digits_model.PCM_LORA_PATH])
    _servers.append(instance)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()
        _servers.remove(instance)
        if _failures:
            print(f"\nComfyUI base dir kept for inspection: {instance.base_dir}")
        else:
            instance.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        _failures.append(item.nodeid)
    if report.failed and _servers:
        server = _servers[-1]
        report.sections.append(("ComfyUI server log, last lines (%s)" % server.log_path, server.log_tail(60)))
