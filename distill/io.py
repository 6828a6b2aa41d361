"""Atomic safetensors files: readers never see a half-written LoRA or training state."""
import os
import pathlib
import tempfile

from safetensors import safe_open
from safetensors.torch import save_file


def save_safetensors_atomic(tensors, path, metadata=None) -> pathlib.Path:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + path.name + "-", suffix=".part", dir=str(path.parent))
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def load_safetensors(path):
    """(tensors, metadata) of a safetensors file."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
