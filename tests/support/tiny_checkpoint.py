"""Seeded, download-free SD1.5-architecture checkpoint for host tests.

``write_tiny_sd15(path, seed=0)`` writes a single-file checkpoint in the original LDM layout
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``)
that ComfyUI 0.3.75 detects as SD15 and loads with ``CheckpointLoaderSimple`` with no missing keys:

* UNet: model_channels=320, context_dim=768, channel_mult=[1], num_res_blocks=[1],
  transformer_depth=[1] (about 26 M parameters; it never downsamples), stored as float16;
* VAE: a TAESD (``first_stage_model.taesd_encoder.*`` / ``taesd_decoder.*``), float16;
* text encoder: the fixed-size CLIP-L, stored as float8_e4m3fn to halve the file.

Shapes and key names come from ComfyUI's own modules built on the meta device, so nothing is
allocated for them; the values are drawn from a seeded generator with fan-in scaled initialisation
small enough that every output stays finite. The weights are random: the model produces noise-like
predictions, which is all that sampler/scheduler plumbing tests need.

The file carries a stamp (format version + seed) in its safetensors metadata. When ``path`` already
holds a file with the same stamp it is returned untouched; otherwise the file is written to a temp
file in the same folder and renamed into place, so concurrent or interrupted writers never leave a
half-written checkpoint behind.

Command line: ``python tests/support/tiny_checkpoint.py OUT.safetensors [--seed N]``.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

FORMAT_VERSION = "1"
STAMP_KEY = "fewstep.tiny_sd15"

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

UNET_CONFIG = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "num_heads": 8,
    "num_head_channels": -1,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "legacy": False,
    "adm_in_channels": None,
    "use_checkpoint": False,
}

# ComfyUI's VAELoader gives a standalone SD1 TAESD this scale; keep the same convention.
TAESD_SD1_SCALE = 0.18215


def _stamp(seed: int) -> str:
    return "v{}-seed{}".format(FORMAT_VERSION, int(seed))


def comfyui_path() -> pathlib.Path:
    """ComfyUI tree to take module definitions from: $COMFYUI_PATH, else <repo>/.comfyui."""
    env = os.environ.get("COMFYUI_PATH")
    return pathlib.Path(env) if env else _REPO_ROOT / ".comfyui"


def _import_comfy():
    """Make ComfyUI's packages importable (CPU mode) without disturbing a host that already has them."""
    if "comfy" not in sys.modules:
        root = str(comfyui_path())
        if root not in sys.path:
            sys.path.insert(0, root)
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
    import comfy.clip_model
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    import comfy.taesd.taesd as taesd

    return comfy, openaimodel, taesd


def _meta_shapes():
    """{checkpoint key: shape} for UNet, TAESD and CLIP-L, from ComfyUI's modules on the meta device."""
    import json

    import torch

    comfy, openaimodel, taesd = _import_comfy()
    meta = torch.device("meta")
    ops = comfy.ops.disable_weight_init

    shapes = {}
    unet = openaimodel.UNetModel(**UNET_CONFIG, dtype=torch.float32, device=meta, operations=ops)
    for k, v in unet.state_dict().items():
        shapes["model.diffusion_model." + k] = ("unet", tuple(v.shape))

    with meta:
        vae = taesd.TAESD(latent_channels=4)
    for k, v in vae.state_dict().items():
        shapes["first_stage_model." + k] = ("vae", tuple(v.shape))

    cfg_file = pathlib.Path(comfy.clip_model.__file__).resolve().parent / "sd1_clip_config.json"
    with open(cfg_file) as f:
        clip_cfg = json.load(f)
    clip = comfy.clip_model.CLIPTextModel(clip_cfg, torch.float32, meta, comfy.ops.manual_cast)
    for k, v in clip.state_dict().items():
        # A real SD1.5 checkpoint has no text projection (ComfyUI tolerates its absence).
        if k.startswith("text_model."):
            shapes["cond_stage_model.transformer." + k] = ("clip", tuple(v.shape))
    return shapes


def _init_tensor(key: str, part: str, shape, gen):
    """Seeded value for one tensor: norms at identity, biases small, weights fan-in scaled."""
    import torch

    name = key.rsplit(".", 1)[-1]
    if key.endswith("vae_scale"):
        return torch.tensor(TAESD_SD1_SCALE)
    if key.endswith("vae_shift"):
        return torch.tensor(0.0)
    if len(shape) == 1 and name == "weight":  # GroupNorm / LayerNorm gains
        return torch.ones(shape)
    if name == "bias":
        return torch.randn(shape, generator=gen) * 0.02
    if "embedding" in key:  # CLIP token / position embeddings
        std = 0.02 if "token_embedding" in key else 0.01
        return torch.randn(shape, generator=gen) * std
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    gain = 1.0
    if part == "unet" and (key.endswith("out.2.weight") or ".out_layers.3." in key or ".proj_out." in key
                           or ".to_out.0." in key or ".ff.net.2." in key):
        # Layers that feed a residual add or the prediction: keep the stack's variance from growing.
        gain = 0.5
    return torch.randn(shape, generator=gen) * (gain / fan_in ** 0.5)


def _read_stamp(path: pathlib.Path):
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(STAMP_KEY)
    except Exception:
        return None


def write_tiny_sd15(path, seed: int = 0) -> pathlib.Path:
    """Write (or reuse) the tiny SD1.5 checkpoint at ``path`` for ``seed``; returns the path."""
    import torch

    path = pathlib.Path(path)
    if path.is_file() and _read_stamp(path) == _stamp(seed):
        return path

    gen = torch.Generator().manual_seed(int(seed))
    store_dtype = {"unet": torch.float16, "vae": torch.float16, "clip": torch.float8_e4m3fn}
    tensors = {}
    for key, (part, shape) in sorted(_meta_shapes().items()):
        value = _init_tensor(key, part, shape, gen)
        if part == "vae" and key.endswith(("vae_scale", "vae_shift")):
            tensors[key] = value.to(torch.float32).contiguous()
        else:
            tensors[key] = value.to(store_dtype[part]).contiguous()

    metadata = {STAMP_KEY: _stamp(seed), "format": "pt",
                "description": "random-weight SD1.5-architecture test checkpoint (fewstep tests)"}
    return save_atomic(tensors, path, metadata)


def save_atomic(tensors, path, metadata) -> pathlib.Path:
    """The pack's atomic safetensors writer (distill/io.py), loaded by path: this module also runs standalone."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fewstep_distill_io", _REPO_ROOT / "distill" / "io.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.save_safetensors_atomic(tensors, path, metadata)


def cached_tiny_sd15(seed: int = 0, cache_dir=None) -> pathlib.Path:
    """The one cached copy that tests, the demo and the benchmark share, under <repo>/.cache.

    Seed 0 carries the name the shipped workflows load (fewstep_tiny_sd15.safetensors); other seeds get a suffix.
    Written once (a few seconds), then reused while its stamp matches.
    """
    name = "fewstep_tiny_sd15.safetensors" if int(seed) == 0 else f"fewstep_tiny_sd15_seed{int(seed)}.safetensors"
    cache = pathlib.Path(cache_dir) if cache_dir else _REPO_ROOT / ".cache"
    return write_tiny_sd15(cache / name, seed=seed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path, help="output .safetensors path")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(argv)
    out = write_tiny_sd15(ns.out, seed=ns.seed)
    print("{} ({:.1f} MiB, stamp {})".format(out, out.stat().st_size / 2 ** 20, _read_stamp(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
