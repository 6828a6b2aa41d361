"""pyproject.toml as the Comfy Registry reads it: comfy-cli's own `comfy node validate` (pinned in
requirements-dev.lock; it runs offline: it parses [project] / [tool.comfy] and runs ruff's S102 (exec), S307 (eval)
and E702 (two statements on a line) over the tracked files), and the fields it does not check itself."""
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _comfy_cli():
    found = shutil.which("comfy", path=str(Path(sys.executable).parent))
    return found


@pytest.mark.subprocess
def test_comfy_node_validate_passes():
    comfy = _comfy_cli()
    if comfy is None:
        pytest.skip("comfy-cli is not installed (requirements-dev.lock pins it; make setup installs it)")
    env = dict(os.environ, HOME=str(REPO / ".cache" / "comfy-cli-home"))  # its config file, not the user's
    run = subprocess.run([comfy, "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "All validation checks passed" in out and "Security warnings" not in out, out


def test_registry_fields_comfy_cli_does_not_check():
    project, comfy = CONFIG["project"], CONFIG["tool"]["comfy"]
    assert re.fullmatch(r"[a-z][a-z0-9-]{0,99}", project["name"])  # the registry's node id rule
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["license"] == {"text": "GPL-3.0-or-later"} and (REPO / "LICENSE").is_file()
    assert project["dependencies"] == ["torch", "safetensors", "numpy", "einops", "kornia"]
    assert re.fullmatch(r"[a-z][a-z0-9-]*", comfy["PublisherId"]) and comfy["DisplayName"].strip()
    assert comfy["requires-comfyui"] == ">=0.3.75"
    for path in comfy["includes"]:
        assert (REPO / path).exists(), f"includes names {path}, which is not in the repository"
    for path in ("workflows", "web", "assets/digits"):
        assert path in comfy["includes"], path
    assert (REPO / "docs" / "icon.svg").is_file()  # Icon's file, for the raw URL once the repository is public
