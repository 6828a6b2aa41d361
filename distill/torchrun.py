"""What a torchrun worker needs beyond torch.distributed (the CLI's workers and the tests' toy worker)."""
import logging
import os
import sys


def exit_without_teardown(code=0):
    """Leave a torchrun worker once its process group is destroyed and its files are written.

    torch 2.13's gloo backend leaves a C++ thread that aborts interpreter shutdown now and then ("terminate called
    without an active exception", after all Python code has run), and torchrun would then report a finished run
    as failed: flush the output and exit without that teardown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
