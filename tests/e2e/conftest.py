"""One real ComfyUI server (subprocess, loopback, this pack) per test session.

It holds the tiny random SD1.5 checkpoint with LoRAs named like published files (plumbing tests), and the
embedded digits model with its shipped PCM LoRA and the training workflow's digits image (what the shipped
workflows load); tests/support/pack_server.py builds it (the browser tier starts the same one).

When a test fails, the last lines of the server log are attached to its report, and the server's
temporary base directory (log, output images) is kept for a look instead of being deleted.
"""
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from support.pack_server import ServerSession, pack_server  # noqa: E402
from support.tiny_checkpoint import cached_tiny_sd15  # noqa: E402
from support import digits_model  # noqa: E402

_session = ServerSession()


@pytest.fixture(scope="session")
def checkpoint():
    return cached_tiny_sd15()


@pytest.fixture(scope="session")
def digits_checkpoint():
    return digits_model.cached_digits_sd15()


@pytest.fixture(scope="session")
def server(checkpoint, digits_checkpoint):
    yield from _session.serve(pack_server(checkpoint, digits_checkpoint))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _session.record(item, outcome.get_result())
