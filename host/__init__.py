"""Where the pack meets ComfyUI, apart from the nodes themselves: everything here imports ComfyUI, nothing here is a node.

- `registration`: the only module touching ComfyUI's global sampler/scheduler lists (the dropdowns).
- `lora_patches`: a parsed LoRA (loras/) onto a ModelPatcher/CLIP: key maps, architecture check, core patches.
- `training_model`: a ModelPatcher as the distillation engine (distill/) needs it: σ table, denoiser, conditioning
  batches, LoRA targets, checkpointed blocks, the student.
- `training_job`: one training job (the PCM Distillation node and the CLI): model, latents, prompts in, LoRA out.
- `distill_cli`: `python -m fewstep.distill`, the headless runner (starts ComfyUI in-process, runs a training job).

This package imports nothing at import time: each module is imported by the node or the CLI that needs it, once
ComfyUI is importable (distill_cli imports ComfyUI only after it has put it on sys.path).
"""
