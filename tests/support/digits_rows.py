"""Few-step rows on the embedded digits model, run as ComfyUI API graphs of core nodes, scored on decoded images.

One row = one way to sample (model, sampler, scheduler, steps, CFG). ``row_graph`` builds the graph: for each
digit 0–9 a CLIPTextEncode of "a handwritten digit d", an EmptyLatentImage of 64×64 px with ``per_digit``
images, a KSampler, a VAEDecode; the decoded batches are joined by ImageBatch and written by one SaveImage, so
the saved PNGs come back digit-major. ``score`` turns them into the classifier's accuracy against the prompted
digits and the Fréchet distance of its features to the held-out digits. The demo (scripts/demo.py) and the
quality tests (tests/e2e/test_digits_quality.py) share these definitions.
"""
from __future__ import annotations

from dataclasses import dataclass

if __package__:
    from .digits_model import PROMPT, DigitClassifier, digits_split, frechet_distance, images_to_ink, ink_to_pixels
else:  # pragma: no cover
    from support.digits_model import (PROMPT, DigitClassifier, digits_split, frechet_distance, images_to_ink,
                                      ink_to_pixels)

TEACHER_CFG = 3.0  # the digits model's CFG (measured best at 25 steps, see README)


@dataclass(frozen=True)
class Row:
    label: str
    sampler: str
    scheduler: str
    steps: int
    cfg: float
    lora: bool = False  # sample the distilled student (the PCM LoRA) instead of the teacher


TEACHER_ROWS = (
    Row("teacher, 25 steps (DDIM)", "ddim", "sgm_uniform", 25, TEACHER_CFG),
    Row("teacher, 1 step (DDIM)", "ddim", "sgm_uniform", 1, TEACHER_CFG),
    Row("teacher, 2 steps (DDIM)", "ddim", "sgm_uniform", 2, TEACHER_CFG),
    Row("teacher, 4 steps (DDIM)", "ddim", "sgm_uniform", 4, TEACHER_CFG),
)
STUDENT_ROWS = (
    Row("PCM LoRA, 1 step (pcm)", "pcm", "pcm", 1, 1.0, lora=True),
    Row("PCM LoRA, 2 steps (pcm)", "pcm", "pcm", 2, 1.0, lora=True),
    Row("PCM LoRA, 4 steps (pcm)", "pcm", "pcm", 4, 1.0, lora=True),
    Row("PCM LoRA, 4 steps (tcd, gamma 0.3)", "tcd", "lcm", 4, 1.0, lora=True),
    Row("PCM LoRA, 4 steps (lcm)", "lcm", "lcm", 4, 1.0, lora=True),
)
ROWS = TEACHER_ROWS + STUDENT_ROWS


def row_graph(row, checkpoint_name, lora_name=None, per_digit=10, seed=0, prefix="fewstep_digits_row"):
    """The API graph of one row (see the module docstring)."""
    graph = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_name}},
             "negative": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
             "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": per_digit}}}
    model = ["ckpt", 0]
    if row.lora:
        if not lora_name:
            raise ValueError(f"row {row.label!r} needs the PCM LoRA's file name")
        graph["lora"] = {"class_type": "LoraLoaderModelOnly",
                         "inputs": {"model": model, "lora_name": lora_name, "strength_model": 1.0}}
        model = ["lora", 0]
    images = None
    for digit in range(10):
        graph[f"prompt{digit}"] = {"class_type": "CLIPTextEncode",
                                   "inputs": {"clip": ["ckpt", 1], "text": PROMPT.format(digit)}}
        graph[f"sample{digit}"] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed + digit, "steps": row.steps, "cfg": row.cfg, "sampler_name": row.sampler,
            "scheduler": row.scheduler, "positive": [f"prompt{digit}", 0], "negative": ["negative", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}}
        graph[f"decode{digit}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"sample{digit}", 0], "vae": ["ckpt", 2]}}
        if images is None:
            images = [f"decode{digit}", 0]
        else:
            graph[f"join{digit}"] = {"class_type": "ImageBatch", "inputs": {"image1": images, "image2": [f"decode{digit}", 0]}}
            images = [f"join{digit}", 0]
    graph["save"] = {"class_type": "SaveImage", "inputs": {"images": images, "filename_prefix": prefix}}
    return graph


def load_images(paths):
    """Saved PNGs → IMAGE-like float tensor [N, H, W, 3] in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays))


class Scorer:
    """Accuracy against the prompted digits and Fréchet distance to the held-out digits (one classifier)."""

    def __init__(self, classifier=None):
        self.classifier = classifier or DigitClassifier()
        self.held_features = self.classifier.features(digits_split()["held"][0])

    def score(self, images, per_digit):
        import torch

        ink = images_to_ink(images)
        labels = torch.arange(10).repeat_interleave(per_digit)
        if len(ink) != len(labels):
            raise ValueError(f"{len(ink)} images for 10 × {per_digit} prompts")
        accuracy = float((self.classifier.predict(ink) == labels).float().mean())
        fd = frechet_distance(self.classifier.features(ink), self.held_features)
        return {"accuracy": accuracy, "fd": fd}

    def floor(self, per_digit, seed=0):
        """The same scores for real training digits (per_digit of each class): what a perfect row would get."""
        import torch

        ink, labels = digits_split()["train"]
        gen = torch.Generator().manual_seed(seed)
        picks = torch.cat([torch.nonzero(labels == d).flatten()[torch.randperm(int((labels == d).sum()), generator=gen)[:per_digit]]
                           for d in range(10)])
        images = ink_to_pixels(ink[picks]).unsqueeze(-1).expand(-1, -1, -1, 3)
        return self.score(images, per_digit)


def contact_sheet(rows, path, scale=1):
    """rows: [(label, images [N, 64, 64, 3], per_digit)]; one line per row with the first image of each digit."""
    import numpy as np
    from PIL import Image, ImageDraw

    label_width, cell, pad = 300, 64 * scale, 4
    height = len(rows) * (cell + pad) + pad + 20
    sheet = Image.new("RGB", (label_width + 10 * (cell + pad) + pad, height), "white")
    draw = ImageDraw.Draw(sheet)
    for digit in range(10):
        draw.text((label_width + pad + digit * (cell + pad) + cell // 2 - 3, 4), str(digit), fill="black")
    for r, (label, images, per_digit) in enumerate(rows):
        top = 20 + r * (cell + pad) + pad
        draw.text((6, top + cell // 2 - 6), label, fill="black")
        for digit in range(10):
            pixels = (images[digit * per_digit].numpy() * 255).round().clip(0, 255).astype(np.uint8)
            tile = Image.fromarray(pixels).resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (label_width + pad + digit * (cell + pad), top))
    sheet.save(path)
    return path
