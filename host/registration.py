"""The one module that touches ComfyUI's global sampler/scheduler registries.

Adds the pack's samplers and schedulers to the lists behind KSampler, KSamplerAdvanced,
KSamplerSelect and BasicScheduler. Append-only (the host's lists are shared objects: never rebind),
idempotent, and it leaves alone a name another pack registered first. Also hooks the pack's input screening
(host/input_checks.py) into the server's POST /prompt, once.

Another pack may also register one of our names after us (ComfyUI loads custom nodes in directory-listing
order): licyk/ComfyUI-TCD-Sampler, for one, sets comfy.k_diffusion.sampling.sample_tcd to its own sampler and
appends the name tcd to SAMPLER_NAMES unconditionally. check_foreign_overrides() finds that in either order: called at
our registration and, through the server's on-prompt hook, on every prompt (so after every pack has loaded).
It logs once per name what the dropdown entry now runs and which of our nodes runs ours, and removes a second
copy of one of our names from the dropdown lists. Our nodes never go through the dropdown registry: they call
the functions of samplers/registry.py and schedulers/registry.py directly.
"""
import inspect
import logging
import pathlib

import comfy.k_diffusion.sampling as k_sampling
import comfy.samplers

from ..samplers.registry import SAMPLERS
from .input_checks import screen_prompt
from ..schedulers.registry import SCHEDULERS

log = logging.getLogger("fewstep")

_node_titles = {}  # node id -> display name, of the node classes register_all was given: what warnings call them

_told = set()  # (kind, name, foreign function) already logged: each is said once per process


# The names, functions and dropdown defaults are samplers/registry.py's and schedulers/registry.py's tables.
def register_samplers():
    for name, entry in SAMPLERS.items():
        fn = entry.function
        attr = "sample_" + name
        existing = getattr(k_sampling, attr, None)
        if existing is not None and existing is not fn:
            _tell("sampler", name, existing)  # keep theirs
            continue
        setattr(k_sampling, attr, fn)
        for names in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES):
            if name not in names:
                names.append(name)


def register_schedulers():
    for name, entry in SCHEDULERS.items():
        fn = entry.function
        existing = comfy.samplers.SCHEDULER_HANDLERS.get(name)
        if existing is not None and existing.handler is not fn:
            _tell("scheduler", name, existing.handler)  # keep theirs
            continue
        comfy.samplers.SCHEDULER_HANDLERS[name] = comfy.samplers.SchedulerHandler(fn, use_ms=True)
        if name not in comfy.samplers.SCHEDULER_NAMES:
            comfy.samplers.SCHEDULER_NAMES.append(name)


def _prompt_server():
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def register_prompt_checks(node_classes):
    """Screen the pack's nodes' widget values on every POST /prompt, before ComfyUI validates the prompt. Without a
    server (ComfyUI used as a library) there is no /prompt; the nodes still check their values in execute()."""
    server = _prompt_server()
    if server is None or any(getattr(h, "fewstep_screen", False) for h in server.on_prompt_handlers):
        return
    by_type = {cls.define_schema().node_id: cls for cls in node_classes}

    def screen(json_data):
        screen_prompt(json_data.get("prompt") if isinstance(json_data, dict) else None, by_type)
        return json_data

    screen.fewstep_screen = True
    server.add_on_prompt_handler(screen)


def register_all(node_classes=()):
    for cls in node_classes:
        schema = cls.define_schema()
        _node_titles[schema.node_id] = schema.display_name
    register_samplers()
    register_schedulers()
    register_prompt_checks(node_classes)
    register_foreign_override_check()


# ---------------------------------------------------------------- another pack registering one of our names

def check_foreign_overrides():
    """Say (once per name and function) which of our dropdown names now run another pack's function, and drop
    second copies of our names from the dropdown lists. Returns the messages said this time."""
    said = []
    for name, entry in SAMPLERS.items():
        current = getattr(k_sampling, "sample_" + name, None)
        if current is not None and current is not entry.function:
            said += _tell("sampler", name, current)
        for names in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES):
            _drop_repeats(names, name)
    for name, entry in SCHEDULERS.items():
        handler = comfy.samplers.SCHEDULER_HANDLERS.get(name)
        if handler is not None and handler.handler is not entry.function:
            said += _tell("scheduler", name, handler.handler)
        _drop_repeats(comfy.samplers.SCHEDULER_NAMES, name)
    return said


def foreign_override_message(kind, name, function):
    node_id = (SAMPLERS if kind == "sampler" else SCHEDULERS)[name].node
    return (f"fewstep: the {kind} '{name}' in KSampler's dropdowns runs {describe_function(function)}, "
            f"another custom node pack's, not fewstep's. For fewstep's, use the node "
            f"'{_node_titles.get(node_id, node_id)}' ({node_id}) with SamplerCustom or SamplerCustomAdvanced; "
            "fewstep's own nodes always run fewstep's.")


def describe_function(function):
    """'sample_tcd from ComfyUI-TCD-Sampler (/…/custom_nodes/ComfyUI-TCD-Sampler/tcd_sampling.py)'."""
    inner = inspect.unwrap(getattr(function, "func", function))  # through functools.partial and decorators
    name = getattr(inner, "__qualname__", None) or getattr(inner, "__name__", None) or repr(inner)
    code = getattr(inner, "__code__", None)
    if code is None:
        return f"{name} from {getattr(inner, '__module__', '?')}"
    path = pathlib.Path(code.co_filename)
    parts = path.parts
    folder = len(parts) - 1 - parts[::-1].index("custom_nodes") if "custom_nodes" in parts else None
    pack = parts[folder + 1] if folder is not None and folder + 2 < len(parts) else getattr(inner, "__module__", "?")
    return f"{name} from {pack} ({path})"


def _tell(kind, name, function):
    if (kind, name, function) in _told:
        return []
    _told.add((kind, name, function))
    message = foreign_override_message(kind, name, function)
    log.warning(message)
    return [message]


def _drop_repeats(names, name):
    """Keep the first `name` in a shared dropdown list, delete later copies in place (the list is never rebound)."""
    while names.count(name) > 1:
        del names[len(names) - 1 - names[::-1].index(name)]


def _check_foreign_overrides_on_prompt(json_data):
    """The server's on-prompt hook: handler(json_data) -> json_data, run on POST /prompt before validation."""
    check_foreign_overrides()
    return json_data


def register_foreign_override_check(server=None):
    """Run check_foreign_overrides on every prompt the server receives (by then every pack has loaded).
    Idempotent; without a running server (in-process hosts, tests) there is nothing to hook and it returns False."""
    server = server or _prompt_server()
    if server is None:
        return False
    if _check_foreign_overrides_on_prompt not in server.on_prompt_handlers:
        server.add_on_prompt_handler(_check_foreign_overrides_on_prompt)
    return True
