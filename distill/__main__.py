"""`python -m fewstep.distill --help`: headless phased consistency distillation (see distill/cli.py)."""
import logging
import os
import sys

from .cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # Under torchrun, torch 2.13's gloo backend leaves a C++ thread that aborts interpreter shutdown now and
    # then ("terminate called without an active exception") after every file is written and the process
    # group destroyed; torchrun would report a finished run as failed. Flush and leave without that teardown.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
sys.exit(code)
