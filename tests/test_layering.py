"""The pack's layers: nodes/ and host/ on top (ComfyUI glue), the pure packages below them.

- Every module of the pure packages (samplers, schedulers, loras, distill, found by walking their folders) and
  version.py imports, in a fresh interpreter, nothing of ComfyUI and nothing of nodes/ or host/. ComfyUI is on
  that interpreter's path (appended, when it is found), so even a guarded `try: import comfy` is caught.
  The one exception, on purpose: distill/__main__.py, the `python -m fewstep.distill` entry point, which is
  only run, never imported, and starts host/distill_cli.py.
- nodes/ holds node classes only: every public top-level def or class there is an io.ComfyNode subclass named
  as its node id (or the extension in nodes/__init__.py); helpers only the nodes use are private. Checked on
  the source (ast), so it needs no ComfyUI.
- host/ never imports nodes/ (the nodes call the host, not the other way round).
"""
import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PURE_PACKAGES = ("samplers", "schedulers", "loras", "distill")
ENTRY_POINTS = {ROOT / "distill" / "__main__.py"}  # run by `python -m`, never imported
HOST_TOP_LEVEL = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution")
PACK_GLUE = ("fewstep.nodes", "fewstep.host")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("fewstep",) + parts)


def pure_modules():
    files = [p for package in PURE_PACKAGES for p in sorted((ROOT / package).rglob("*.py")) if p not in ENTRY_POINTS]
    return [module_name(p) for p in files] + ["fewstep.version"]


def comfyui_root():
    env = os.environ.get("COMFYUI_PATH")
    root = pathlib.Path(env).expanduser() if env else ROOT / ".comfyui"
    return root.resolve() if (root / "comfy" / "samplers.py").is_file() else None


# In the child: fewstep as tests/conftest.py registers it, ComfyUI importable (appended: it shadows nothing), then
# each module in turn; what of the host or the pack's glue appears is charged to the module whose import brought it.
CHILD = """
import importlib, json, sys
sys.path.insert(0, {tests!r})
import conftest  # noqa: F401  (registers the repo as the package fewstep)
if {comfy!r}:
    sys.path.append({comfy!r})
host, glue = {host!r}, {glue!r}
def offending():
    return set(m for m in sys.modules if m.split(".")[0] in host or ".".join(m.split(".")[:2]) in glue)
found, seen = {{}}, offending()
for module in {modules!r}:
    importlib.import_module(module)
    new = offending() - seen
    if new:
        found[module] = sorted(new)
    seen |= new
print(json.dumps({{"before": sorted(offending() - set(m for v in found.values() for m in v)), "found": found}}))
"""


def test_the_walk_finds_every_pure_package():
    modules = pure_modules()
    for package in PURE_PACKAGES:
        assert f"fewstep.{package}" in modules
    assert {"fewstep.distill.engine", "fewstep.loras.presets", "fewstep.samplers.tcd"} <= set(modules)
    assert "fewstep.distill.__main__" not in modules


@pytest.mark.subprocess
def test_pure_modules_import_nothing_of_comfyui_nodes_or_host():
    """One fresh interpreter imports every pure module in turn (one torch import instead of one per module)."""
    root = comfyui_root()
    code = CHILD.format(tests=str(ROOT / "tests"), comfy=str(root) if root else "", modules=pure_modules(),
                        host=HOST_TOP_LEVEL, glue=PACK_GLUE)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"before": [], "found": {}}, report


def _node_id(cls: ast.ClassDef):
    for node in ast.walk(cls):
        if isinstance(node, ast.keyword) and node.arg == "node_id" and isinstance(node.value, ast.Constant):
            return node.value.value
    return None


def _base_names(cls: ast.ClassDef):
    return {ast.unparse(base) for base in cls.bases}


def test_nodes_hold_only_node_classes_named_as_their_node_ids():
    node_classes = []
    for path in sorted((ROOT / "nodes").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            where = f"{path.relative_to(ROOT)}: {node.name}"
            assert isinstance(node, ast.ClassDef), f"{where} is a public function: nodes/ holds node classes only " \
                                                   "(make it private if only nodes use it, else move it to host/)"
            if path.name == "__init__.py" and "ComfyExtension" in _base_names(node):
                continue
            assert "io.ComfyNode" in _base_names(node), f"{where} is not an io.ComfyNode"
            assert _node_id(node) == node.name, f"{where}: the class is not named as its node id {_node_id(node)!r}"
            node_classes.append(node.name)
    assert len(node_classes) == len(set(node_classes)) >= 12


def test_host_imports_no_node():
    for path in sorted((ROOT / "host").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
                names = [a.name for a in node.names]
                assert not (target in ("..nodes", "fewstep.nodes") or target.startswith(("..nodes.", "fewstep.nodes."))
                            or (target == ".." and "nodes" in names)), f"{path.relative_to(ROOT)} imports {target}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("fewstep.nodes"), f"{path.relative_to(ROOT)} imports {alias.name}"
