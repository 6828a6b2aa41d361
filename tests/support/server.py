"""Run a real ComfyUI server with this pack, as a subprocess on a free loopback port.

Used by the end-to-end tests (tests/e2e) and by scripts/demo.py:

    with ComfyServer(checkpoints=[ckpt]) as server:
        submitted = server.post_prompt(graph)        # Submission: .prompt_id, or .status 400 + .body
        entry = server.wait(submitted.prompt_id)     # the /history entry once execution ended
        server.output_files(entry)                   # paths of the images it saved

The server gets a throw-away --base-directory (models/checkpoints with the given files linked in,
custom_nodes/fewstep linking to this repository, input/, output/, user/), logs stdout+stderr to
a file (``log_path``, ``log_tail()``), and is stopped by terminate, then kill, whatever happens.
The ComfyUI tree is .comfyui/ in the repository, or $COMFYUI_PATH.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "fewstep"


def comfyui_path() -> Path:
    """The ComfyUI tree to run: $COMFYUI_PATH, else the pinned copy in .comfyui/."""
    path = Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".comfyui").resolve()
    if not (path / "main.py").is_file() or not (path / "comfy" / "samplers.py").is_file():
        raise FileNotFoundError(f"no ComfyUI tree at {path} (run scripts/setup.sh, or set COMFYUI_PATH)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerError(RuntimeError):
    """The server did not start, died, or did not finish a prompt in time; the message carries the log tail."""


@dataclass
class Submission:
    """What POST /prompt answered: a prompt_id when queued, else the error JSON (HTTP 400)."""

    status: int
    body: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == 200 and "prompt_id" in self.body

    @property
    def prompt_id(self) -> str | None:
        return self.body.get("prompt_id") if self.ok else None

    def messages(self) -> str:
        """Every message and detail of the rejection, flattened into one string (for assertions)."""
        parts = []
        error = self.body.get("error")
        if isinstance(error, dict):
            parts += [str(error.get("message", "")), str(error.get("details", ""))]
        elif error:
            parts.append(str(error))
        for node_id, node in (self.body.get("node_errors") or {}).items():
            for err in node.get("errors", []):
                parts.append(f"[{node.get('class_type')} #{node_id}] {err.get('type')}: {err.get('message')}: {err.get('details')}")
        return "\n".join(p for p in parts if p)


def history_status(entry: dict) -> str:
    """'success' or 'error' (ComfyUI's status_str) of a /history entry."""
    return (entry.get("status") or {}).get("status_str", "")


def execution_error(entry: dict) -> dict | None:
    """The execution_error message of a failed /history entry (node_type, exception_message, ...), if any."""
    for name, data in (entry.get("status") or {}).get("messages", []):
        if name == "execution_error":
            return data
    return None


class ComfyServer:
    def __init__(self, checkpoints=(), base_dir=None, port=None, python=None, comfyui=None,
                 startup_timeout=120.0, extra_args=(), loras=(), inputs=(), lora_copies=(), model_links=None):
        self.checkpoints = [Path(c) for c in checkpoints]
        # {"diffusion_models/<name>": file}: a file linked under models/ by another name (e.g. a tiny SDXL UNet under
        # the published 1-step UNet's name, which a shipped workflow loads)
        self.model_links = {str(k): Path(v) for k, v in (model_links or {}).items()}
        self.loras = [Path(p) for p in loras]
        self.inputs = [Path(p) for p in inputs]  # files linked into input/ (LoadImage's folder)
        # copied, not linked: a LoRA the training node may write under the same name (it refuses to follow a link)
        self.lora_copies = [Path(p) for p in lora_copies]
        self.comfyui = Path(comfyui) if comfyui else comfyui_path()
        self.python = python or sys.executable
        self.port = port
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir) if base_dir else None
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._log_file = None
        self.client_id = uuid.uuid4().hex

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    def _prepare_base_dir(self):
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="fewstep-comfy-"))
        for sub in ("models/checkpoints", "models/loras", "custom_nodes", "input", "output", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        pack = self.base_dir / "custom_nodes" / PACK_NAME
        if not pack.exists():
            pack.symlink_to(REPO_ROOT, target_is_directory=True)
        links = {f"models/checkpoints/{file.name}": file for file in self.checkpoints}
        links.update({f"models/loras/{file.name}": file for file in self.loras})
        links.update({f"input/{file.name}": file for file in self.inputs})
        links.update({f"models/{relative}": file for relative, file in self.model_links.items()})
        for relative, file in links.items():
            if not file.is_file():
                raise FileNotFoundError(f"{file} (for {relative}) does not exist")
            link = self.base_dir / relative
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(file.resolve())
        for file in self.lora_copies:
            shutil.copyfile(file, self.base_dir / "models" / "loras" / file.name)

    def start(self) -> "ComfyServer":
        if self.process is not None:
            raise ServerError("server already started")
        self._prepare_base_dir()
        self.port = self.port or free_port()
        self.log_path = self.base_dir / "comfyui.log"
        self._log_file = open(self.log_path, "ab")
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base_dir), "--disable-api-nodes",
               "--preview-method", "none",
               # ComfyUI's default database lives inside its own tree; keep that tree read-only.
               "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}", *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(cmd, cwd=self.comfyui, stdout=self._log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env)
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self):
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.process.returncode} during start-up.\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        raise ServerError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s.\n{self.log_tail()}")

    def stop(self):
        """Terminate, then kill after 10 s. Safe to call twice; removes the base dir it created."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass

    def cleanup(self):
        """Stop, then delete the base dir if this object made it (the log goes with it)."""
        self.stop()
        if self._own_base and self.base_dir is not None and self.base_dir.exists():
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        """Stop; on an exception print the log tail and keep the base dir (and log) for a look, else delete it."""
        self.stop()
        if exc_type is not None:
            if self.log_path is not None:
                print(f"--- ComfyUI log, last lines ({self.log_path}) ---\n{self.log_tail()}", file=sys.stderr)
        else:
            self.cleanup()
        return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        if self._log_file is not None:
            self._log_file.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- HTTP --------------------------------------------------------------------------------
    def _request(self, method, path, payload=None, timeout=30.0):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                return err.code, json.loads(body)
            except ValueError:
                return err.code, {"error": body.decode(errors="replace")}

    def get_bytes(self, path, timeout=30.0) -> tuple[int, str, bytes]:
        """(HTTP status, content type, body) of a GET, whatever the status: static files (help pages, images)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get("Content-Type", ""), err.read()

    def get_text(self, path, timeout=30.0) -> tuple[int, str]:
        """(HTTP status, body as text) of a GET, whatever the status: static files such as the help pages."""
        status, _, body = self.get_bytes(path, timeout)
        return status, body.decode(errors="replace")

    def get_json(self, path, timeout=30.0):
        status, body = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise ServerError(f"GET {path} answered HTTP {status}: {body}")
        return body

    def object_info(self) -> dict:
        return self.get_json("/object_info", timeout=60)

    def post_prompt(self, graph: dict) -> Submission:
        status, body = self._request("POST", "/prompt", {"prompt": graph, "client_id": self.client_id})
        return Submission(status, body if isinstance(body, dict) else {"error": body})

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """Poll /history until the prompt has ended (success or error); returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerError(f"ComfyUI died while running prompt {prompt_id}.\n{self.log_tail()}")
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and (entry.get("status") or {}).get("completed") is not None:
                return entry
            time.sleep(0.1)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s.\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 120.0) -> dict:
        """post_prompt + wait; raises ServerError with the rejection if /prompt refused the graph."""
        submitted = self.post_prompt(graph)
        if not submitted.ok:
            raise ServerError(f"/prompt refused the graph (HTTP {submitted.status}):\n{submitted.messages()}")
        return self.wait(submitted.prompt_id, timeout)

    def output_files(self, entry: dict) -> list[Path]:
        """Paths of the files the prompt saved to the output dir (SaveImage's 'images' entries)."""
        paths = []
        for node_output in (entry.get("outputs") or {}).values():
            for image in node_output.get("images", []):
                if image.get("type") == "output":
                    paths.append(self.output_dir / image.get("subfolder", "") / image["filename"])
        return paths
