"""`python -m fewstep.distill` that SIGKILLs itself at a chosen point of its saves (tests/e2e/test_train_kill.py).

    python kill_during_save.py REPORT POINT FILE N -- <the CLI's arguments>

Kills this process with SIGKILL the N-th time the writer (host/output_files.py) reaches POINT ("partial": half
the bytes written, "written": all written and flushed, "replaced": renamed into place) for the file named FILE
in a training save; "start-partial" etc. count the writes of the job's start instead (the repair of a lagging
LoRA). N = 0 never kills. At every job start ("ready": after the start's sweep, checks and repair) it appends to REPORT
one JSON line: every file under the output folder, the LoRA's steps_trained and tensor hash, the state's step
and the hash it recorded. The kill is the process's own, so it lands exactly there, with no timing involved.
"""
import json
import os
import pathlib
import signal
import sys


def snapshot(output):
    from safetensors import safe_open

    from fewstep.host import output_files

    def meta(path):
        if not path.is_file():
            return {}
        with safe_open(str(path), "pt") as handle:
            return handle.metadata() or {}

    state = output.with_name(output.stem + ".state.safetensors")
    lora_meta, state_meta = meta(output), meta(state)
    recorded = json.loads(state_meta.get(output_files.STATE_LORA_METADATA, "{}"))
    return {"files": sorted(str(p.relative_to(output.parent)) for p in output.parent.rglob("*") if p.is_file()),
            "lora_step": lora_meta.get("fewstep.steps_trained"), "state_step": state_meta.get("step"),
            "lora_hash": lora_meta.get(output_files.LORA_HASH_KEY),
            "recorded_hash": recorded.get(output_files.LORA_HASH_KEY)}


def main():
    report, point, file_name, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    args = sys.argv[sys.argv.index("--") + 1:]
    output = pathlib.Path(args[args.index("--output") + 1]).resolve()
    seen = {"n": 0, "ready": False}

    from fewstep.host import distill_cli, output_files

    def hook(where, name):
        if where == "ready":
            seen["ready"] = True
            with open(report, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(snapshot(output)) + "\n")
        if (where if seen["ready"] else "start-" + where) == point and name == file_name:
            seen["n"] += 1
            if seen["n"] == count:
                os.kill(os.getpid(), signal.SIGKILL)

    output_files._test_hook = hook
    sys.exit(distill_cli.main(args))


if __name__ == "__main__":
    main()
