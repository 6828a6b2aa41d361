"""A real ComfyUI, in-process, with the pack loaded as a custom node and a tiny SD1.5 checkpoint.

One session-scoped bring-up (``comfy_host``): ComfyUI from $COMFYUI_PATH (default <repo>/.comfyui) in CPU
mode, a temporary base directory whose models/checkpoints holds the seeded tiny checkpoint (cached in
<repo>/.cache, keyed by seed) and whose custom_nodes/fewstep is a symlink to this repository, and
``nodes.init_extra_nodes`` loading comfy_extras and the pack exactly as the server does.
Every test in this folder is skipped, with the reason, only when no ComfyUI tree is found.
"""
from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import sys
import types

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CHECKPOINT_SEED = 0
CHECKPOINT_NAME = "fewstep_tiny_sd15.safetensors"

if str(REPO_ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "tests"))
from support.log_capture import captured_log  # noqa: E402
from support.tiny_checkpoint import cached_tiny_sd15  # noqa: E402


def _comfyui_path() -> pathlib.Path:
    env = os.environ.get("COMFYUI_PATH")
    return pathlib.Path(env).expanduser().resolve() if env else REPO_ROOT / ".comfyui"


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory):
    """The started host: a namespace with the comfy modules, the base directory and the start-up log."""
    comfy_root = _comfyui_path()
    if not ((comfy_root / "nodes.py").is_file() and (comfy_root / "comfy" / "samplers.py").is_file()):
        pytest.skip(f"ComfyUI not present at {comfy_root} (set COMFYUI_PATH to a ComfyUI checkout to run the host tests)")

    base = tmp_path_factory.mktemp("comfy_base")
    ckpt_dir = base / "models" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    (base / "custom_nodes").mkdir()
    for sub in ("input", "output", "temp", "user"):
        (base / sub).mkdir()
    (base / "custom_nodes" / "fewstep").symlink_to(REPO_ROOT, target_is_directory=True)

    cached = cached_tiny_sd15(CHECKPOINT_SEED)
    (ckpt_dir / CHECKPOINT_NAME).symlink_to(cached)

    if str(comfy_root) not in sys.path:
        sys.path.insert(0, str(comfy_root))
    import comfy.cli_args

    # As main.py does: ComfyUI's own `utils` package must win before nodes.py puts comfy/ (with utils.py) first on sys.path.
    import utils.install_util  # noqa: F401

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.base_directory = str(base)
    comfy.cli_args.args.disable_api_nodes = True

    # start-up problems (IMPORT FAILED, ...) are logged at WARNING
    with captured_log(logging.INFO) as collector:
        import folder_paths

        if pathlib.Path(folder_paths.base_path).resolve() != base.resolve():
            # folder_paths was imported earlier in this process: point it at our base directory instead.
            folder_paths.add_model_folder_path("checkpoints", str(ckpt_dir), is_default=True)
            folder_paths.add_model_folder_path("custom_nodes", str(base / "custom_nodes"), is_default=True)
            folder_paths.set_output_directory(str(base / "output"))
            folder_paths.set_temp_directory(str(base / "temp"))
            folder_paths.set_input_directory(str(base / "input"))
        import comfy.model_management
        import comfy.samplers
        import comfy.utils
        import nodes

        samplers_file = pathlib.Path(comfy.samplers.__file__).resolve()
        if comfy_root.resolve() not in samplers_file.parents:
            pytest.fail(f"comfy was already imported from {samplers_file}, not from {comfy_root}")
        comfy.utils.set_progress_bar_enabled(False)
        if "FewStepPCMScheduler" not in nodes.NODE_CLASS_MAPPINGS:
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))

    import execution

    return types.SimpleNamespace(
        root=comfy_root, base=base, checkpoint=CHECKPOINT_NAME, checkpoint_file=cached,
        nodes=nodes, comfy=comfy, execution=execution, folder_paths=folder_paths, startup_log=collector,
    )


@pytest.fixture(scope="session")
def run_node(comfy_host):
    """run_node(class_type, **inputs) -> tuple of outputs, for V1 and V3 nodes alike (no server needed)."""

    def call(class_type, **inputs):
        cls = comfy_host.nodes.NODE_CLASS_MAPPINGS[class_type]
        if hasattr(cls, "PREPARE_CLASS_CLONE"):  # V3 node: what the executor does, minus the graph
            clone = cls.PREPARE_CLASS_CLONE({})
            out = getattr(clone, cls.FUNCTION)(**inputs)
            if asyncio.iscoroutine(out):
                out = asyncio.run(out)
            return tuple(out.result or ())
        return tuple(getattr(cls(), cls.FUNCTION)(**inputs))

    return call


@pytest.fixture(scope="session")
def tiny_models(comfy_host, run_node):
    """(model, clip, vae, load_log) from CheckpointLoaderSimple on the tiny checkpoint."""
    with captured_log() as collector:
        model, clip, vae = run_node("CheckpointLoaderSimple", ckpt_name=comfy_host.checkpoint)
    return types.SimpleNamespace(model=model, clip=clip, vae=vae, load_log=collector)


@pytest.fixture(scope="session")
def conds(tiny_models, run_node):
    """(positive, negative) CONDITIONING encoded by the checkpoint's CLIP."""
    (positive,) = run_node("CLIPTextEncode", clip=tiny_models.clip, text="a red fox standing in fresh snow, photograph")
    (negative,) = run_node("CLIPTextEncode", clip=tiny_models.clip, text="blurry, low quality")
    return positive, negative


@pytest.fixture(scope="session")
def arch_models(comfy_host, tiny_models):
    """arch_models(arch) -> (ModelPatcher, CLIP or None) of the tiny model of 'sd15' | 'sdxl' | 'sd3' | 'flux'.

    SD1.5 and SDXL are full checkpoints (UNet + text encoders); SD3 and FLUX are diffusion-model-only files
    (LoRAs for them patch the transformer; their text encoders are the stock T5/CLIP ones).
    """
    loaded = {"sd15": (tiny_models.model, tiny_models.clip)}

    def get(arch):
        if arch not in loaded:
            import comfy.sd
            from support import tiny_models as builders

            if arch == "sdxl":
                model, clip = comfy.sd.load_checkpoint_guess_config(
                    str(builders.cached_tiny_sdxl()), output_vae=False, output_clip=True)[:2]
                loaded[arch] = (model, clip)
            elif arch == "sd3":
                loaded[arch] = (comfy.sd.load_diffusion_model(str(builders.cached_tiny_sd3())), None)
            elif arch == "flux":
                loaded[arch] = (comfy.sd.load_diffusion_model(str(builders.cached_tiny_flux())), None)
            else:
                raise KeyError(arch)
        return loaded[arch]

    return get


@pytest.fixture(scope="session")
def core_coverage(arch_models):
    """core_coverage(arch, fmt) -> (layers core's own LoRA loading patches, layers in the file)."""
    from support.lora_files import lora_layers, make_lora, target_id

    def count(arch, fmt):
        import comfy.lora
        import comfy.lora_convert

        model, clip = arch_models(arch)
        tensors, metadata, expected = make_lora(lora_layers(model, clip), fmt, seed=11, single_te=(arch == "sd15"))
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        if clip is not None:
            comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(tensors), key_map, log_missing=False)
        applied = {target_id(t) for t in loaded}
        return len(applied & set(expected)), len(expected)

    return count
