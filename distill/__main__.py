"""`python -m fewstep.distill --help`: headless phased consistency distillation (see distill/cli.py)."""
import sys

from .cli import main

sys.exit(main())
