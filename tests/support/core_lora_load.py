"""Apply LoRA files with core ComfyUI's LoraLoader call in a fresh process; one JSON line per LoRA on stdout.

    python tests/support/core_lora_load.py (--checkpoint FILE | --diffusion-model FILE) LORA...

Run with the pack importable as `fewstep` (PYTHONPATH) and $COMFYUI_PATH set, as the CLI tests run the CLI. The
model is loaded as CheckpointLoaderSimple or UNETLoader loads it; each LoRA goes through
``comfy.sd.load_lora_for_models`` (what LoraLoader / LoraLoaderModelOnly call). Each line gives the file's
tensor count, the number of weights core patched, and every warning core logged while applying it ("lora key not
loaded: ..." for a key no target took, "NOT LOADED ..." for a patch the model refused): zero missed keys is an
empty list with patches == tensors / 3 (up, down, alpha per layer).
"""
import argparse
import json
import logging
import sys
import tempfile


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint")
    source.add_argument("--diffusion-model")
    p.add_argument("loras", nargs="+")
    args = p.parse_args(argv)

    from fewstep.host.distill_cli import comfyui_root, start_host

    start_host(comfyui_root(None), True, tempfile.gettempdir())
    import comfy.sd
    import comfy.utils

    if args.checkpoint:
        model = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=False, output_clip=False)[0]
    else:
        model = comfy.sd.load_diffusion_model(args.diffusion_model)
    warnings = _Warnings()
    logging.getLogger().addHandler(warnings)
    for path in args.loras:
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        warnings.messages.clear()
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
        print(json.dumps({"lora": path, "tensors": len(lora), "patches": len(patched.patches),
                          "warnings": list(warnings.messages)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
