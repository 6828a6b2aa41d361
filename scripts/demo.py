"""`make demo`: few-step sampling and PCM distillation of the embedded digits model inside a real ComfyUI.

1. Builds (or reuses, from .cache/) the digits checkpoint (tests/support/digits_model.py: an SD1.5-class model
   that draws "a handwritten digit N" at 64×64 px, made from the weights in assets/digits/).
2. Starts ComfyUI with this pack on a free loopback port.
3. Distils the model with the pack's PCM node by running workflows/api/pcm_distill_train.json (a few CPU minutes;
   reused from .cache/demo/ while the checkpoint and the workflow are unchanged), and compares the LoRA it
   wrote with the shipped copy in assets/digits/.
4. Runs every workflow in workflows/api/ that runs on the digits model (not the SDXL 1-step UNet one) and copies
   what each saved to demo_out/.
5. Samples the rows of tests/support/digits_rows.py (the teacher at 25 steps and at 1/2/4 DDIM steps; the PCM
   LoRA at 1/2/4 steps with `pcm`, and with `tcd` and `lcm`), ten prompts × PER_DIGIT images each, scores them
   (classifier accuracy, Fréchet distance to held-out digits) and writes demo_out/contact_sheet.png and
   demo_out/digits_table.json.
Exits 1 if any workflow fails. Point COMFYUI_PATH at another ComfyUI tree to use it instead.
"""
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from support import digits_model  # noqa: E402
from support.digits_rows import ROWS, Scorer, contact_sheet, load_images, row_graph  # noqa: E402
from support.lora_files import write_zero_lora  # noqa: E402
from support.server import ComfyServer, ServerError, execution_error, history_status  # noqa: E402
from support.workflow_catalog import WORKFLOWS as CATALOG  # noqa: E402

WORKFLOWS_DIR = REPO_ROOT / "workflows" / "api"  # the API twins of the templates in workflows/
OUT_DIR = REPO_ROOT / "demo_out"
CACHE_DIR = REPO_ROOT / ".cache" / "demo"
TRAINING_WORKFLOW = "pcm_distill_train"
PER_DIGIT = 5
# The Hyper-SD LoRA workflow shows how the loader reads a published file's name; no Hyper-SD LoRA exists for the
# digits model, so the demo gives it a LoRA with that name whose every delta is zero (the image is the teacher at
# Hyper-SD's recommended settings). On a real SD1.5 checkpoint, put the real file in models/loras.
HYPER_SD_STAND_IN = "Hyper-SD15-4steps-lora.safetensors"


def run_graph(server, graph, timeout=900):
    """(status, seconds, [saved files], note) for one API graph."""
    started = time.monotonic()
    submitted = server.post_prompt(graph)
    if not submitted.ok:
        return "rejected", time.monotonic() - started, [], submitted.messages().splitlines()[-1:]
    try:
        entry = server.wait(submitted.prompt_id, timeout=timeout)
    except ServerError as err:
        return "timeout", time.monotonic() - started, [], [str(err).splitlines()[0]]
    elapsed = time.monotonic() - started
    if history_status(entry) != "success":
        error = execution_error(entry) or {}
        return "error", elapsed, [], [f"{error.get('node_type')}: {error.get('exception_message', '').strip()}"]
    files = [f for f in server.output_files(entry) if f.is_file()]
    if not files:
        return "no image", elapsed, [], []
    return "ok", elapsed, files, []


def training_key(checkpoint, graph):
    digest = hashlib.sha256(digits_model._read_stamp(checkpoint).encode() + json.dumps(graph, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def distilled_lora(server, checkpoint):
    """Run the training workflow (or reuse its cached LoRA); returns (LoRA file name, seconds, cached?, status, note)."""
    graph = json.loads((WORKFLOWS_DIR / f"{TRAINING_WORKFLOW}.json").read_text())
    node = next(n for n in graph.values() if n["class_type"] == "FewStepPCMDistill")
    name = node["inputs"]["output_name"] + ".safetensors"
    target = server.base_dir / "models" / "loras" / name
    cached = CACHE_DIR / name
    key_file = CACHE_DIR / (name + ".key")
    key = training_key(checkpoint, graph)
    if cached.is_file() and key_file.is_file() and key_file.read_text() == key:
        if target.is_symlink() or target.exists():
            target.unlink()
        shutil.copyfile(cached, target)
        return name, 0.0, True, "ok", []
    if target.is_symlink():  # the shipped copy: train a fresh one next to nothing
        target.unlink()
    status, seconds, files, note = run_graph(server, graph)
    if status == "ok":
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, cached)
        key_file.write_text(key)
        for file in files:
            shutil.copyfile(file, OUT_DIR / f"{TRAINING_WORKFLOW}{file.suffix}")
    return name, seconds, False, status, note


def compare_with_shipped(lora_file):
    from safetensors.torch import load_file

    shipped = digits_model.ASSETS / lora_file.name
    if not shipped.is_file():
        return "no shipped copy"
    ours, theirs = load_file(str(lora_file)), load_file(str(shipped))
    if ours.keys() != theirs.keys():
        return "different keys from the shipped copy"
    diff = max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours)
    return "identical to the shipped copy" if diff == 0 else f"max |difference| to the shipped copy {diff:.2e}"


def image_size(path):
    try:
        from PIL import Image

        with Image.open(path) as image:
            return "{}x{}".format(*image.size)
    except Exception:
        return "?"


def main():
    started = time.monotonic()
    print("demo: digits checkpoint ...", flush=True)
    checkpoint = digits_model.cached_digits_sd15()
    inputs = [digits_model.write_training_images(REPO_ROOT / ".cache" / digits_model.TRAINING_IMAGES)]
    stand_in = write_zero_lora(REPO_ROOT / ".cache" / "demo" / "stand_in" / HYPER_SD_STAND_IN, checkpoint)
    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    OUT_DIR.mkdir(parents=True)

    workflow_rows, failed, table, sheet_rows = [], [], [], []
    server = ComfyServer(checkpoints=[checkpoint], loras=[stand_in], inputs=inputs)
    print("demo: starting ComfyUI ...", flush=True)
    try:
        server.start()
        print(f"demo: server at {server.url}, log {server.log_path}", flush=True)
        print("demo: distilling the digits model with the PCM node (workflows/api/pcm_distill_train.json) ...", flush=True)
        lora, seconds, cached, status, note = distilled_lora(server, checkpoint)
        lora_path = server.base_dir / "models" / "loras" / lora
        workflow_rows.append((f"{TRAINING_WORKFLOW}.json", status, seconds,
                              [], note or ["cached" if cached else compare_with_shipped(lora_path)]))
        if status != "ok":
            failed.append(TRAINING_WORKFLOW)
        for path in sorted(WORKFLOWS_DIR.glob("*.json")):
            if path.stem == TRAINING_WORKFLOW:
                continue
            if not CATALOG[path.stem].runs_on_digits:  # its real (SDXL) files do not ship; the digits model is SD1.5
                print(f"demo: {path.name} skipped: it needs {', '.join(m.name for m in CATALOG[path.stem].models)}",
                      flush=True)
                continue
            status, seconds, files, note = run_graph(server, json.loads(path.read_text()), timeout=300)
            copied = []
            for file in files:
                target = OUT_DIR / f"{path.stem}{file.suffix}" if len(files) == 1 else OUT_DIR / file.name
                shutil.copyfile(file, target)
                copied.append(target)
            workflow_rows.append((path.name, status, seconds, copied, note))
            if status != "ok":
                failed.append(path.name)
        if TRAINING_WORKFLOW not in failed:
            print(f"demo: sampling {len(ROWS)} rows × 10 digits × {PER_DIGIT} ...", flush=True)
            scorer = Scorer()
            for index, row in enumerate(ROWS):
                graph = row_graph(row, checkpoint.name, lora, per_digit=PER_DIGIT, seed=1000,
                                  prefix=f"fewstep_digits_row{index}")
                status, seconds, files, note = run_graph(server, graph)
                if status != "ok":
                    failed.append(row.label)
                    print(f"demo: row {row.label!r} {status}: {note}", file=sys.stderr)
                    continue
                images = load_images(files)
                scores = scorer.score(images, PER_DIGIT)
                table.append({"row": row.label, **scores, "seconds": round(seconds, 1), "sampler": row.sampler,
                              "scheduler": row.scheduler, "steps": row.steps, "cfg": row.cfg})
                sheet_rows.append((row.label, images, PER_DIGIT))
            floor = scorer.floor(PER_DIGIT)
            table.append({"row": "real digits (floor)", **floor, "seconds": 0.0})
    except ServerError as err:
        print(f"demo: {err}", file=sys.stderr)
        failed.append("server")
    finally:
        server.stop()
        if failed and server.log_path is not None:
            log_copy = OUT_DIR / "comfyui.log"
            shutil.copyfile(server.log_path, log_copy)
            print(f"demo: server log copied to {log_copy.relative_to(REPO_ROOT)}", file=sys.stderr)
        server.cleanup()

    name_width = max([len("workflow")] + [len(r[0]) for r in workflow_rows])
    print()
    print(f"{'workflow':<{name_width}}  {'status':<8}  {'time':>6}  output")
    print(f"{'-' * name_width}  {'-' * 8}  {'-' * 6}  {'-' * 30}")
    for name, status, seconds, copied, note in workflow_rows:
        outputs = ", ".join(f"{p.relative_to(REPO_ROOT)} ({image_size(p)})" for p in copied)
        print(f"{name:<{name_width}}  {status:<8}  {seconds:5.1f}s  {outputs or '; '.join(note)}")
    if sheet_rows:
        sheet = contact_sheet(sheet_rows, OUT_DIR / "contact_sheet.png")
        (OUT_DIR / "digits_table.json").write_text(json.dumps(table, indent=1) + "\n")
        width = max(len(r["row"]) for r in table)
        print()
        print(f"digits model, 10 prompts × {PER_DIGIT} images per row (classifier accuracy; Fréchet distance of "
              "classifier features to the 297 held-out digits, lower is better)")
        print(f"{'row':<{width}}  {'accuracy':>8}  {'FD':>7}  {'time':>6}")
        print(f"{'-' * width}  {'-' * 8}  {'-' * 7}  {'-' * 6}")
        for r in table:
            print(f"{r['row']:<{width}}  {r['accuracy']:8.3f}  {r['fd']:7.2f}  {r['seconds']:5.1f}s")
        print(f"\ndemo: contact sheet {sheet.relative_to(REPO_ROOT)}")
    print()
    if failed:
        print(f"demo: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"demo: {len(workflow_rows)} workflows ok, images in {OUT_DIR.relative_to(REPO_ROOT)}/ "
          f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
