"""Host tests: a real ComfyUI in-process with the pack as a custom node."""
