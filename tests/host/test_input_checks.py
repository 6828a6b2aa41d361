"""Bad widget values for every pack node, through ComfyUI's own validator: each is refused at /prompt validation with
one message, on that input, that names it (no raw Python error, no copy on the node's other inputs), and each is
refused again by execute() when it arrives through a link.

The corpus is built from the nodes' schemas: for every INT / FLOAT / BOOLEAN widget, values ComfyUI lets through or
turns into raw errors (NaN, ±Inf, strings, booleans for numbers, strings for booleans, fractions for integers,
just outside the declared range, null, objects). host/registration.py hooks `screen_prompt` into the server's
POST /prompt; here it is called as the server calls it, right before `execution.validate_inputs`.
"""
import asyncio
import re

import pytest

from fewstep.host.input_checks import RefusedValue, input_problems, screen_prompt, widget_specs

NAN, INF = float("nan"), float("inf")
RAW = re.compile(r"not supported between|invalid literal|could not convert|has no attribute|NoneType|Traceback|"
                 r"object is not|unsupported operand|must be real number|cannot convert")


def pack_nodes(comfy_host):
    from fewstep.nodes import NODES

    return {cls.define_schema().node_id: comfy_host.nodes.NODE_CLASS_MAPPINGS[cls.define_schema().node_id]
            for cls in NODES}


def bad_values(kind, low, high):
    if kind == "BOOLEAN":
        return ["false", "true", 0, 1, 0.5, None, "abc", {}]
    values = ["abc", True, NAN, INF, -INF, None, {}, "nan"]
    if kind == "INT":
        values += [2.5, "2.5"]
    if low is not None:
        values.append(low - 1)
    if high is not None:
        values.append(high + 1 if kind == "INT" else high * 2 + 1)
    return values


def default_inputs(cls):
    inputs = {}
    for entry in cls.define_schema().inputs:
        default = getattr(entry, "default", None)
        if default is not None:
            inputs[entry.id] = default
        elif entry.get_io_type() == "COMBO" and getattr(entry, "options", None):
            inputs[entry.id] = entry.options[0]
    return inputs


def validation_errors(comfy_host, node_id, inputs, classes):
    prompt = {"1": {"class_type": node_id, "inputs": dict(inputs)}}
    screen_prompt(prompt, classes)
    _valid, errors, _ = asyncio.run(comfy_host.execution.validate_inputs("checks", prompt, "1", {}))
    return errors


def corpus(comfy_host):
    for node_id, cls in sorted(pack_nodes(comfy_host).items()):
        for name, (kind, low, high) in widget_specs(cls).items():
            for value in bad_values(kind, low, high):
                yield node_id, cls, name, value


def test_every_pack_widget_has_a_range_or_is_boolean(comfy_host):
    """The corpus covers what it claims: numbers with both bounds declared (the messages quote them)."""
    specs = {(n, name): spec for n, cls in pack_nodes(comfy_host).items() for name, spec in widget_specs(cls).items()}
    assert len(specs) >= 30
    for (node_id, name), (kind, low, high) in specs.items():
        assert kind == "BOOLEAN" or (low is not None and high is not None), (node_id, name)


def test_defaults_pass_and_bad_values_are_refused_once_on_their_input(comfy_host):
    classes = pack_nodes(comfy_host)
    for node_id, cls in classes.items():
        errors = validation_errors(comfy_host, node_id, default_inputs(cls), classes)
        on_widgets = [e for e in errors if e["extra_info"].get("input_name") in widget_specs(cls)]
        assert not on_widgets, (node_id, on_widgets)

    failures, cases = [], 0
    for node_id, cls, name, value in corpus(comfy_host):
        cases += 1
        inputs = default_inputs(cls)
        inputs[name] = value
        errors = validation_errors(comfy_host, node_id, inputs, classes)
        mine = [e for e in errors if e["extra_info"].get("input_name") == name]
        others = [e for e in errors if e["extra_info"].get("input_name") in set(widget_specs(cls)) - {name}]
        text = " ".join(f"{e['message']}: {e['details']}" for e in mine)
        # ComfyUI's own range message ("Value 0 smaller than min of 1", details: the input) or the pack's, which
        # starts with the input's name (after ComfyUI's "name, value, " prefix of a refused conversion).
        named = len(mine) == 1 and (mine[0]["type"].startswith("value_") or
                                    mine[0]["details"].split(", ", 2)[-1].startswith(name + " "))
        if not named or others or RAW.search(text):
            failures.append((node_id, name, value, [e["details"] for e in mine], len(others)))
    print(f"\n{cases} bad values over {len({(n, i) for n, _, i, _ in corpus(comfy_host)})} inputs of "
          f"{len(classes)} nodes: {len(failures)} not refused as one named message")
    assert cases > 300
    assert not failures, failures[:10]


@pytest.mark.parametrize("node_id,inputs,where,words", [
    ("FewStepPCMScheduler", {"phases": 12, "ddim_timesteps": 10}, "phases", "cannot exceed ddim_timesteps"),
    ("FewStepSchedulePreview", {"phases": 12, "ddim_timesteps": 10}, "phases", "cannot exceed ddim_timesteps"),
    ("FewStepPCMDistill", {"phases": 60, "ddim_timesteps": 50}, "phases", "cannot exceed ddim_timesteps"),
    ("FewStepPCMDistill", {"w_min": 6.0, "w_max": 5.0}, "w_min", "larger than w_max"),
    ("FewStepLCMScheduler", {"steps": 40, "denoise": 0.5}, "steps", "40"),
])
def test_rules_between_inputs_give_one_message(comfy_host, node_id, inputs, where, words):
    classes = pack_nodes(comfy_host)
    values = dict(default_inputs(classes[node_id]), **inputs)
    errors = validation_errors(comfy_host, node_id, values, classes)
    widgets = widget_specs(classes[node_id])
    on_widgets = [e for e in errors if e["extra_info"].get("input_name") in widgets]
    assert len(on_widgets) == 1 and on_widgets[0]["extra_info"]["input_name"] == where, on_widgets
    assert words in on_widgets[0]["details"]


def test_a_bad_output_name_is_one_message(comfy_host):
    classes = pack_nodes(comfy_host)
    values = dict(default_inputs(classes["FewStepPCMDistill"]), output_name="x" * 300)
    errors = [e for e in validation_errors(comfy_host, "FewStepPCMDistill", values, classes)
              if e["type"] == "custom_validation_failed"]
    assert len(errors) == 1 and errors[0]["extra_info"]["input_name"] == "output_name", errors
    assert "300 characters" in errors[0]["details"]


def test_execute_refuses_bad_linked_values_naming_the_input(comfy_host, run_node):
    """Links bypass /prompt checks: each node's execute checks every widget it has (None for the other inputs,
    which are never reached)."""
    missed = []
    for node_id, cls, name, value in corpus(comfy_host):
        kind = widget_specs(cls)[name][0]
        if kind != "BOOLEAN" and (isinstance(value, (str, bool)) or value is None or isinstance(value, dict)):
            continue  # a link into a number input carries a number (ComfyUI checks the link's type)
        inputs = {entry.id: None for entry in cls.define_schema().inputs}
        inputs.update(default_inputs(cls))
        inputs[name] = value
        try:
            run_node(node_id, **inputs)
        except ValueError as error:
            if name in str(error):
                continue
        except Exception:  # noqa: BLE001 — anything else means the check was not reached first
            pass
        missed.append((node_id, name, value))
    assert not missed, missed[:10]


def test_refused_values_are_reported_by_comfyui_and_serialise(comfy_host):
    refused = RefusedValue(NAN, "cfg is NaN")
    for convert in (bool, int, float):
        with pytest.raises(ValueError, match="cfg is NaN"):
            convert(refused)
    assert f"{refused}" == "nan"  # ComfyUI formats the value into its error details
    import copy
    import json
    import pickle

    for twin in (copy.deepcopy(refused), copy.copy(refused), pickle.loads(pickle.dumps(refused))):
        assert twin == "nan" and isinstance(twin, RefusedValue) and twin.reason == "cfg is NaN"
        with pytest.raises(ValueError, match="cfg is NaN"):
            float(twin)

    assert json.loads(json.dumps({"v": refused})) == {"v": "nan"}


def test_valid_numbers_given_as_text_are_left_to_comfyui(comfy_host):
    """ComfyUI reads "12" as 12; the screen does not refuse what ComfyUI converts correctly."""
    classes = pack_nodes(comfy_host)
    assert input_problems(classes["FewStepPCMScheduler"], {"steps": "12", "denoise": "0.5"}) == {}


def test_a_long_wrong_value_is_shown_short(comfy_host):
    """A widget list shifted by one puts the training node's 100 prompt lines into `resume`: the message names the
    input and the value's start, on one short line, not the whole text."""
    from fewstep.host.input_checks import type_problem

    prompts = "\n".join(f"a handwritten digit {d}" for d in range(10) for _ in range(10))
    message = type_problem("resume", "BOOLEAN", None, None, prompts)
    assert message.startswith("resume must be true or false") and "a handwritten digit 0" in message
    assert len(message) < 200 and f"({len(repr(prompts))} characters)" in message
    assert type_problem("steps", "INT", 0, 10, "many") == "steps must be a whole number, got 'many'."
