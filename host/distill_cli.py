"""Headless distillation: `python -m fewstep.distill --checkpoint model.safetensors --images folder/ ...`

Loads the checkpoint with ComfyUI's own loader in-process (no server), or the separate files UNETLoader,
CLIPLoader / DualCLIPLoader and VAELoader would load (--diffusion-model, --text-encoder ×N with --clip-type,
--vae), encodes the images with the VAE and the prompts with the text encoders, and runs the same job as the PCM
Distillation node. Under
`torchrun --nproc_per_node N` it trains data-parallel with torch.distributed: every process draws the same
global batch from the shared seed and takes its slice, gradients are averaged, rank 0 writes the files; the
result equals one process at the same global batch (--batch-size is global and must divide by N).

ComfyUI is found from --comfyui, $COMFYUI_PATH, or the folder two levels up when the pack sits in
ComfyUI/custom_nodes. Nothing here imports ComfyUI before `start_host` has put it on sys.path, so `--help` and
argument errors need no ComfyUI; `distill/__main__.py` only calls `entry_point`.
"""
import argparse
import logging
import os
import pathlib
import signal
import sys

from ..distill.torchrun import exit_without_teardown

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# comfy.sd.CLIPType's members in ComfyUI 0.3.75, lower case as CLIPLoader / DualCLIPLoader name them; listed here so
# that --help and argument errors need no ComfyUI.
CLIP_TYPES = ("stable_diffusion", "stable_cascade", "sd3", "stable_audio", "hunyuan_dit", "flux", "mochi", "ltxv",
              "hunyuan_video", "pixart", "cosmos", "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2",
              "qwen_image", "hunyuan_image", "hunyuan_video_15")


def parse_args(argv=None):
    from ..distill.engine import CFG_MODES, METHODS, PRECISIONS, TSCD_SOLVERS, DistillConfig
    from ..distill.lora import DEFAULT_ALPHA, DEFAULT_RANK

    d = DistillConfig()  # the training defaults: DistillConfig's own (the PCM Distillation node shows the same)
    p = argparse.ArgumentParser(prog="python -m fewstep.distill", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="model checkpoint (.safetensors) with UNet, CLIP and VAE in one file")
    p.add_argument("--diffusion-model", metavar="PATH",
                   help="instead of --checkpoint: the diffusion model (UNet/DiT) alone, as UNETLoader loads it; needs "
                        "--text-encoder, --clip-type and --vae")
    p.add_argument("--text-encoder", metavar="PATH", action="append", default=[],
                   help="with --diffusion-model: a text encoder file, as CLIPLoader loads it; repeat for each (e.g. "
                        "SD3: clip_l and clip_g, optionally t5xxl; FLUX: clip_l and t5xxl)")
    p.add_argument("--clip-type", choices=CLIP_TYPES,
                   help="with --diffusion-model: the text encoders' model family, CLIPLoader's type (sd3, flux, "
                        "stable_diffusion for SD1.5/SDXL, ...)")
    p.add_argument("--vae", metavar="PATH", help="with --diffusion-model: the VAE file, as VAELoader loads it")
    p.add_argument("--images", required=True, help="folder of training images (captions: <image>.txt beside each)")
    p.add_argument("--prompts", help="text file, one prompt per line: one per image (sorted by name) or a single line")
    p.add_argument("--prompt", help="one prompt shared by all images")
    p.add_argument("--output", required=True, help="LoRA file to write (.safetensors); the state goes beside it")
    p.add_argument("--resolution", type=int, default=512, help="images are resized and centre-cropped to this square")
    p.add_argument("--flip", action="store_true", help="add horizontally flipped copies of the images (kornia)")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH or ../.. of the pack)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU")
    default = " (default: %(default)s)"
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps" + default)
    p.add_argument("--method", choices=METHODS, default=d.method,
                   help="pcm: phased consistency (--phases); tcd: trajectory consistency (one LoRA for any step count "
                        "with the tcd sampler's gamma); tscd: Hyper-SD's stages (--tscd-segments)" + default)
    p.add_argument("--tscd-segments", default=d.tscd_segments,
                   help="tscd: segments per stage, each dividing the one before; stage 1 is PCM with the first, a "
                        "1-segment end is the unified (tcd sampler) LoRA" + default)
    p.add_argument("--tscd-stage-steps", default=d.tscd_stage_steps,
                   help="tscd: optimiser steps per stage, e.g. 250,250,250,250 (sum = --steps); empty: --steps split "
                        "evenly" + default)
    p.add_argument("--tscd-solver", choices=TSCD_SOLVERS, default=d.tscd_solver,
                   help="tscd stages 2+: the previous stage's frozen LoRA makes the target (previous) or the CFG "
                        "teacher's DDIM step (teacher)" + default)
    p.add_argument("--phases", type=int, default=d.phases, help="PCM phases M; 1 = one-phase baseline" + default)
    p.add_argument("--ddim-timesteps", type=int, default=d.ddim_timesteps,
                   help="K, the teacher's DDIM grid, at least --phases" + default)
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global batch (split over torchrun processes)" + default)
    p.add_argument("--grad-accumulation", type=int, default=d.grad_accumulation,
                   help="micro-steps per optimiser step" + default)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, help="AdamW learning rate" + default)
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help="LoRA rank" + default)
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="LoRA alpha (scale alpha/rank)" + default)
    p.add_argument("--cfg-mode", choices=CFG_MODES, default=d.cfg_mode,
                   help="small: the teacher's CFG is distilled in; normal: CFG solver off" + default)
    p.add_argument("--w-min", type=float, default=d.w_min,
                   help="smallest teacher guidance w, ComfyUI CFG = 1 + w (small mode)" + default)
    p.add_argument("--w-max", type=float, default=d.w_max, help="largest teacher guidance w (small mode)" + default)
    p.add_argument("--huber-c", type=float, default=d.huber_c, help="pseudo-Huber c of the distance" + default)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="EMA target (0: the student under stop-grad)" + default)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warm-up" + default)
    p.add_argument("--adversarial-weight", type=float, default=d.adversarial_weight,
                   help="PCM's optional adversarial loss on the teacher's UNet features (reference 0.1; 0 = off)"
                        + default)
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the LoRA's init and every random draw" + default)
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=d.precision,
                   help="autocast dtype of the forwards (fp32 on CPU)" + default)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the saved state beside --output")
    p.add_argument("--virtual-ranks", type=int, default=1,
                   help="compute N data-parallel ranks' slices in this one process and average them as torchrun's "
                        "all-reduce does: N = 2 reproduces a 2-process run bit for bit (a check, not a speed-up)")
    args = p.parse_args(argv)
    check_model_files(p, args)
    return args


def check_model_files(parser, args):
    """Exactly one model source: --checkpoint, or --diffusion-model with its text encoders, type and VAE.

    parser.error exits 2 with the usage, before ComfyUI is imported or anything is written."""
    separate = {"--text-encoder": args.text_encoder, "--clip-type": args.clip_type, "--vae": args.vae}
    if args.checkpoint and args.diffusion_model:
        parser.error("--checkpoint and --diffusion-model exclude each other: give a full checkpoint (UNet, CLIP and "
                     "VAE in one file) or the diffusion model with --text-encoder, --clip-type and --vae.")
    if args.checkpoint:
        given = [name for name, value in separate.items() if value]
        if given:
            parser.error(f"{', '.join(given)} {'go' if len(given) > 1 else 'goes'} only with --diffusion-model; "
                         "--checkpoint uses its own CLIP and VAE. Drop them, or give --diffusion-model instead of "
                         "--checkpoint.")
    elif args.diffusion_model:
        missing = [name for name, value in separate.items() if not value]
        if missing:
            parser.error(f"--diffusion-model needs {', '.join(missing)}: e.g. SD3: --text-encoder clip_l.safetensors "
                         "--text-encoder clip_g.safetensors --clip-type sd3 --vae sd3_vae.safetensors.")
    else:
        parser.error("no model: give --checkpoint FILE (UNet, CLIP and VAE in one file), or --diffusion-model FILE "
                     "with --text-encoder FILE (repeat for each), --clip-type and --vae FILE.")


def missing_model_file(args):
    """The first model file option whose file is not there, as the message that says so; None when all are."""
    for name, paths in (("--checkpoint", [args.checkpoint]), ("--diffusion-model", [args.diffusion_model]),
                        ("--text-encoder", args.text_encoder), ("--vae", [args.vae])):
        for path in paths:
            if path and not pathlib.Path(path).is_file():
                return f"{name} {path}: no such file."
    return None


def comfyui_root(explicit):
    candidates = [explicit, os.environ.get("COMFYUI_PATH"), pathlib.Path(__file__).resolve().parents[3]]
    for candidate in candidates:
        if candidate and (pathlib.Path(candidate) / "comfy" / "sd.py").is_file():
            return pathlib.Path(candidate).resolve()
    raise SystemExit("ComfyUI not found: pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH.")


def start_host(root, cpu, output_dir):
    """Import ComfyUI in-process the way main.py configures it (no server, no custom nodes)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    import utils.install_util  # noqa: F401  (ComfyUI's utils package must win over comfy/utils.py, as in main.py)

    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.disable_api_nodes = True
    import folder_paths

    folder_paths.set_output_directory(str(output_dir))


def list_images(folder):
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"--images {folder} is not a folder.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"--images {folder} has no images ({', '.join(IMAGE_SUFFIXES)}).")
    return files


def load_images(files, resolution, flip):
    """N × res × res × 3 in [0, 1] (ComfyUI IMAGE layout): shorter side resized, centre crop; + flipped copies."""
    import kornia
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for path in files:
        with Image.open(path) as img:
            x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        h, w = x.shape[-2:]
        scale = resolution / min(h, w)
        x = kornia.geometry.transform.resize(x, (max(resolution, round(h * scale)), max(resolution, round(w * scale))),
                                             antialias=True)
        out.append(kornia.geometry.transform.center_crop(x, (resolution, resolution)).clamp(0, 1))
    images = torch.cat(out)
    if flip:
        images = torch.cat([images, kornia.geometry.transform.hflip(images)])
    return images.permute(0, 2, 3, 1).contiguous()


def read_prompts(args, files):
    if args.prompt is not None:
        return [args.prompt]
    if args.prompts:
        lines = [ln.strip() for ln in pathlib.Path(args.prompts).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(lines) not in (1, len(files)):
            raise SystemExit(f"--prompts has {len(lines)} lines for {len(files)} images: one per image or one line.")
        return lines
    captions = [p.with_suffix(".txt") for p in files]
    if all(c.is_file() for c in captions):
        return [c.read_text(encoding="utf-8").strip() for c in captions]
    raise SystemExit("No prompts: give --prompt, --prompts FILE, or a <image>.txt caption beside every image.")


def entry_point():
    """`python -m fewstep.distill`: exit with main's code; torchrun workers exit without interpreter teardown."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_without_teardown(code)
    sys.exit(code)


def main(argv=None):
    args = parse_args(argv)
    missing = missing_model_file(args)
    if missing:  # as argparse reports, before ComfyUI is imported or anything is written
        print(f"python -m fewstep.distill: error: {missing}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    output = pathlib.Path(args.output).resolve()
    start_host(comfyui_root(args.comfyui), args.cpu, output.parent)

    import torch
    import torch.distributed as dist

    if world > 1:
        if torch.cuda.is_available() and not args.cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("gloo" if args.cpu or not torch.cuda.is_available() else "nccl")
        if rank == 0:
            logging.info("data parallel: %d processes (%s), global batch %d, %d per process", world,
                         dist.get_backend(), args.batch_size, args.batch_size // world)
    try:
        return train(args, output, rank)
    except ValueError as error:  # bad settings or data: the message says what to change
        logging.error("fewstep.distill: %s", error)
        return 2
    finally:
        if world > 1:
            dist.destroy_process_group()


def load_models(args):
    """(MODEL, CLIP, VAE) with ComfyUI's own loaders: CheckpointLoaderSimple's call, or UNETLoader's,
    CLIPLoader / DualCLIPLoader's and VAELoader's on the separate files."""
    import comfy.sd
    import comfy.utils

    if args.checkpoint:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True)
        if clip is None or vae is None:
            raise SystemExit(f"{args.checkpoint} has no CLIP or VAE; give a full checkpoint, or --diffusion-model "
                             "with --text-encoder, --clip-type and --vae.")
        return model, clip, vae
    clip_type = getattr(comfy.sd.CLIPType, args.clip_type.upper(), None)
    if clip_type is None:
        raise SystemExit(f"--clip-type {args.clip_type} is not known to this ComfyUI (comfy.sd.CLIPType).")
    model = comfy.sd.load_diffusion_model(args.diffusion_model)
    clip = comfy.sd.load_clip(ckpt_paths=list(args.text_encoder), embedding_directory=None, clip_type=clip_type)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(args.vae))
    vae.throw_exception_if_invalid()
    return model, clip, vae


def train(args, output, rank):
    import torch

    from ..distill.engine import DistillConfig
    from .training_model import encode_prompts
    from .training_job import TrainingInterrupted, TrainJob, run

    files = list_images(args.images)
    prompts = read_prompts(args, files)
    with torch.inference_mode(False):
        model, clip, vae = load_models(args)
        with torch.no_grad():
            latents = vae.encode(load_images(files, args.resolution, args.flip))
            if args.flip and len(prompts) > 1:
                prompts = prompts + prompts
            positive = encode_prompts(clip, prompts)
            negative = encode_prompts(clip, [""])[0]
    config = DistillConfig(
        phases=args.phases, ddim_timesteps=args.ddim_timesteps, steps=args.steps, batch_size=args.batch_size,
        grad_accumulation=args.grad_accumulation, learning_rate=args.learning_rate, cfg_mode=args.cfg_mode,
        w_min=args.w_min, w_max=args.w_max, huber_c=args.huber_c, precision=args.precision, seed=args.seed,
        ema_decay=args.ema_decay, warmup_steps=args.warmup_steps,
        adversarial_weight=args.adversarial_weight, method=args.method, tscd_segments=args.tscd_segments,
        tscd_stage_steps=args.tscd_stage_steps, tscd_solver=args.tscd_solver, deterministic=True)
    stop = {"now": False}
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))

    def progress(step, total, loss, eta):
        if rank == 0:
            logging.info("step %d/%d  loss %.5g  ETA %ds", step, total, loss, eta)

    state = output.with_name(output.stem + ".state.safetensors")
    job = TrainJob(model=model, latents=latents, positive=positive, negative=negative, config=config, rank=args.rank,
                   alpha=args.alpha, lora_path=output, state_path=state,
                   gradient_checkpointing=not args.no_gradient_checkpointing, save_every=args.save_every,
                   resume=args.resume, progress=progress, interrupted=lambda: stop["now"], writer=rank == 0,
                   virtual_ranks=args.virtual_ranks)
    try:
        result = run(job)
    except TrainingInterrupted as error:
        logging.warning("%s", error)
        return 130
    if rank == 0:
        logging.info("wrote %s (%d steps, last loss %.5g)", result.lora_path, result.steps, result.losses[-1])
    return 0
