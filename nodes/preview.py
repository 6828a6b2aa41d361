"""A picture of a σ schedule: log σ per step, with timesteps and (optionally) PCM phase edges."""
import math

import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageDraw, ImageFont

from ..schedulers import pcm_phase_edges, phases_problem
from ..host.input_checks import check_values

CATEGORY = "sampling/custom_sampling/schedulers"


def _draw_schedule(sigmas, timesteps=None, edge_sigmas=(), width=768, height=432, title=""):
    """Render the schedule to an RGB uint8 array (pure PIL; no ComfyUI types)."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    left, right, top, bottom = 70, width - 150, 36, height - 46
    values = [float(s) for s in sigmas]
    positive = [v for v in values + list(edge_sigmas) if v > 0] or [1.0]
    lo, hi = math.log10(min(positive)) - 0.1, math.log10(max(positive)) + 0.1
    floor_y = bottom

    def ypos(v):
        if v <= 0:
            return floor_y
        return bottom - (math.log10(v) - lo) / (hi - lo) * (bottom - top - 14)

    def xpos(i):
        return left + (right - left) * (i / max(len(values) - 1, 1))

    draw.rectangle([left, top, right, bottom], outline="black")
    for decade in range(math.floor(lo), math.ceil(hi) + 1):
        y = ypos(10.0 ** decade)
        if top <= y <= bottom:
            draw.line([left - 4, y, right, y], fill=(225, 225, 225))
            draw.text((8, y - 7), f"1e{decade}", fill="black", font=font)
    for v in edge_sigmas:
        y = ypos(v)
        draw.line([left, y, right, y], fill=(220, 120, 40), width=1)
        draw.text((right + 6, y - 7), f"phase edge {v:.3g}", fill=(200, 100, 20), font=font)
    points = [(xpos(i), ypos(v)) for i, v in enumerate(values)]
    if len(points) > 1:
        draw.line(points, fill=(30, 80, 200), width=2)
    for i, ((x, y), v) in enumerate(zip(points, values)):
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(30, 80, 200))
        label = f"{v:.3g}" if timesteps is None else f"{v:.3g} (t={timesteps[i]})"
        draw.text((x + 6, y - 16), label, fill="black", font=font)
        draw.text((x - 3, bottom + 6), str(i), fill="black", font=font)
    draw.text((left, bottom + 24), "step", fill="black", font=font)
    draw.text((left, 10), title or f"sigma schedule, {len(values) - 1} steps (log scale; sigma = 0 drawn on the floor)", fill="black", font=font)
    return np.asarray(img)


class FewStepSchedulePreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepSchedulePreview",
            display_name="Schedule Preview (σ plot)",
            category=CATEGORY,
            description="Draws a SIGMAS list as an image: σ per step on a log scale, the training timestep of each σ when a "
                        "model is connected, and PCM phase edges when phases > 0.",
            inputs=[
                io.Sigmas.Input("sigmas", tooltip="Any SIGMAS, e.g. from the PCM Scheduler or BasicScheduler."),
                io.Model.Input("model", optional=True, tooltip="Optional: labels each σ with the model's timestep t."),
                io.Int.Input("phases", default=0, min=0, max=50, optional=True,
                             tooltip="Optional: draw the edges of a PCM with this many phases (needs model); 0 = none."),
                io.Int.Input("ddim_timesteps", default=50, min=1, max=1000, optional=True,
                             tooltip="K of the PCM whose edges are drawn (50 for SD1.5, 40 for SDXL)."),
                io.Int.Input("width", default=768, min=256, max=2048, optional=True, tooltip="Image width in pixels."),
                io.Int.Input("height", default=432, min=192, max=2048, optional=True, tooltip="Image height in pixels."),
            ],
            outputs=[io.Image.Output(tooltip="The plot: preview or save it like any image.")],
        )

    @classmethod
    def cross_checks(cls, values):
        phases, k = values.get("phases", 0), values.get("ddim_timesteps", 50)
        problem = phases_problem(int(phases), int(k)) if phases > 0 else None  # 0 draws no edges
        return {"phases": problem} if problem else {}

    @classmethod
    def execute(cls, sigmas, model=None, phases=0, ddim_timesteps=50, width=768, height=432) -> io.NodeOutput:
        check_values(cls, phases=phases, ddim_timesteps=ddim_timesteps, width=width, height=height)
        timesteps, edges = None, ()
        if model is not None:
            ms = model.get_model_object("model_sampling")
            timesteps = [int(round(float(ms.timestep(s)))) if float(s) > 0 else "-" for s in sigmas.float()]
            if phases > 0:
                edges = [float(ms.sigmas[t]) for t in pcm_phase_edges(phases, ddim_timesteps, len(ms.sigmas))[1:-1]]
        array = _draw_schedule(sigmas, timesteps, edges, width, height)
        return io.NodeOutput(torch.from_numpy(array.astype(np.float32) / 255.0)[None])


def _draw_loss_curve(losses, width=768, height=432, title=""):
    """Training loss per optimiser step (log scale) with a 20-step moving average, as an RGB uint8 array."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    left, right, top, bottom = 70, width - 24, 36, height - 46
    values = [float(v) for v in losses if math.isfinite(float(v)) and float(v) > 0]
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 10), title or f"distillation loss, {len(values)} steps (log scale)", fill="black", font=font)
    if not values:
        draw.text((left + 10, top + 10), "no loss values yet", fill="black", font=font)
        return np.asarray(img)
    lo, hi = math.log10(min(values)), math.log10(max(values))
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5

    def ypos(v):
        return bottom - (math.log10(v) - lo) / (hi - lo) * (bottom - top - 10)

    def xpos(i):
        return left + (right - left) * (i / max(len(values) - 1, 1))

    for decade in range(math.floor(lo), math.ceil(hi) + 1):
        y = ypos(10.0 ** decade)
        if top <= y <= bottom:
            draw.line([left - 4, y, right, y], fill=(225, 225, 225))
            draw.text((8, y - 7), f"1e{decade}", fill="black", font=font)
    draw.line([(xpos(i), ypos(v)) for i, v in enumerate(values)] if len(values) > 1 else
              [(left, ypos(values[0])), (right, ypos(values[0]))], fill=(170, 190, 230), width=1)
    window = min(20, len(values))
    smooth = np.convolve(np.log10(values), np.ones(window) / window, mode="valid")
    if len(smooth) > 1:
        draw.line([(xpos(i + window - 1), bottom - (v - lo) / (hi - lo) * (bottom - top - 10))
                   for i, v in enumerate(smooth)], fill=(30, 80, 200), width=2)
    draw.text((left, bottom + 6), "1", fill="black", font=font)
    draw.text((right - 40, bottom + 6), str(len(values)), fill="black", font=font)
    draw.text((left + 40, bottom + 24), f"optimiser step; last {values[-1]:.4g}, "
              f"mean of last {window} {10 ** float(smooth[-1]):.4g}", fill="black", font=font)
    return np.asarray(img)
