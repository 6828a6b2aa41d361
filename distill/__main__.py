"""`python -m fewstep.distill`: the headless runner, host/distill_cli.py. Only run, never imported: the one module
of distill/ that reaches the host on purpose (tests/test_layering.py leaves it out)."""
from ..host.distill_cli import entry_point

entry_point()
