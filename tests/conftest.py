"""Test bootstrap: import the repo root as the package `fewstep`, whatever the checkout folder is called."""
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

if "fewstep" not in sys.modules:
    spec = importlib.util.spec_from_file_location("fewstep", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fewstep"] = module
    spec.loader.exec_module(module)
