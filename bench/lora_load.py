"""Load time and peak RAM of an SDXL-size rank-64 LoRA: Fast LoRA Loader vs core LoraLoader (goal: ratio ≤ 1.10).

Model: a full-size SDXL UNet (ComfyUI's own SDXL unet config, 2.57 B parameters) and the SDXL text encoders
(CLIP-L + CLIP-G, 818 M), built on the META device: loading a LoRA only reads weight names and shapes (patches
are applied at sampling time), so the model costs no RAM and the measurement is the LoRA load alone.
LoRA: kohya keys, rank 64, float16, every Linear/Conv2d of the UNet's transformer blocks, resnets and
down/upsamplers (convs as conv LoRAs) plus q/k/v/out_proj and fc1/fc2 of both text encoders; seeded random
values, written once to <repo>/.cache/bench_sdxl_rank64_lora.safetensors.

Each measurement runs in a fresh subprocess, the loaders interleaved with the first of each round rotating:
start ComfyUI in CPU mode, build the meta model, note the RSS, reset the kernel's peak-RSS mark, then time
    core: comfy.sd.load_lora_for_models(model, clip, comfy.utils.load_torch_file(path, safe_load=True), 1, 1)
    ours: read_lora_file -> parse_lora -> presets.preset_for -> apply_lora   (what FewStepLoraLoader.execute does:
          the text encoder's values are checked for NaN/Inf there, the model's when sampling first loads the model)
and, as a diagnostic row, ours with its NaN/Inf scan stubbed out. The deferred check of the model's tensors is
timed after the load, in the same process, and printed on its own line. Peak RAM = ru_maxrss after the load minus
the RSS before it. The file is read (plain reads, not mapped) before the first round and again in each process
before its baseline, so every loader finds it in the page cache.
Run: `make bench` (or .venv/bin/python bench/lora_load.py [--rounds N] [--threads N] [--profile]).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench_host import ROOT, SDXL_UNET, reset_peak, start_comfy, status_kb

LORA_PATH = ROOT / ".cache" / "bench_sdxl_rank64_lora.safetensors"
LORA_FORMAT_VERSION = "1"  # bump when the generated file's contents change
RANK = 64
GOAL = 1.10



# ---------------------------------------------------------------- child side (ComfyUI in this process)

def meta_sdxl():
    """(ModelPatcher, comfy.sd.CLIP) of SDXL with every weight on the meta device."""
    import torch

    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd

    config = comfy.model_detection.model_config_from_unet_config(dict(SDXL_UNET, dtype=torch.float16))
    config.set_inference_dtype(torch.float16, None)
    meta, cpu = torch.device("meta"), torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(config.get_model({}, device=meta), load_device=cpu, offload_device=cpu)
    clip = comfy.sd.CLIP(target=config.clip_target({}), model_options={"initial_device": meta})
    return model, clip


def lora_layers(model, clip):
    """[(kohya module name, weight shape)] of every layer the benchmark LoRA patches."""
    import re

    import comfy.utils

    unet_shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    layers = []
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(SDXL_UNET).items():
        shape = unet_shapes.get("diffusion_model." + ldm_key)
        if (not diffusers_key.endswith(".weight") or shape is None or len(shape) not in (2, 4)
                or not any(part in diffusers_key for part in (".attentions.", ".resnets.", "samplers."))):
            continue
        layers.append(("lora_unet_" + diffusers_key[: -len(".weight")].replace(".", "_"), shape))
    te = re.compile(r"clip_([lg])\.transformer\."
                    r"(text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12]))\.weight$")
    for key, value in clip.cond_stage_model.state_dict().items():
        match = te.match(key)
        if match:
            prefix = "lora_te1_" if match.group(1) == "l" else "lora_te2_"
            layers.append((prefix + match.group(2).replace(".", "_"), tuple(value.shape)))
    return sorted(layers)


def make_lora(path):
    import torch
    from fewstep.distill.io import save_safetensors_atomic

    model, clip = meta_sdxl()
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in lora_layers(model, clip):
        out_dim, in_shape = shape[0], shape[1:]
        fan_in = 1
        for d in in_shape:
            fan_in *= d
        down = torch.randn((RANK,) + in_shape, generator=gen) / fan_in ** 0.5
        up = torch.randn((out_dim, RANK) + (1,) * (len(shape) - 2), generator=gen) * 0.01
        tensors[name + ".lora_down.weight"] = down.to(torch.float16)
        tensors[name + ".lora_up.weight"] = up.to(torch.float16)
        tensors[name + ".alpha"] = torch.tensor(float(RANK // 2), dtype=torch.float16)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(RANK), "ss_network_alpha": str(RANK // 2),
                "ss_base_model_version": "sdxl_base_v1-0", "fewstep_bench_version": LORA_FORMAT_VERSION}
    save_safetensors_atomic(tensors, path, metadata)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _patched(patcher):
    return len(patcher.patches)


def load_core(path, model, clip):
    import comfy.sd
    import comfy.utils

    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, comfy.utils.load_torch_file(path, safe_load=True),
                                                        1.0, 1.0)
    return new_model, new_clip


STAGES = {}  # ours: seconds per step of the load, for the breakdown line


def load_ours(path, model, clip):
    from fewstep.loras import presets
    from fewstep.loras.formats import parse_lora, read_lora_file
    from fewstep.host.lora_patches import apply_lora

    name = os.path.basename(path)
    t0 = time.perf_counter()
    tensors, metadata = read_lora_file(path, check_values=False)
    t1 = time.perf_counter()
    parsed = parse_lora(tensors, metadata)
    t2 = time.perf_counter()
    presets.preset_for(name, metadata, parsed.base_arch, max(parsed.ranks))
    t3 = time.perf_counter()
    new_model, new_clip, _report = apply_lora(parsed, name, model, clip, 1.0, 1.0, values_checked=False)
    t4 = time.perf_counter()
    STAGES.update({"read": t1 - t0, "parse": t2 - t1, "preset": t3 - t2,
                   "apply (+ text encoder NaN/Inf check)": t4 - t3})
    return new_model, new_clip


def deferred_check_seconds(new_model):
    """The model tensors' NaN/Inf check the loader leaves to the first sampling (host/lora_patches.py ValuesCheck),
    run here by hand and timed: what the first sampling pays for it, after the load."""
    from comfy.patcher_extension import WrappersMP
    from fewstep.host.lora_patches import VALUES_CHECK_KEY

    checks = new_model.wrappers.get(WrappersMP.PREPARE_SAMPLING, {}).get(VALUES_CHECK_KEY, [])
    start = time.perf_counter()
    for check in checks:
        check(lambda: None)
    return time.perf_counter() - start if checks else None


def load_ours_unchecked(path, model, clip):
    """Diagnostic only: ours with the NaN/Inf scan stubbed out, to show what the rest of the loader costs."""
    from fewstep.loras import formats

    formats._all_finite = lambda tensor: True
    return load_ours(path, model, clip)


LOADERS = {  # child name -> (label, load function)
    "core": ("core LoraLoader", load_core),
    "ours": ("fewstep Fast LoRA Loader", load_ours),
    "ours-nocheck": ("fewstep, NaN/Inf scan stubbed out (diagnostic, not shipped)", load_ours_unchecked),
}


def child(loader, path, profile, threads):
    import resource

    start_comfy()
    if threads:
        import torch

        torch.set_num_threads(threads)
    import fewstep.host.lora_patches  # noqa: F401  (imports outside the timed part, for both loaders)
    from fewstep.loras import formats, presets  # noqa: F401

    import comfy.lora  # noqa: F401
    if loader == "ours-nocheck" and not hasattr(formats, "_all_finite"):
        print("RESULT " + json.dumps({"unavailable": "loras/formats.py has no _all_finite to stub"}), flush=True)
        return
    model, clip = meta_sdxl()
    load = LOADERS[loader][1]
    warm_page_cache(path)  # again here: other processes on the machine may have pushed it out since the parent's read
    rss_before = _rss_bytes()
    anon_before_kb, file_before_kb = status_kb("RssAnon"), status_kb("RssFile")
    maxrss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_reset = reset_peak()
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        start = time.perf_counter()
        new_model, new_clip = prof.runcall(load, str(path), model, clip)
        seconds = time.perf_counter() - start
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    else:
        start = time.perf_counter()
        new_model, new_clip = load(str(path), model, clip)
        seconds = time.perf_counter() - start
    maxrss_after_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    file_after_kb = status_kb("RssFile")
    deferred = deferred_check_seconds(new_model) if loader != "core" else None
    result = {
        "loader": loader, "seconds": seconds, "peak_mb": (maxrss_after_kb * 1024 - rss_before) / 2 ** 20,
        "rss_before_mb": rss_before / 2 ** 20, "maxrss_before_mb": maxrss_before_kb / 1024, "peak_reset": peak_reset,
        "anon_grew_mb": (status_kb("RssAnon") - anon_before_kb) / 1024,
        "file_grew_mb": (file_after_kb - file_before_kb) / 1024, "deferred_check_s": deferred,
        "stages": dict(STAGES), "model_layers": _patched(new_model), "clip_layers": _patched(new_clip.patcher),
        "unet_params": sum(p.numel() for p in model.model.diffusion_model.parameters()),
        "clip_params": sum(p.numel() for p in clip.cond_stage_model.parameters()),
    }
    print("RESULT " + json.dumps(result), flush=True)


def child_make(path):
    start_comfy()
    make_lora(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    print("RESULT " + json.dumps({"layers": sum(k.endswith(".lora_down.weight") for k in keys),
                                  "unet_layers": sum(k.startswith("lora_unet_") and k.endswith(".lora_down.weight")
                                                     for k in keys)}), flush=True)


# ---------------------------------------------------------------- parent side (no torch here: keeps children small)

def run_child(*args):
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child {' '.join(args)} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):]), proc.stderr


def lora_file_info(path):
    """(layers, unet layers, tensor values) from the header alone; None when the cached file is stale or absent."""
    import struct

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    if (header.get("__metadata__") or {}).get("fewstep_bench_version") != LORA_FORMAT_VERSION:
        return None
    downs = [k for k in header if k.endswith(".lora_down.weight")]
    values = 0
    for key, info in header.items():
        if key != "__metadata__":
            count = 1
            for d in info["shape"]:
                count *= d
            values += count
    return len(downs), sum(k.startswith("lora_unet_") for k in downs), values


def warm_page_cache(path):
    buffer = bytearray(16 * 2 ** 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also run each loader once under cProfile")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in the measured processes (0 = torch's default). Default 1: on a small "
                             "shared machine, multi-threaded torch ops stall whenever other processes hold the cores, "
                             "which measures the scheduler rather than the loader; core does no tensor maths here")
    parser.add_argument("--child", choices=[*LOADERS, "make"], help=argparse.SUPPRESS)
    parser.add_argument("--child-profile", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child == "make":
        return child_make(LORA_PATH)
    if opts.child:
        return child(opts.child, LORA_PATH, opts.child_profile, opts.threads)

    LORA_PATH.parent.mkdir(parents=True, exist_ok=True)
    if lora_file_info(LORA_PATH) is None:
        start = time.perf_counter()
        run_child("--child", "make")
        print(f"(wrote {LORA_PATH.relative_to(ROOT)} in {time.perf_counter() - start:.1f} s)")
    layers, unet_layers, values = lora_file_info(LORA_PATH)
    size_mb = LORA_PATH.stat().st_size / 2 ** 20
    warm_page_cache(LORA_PATH)

    names = list(LOADERS)
    results = {name: [] for name in names}
    for i in range(opts.rounds):
        for loader in names[i % len(names):] + names[: i % len(names)]:  # who goes first rotates
            results[loader].append(run_child("--child", loader, "--threads", str(opts.threads))[0])
    for name in names:
        if any("unavailable" in r for r in results[name]):
            print(f"({name}: {results[name][0]['unavailable']}; row left out)")
            del results[name]
    if opts.profile:
        for loader in ("core", "ours"):
            _, err = run_child("--child", loader, "--child-profile", "--threads", str(opts.threads))
            print(f"\n<details><summary>cProfile, {loader}</summary>\n\n```\n{err.strip()}\n```\n</details>\n")

    first = results["core"][0]
    print(f"LoRA load vs core LoraLoader — SDXL UNet ({first['unet_params'] / 1e9:.2f} B params) + CLIP-L/G "
          f"({first['clip_params'] / 1e6:.0f} M params) on the meta device; kohya rank-{RANK} fp16 LoRA, "
          f"{layers} layers ({unet_layers} UNet, {layers - unet_layers} text encoder), {values / 1e6:.0f} M values, "
          f"{size_mb:.0f} MB; CPU, torch threads: {opts.threads or 'default'}, page cache warm for all; median of "
          f"{opts.rounds} fresh processes each, interleaved")
    print()
    print("| loader | median load time (s) | median peak RAM over baseline (MB) | layers patched "
          "| ratio vs core (time / RAM) |")
    print("|---|---|---|---|---|")
    medians = {}
    for loader, runs in results.items():
        t = statistics.median(r["seconds"] for r in runs)
        m = statistics.median(r["peak_mb"] for r in runs)
        medians[loader] = (t, m)
        counts = {(r["model_layers"], r["clip_layers"]) for r in runs}
        patched = " / ".join(f"{a + b} ({a} UNet + {b} TE)" for a, b in sorted(counts))
        base_t, base_m = medians["core"]
        print(f"| {LOADERS[loader][0]} | {t:.3f} | {m:.0f} | {patched} of {layers} "
              f"| {t / base_t:.2f}× / {m / max(base_m, 1):.2f}× |")
    print()
    for loader, runs in results.items():
        times = ", ".join("%.3f" % r["seconds"] for r in runs)
        print(f"- {loader}: times {times} s; RSS grew by {statistics.median(r['anon_grew_mb'] for r in runs):.0f} MB "
              f"anonymous + {statistics.median(r['file_grew_mb'] for r in runs):.0f} MB file-backed (pages of the "
              f"LoRA's memory map) over a {statistics.median(r['rss_before_mb'] for r in runs):.0f} MB baseline"
              + ("" if all(r["peak_reset"] for r in runs) else " (peak-RSS reset refused: peak may include start-up)"))
    stages = results["ours"][0]["stages"]
    print("- ours, median seconds per step: " + ", ".join(
        f"{stage} {statistics.median(r['stages'][stage] for r in results['ours']):.3f}" for stage in stages))
    deferred = [r["deferred_check_s"] for r in results["ours"] if r.get("deferred_check_s") is not None]
    if deferred:
        print(f"- ours, the model tensors' NaN/Inf check, run when sampling first loads the model (not part of the "
              f"load; core reads the same pages then to patch): median {statistics.median(deferred):.3f} s")
    (ct, cm), (ot, om) = medians["core"], medians["ours"]
    met = ot <= GOAL * ct and om <= GOAL * max(cm, 1)
    print(f"\ngoal ≤ {GOAL:.2f}× core on time and peak RAM: {'met' if met else 'not met'} "
          f"(time {ot / ct:.2f}×, RAM {om / max(cm, 1):.2f}×)")


if __name__ == "__main__":
    main()
