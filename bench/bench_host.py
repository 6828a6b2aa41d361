"""What the benchmarks that run ComfyUI in-process share: paths, ComfyUI's SDXL UNet config, start-up, /proc memory."""
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMFY = pathlib.Path(os.environ.get("COMFYUI_PATH", ROOT / ".comfyui"))

# ComfyUI's SDXL UNet as model detection finds it in an SDXL checkpoint (comfy/model_detection.py, "SDXL").
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def start_comfy(cpu=True, pytorch_attention=False):
    """Import ComfyUI in this process as main.py configures it, and the repo as the package `fewstep`.

    pytorch_attention: as main.py's --use-pytorch-cross-attention (torch's scaled_dot_product_attention, what
    ComfyUI picks by itself on an NVIDIA GPU) instead of the sub-quadratic attention it picks on the CPU."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(COMFY))
    import comfy.cli_args

    import utils.install_util  # noqa: F401  (as main.py: ComfyUI's `utils` package before nodes puts comfy/ first)

    comfy.cli_args.args.cpu = cpu  # before any other comfy module reads it
    comfy.cli_args.args.use_pytorch_cross_attention = pytorch_attention
    comfy.cli_args.args.disable_api_nodes = True
    import conftest  # noqa: F401  (tests/conftest.py: imports the repo as package `fewstep`)


def status_kb(field):
    """A /proc/self/status field in kB (VmRSS, VmHWM, RssAnon, ...); 0 where the kernel has no such field."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak():
    """Set the kernel's peak-RSS mark (VmHWM, ru_maxrss) to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
