"""LoRA files without ComfyUI: safe reading, key formats, scale rules, base-architecture guess.

A LoRA file is a flat dict of tensors. Every trainer spells the same thing differently:

    kohya        lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight  (+ .alpha)
    LDM          diffusion_model.input_blocks.1.1.proj_in.lora_down.weight
    PEFT         unet.down_blocks.0.attentions.0.proj_in.lora_A.weight           (alpha in metadata)
    PEFT save    base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight (alpha in adapter_config.json)
    diffusers    unet.down_blocks.0....to_q.lora.down.weight / .lora_linear_layer.down.weight
    attn-proc    unet.down_blocks.0....processor.to_q_lora.down.weight

`parse_lora` groups the tensors into one `LoraModule` per patched layer (up, down, optional mid,
scale) and lists every tensor it could not place, so nothing is dropped silently. Which model weight
a module patches is the host's business (host/lora_patches.py); this module only offers the name
variants (`module_aliases`) to try.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field

import torch

from .architectures import CONTEXT_DIM_ARCHS, FLUX, MMDIT, SD3, SD15, SDXL

SAFE_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 2 ** 20
MAX_RANK = 2048  # far above any published LoRA (they ship 4..256); beyond it the file is damaged or not a LoRA
PEFT_METADATA_KEY = "lora_adapter_metadata"  # what diffusers writes next to PEFT weights
# PEFT's LoraConfig default lora_alpha. A UNet wrapped by peft.get_peft_model and written by save_pretrained has
# "base_model.model.<diffusers UNet name>" keys; its lora_alpha lives only in the adapter_config.json beside it.
# Without that file the default is the best estimate, and it is what the PCM scripts trained with (docs/algorithms.md,
# "PCM: the first SD1.5/SDXL uploads").
PEFT_DEFAULT_LORA_ALPHA = 8
_PEFT_UNET_SAVE = re.compile(r"base_model\.model\.(down_blocks|up_blocks|mid_block|conv_in|conv_out|time_embedding|"
                             r"add_embedding)\.")

# (up suffix, down suffix); the module name is the key without its suffix.
PAIR_SUFFIXES = (
    (".lora_up.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
)
MID_SUFFIX = ".lora_mid.weight"
ALPHA_SUFFIX = ".alpha"

_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class LoraFileError(ValueError):
    """A LoRA file that cannot be used; the message names the problem and what to do."""


@dataclass
class LoraModule:
    name: str
    up: torch.Tensor
    down: torch.Tensor
    mid: torch.Tensor | None = None
    scale: float = 1.0
    scale_rule: str = "none"  # "alpha key", "peft metadata", "peft default alpha" or "none" (scale 1, as diffusers)
    keys: tuple = ()

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta_shape(self) -> tuple:
        """Shape of up @ down (conv LoRAs: out, in, kh, kw)."""
        if self.mid is not None:
            return (self.up.shape[0], self.down.shape[1]) + tuple(self.mid.shape[2:])
        return (self.up.shape[0],) + tuple(self.down.shape[1:])


@dataclass
class ParsedLora:
    modules: list
    unused: list = field(default_factory=list)
    key_formats: tuple = ()
    base_arch: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def ranks(self) -> list:
        return sorted({m.rank for m in self.modules})


# ---------------------------------------------------------------- reading

def check_lora_path(path: str) -> None:
    """Refuse what must not be opened: pickle formats (unpickling runs code) and non-safetensors files."""
    lower = path.lower()
    if lower.endswith(PICKLE_EXTENSIONS):
        raise LoraFileError(
            f"{os.path.basename(path)} is a pickle-based file; it is never unpickled because unpickling can run "
            "arbitrary code. Use the .safetensors release of this LoRA, or convert it to .safetensors with a trusted tool.")
    if not lower.endswith(SAFE_EXTENSIONS):
        raise LoraFileError(f"{os.path.basename(path)} is not a .safetensors file; only .safetensors LoRAs are loaded.")


def read_safetensors_header(path: str) -> dict:
    """Parse and check the header (lengths, offsets, dtypes) without reading tensor data."""
    name = os.path.basename(path)
    size = os.path.getsize(path)
    if size == 0:
        raise LoraFileError(f"{name} is empty (0 bytes): the download or copy did not finish. Download it again.")
    if size < 8:
        raise LoraFileError(f"{name} is {size} bytes, too short for a safetensors file. Download it again.")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES or header_len > size - 8:
            raise LoraFileError(f"{name} is not a valid safetensors file (its header claims {header_len} bytes, the "
                                f"file has {size}): it is truncated or corrupt. Download it again.")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraFileError(f"{name} has a corrupt safetensors header ({e.__class__.__name__}). Download it again.") from None
    if not isinstance(header, dict):
        raise LoraFileError(f"{name} has a corrupt safetensors header (not a JSON object). Download it again.")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoraFileError(f"{name} has corrupt metadata (safetensors metadata is text keys and text values). "
                            "Download it again, or re-save it with a current safetensors tool.")
    data_len = size - 8 - header_len
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            shape = info["shape"]
            if not all(_is_count(v) for v in (begin, end, *shape)):
                raise TypeError
            n_bytes = math.prod(shape) * _SAFETENSORS_DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise LoraFileError(f"{name}: tensor {key!r} has a corrupt header entry. Download the file again.") from None
        if not (0 <= begin <= end <= data_len) or end - begin != n_bytes:
            raise LoraFileError(f"{name}: tensor {key!r} lies outside the file ({end} > {data_len} data bytes): the "
                                "file is truncated or corrupt. Download it again.")
        spans.append((begin, end, key))
    # The format stores the tensors back to back: any overlap or gap means a damaged or crafted file.
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            raise LoraFileError(f"{name}: tensor {key!r} {'overlaps another' if begin < position else 'leaves a gap'} "
                                "in the data: the file is corrupt. Download it again.")
        position = end
    if position != data_len:
        raise LoraFileError(f"{name} has {data_len - position} bytes after its last tensor: the file is corrupt or "
                            "was appended to. Download it again.")
    return header


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_lora_file(path: str, check_values: bool = True):
    """(tensors, metadata) of a checked safetensors LoRA; refuses NaN/Inf values, naming the tensors. check_values=False
    leaves the values unread (the tensors are memory-mapped): the caller checks them later with refuse_non_finite."""
    from safetensors.torch import load_file

    check_lora_path(path)
    header = read_safetensors_header(path)
    metadata = dict(header.get("__metadata__") or {})
    if len(header) - ("__metadata__" in header) == 0:
        raise LoraFileError(f"{os.path.basename(path)} holds no tensors; it is not a LoRA.")
    problem = not_a_lora_problem(header, os.path.basename(path))
    if problem:
        raise LoraFileError(problem)
    tensors = load_file(path, device="cpu")
    if check_values:
        refuse_non_finite({k: [t] for k, t in tensors.items()}, os.path.basename(path))
    return tensors, metadata


def refuse_non_finite(groups: dict, file_name: str) -> None:
    """LoraFileError naming the groups (name -> tensors: a tensor key, or a layer with its up/down/mid) that hold a
    NaN or Inf value."""
    bad = [name for name, tensors in groups.items()
           if any(t is not None and t.is_floating_point() and not _all_finite(t) for t in tensors)]
    if bad:
        shown = ", ".join(sorted(bad)[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise LoraFileError(f"{file_name} contains NaN or Inf values in {len(bad)} tensor(s) ({shown}); "
                            "it would turn every image black. The training run diverged or the file is damaged.")


# Sum accumulators that no finite value of the type can overflow: |float16| <= 65504 would need 5e33 values to
# overflow float32; |bfloat16|, |float32| < 2**128 would need 2**896 to overflow float64.
_FINITE_SUM_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float64, torch.float32: torch.float64}


def _all_finite(t: torch.Tensor) -> bool:
    # One sum instead of an elementwise isfinite mask (4-8x slower on CPU): NaN and Inf propagate through a sum
    # (inf - inf = NaN) and finite values cannot overflow the accumulator, so the sum is finite iff every value is.
    acc = _FINITE_SUM_DTYPE.get(t.dtype)
    if acc is None:
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(t.sum(dtype=acc)))


# ---------------------------------------------------------------- parsing

# Marks of adapter files the pack does not apply (LyCORIS LoHa/LoKr, ...): such a file is not a full model.
_ADAPTER_MARKS = ("lora", "hada_", "lokr_", "lycoris", ".alpha", "dora_scale")


def not_a_lora_problem(keys, name):
    """The message for a file of plain model weights (a full UNet or checkpoint put in models/loras), else None.

    Such a file has tensors but not one LoRA up/down pair and nothing of another adapter format; loaded as a LoRA
    it would patch nothing."""
    keys = [k for k in keys if k != "__metadata__"]
    if not keys or any(_split_pair_key(k) is not None or any(m in k.lower() for m in _ADAPTER_MARKS) for k in keys):
        return None
    return (f"{name} is not a LoRA: none of its {len(keys)} tensors is a LoRA layer; it holds a model's own weights "
            f"(first: {sorted(keys)[0]}). Move it to models/diffusion_models (or models/checkpoints if it is a whole "
            "checkpoint) and load it with the Hyper-SDXL 1-Step UNet Loader for the Hyper-SDXL 1-step UNet, or with "
            "core's Load Diffusion Model / Load Checkpoint.")


def _split_pair_key(key: str):
    for up_suffix, down_suffix in PAIR_SUFFIXES:
        if key.endswith(up_suffix):
            return key[: -len(up_suffix)], "up", down_suffix
        if key.endswith(down_suffix):
            return key[: -len(down_suffix)], "down", down_suffix
    return None


def _key_format(module_name: str, down_suffix: str) -> str:
    if module_name.startswith(("lora_unet_", "lora_te", "lora_transformer_", "lycoris_", "lora_prior_")):
        return "kohya"
    if down_suffix == "_lora.down.weight":
        return "attn-processor"
    if down_suffix == ".lora_linear_layer.down.weight":
        return "diffusers-lora_linear_layer"
    if down_suffix in (".lora_A.weight", ".lora_A.default.weight"):
        return "peft"
    if down_suffix == ".lora.down.weight":
        return "diffusers-lora.down"
    if module_name.startswith(("diffusion_model.", "model.diffusion_model.")):
        return "ldm"
    return "generic-lora_down"


def peft_adapter_config(metadata: dict):
    """diffusers' adapter config from the file's metadata (parsed once per file), or None."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return None
    try:
        return json.loads(raw) if isinstance(raw, str) else dict(raw)
    except json.JSONDecodeError:
        return None


def peft_config_for(config, module_name: str):
    """The part of the adapter config that applies to this module's component, or None."""
    if config is None or "lora_alpha" in config or "r" in config:
        return config
    # Pipeline-level saves prefix each component's entries: "unet.lora_alpha", "text_encoder_2.r", ...
    component = module_name.split(".", 1)[0]
    sub = {k[len(component) + 1:]: v for k, v in config.items() if k.startswith(component + ".")}
    return sub or None


def _pattern_value(patterns: dict, module_path: str, default):
    # PEFT matches pattern keys against the end of the module path on a dot boundary.
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return default


def _peft_scale(config: dict, module_name: str, rank: int) -> float:
    # PEFT patterns are relative to the component model: drop "unet." and PEFT's "base_model.model." wrapper.
    component_path = module_name
    if not component_path.startswith("base_model.model.") and "." in component_path:
        component_path = component_path.split(".", 1)[1]
    if component_path.startswith("base_model.model."):
        component_path = component_path[len("base_model.model."):]
    r = _pattern_value(config.get("rank_pattern"), component_path, config.get("r", rank))
    alpha = _pattern_value(config.get("alpha_pattern"), component_path, config.get("lora_alpha", r))
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(float(r))
    return float(alpha) / float(r)


def parse_lora(tensors: dict, metadata: dict | None = None) -> ParsedLora:
    """Group a LoRA state dict into modules with their scale; everything else is listed in `unused`."""
    metadata = dict(metadata or {})
    adapter_config = peft_adapter_config(metadata)
    component_configs = {}  # component -> its slice of adapter_config
    halves, formats, used = {}, set(), set()
    for key in tensors:
        split = _split_pair_key(key)
        if split is not None:
            module_name, role, down_suffix = split
            halves.setdefault(module_name, {})[role] = key
            halves[module_name]["format"] = _key_format(module_name, down_suffix)

    modules = []
    for module_name, parts in sorted(halves.items()):
        if "up" not in parts or "down" not in parts:
            continue  # half a pair: reported with the unused keys
        up, down = tensors[parts["up"]], tensors[parts["down"]]
        rank = int(down.shape[0])
        if up.ndim < 2 or down.ndim < 2 or up.shape[1] != rank:
            raise LoraFileError(f"LoRA layer {module_name!r}: up {tuple(up.shape)} and down {tuple(down.shape)} do not "
                                "share a rank; the file is damaged or not a LoRA.")
        if rank > MAX_RANK:
            raise LoraFileError(f"LoRA layer {module_name!r} has rank {rank} (more than {MAX_RANK}); that is not a usable "
                                "LoRA. The file is damaged or is a full model saved under LoRA names.")
        keys = [parts["up"], parts["down"]]
        mid = tensors.get(module_name + MID_SUFFIX)
        if mid is not None:
            keys.append(module_name + MID_SUFFIX)
        alpha_key = module_name + ALPHA_SUFFIX
        component = module_name.split(".", 1)[0]
        if component not in component_configs:
            component_configs[component] = peft_config_for(adapter_config, module_name)
        config = component_configs[component]
        if alpha_key in tensors:
            keys.append(alpha_key)
            scale, rule = float(tensors[alpha_key].float().item()) / rank, "alpha key"
        elif config is not None:
            scale, rule = _peft_scale(config, module_name, rank), "peft metadata"
        elif adapter_config is None and _PEFT_UNET_SAVE.match(module_name):
            scale, rule = PEFT_DEFAULT_LORA_ALPHA / rank, "peft default alpha"
        else:
            scale, rule = 1.0, "none"
        modules.append(LoraModule(module_name, up, down, mid, scale, rule, tuple(keys)))
        used.update(keys)
        formats.add(parts["format"])

    unused = sorted(k for k in tensors if k not in used)
    parsed = ParsedLora(modules, unused, tuple(sorted(formats)), None, metadata)
    parsed.base_arch = guess_base_arch(parsed)
    return parsed


# ---------------------------------------------------------------- names and architecture

def module_aliases(name: str) -> list:
    """Names under which a host key map may know this module, most literal first."""
    out = [name]

    def add(candidate):
        if candidate not in out:
            out.append(candidate)

    for prefix in ("base_model.model.", "unet.base_model.model.", "transformer.base_model.model."):
        if name.startswith(prefix):
            component = prefix.split("base_model")[0]
            rest = name[len(prefix):]
            add(component + rest)
            add(rest)
            add("transformer." + rest)  # model-level PEFT saves of SD3/FLUX transformers
    if name.startswith("model.diffusion_model."):
        add(name[len("model."):])
    for base in list(out):
        if ".processor." in base:  # old attention-processor LoRAs: ...attn1.processor.to_q_lora
            plain = base.replace(".processor.", ".")
            add(plain + ".0" if plain.endswith(".to_out") else plain)
    return out


# SD3 first: its LDM names share "x_embedder" with FLUX's diffusers names, nothing with FLUX's own.
_FLUX_TOKENS = ("double_blocks", "single_blocks", "single_transformer_blocks", "guidance_embedder", "guidance_in",
                "img_attn", "txt_attn")
_SD3_TOKENS = ("joint_blocks", "context_block", "x_block", "pos_embed")
_MMDIT_TOKENS = ("transformer_blocks", "add_q_proj", "ff_context", "context_embedder")


def guess_base_arch(parsed: ParsedLora):
    """One of architectures.LORA_ARCHS (MMDIT when SD3 or FLUX, which names alone cannot tell apart), or None."""
    flat = [m.name.replace(".", "_") for m in parsed.modules]
    if any(tok in n for n in flat for tok in _SD3_TOKENS):
        return SD3
    if any(tok in n for n in flat for tok in _FLUX_TOKENS):
        return FLUX
    if any("x_embedder" in n and "x_embedder_proj" not in n for n in flat):  # FLUX's Linear; SD3's is a conv .proj
        return FLUX
    is_unet = any(tok in n for n in flat for tok in ("down_blocks", "up_blocks", "input_blocks", "output_blocks",
                                                      "middle_block", "mid_block", "lora_unet_"))
    if not is_unet and any(tok in n for n in flat for tok in _MMDIT_TOKENS):
        return MMDIT
    if any(("lora_te2_" in n) or n.startswith("text_encoder_2") or "label_emb" in n or "add_embedding" in n
           for n in flat):
        return SDXL
    for module, n in zip(parsed.modules, flat):  # cross-attention key/value input width = text context width
        if n.endswith(("attn2_to_k", "attn2_to_v", "attn2_processor_to_k", "attn2_processor_to_v")):
            arch = CONTEXT_DIM_ARCHS.get(int(module.down.shape[1]))
            if arch:
                return arch
    if is_unet:
        return SDXL if any("transformer_blocks_1" in n for n in flat) else SD15
    if any(n.startswith(("lora_te_", "lora_te1_", "text_encoder_")) for n in flat):
        return SD15
    return None
