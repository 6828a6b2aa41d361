"""Pure LoRA file handling: key formats, scale rules, presets (no ComfyUI import)."""
