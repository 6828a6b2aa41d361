"""The trainer's files on disk: inside their root folders, atomic, never over a file this pack did not write,
nothing left behind after a crash, and the LoRA never lagging its training state for longer than one start.

- Roots. The node's LoRA goes under models/loras and its state under output/ (the CLI: both under the folder of
  --output). Every write opens its destination folder from the root down, one component at a time, checks
  after each step that the folder it holds lies inside the real root (walking '..' up to the root's inode, so
  a symbolic link anywhere on the way is judged by where it leads), and then creates, fills and renames its
  temporary file relative to that open folder (dir_fd). A link swapped into the path after the check cannot
  redirect the write: the open folder is the one that was checked. A folder outside the root is refused with a
  message naming it, and nothing is created there (not even a sub-folder).
- Temporary files are `.fewstep-part-<random>-<name>`, the prefix is this pack's own. The writer holds an
  exclusive flock on its temporary file from creation until after the rename; a kill releases the lock with
  the process. `sweep` removes only files with the prefix whose lock it can take, so the live temporary file
  of a concurrent training (another output name, another process or container on the same kernel) is left
  alone, and nothing of another program is touched. Every job sweeps its two folders when it starts; the pack
  sweeps models/loras and output/fewstep_training when ComfyUI loads it.
- Replacing. A LoRA file is replaced only if it is absent or carries every fewstep.* trainer metadata key (a
  previous run of the trainer, or the shipped digits LoRA); anything else (another LoRA, a file that cannot be
  read, a symbolic link) is refused with the file's name and the fix. A state file likewise needs the state's
  own metadata (step, config). Checked at /prompt validation and again just before each write.
- The pair. The state is written first and carries a copy of the LoRA file (tensors under `lora_file.` and the
  LoRA's metadata, which holds a hash of its tensors); the LoRA is written second. A kill between the two
  writes (or inside the second) leaves a state that is ahead of the LoRA: the next start sees the LoRA's hash
  differ from the one the state recorded (or the LoRA missing) and rewrites the LoRA from the state's copy.
  The hash, not the step, decides: a run restarted from scratch reaches the same step with other weights.

Platforms without dir_fd and flock (Windows) write through paths instead: the folder is checked before the
temporary file is created and again just before the rename, and a sweep removes a temporary file only if
the platform lets it delete it (Windows refuses while the writer has it open).
"""
import dataclasses
import errno
import hashlib
import json
import logging
import os
import pathlib
import re
import secrets
import struct
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import torch
from safetensors.torch import save as safetensors_bytes

from ..distill.io import load_safetensors
from ..loras.presets import TRAINER_METADATA_KEYS

log = logging.getLogger("fewstep")

TEMP_PREFIX = ".fewstep-part-"
LORA_HASH_KEY = "fewstep.tensors_sha256"   # in the LoRA's metadata: sha256 of its tensors
STATE_LORA_PREFIX = "lora_file."            # the state's copy of the LoRA's tensors
STATE_LORA_METADATA = "lora_file_metadata"  # ... and of its metadata (JSON), hash included
STATE_KEYS = ("step", "config")             # metadata every training state has
_DIR_FD = fcntl is not None and all(f in os.supports_dir_fd for f in (os.open, os.mkdir, os.rename, os.unlink,
                                                                       os.stat)) and os.listdir in os.supports_fd
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_MAX_HEADER = 100_000_000

# Tests only: called as _test_hook(point, file_name) at "partial" (half the bytes written), "written" (all written
# and flushed, before the rename), "replaced" (after it) and "ready" (a job's start: swept, checked, repaired).
_test_hook = None


def _at(point, name):
    if _test_hook is not None:
        _test_hook(point, name)


def tensors_sha256(tensors) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# -- folders --------------------------------------------------------------------------------------------------

def _identity(st):
    return st.st_dev, st.st_ino


def _outside(folder, root):
    return ValueError(f"Refusing to write into {folder}: it leads to {os.path.realpath(folder)}, outside {root} "
                      "(a symbolic link?). Remove the link, or pick another output name.")


def _inside(fd, root_id) -> bool:
    """Whether the open folder `fd` is the root or below it: walk '..' up to the root, or to '/'."""
    current = os.dup(fd)
    try:
        while True:
            here = _identity(os.fstat(current))
            if here == root_id:
                return True
            parent = os.open("..", os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC, dir_fd=current)
            os.close(current)
            current = parent
            if _identity(os.fstat(current)) == here:  # '/' is its own parent
                return False
    finally:
        os.close(current)


def _open_folder(root, folder, create):
    """An fd of `folder` (given under `root`), checked inside the real root after every component; None if it does
    not exist and `create` is false. Folders are created only inside the root."""
    root, folder = pathlib.Path(root), pathlib.Path(folder)
    try:
        parts = folder.relative_to(root).parts
    except ValueError:
        raise _outside(folder, root) from None
    if not root.is_dir():
        if not create:
            return None
        root.mkdir(parents=True, exist_ok=True)  # the root itself is the user's choice (the CLI's --output folder)
    fd = os.open(root, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    root_id = _identity(os.fstat(fd))
    try:
        for part in parts:
            try:
                child = os.open(part, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    return None
                try:
                    os.mkdir(part, 0o777, dir_fd=fd)  # mkdir never follows a link: this creates inside `fd`
                except FileExistsError:
                    pass
                child = os.open(part, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = child
            if not _inside(fd, root_id):
                raise _outside(folder, root)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _check_inside_by_path(root, folder):
    real, real_root = pathlib.Path(os.path.realpath(folder)), pathlib.Path(os.path.realpath(root))
    if real != real_root and real_root not in real.parents:
        raise _outside(folder, root)


# -- reading what is there ------------------------------------------------------------------------------------

def _header_metadata(fd) -> dict:
    """The safetensors metadata of an open file, from its header alone."""
    with os.fdopen(os.dup(fd), "rb") as handle:
        size = handle.read(8)
        if len(size) != 8 or struct.unpack("<Q", size)[0] > _MAX_HEADER:
            raise ValueError("not a safetensors file")
        header = json.loads(handle.read(struct.unpack("<Q", size)[0]))
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file")
    return dict(header.get("__metadata__") or {})


def _existing(name, folder_fd=None):
    """(exists, metadata or None, why it cannot be read). `name` relative to folder_fd, or a path."""
    try:
        fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC,
                     **({"dir_fd": folder_fd} if folder_fd is not None else {}))
    except FileNotFoundError:
        return False, None, None
    except OSError as error:
        return True, None, "it is a symbolic link" if _O_NOFOLLOW and error.errno == errno.ELOOP else \
            f"cannot be read: {error.strerror or error}"
    try:
        return True, _header_metadata(fd), None
    except (OSError, ValueError, UnicodeDecodeError) as error:
        return True, None, f"cannot be read as safetensors: {error}"
    finally:
        os.close(fd)


def _foreign(required_keys, what):
    """A check for write_atomic: the message refusing to replace an existing file that lacks `required_keys` in its
    metadata (or could not be read: `why`), else None."""
    def check(path, exists, meta, why):
        if not exists:
            return None
        if why is None and not all(key in meta for key in required_keys):
            why = what
        if why is None:
            return None
        return (f"{path} already exists and was not written by the fewstep trainer ({why}); refusing to replace it. "
                "Pick another output_name, or move that file away.")
    return check


_foreign_lora = _foreign(TRAINER_METADATA_KEYS, "it has no fewstep trainer metadata")
_foreign_state = _foreign(STATE_KEYS, "it is not a fewstep training state")


def refuse_foreign_lora(path) -> pathlib.Path:
    """Raise ValueError (naming the file and the fix) if the LoRA at `path` exists and is not the trainer's."""
    problem = _foreign_lora(pathlib.Path(path), *_existing(str(path)))
    if problem:
        raise ValueError(problem)
    return pathlib.Path(path)


# -- writing --------------------------------------------------------------------------------------------------

def _temp_name(name):
    return (TEMP_PREFIX + secrets.token_hex(4) + "-" + name)[:255]


def _write_all(write, chunk):
    while len(chunk):
        chunk = chunk[write(chunk):]


def _write_halves(write, data, name):
    view = memoryview(data)
    _write_all(write, view[:len(view) // 2])
    _at("partial", name)
    _write_all(write, view[len(view) // 2:])


def write_atomic(root, path, data: bytes, foreign=None) -> pathlib.Path:
    """Write `data` to `path` (below `root`) through a locked temporary file in the checked folder: flushed, then
    renamed over `path`. `foreign(path, exists, metadata, why)` returns why an existing file must stay, or None."""
    path = pathlib.Path(path)
    if not _DIR_FD:
        return _write_by_path(root, path, data, foreign)
    folder = _open_folder(root, path.parent, create=True)
    try:
        if foreign is not None:
            problem = foreign(path, *_existing(path.name, folder))
            if problem:
                raise ValueError(problem)
        temp, fd = _create_locked(folder, path.name)
        try:
            try:
                _write_halves(lambda chunk: os.write(fd, chunk), data, path.name)
                os.fsync(fd)
                _at("written", path.name)
                os.replace(temp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
            except BaseException:
                try:
                    os.unlink(temp, dir_fd=folder)
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)  # the lock goes after the rename: a sweep never finds our live temporary file unlocked
        os.fsync(folder)  # the rename itself reaches the disk
        _at("replaced", path.name)
    finally:
        os.close(folder)
    return path


def _create_locked(folder, name):
    while True:
        temp = _temp_name(name)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o666, dir_fd=folder)  # umask applies
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if _identity(os.stat(temp, dir_fd=folder, follow_symlinks=False)) == _identity(os.fstat(fd)):
                return temp, fd
        except FileNotFoundError:
            pass
        os.close(fd)  # a sweep removed it between creation and lock: take another name


def _write_by_path(root, path, data, foreign):
    _check_inside_by_path(root, path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_inside_by_path(root, path.parent)
    if foreign is not None:
        problem = foreign(path, *_existing(str(path)))
        if problem:
            raise ValueError(problem)
    temp = path.parent / _temp_name(path.name)
    try:
        with open(temp, "xb") as handle:
            _write_halves(handle.write, data, path.name)
            handle.flush()
            os.fsync(handle.fileno())
        _at("written", path.name)
        _check_inside_by_path(root, path.parent)  # again, just before the rename
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    _at("replaced", path.name)
    return path


# -- sweeping -------------------------------------------------------------------------------------------------

# What fewstep 0.x before the locked temporary files left (tempfile.mkstemp(prefix=".tmp-" + name + "-",
# suffix=".part") in distill/io.py): no lock, so a match is swept as the remains of a killed save.
_LEGACY_TEMP = re.compile(r"^\.tmp-.+\.safetensors-[a-z0-9_]{8}\.part$")


def is_temp_name(name) -> bool:
    return name.startswith(TEMP_PREFIX) or bool(_LEGACY_TEMP.match(name))


def _sweep_fd(folder) -> int:
    removed = 0
    for name in os.listdir(folder):
        if not is_temp_name(name):
            continue
        try:
            fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=folder)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: a live writer's file
            if _identity(os.stat(name, dir_fd=folder, follow_symlinks=False)) == _identity(os.fstat(fd)):
                os.unlink(name, dir_fd=folder)
                removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def sweep(root, folder) -> int:
    """Remove the temporary files a killed writer left in `folder` (below `root`); live ones stay. The count."""
    folder = pathlib.Path(folder)
    if not _DIR_FD:
        removed = 0
        for entry in (folder.iterdir() if folder.is_dir() else ()):
            if is_temp_name(entry.name):
                try:
                    entry.unlink()  # Windows refuses while the writer has it open
                    removed += 1
                except OSError:
                    pass
        return removed
    fd = _open_folder(root, folder, create=False)
    if fd is None:
        return 0
    try:
        removed = _sweep_fd(fd)
    finally:
        os.close(fd)
    if removed:
        log.info("fewstep: removed %d temporary file(s) of an interrupted save in %s", removed, folder)
    return removed


def sweep_tree(root) -> int:
    """`sweep` every folder below `root` (links not followed)."""
    removed = 0
    for here, _, names in os.walk(root):
        if any(is_temp_name(n) for n in names):
            removed += sweep(root, here)
    return removed


def sweep_at_startup():
    """When ComfyUI loads the pack: what killed trainings left in models/loras and output/fewstep_training."""
    try:
        import folder_paths

        roots = list(folder_paths.get_folder_paths("loras"))
        roots.append(os.path.join(folder_paths.get_output_directory(), "fewstep_training"))
        for root in roots:
            if os.path.isdir(root):
                sweep_tree(os.path.realpath(root))
    except Exception as error:  # a sweep must never keep the pack from loading
        log.warning("fewstep: could not sweep old temporary files (%s)", error)


# -- the job's two files --------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainingFiles:
    lora_path: pathlib.Path
    state_path: pathlib.Path
    lora_root: Optional[pathlib.Path] = None   # default: the LoRA's own folder
    state_root: Optional[pathlib.Path] = None  # default: the state's own folder

    def __post_init__(self):
        self.lora_path, self.state_path = pathlib.Path(self.lora_path), pathlib.Path(self.state_path)
        self.lora_root = pathlib.Path(self.lora_root or self.lora_path.parent)
        self.state_root = pathlib.Path(self.state_root or self.state_path.parent)

    def prepare(self):
        """A job's start: refuse folders outside the roots and files that are not ours, sweep what killed saves
        left, and rewrite a LoRA that lags its state (a kill between the two writes) from the state's copy."""
        for root, path, foreign in ((self.state_root, self.state_path, _foreign_state),
                                    (self.lora_root, self.lora_path, _foreign_lora)):
            sweep(root, path.parent)
            problem = foreign(path, *self._existing(root, path))
            if problem:
                raise ValueError(problem)
        self._repair()
        _at("ready", self.lora_path.name)

    def _existing(self, root, path):
        if not _DIR_FD:
            return _existing(str(path))
        folder = _open_folder(root, path.parent, create=False)
        if folder is None:
            return False, None, None
        try:
            return _existing(path.name, folder)
        finally:
            os.close(folder)

    def _repair(self):
        _, state_meta, _ = self._existing(self.state_root, self.state_path)
        if not state_meta or STATE_LORA_METADATA not in state_meta:
            return  # no state, or one from before the pair was recorded
        recorded = json.loads(state_meta[STATE_LORA_METADATA])
        _, lora_meta, _ = self._existing(self.lora_root, self.lora_path)
        if lora_meta is not None and lora_meta.get(LORA_HASH_KEY) == recorded.get(LORA_HASH_KEY):
            return
        tensors, _ = load_safetensors(self.state_path)
        lora = {k[len(STATE_LORA_PREFIX):]: v for k, v in tensors.items() if k.startswith(STATE_LORA_PREFIX)}
        write_atomic(self.lora_root, self.lora_path, safetensors_bytes(lora, recorded), _foreign_lora)
        log.warning("fewstep: %s lagged its training state (step %s); rewrote it from the state", self.lora_path.name,
                    state_meta.get("step"))

    def save(self, state_tensors, state_meta, lora_tensors, lora_meta):
        """The state (with a copy of the LoRA file), then the LoRA; see the module's docstring for why."""
        lora_meta = {**lora_meta, LORA_HASH_KEY: tensors_sha256(lora_tensors)}
        copy = {STATE_LORA_PREFIX + k: v.clone() for k, v in lora_tensors.items()}  # on the CPU they share the params'
        state_tensors = {**state_tensors, **copy}                                   # memory, which safetensors refuses
        state_meta = {**state_meta, STATE_LORA_METADATA: json.dumps(lora_meta, sort_keys=True)}
        write_atomic(self.state_root, self.state_path, safetensors_bytes(state_tensors, state_meta), _foreign_state)
        write_atomic(self.lora_root, self.lora_path, safetensors_bytes(lora_tensors, lora_meta), _foreign_lora)
