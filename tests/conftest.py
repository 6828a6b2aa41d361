"""Test bootstrap: import the repo root as the package `fewstep`, whatever the checkout folder is called; and the
wall time of each tier (pure, host, e2e) in the closing summary."""
import importlib.util
import pathlib
import sys
from collections import defaultdict

ROOT = pathlib.Path(__file__).resolve().parents[1]

if "fewstep" not in sys.modules:
    spec = importlib.util.spec_from_file_location("fewstep", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fewstep"] = module
    spec.loader.exec_module(module)

_TIER_SECONDS = defaultdict(float)
_TIER_TESTS = defaultdict(set)


def _tier(nodeid):
    parts = nodeid.split("::")[0].split("/")  # the file's path; parameter ids may hold slashes
    return parts[1] if len(parts) > 2 and parts[0] == "tests" else "pure"


def pytest_runtest_logreport(report):
    # setup + call + teardown of every test, fixtures included (module-scoped servers count where they start)
    _TIER_SECONDS[_tier(report.nodeid)] += report.duration
    _TIER_TESTS[_tier(report.nodeid)].add(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    if _TIER_SECONDS:
        parts = [f"{tier} {_TIER_SECONDS[tier]:.0f} s ({len(_TIER_TESTS[tier])} tests)" for tier in sorted(_TIER_SECONDS)]
        terminalreporter.write_line("wall time per tier: " + ", ".join(parts))
