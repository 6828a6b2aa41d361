"""`make demo`: run every workflow in workflows/ on a real ComfyUI server and collect the images.

Generates (or reuses, from .cache/) the tiny random-weight SD1.5 checkpoint, starts ComfyUI with this
pack on a free loopback port, queues each workflow, copies what it saved into demo_out/ (the schedule
plot included), prints a table and stops the server. Exits 1 if any workflow fails.

The checkpoint is random, so the images are noise-like: the demo shows the plumbing works end to end,
not what a real few-step LoRA would draw. Point COMFYUI_PATH at another ComfyUI tree to use it instead.
"""
import json
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from support.lora_files import cached_demo_loras  # noqa: E402
from support.server import ComfyServer, ServerError, execution_error, history_status  # noqa: E402
from support.tiny_checkpoint import cached_tiny_sd15  # noqa: E402

WORKFLOWS_DIR = REPO_ROOT / "workflows"
OUT_DIR = REPO_ROOT / "demo_out"


def run_workflow(server, path):
    """(status, seconds, [saved files], note) for one workflow file."""
    graph = json.loads(path.read_text())
    started = time.monotonic()
    submitted = server.post_prompt(graph)
    if not submitted.ok:
        return "rejected", time.monotonic() - started, [], submitted.messages().splitlines()[-1:]
    try:
        entry = server.wait(submitted.prompt_id, timeout=300)
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


def image_size(path):
    try:
        from PIL import Image

        with Image.open(path) as image:
            return "{}x{}".format(*image.size)
    except Exception:
        return "?"


def main():
    workflows = sorted(WORKFLOWS_DIR.glob("*.json"))
    if not workflows:
        print(f"demo: no workflows in {WORKFLOWS_DIR}", file=sys.stderr)
        return 1
    print("demo: tiny SD1.5 checkpoint ...", flush=True)
    checkpoint = cached_tiny_sd15()
    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    OUT_DIR.mkdir(parents=True)

    rows, failed = [], []
    server = ComfyServer(checkpoints=[checkpoint], loras=cached_demo_loras(checkpoint))
    print("demo: starting ComfyUI ...", flush=True)
    try:
        server.start()
        print(f"demo: server at {server.url}, log {server.log_path}", flush=True)
        for path in workflows:
            status, seconds, files, note = run_workflow(server, path)
            copied = []
            for file in files:
                target = OUT_DIR / f"{path.stem}{file.suffix}" if len(files) == 1 else OUT_DIR / file.name
                shutil.copyfile(file, target)
                copied.append(target)
            rows.append((path.name, status, seconds, copied, note))
            if status != "ok":
                failed.append(path.name)
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

    name_width = max([len("workflow")] + [len(r[0]) for r in rows])
    print()
    print(f"{'workflow':<{name_width}}  {'status':<8}  {'time':>6}  output")
    print(f"{'-' * name_width}  {'-' * 8}  {'-' * 6}  {'-' * 30}")
    for name, status, seconds, copied, note in rows:
        outputs = ", ".join(f"{p.relative_to(REPO_ROOT)} ({image_size(p)})" for p in copied)
        print(f"{name:<{name_width}}  {status:<8}  {seconds:5.1f}s  {outputs or '; '.join(note)}")
    print()
    if failed:
        print(f"demo: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"demo: {len(rows)} workflows ok, images in {OUT_DIR.relative_to(REPO_ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
