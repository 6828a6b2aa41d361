"""Prints the float64 parity table: max |Δ| of final latents, pack vs diffusers / reference formulas.

The same cases are asserted (≤ 1e-5) by tests/test_parity_diffusers.py and tests/test_parity_core_lcm.py.
"""
import os
import pathlib
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
warnings.filterwarnings("ignore")
import conftest  # noqa: E402,F401  (imports the repo as package `fewstep`)

COMFY = pathlib.Path(os.environ.get("COMFYUI_PATH", ROOT / ".comfyui"))
sys.path.insert(0, str(COMFY))
from comfy.cli_args import args  # noqa: E402

args.cpu = True
import logging  # noqa: E402

logging.getLogger("diffusers").setLevel(logging.ERROR)
from diffusers.utils import logging as diffusers_logging  # noqa: E402

diffusers_logging.set_verbosity_error()
from comfy.k_diffusion.sampling import sample_lcm  # noqa: E402

import parity_cases  # noqa: E402


def main():
    rows = parity_cases.all_cases(sample_lcm)
    width = max(len(name) for name, _ in rows)
    print(f"{'configuration':<{width}}  max |Δ| final latent")
    print("-" * (width + 24))
    for name, diff in rows:
        note = "  (diffusers DDIM steps to t−T//N=333, then evaluates at 332; see README)" if "DDIM" in name and "N=3" in name else ""
        print(f"{name:<{width}}  {diff:.3e}{note}")


if __name__ == "__main__":
    main()
