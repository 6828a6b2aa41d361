"""Recommended sampling settings for fast LoRAs: the table in presets.json and its lookups.

No ComfyUI import; torch comes in only with the pack's vocabularies read here (the dropdown names of
samplers/registry.py and schedulers/registry.py, the phases ≤ K rule of schedulers/pcm.py). `preset_for`
weighs the evidence in this order: metadata written by this pack's trainer, then the file name (or, for a generic
name such as pytorch_lora_weights, the folders it sits in under models/loras), then the key structure (which only
tells the base architecture), then nothing at all. Without a family it falls back to
conservative settings and says so. The table is read and checked once, on first use.
"""
import functools
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path, PureWindowsPath

from ..samplers.registry import SAMPLERS
from .architectures import PRESET_ARCHS, TRAINABLE_ARCHS, arch_label, same_family
from ..schedulers.pcm import phases_problem
from ..schedulers.registry import SCHEDULERS

TABLE_PATH = Path(__file__).with_name("presets.json")

# Metadata keys of files written by this pack's trainer (safetensors metadata values are strings).
TRAINER_METADATA_PREFIX = "fewstep."
META_METHOD = TRAINER_METADATA_PREFIX + "method"            # "pcm" ("lcm": the one-phase baseline), "tcd", "tscd"
META_PHASES = TRAINER_METADATA_PREFIX + "phases"            # PCM phases M (TSCD: the segments of the stage reached)
# TSCD only, so not in TRAINER_METADATA_KEYS (every file the trainer writes carries those: host/output_files.py
# refuses to replace a LoRA that lacks one of them)
META_STAGES = TRAINER_METADATA_PREFIX + "stages"            # TSCD: the segments of every stage, "8,4,2,1"
META_STAGE = TRAINER_METADATA_PREFIX + "stage"              # TSCD: the stage that made the weights, 1-based
META_DDIM_TIMESTEPS = TRAINER_METADATA_PREFIX + "ddim_timesteps"  # PCM DDIM grid size K
META_CFG_MODE = TRAINER_METADATA_PREFIX + "cfg_mode"        # "small" (CFG-augmented teacher) or "normal"
META_W_MIN = TRAINER_METADATA_PREFIX + "w_min"              # teacher guidance range (ComfyUI CFG = 1 + w)
META_W_MAX = TRAINER_METADATA_PREFIX + "w_max"
META_BASE_ARCH = TRAINER_METADATA_PREFIX + "base_arch"
META_STEPS_TRAINED = TRAINER_METADATA_PREFIX + "steps_trained"  # optimiser steps, not sampling steps
META_VERSION = TRAINER_METADATA_PREFIX + "version"
TRAINER_METADATA_KEYS = (
    META_METHOD, META_PHASES, META_DDIM_TIMESTEPS, META_CFG_MODE, META_W_MIN, META_W_MAX,
    META_BASE_ARCH, META_STEPS_TRAINED, META_VERSION,
)

ARCHES = PRESET_ARCHS  # the architectures the table covers, of loras/architectures.py's vocabulary
FAMILIES = ("pcm", "hyper_sd", "tcd", "lcm", "lightning", "dmd2", "fewstep", "unknown")

# Names the table may use: the pack's own dropdown entries (the registries host/registration.py registers) and
# ComfyUI core ones.
PACK_SAMPLERS = tuple(SAMPLERS)
PACK_SCHEDULERS = tuple(SCHEDULERS)
CORE_SAMPLERS = ("euler", "lcm", "ddim")
CORE_SCHEDULERS = ("simple", "sgm_uniform", "normal", "ddim_uniform")
SAMPLER_NAMES = frozenset(PACK_SAMPLERS + CORE_SAMPLERS)
SCHEDULER_NAMES = frozenset(PACK_SCHEDULERS + CORE_SCHEDULERS)

MAX_STEPS = 50  # the LCM/TCD grid has 50 points; a larger number in a file name is not a step count
FILE_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_FAMILY_KEYS = ("family", "variant", "base_arch", "label", "sampler", "scheduler", "steps", "cfg", "gamma",
                "strength", "negatives", "shift", "phases", "ddim_timesteps", "sources", "notes")


@dataclass(frozen=True)
class Preset:
    preset_id: str
    family: str
    variant: str
    base_arch: str | None
    label: str
    sampler: str
    scheduler: str
    steps: int
    cfg: float
    cfg_min: float
    cfg_max: float
    gamma: float | None          # TCD γ (diffusers' "eta"); None when the sampler is not TCD
    strength: float              # recommended LoRA (model) strength
    negatives: bool              # whether a negative prompt has any effect at the recommended CFG
    shift: float | None          # SD3 flow shift
    phases: int | None           # PCM phases M
    ddim_timesteps: int | None   # PCM DDIM grid size K
    notes: str
    source: str = "table"        # how it was found: "table", "metadata", "filename", "folder", "structure", "unknown"
    message: str = ""


@dataclass(frozen=True)
class _Pattern:
    regex: re.Pattern
    preset_by_arch: dict  # arch → preset id; {None: id} when the name alone decides


@dataclass(frozen=True)
class _Table:
    presets: dict          # preset id → Preset (source "table")
    cfg_by_steps: dict     # preset id → {steps: default CFG}
    patterns: tuple
    conservative: dict     # arch or None → preset id
    trainer: dict
    generic_names: frozenset  # lower-case file stems that name no LoRA (pytorch_lora_weights, ...)


# ---------------------------------------------------------------- table loading and validation

def validate_table(table):
    """Check a parsed presets.json and compile it; ValueError names the offending preset or pattern."""
    if not isinstance(table, dict):
        raise ValueError("preset table: the top level must be an object.")
    source_ids = {s.get("id") for s in table.get("sources", []) if isinstance(s, dict)}
    families = table.get("families")
    if not isinstance(families, dict) or not families:
        raise ValueError("preset table: 'families' must be a non-empty object.")
    presets, cfg_by_steps = {}, {}
    for pid, entry in families.items():
        presets[pid], cfg_by_steps[pid] = _check_family(pid, entry, source_ids)
    patterns = tuple(_check_pattern(i, p, presets) for i, p in enumerate(table.get("filename_patterns", [])))
    conservative = _check_conservative(table.get("conservative"), presets)
    trainer = _check_trainer(table.get("trainer"), source_ids)
    generic = _check_generic_names(table.get("generic_file_names"), source_ids)
    return _Table(presets, cfg_by_steps, patterns, conservative, trainer, generic)


def _fail(pid, problem):
    raise ValueError(f"preset {pid!r}: {problem}")


def _check_family(pid, entry, source_ids):
    if not isinstance(entry, dict):
        _fail(pid, "must be an object.")
    missing = [k for k in _FAMILY_KEYS if k not in entry]
    if missing:
        _fail(pid, f"missing field(s) {', '.join(missing)}.")
    if entry["family"] not in FAMILIES:
        _fail(pid, f"family {entry['family']!r} is not one of {FAMILIES}.")
    if entry["base_arch"] not in ARCHES and not (entry["base_arch"] is None and entry["family"] == "unknown"):
        _fail(pid, f"base_arch {entry['base_arch']!r} is not one of {ARCHES}.")
    _check_names(pid, entry["sampler"], entry["scheduler"])
    cfg = _check_cfg(pid, entry["cfg"], entry["negatives"])
    by_steps = _check_cfg_by_steps(pid, entry.get("cfg_by_steps", {}), cfg)
    _check_numbers(pid, entry)
    _check_label(pid, entry["label"])
    unknown_sources = [s for s in entry["sources"] if s not in source_ids]
    if not entry["sources"] or unknown_sources:
        _fail(pid, f"sources must name entries of the 'sources' list (unknown: {unknown_sources}).")
    preset = Preset(
        preset_id=pid, family=entry["family"], variant=entry["variant"], base_arch=entry["base_arch"],
        label=entry["label"], sampler=entry["sampler"], scheduler=entry["scheduler"], steps=entry["steps"],
        cfg=cfg[0], cfg_min=cfg[1], cfg_max=cfg[2], gamma=_opt_float(entry["gamma"]),
        strength=float(entry["strength"]),
        negatives=entry["negatives"], shift=_opt_float(entry["shift"]), phases=entry["phases"],
        ddim_timesteps=entry["ddim_timesteps"], notes=entry["notes"],
    )
    return preset, by_steps


def _check_names(pid, sampler, scheduler):
    if sampler not in SAMPLER_NAMES:
        _fail(pid, f"sampler {sampler!r} is neither the pack's {PACK_SAMPLERS} "
                   f"nor a known core name {CORE_SAMPLERS}.")
    if scheduler not in SCHEDULER_NAMES:
        _fail(pid, f"scheduler {scheduler!r} is neither the pack's {PACK_SCHEDULERS} "
                   f"nor a known core name {CORE_SCHEDULERS}.")


def _check_cfg(pid, cfg, negatives):
    if not isinstance(cfg, dict) or any(not _is_number(cfg.get(k)) for k in ("default", "min", "max")):
        _fail(pid, "cfg must be {default, min, max} numbers.")
    default, low, high = float(cfg["default"]), float(cfg["min"]), float(cfg["max"])
    if not 1.0 <= low <= default <= high:
        _fail(pid, f"cfg needs 1 <= min <= default <= max, got {low} / {default} / {high}.")
    if not isinstance(negatives, bool):
        _fail(pid, "negatives must be true or false.")
    # ComfyUI skips the unconditional pass at CFG 1, so a negative prompt cannot act there.
    if default == 1.0 and negatives:
        _fail(pid, "negatives cannot be true at CFG 1.0.")
    return default, low, high


def _check_cfg_by_steps(pid, by_steps, cfg):
    out = {}
    for steps, value in by_steps.items():
        if not str(steps).isdigit() or not _is_number(value) or not cfg[1] <= value <= cfg[2]:
            _fail(pid, f"cfg_by_steps entry {steps!r}: {value!r} must be a step count with a CFG inside [min, max].")
        out[int(steps)] = float(value)
    return out


def _check_numbers(pid, entry):
    if not _is_int(entry["steps"]) or not 1 <= entry["steps"] <= MAX_STEPS:
        _fail(pid, f"steps must be an integer in 1..{MAX_STEPS}, got {entry['steps']!r}.")
    if not _is_number(entry["strength"]) or entry["strength"] <= 0:
        _fail(pid, f"strength must be a positive number, got {entry['strength']!r}.")
    gamma = entry["gamma"]
    if gamma is not None and not (_is_number(gamma) and 0.0 <= gamma <= 1.0):
        _fail(pid, f"gamma must be null or in [0, 1], got {gamma!r}.")
    if (gamma is None) == (entry["sampler"] == "tcd"):
        _fail(pid, "gamma is set exactly when the sampler is tcd.")
    if entry["shift"] is not None and not (_is_number(entry["shift"]) and entry["shift"] > 0):
        _fail(pid, f"shift must be null or positive, got {entry['shift']!r}.")
    for key in ("phases", "ddim_timesteps"):
        if entry[key] is not None and not (_is_int(entry[key]) and entry[key] >= 1):
            _fail(pid, f"{key} must be null or a positive integer, got {entry[key]!r}.")
    if entry["phases"] and entry["ddim_timesteps"] and phases_problem(entry["phases"], entry["ddim_timesteps"]):
        _fail(pid, phases_problem(entry["phases"], entry["ddim_timesteps"]))


def _check_label(pid, label):
    try:
        label.format(steps=1, shift="1")
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        _fail(pid, f"label {label!r} may only use {{steps}} and {{shift}} ({err}).")


def _check_pattern(index, pattern, presets):
    where = f"filename_patterns[{index}]"
    if not isinstance(pattern, dict) or "regex" not in pattern:
        raise ValueError(f"preset table: {where} must be an object with a regex.")
    by_arch = pattern.get("preset_by_arch") or {None: pattern.get("preset")}
    for arch, pid in by_arch.items():
        if pid not in presets:
            raise ValueError(f"preset table: {where} names unknown preset {pid!r}.")
        if arch is not None and presets[pid].base_arch != arch:
            raise ValueError(f"preset table: {where} maps {arch} to preset {pid!r} of another architecture.")
    try:
        regex = re.compile(pattern["regex"], re.IGNORECASE)
    except re.error as err:
        raise ValueError(f"preset table: {where} (preset {by_arch}) has a bad regex: {err}.") from err
    if set(regex.groupindex) - {"steps", "shift"}:
        raise ValueError(f"preset table: {where} may only name the groups 'steps' and 'shift'.")
    return _Pattern(regex, dict(by_arch))


def _check_conservative(section, presets):
    if not isinstance(section, dict) or section.get("default") not in presets:
        raise ValueError("preset table: 'conservative' needs a 'default' preset id.")
    out = {None: section["default"]}
    for arch, pid in section.get("by_arch", {}).items():
        if arch not in ARCHES or pid not in presets or presets[pid].base_arch != arch:
            _fail(pid, f"is not a valid conservative preset for architecture {arch!r}.")
        out[arch] = pid
    return out


def _check_trainer(rule, source_ids):
    if not isinstance(rule, dict):
        raise ValueError("preset table: 'trainer' must be an object.")
    for method, spec in rule.get("methods", {}).items():
        _check_names(f"trainer method {method}", spec.get("sampler"), spec.get("scheduler"))
    for mode, spec in rule.get("cfg_modes", {}).items():
        _check_cfg(f"trainer cfg_mode {mode}", spec.get("cfg"), spec.get("negatives"))
    if set(rule.get("methods", {})) != {"pcm", "lcm", "tcd", "tscd"} or \
            set(rule.get("cfg_modes", {})) != {"small", "normal"}:
        raise ValueError("preset table: 'trainer' needs methods pcm, lcm, tcd, tscd and cfg_modes small, normal.")
    for name, spec in [*rule["methods"].items(), ("unified", rule.get("unified") or {})]:
        _check_names(f"trainer {name}", spec.get("sampler"), spec.get("scheduler"))
        gamma = spec.get("gamma")
        if (gamma is None) == (spec.get("sampler") == "tcd") or (gamma is not None and not 0 <= gamma <= 1):
            raise ValueError(f"preset table: trainer {name} needs a gamma in [0, 1] exactly when its sampler is tcd.")
    if not _is_number(rule.get("strength")) or any(s not in source_ids for s in rule.get("sources", [])):
        raise ValueError("preset table: 'trainer' needs a numeric strength and known sources.")
    return rule


def _check_generic_names(section, source_ids):
    names = section.get("names") if isinstance(section, dict) else None
    if not isinstance(names, list) or not names or any(not isinstance(n, str) or not n.strip() for n in names):
        raise ValueError("preset table: 'generic_file_names' needs a non-empty list of names.")
    if not section.get("sources") or any(s not in source_ids for s in section["sources"]):
        raise ValueError("preset table: 'generic_file_names' needs sources from the 'sources' list.")
    return frozenset(n.strip().lower() for n in names)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _opt_float(value):
    return None if value is None else float(value)


@functools.lru_cache(maxsize=1)
def _table():
    with open(TABLE_PATH, encoding="utf-8") as handle:
        return validate_table(json.load(handle))


def all_presets():
    """Every preset of the table by id (source "table")."""
    return {pid: replace(p, message=_describe(p, "from the preset table")) for pid, p in _table().presets.items()}


# ---------------------------------------------------------------- lookups

def preset_from_metadata(metadata):
    """Preset for a file written by this pack's trainer; None when the metadata is not ours.

    Raises ValueError when the fewstep.* keys are there but malformed.
    """
    if not metadata or META_METHOD not in metadata:
        return None
    rule = _table().trainer
    method = str(metadata[META_METHOD]).strip().lower()
    mode = str(metadata.get(META_CFG_MODE, "small")).strip().lower()
    if method not in rule["methods"]:
        raise ValueError(f"{META_METHOD} is {method!r}, expected one of {sorted(rule['methods'])}.")
    if mode not in rule["cfg_modes"]:
        raise ValueError(f"{META_CFG_MODE} is {mode!r}, expected one of {sorted(rule['cfg_modes'])}.")
    arch = str(metadata.get(META_BASE_ARCH, "")).strip().lower()
    known = tuple(dict.fromkeys(ARCHES + TRAINABLE_ARCHS))  # whatever the trainer writes, SD2 included
    if arch not in known:
        raise ValueError(f"{META_BASE_ARCH} is {arch!r}, expected one of {known}.")
    phases, ddim = _meta_phases(metadata, method)
    _meta_guidance(metadata, mode)
    spec, cfg_spec = rule["methods"][method], rule["cfg_modes"][mode]
    stages = _meta_stages(metadata, phases) if method == "tscd" else None
    variant = method
    if method == "tscd" and phases == 1:  # ended on one segment: the unified LoRA, any step count with TCD
        spec, variant = rule["unified"], "tscd_unified"
    shape = f"{phases} phase{'s' * (phases != 1)}" if method != "tcd" else "any end point"
    if stages:
        shape = f"stages {stages}, {phases} segment{'s' * (phases != 1)}"
    cfg = cfg_spec["cfg"]
    tcd = spec["sampler"] == "tcd"  # unified: any step count, no phase edges to follow
    preset = Preset(
        preset_id=f"fewstep_{variant}_{mode}cfg", family="fewstep", variant=f"{variant}_{mode}cfg", base_arch=arch,
        label=f"fewstep-trained {spec['label']} {arch_label(arch)} LoRA ({shape}, {cfg_spec['label']})",
        sampler=spec["sampler"], scheduler=spec["scheduler"], steps=spec["steps"] or phases,
        cfg=float(cfg["default"]), cfg_min=float(cfg["min"]), cfg_max=float(cfg["max"]),
        gamma=float(spec["gamma"]) if spec.get("gamma") is not None else None,
        strength=float(rule["strength"]), negatives=cfg_spec["negatives"], shift=None,
        phases=None if tcd else phases, ddim_timesteps=None if tcd else ddim,
        notes=_trainer_notes(metadata, mode, phases, None if tcd else ddim, spec.get("gamma")), source="metadata",
    )
    return replace(preset, message=_describe(preset, "from trainer metadata"))


def _meta_stages(metadata, phases):
    """TSCD's stage list ("8,4,2,1"), when written: whole numbers, each dividing the one before, holding `phases`."""
    raw = str(metadata.get(META_STAGES, "")).strip()
    if not raw:
        return None
    try:
        stages = [int(v) for v in raw.split(",")]
    except ValueError:
        raise ValueError(f"{META_STAGES} is {raw!r}, not a comma list of whole numbers.") from None
    if any(m < 1 for m in stages) or any(b <= a or b % a for b, a in zip(stages, stages[1:])) or phases not in stages:
        raise ValueError(f"{META_STAGES} is {raw!r}: stages must shrink, each dividing the one before, and include "
                         f"{META_PHASES} ({phases}).")
    return ",".join(map(str, stages))


def _meta_phases(metadata, method):
    # The one-phase baseline has M = 1 whatever the file says; PCM and TSCD need their M (and K when known); a TCD
    # LoRA has no phases (any end point): it reads as 1.
    phases = 1 if method in ("lcm", "tcd") else _meta_int(metadata, META_PHASES, required=True)
    ddim = _meta_int(metadata, META_DDIM_TIMESTEPS, required=False)
    if ddim is not None and phases_problem(phases, ddim):
        raise ValueError(f"{META_PHASES}, {META_DDIM_TIMESTEPS}: {phases_problem(phases, ddim)}")
    return phases, ddim


def _meta_guidance(metadata, mode):
    """The trained guidance range, when written: finite and ≥ 0, and w_min ≤ w_max where it was used (small CFG;
    the trainer checks the order only there). Else the metadata is nonsense."""
    values = []
    for key in (META_W_MIN, META_W_MAX):
        raw = metadata.get(key)
        if raw is None or str(raw).strip() == "":
            return
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{key} is {raw!r}, not a number.") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{key} is {raw!r}, not a finite guidance w ≥ 0.")
        values.append(value)
    if mode == "small" and values[0] > values[1]:
        raise ValueError(f"{META_W_MIN} ({values[0]:g}) is above {META_W_MAX} ({values[1]:g}).")


def _meta_int(metadata, key, required):
    raw = metadata.get(key)
    if raw is None or str(raw).strip() == "":
        if required:
            raise ValueError(f"{key} is missing.")
        return None
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ValueError(f"{key} is {raw!r}, not an integer.") from None
    if value < 1:
        raise ValueError(f"{key} must be at least 1, got {value}.")
    return value


def _trainer_notes(metadata, mode, phases, ddim, gamma=None):
    parts = [f"Written by this pack's trainer (version {metadata.get(META_VERSION, '?')})."]
    if gamma is not None:
        parts.append(f"Unified LoRA: any step count with the TCD sampler; gamma {gamma:g} here, lower it for more "
                     "detail at more steps (TCD Sampler node).")
    if ddim:
        parts.append(f"Exact phase edges: PCM Scheduler node with phases {phases}, K {ddim}.")
    w_min, w_max = metadata.get(META_W_MIN), metadata.get(META_W_MAX)
    if mode == "small" and w_min is not None and w_max is not None:  # "normal" trains with the CFG solver off
        parts.append(f"Teacher guidance w in [{w_min}, {w_max}] (ComfyUI CFG 1 + w) was distilled in.")
    if metadata.get(META_STEPS_TRAINED):
        parts.append(f"Trained for {metadata[META_STEPS_TRAINED]} optimiser steps.")
    return " ".join(parts)


def preset_from_filename(name, base_arch=None):
    """Preset for a known file name (extension ignored, case-insensitive), else None.

    Only the base name counts, except for a generic one (pytorch_lora_weights, adapter_model, ...: the table's
    generic_file_names), which every LCM and TCD repository ships: then the folders of the name decide, as
    ComfyUI-Manager's "SD1.5/lcm/pytorch_lora_weights.safetensors" (names are relative to models/loras; for a
    full path only the part below the last "loras" folder is read). base_arch (from the key structure) is only
    used by patterns that name a family but no architecture, such as "tcd.safetensors".
    """
    table = _table()
    stem = _stem(name)
    preset = _match_patterns(table, stem, base_arch)
    if preset is not None:
        return replace(preset, message=_describe(preset, "from file name"))
    folder = _folder(name) if stem.lower() in table.generic_names else ""
    preset = _match_patterns(table, folder, base_arch) if folder else None
    if preset is not None:
        origin = f"recognised by its folder {folder}/, {stem} being a generic file name"
        return replace(preset, source="folder", message=_describe(preset, origin))
    return None


def _match_patterns(table, text, base_arch):
    for pattern in table.patterns:
        match = pattern.regex.search(text)
        pid = pattern.preset_by_arch.get(None) or pattern.preset_by_arch.get(base_arch)
        if match is None or pid is None:
            continue
        preset = _from_match(table, pid, match)
        if preset is not None:
            return preset
    return None


def _folder(name):
    """The folders of a LoRA name below models/loras, "/"-joined ("SD1.5/lcm"); "" for a bare file name."""
    parts = [p for p in PureWindowsPath(str(name)).parts[:-1] if p.strip("\\/") and not p.endswith(":\\")]
    below = [i for i, p in enumerate(parts) if p.lower() == "loras"]
    return "/".join(parts[below[-1] + 1:] if below else parts)


def generic_name_note(name):
    """Why a generic file name told nothing ("… is a generic file name …"), or None for any other name."""
    stem = _stem(name)
    if stem.lower() not in _table().generic_names:
        return None
    folder = _folder(name)
    where = f"its folder {folder}/ names no known LoRA" if folder else "it sits in no folder that could name one"
    return f"{stem} is a generic file name (every LCM/TCD release uses one) and {where}"


def _stem(name):
    # Both separators: file names may come from Windows or POSIX paths.
    base = PureWindowsPath(str(name)).name
    for ext in FILE_EXTENSIONS:
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base


def _from_match(table, pid, match):
    preset = table.presets[pid]
    groups = match.groupdict()
    steps = int(groups["steps"]) if groups.get("steps") else None
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        return None  # a number that cannot be a step count: let a later pattern try
    shift = float(groups["shift"].lower().replace("p", ".")) if groups.get("shift") else preset.shift
    steps = steps or preset.steps
    return replace(
        preset, steps=steps, shift=shift, source="filename",
        cfg=table.cfg_by_steps[pid].get(steps, preset.cfg),
        # A deterministic PCM LoRA is sampled with as many phases as its name has steps.
        phases=steps if preset.phases is not None else None,
        label=preset.label.format(steps=steps, shift=_number(shift)),
    )


def conservative_preset(base_arch=None, reason=""):
    """The conservative preset for an architecture (or for none), with a message that says why."""
    table = _table()
    arch = base_arch if base_arch in ARCHES else None
    preset = table.presets[table.conservative.get(arch, table.conservative[None])]
    source = "structure" if arch else "unknown"
    return replace(preset, source=source, message=reason + _describe(preset, None))


def preset_for(filename, metadata=None, base_arch=None, rank=None):
    """The best preset for a LoRA file: trainer metadata, then file name, then key structure, then unknown."""
    reasons = []
    try:
        found = preset_from_metadata(metadata)
    except ValueError as err:
        found = None
        reasons.append(f"trainer metadata ignored ({err})")
    if found is not None:
        return found
    named = preset_from_filename(filename or "", base_arch)
    if named is not None and same_family(named.base_arch, base_arch):
        return replace(named, message="; ".join(reasons + [named.message]))
    if named is not None:
        said_by = f"the folder {_folder(filename)}/" if named.source == "folder" else "the file name"
        reasons.append(f"{said_by} says {named.label} but the keys are {arch_label(base_arch)}, "
                       f"so the {'folder' if named.source == 'folder' else 'name'} is not trusted")
    elif generic_name_note(filename or ""):
        reasons.append(generic_name_note(filename))
    return conservative_preset(base_arch, _unknown_text(base_arch, rank, reasons))


def _unknown_text(base_arch, rank, reasons):
    rank_text = f" of rank {rank}" if rank else ""
    prefix = "; ".join(reasons) + "; " if reasons else ""
    if base_arch in ARCHES:
        return f"{prefix}unknown family ({arch_label(base_arch)} LoRA{rank_text}, by key structure): "
    arch_text = f", architecture {base_arch!r} not covered" if base_arch else ""
    return f"{prefix}unknown LoRA{rank_text} (no trainer metadata, no known file name{arch_text}): "


def _describe(preset, origin):
    settings = [f"sampler {preset.sampler}", f"scheduler {preset.scheduler}",
                f"{preset.steps} step{'s' * (preset.steps != 1)}", f"CFG {preset.cfg:.1f}"]
    if preset.gamma is not None:
        settings.append(f"gamma {_number(preset.gamma)}")
    if preset.strength != 1.0:
        settings.append(f"LoRA strength {_number(preset.strength)}")
    if preset.shift is not None:
        settings.append(f"shift {_number(preset.shift)}")
    if origin is None:  # conservative: the caller's reason already names what is unknown
        return f"conservative settings: {', '.join(settings)}; check the model card"
    return f"{preset.label} ({origin}): {', '.join(settings)}"


def _number(value):
    return f"{value:g}" if value is not None else "?"
