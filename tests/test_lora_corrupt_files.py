"""Damaged and crafted .safetensors files: the loader refuses each with its own message (the file's name and what to do),
never with a raw message of the safetensors, json or struct libraries, and never crashes or loads garbage.

Each case is built here from a small valid LoRA (kohya keys, two modules) by editing its header or bytes, the way
a broken download, a bad converter or a hostile file would. The header-only check (what /prompt validation runs)
and the full read (what the loader runs) must both refuse; the message must not look like a library's.
"""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from fewstep.loras.formats import LoraFileError, not_a_lora_problem, read_lora_file, read_safetensors_header

RAW = ("Error while deserializing", "MetadataIncompleteBuffer", "InvalidOffset", "HeaderTooLarge", "invalid utf-8",
       "Expecting value", "unpack requires", "TypeError", "KeyError", "Traceback", "object of type", "'NoneType'",
       "not subscriptable", "SafetensorError", "invalid type", "InvalidHeader", "overflow")


def valid_lora():
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_mid_block_attentions_0_proj_out"):
        tensors[f"{module}.lora_down.weight"] = torch.randn(4, 32, generator=g).half()
        tensors[f"{module}.lora_up.weight"] = torch.randn(32, 4, generator=g).half()
        tensors[f"{module}.alpha"] = torch.tensor(4.0).half()
    return tensors


def split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header, body: bytes, pad=True):
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def edit_header(change):
    def build(data):
        header, body = split(data)
        change(header)
        return join(header, body)
    return build


def first_tensor(header):
    return next(k for k in sorted(header) if k != "__metadata__")


def _overlap(header):
    keys = [k for k in sorted(header, key=lambda k: header[k]["data_offsets"][0] if k != "__metadata__" else -1)
            if k != "__metadata__"]
    a, b = header[keys[0]], header[keys[1]]
    size = a["data_offsets"][1] - a["data_offsets"][0]
    if b["data_offsets"][1] - b["data_offsets"][0] == size:
        b["data_offsets"] = list(a["data_offsets"])  # two tensors on the same bytes
    else:
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + b["data_offsets"][1] - b["data_offsets"][0]]


def _gap(header):
    for key, info in header.items():
        if key != "__metadata__":
            info["data_offsets"] = [info["data_offsets"][0] + 2, info["data_offsets"][1] + 2]


def _set(path, value):
    def change(header):
        target = header[first_tensor(header)]
        *parents, last = path
        for p in parents:
            target = target[p]
        target[last] = value
    return change


CASES = {
    "empty": lambda d: b"",
    "seven_bytes": lambda d: d[:7],
    "header_length_beyond_file": lambda d: struct.pack("<Q", len(d)) + d[8:],
    "header_length_huge": lambda d: struct.pack("<Q", 2 ** 63) + d[8:],
    "header_not_utf8": lambda d: struct.pack("<Q", 8) + b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8" + d[8:],
    "header_not_json": lambda d: struct.pack("<Q", 9) + b"{not json" + d[8:],
    "header_a_list": lambda d: join([1, 2, 3], b""),
    "header_a_string": lambda d: join("lora", b""),
    "truncated_body": lambda d: d[:-10],
    "bytes_after_the_data": lambda d: d + b"\0" * 16,
    "truncated_in_header": lambda d: d[:20],
    "missing_dtype": edit_header(lambda h: h[first_tensor(h)].pop("dtype")),
    "unknown_dtype": edit_header(_set(["dtype"], "F12")),
    "dtype_not_a_string": edit_header(_set(["dtype"], 16)),
    "missing_shape": edit_header(lambda h: h[first_tensor(h)].pop("shape")),
    "shape_not_a_list": edit_header(_set(["shape"], "4x32")),
    "shape_negative": edit_header(_set(["shape"], [-4, -32])),
    "shape_fractional": edit_header(_set(["shape"], [4.5, 32])),
    "shape_huge": edit_header(_set(["shape"], [2 ** 40, 2 ** 40])),
    "missing_offsets": edit_header(lambda h: h[first_tensor(h)].pop("data_offsets")),
    "offsets_one_number": edit_header(_set(["data_offsets"], [0])),
    "offsets_strings": edit_header(_set(["data_offsets"], ["0", "256"])),
    "offsets_reversed": edit_header(lambda h: h[first_tensor(h)].update(
        data_offsets=h[first_tensor(h)]["data_offsets"][::-1])),
    "offsets_beyond_data": edit_header(lambda h: h[first_tensor(h)].update(
        data_offsets=[10 ** 9, 10 ** 9 + 256])),
    "offsets_overlap": edit_header(_overlap),
    "offsets_leave_a_gap": edit_header(_gap),
    "entry_not_an_object": edit_header(lambda h: h.update({first_tensor(h): [1, 2]})),
    "metadata_a_list": edit_header(lambda h: h.update({"__metadata__": ["a", "b"]})),
    "metadata_value_a_number": edit_header(lambda h: h.update({"__metadata__": {"ss_network_alpha": 4}})),
    "metadata_value_an_object": edit_header(lambda h: h.update({"__metadata__": {"x": {"y": 1}}})),
    "no_tensors": lambda d: join({"__metadata__": {"a": "b"}}, b""),
    "nan_values": None,  # built from tensors below
    "inf_values": None,
    "a_png_renamed": lambda d: b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
    "a_zip_renamed": lambda d: b"PK\x03\x04" + b"\x00" * 200,
    "text_file": lambda d: b"this is not a LoRA, just some text that someone saved with the wrong name\n" * 3,
}


def build_case(name, tmp_path):
    path = tmp_path / f"broken_{name}.safetensors"
    if name in ("nan_values", "inf_values"):
        tensors = valid_lora()
        first = next(k for k in sorted(tensors) if tensors[k].ndim == 2)
        tensors[first][0, 0] = float("nan") if name == "nan_values" else float("inf")
        save_file(tensors, str(path))
        return path
    good = tmp_path / "good.safetensors"
    save_file(valid_lora(), str(good), metadata={"ss_network_dim": "4"})
    path.write_bytes(CASES[name](good.read_bytes()))
    return path


def test_the_template_file_is_a_good_lora(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(valid_lora(), str(good))
    tensors, _ = read_lora_file(str(good))
    assert len(tensors) == 6


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_damaged_file_is_refused_with_a_message_of_ours(name, tmp_path):
    path = build_case(name, tmp_path)
    messages = []
    for reader in (_header_check, read_lora_file):
        try:
            reader(str(path))
        except LoraFileError as error:
            messages.append(str(error))
        else:
            if reader is read_lora_file:
                pytest.fail(f"{name}: loaded without complaint")
    for message in messages:
        assert path.name in message, message
        assert not any(raw in message for raw in RAW), message
    assert messages and any(fix in messages[-1] for fix in ("Download", "diverged", "not a LoRA")), messages


def _header_check(path):
    """What /prompt validation runs (nodes/loras.py _cheap_file_check): the header and the not-a-LoRA test."""
    header = read_safetensors_header(path)
    problem = not_a_lora_problem(header, path.rsplit("/", 1)[-1])
    if problem:
        raise LoraFileError(problem)
