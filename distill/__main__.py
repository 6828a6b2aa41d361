"""`python -m fewstep.distill --help`: headless phased consistency distillation (see distill/cli.py)."""
import os
import sys

from .cli import exit_without_teardown, main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    exit_without_teardown(code)
sys.exit(code)
