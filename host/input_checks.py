"""Widget values of the pack's nodes, checked once, with one message per bad input that names it.

ComfyUI's own checks leave gaps for the values a prompt sent over the API can hold: NaN and ±Inf pass its min/max
test (every comparison with NaN is false), `bool("false")` is True, and it skips min/max for every input a node's
validate_inputs takes, while a validate_inputs message is repeated once per input it takes. So the pack checks
its widget values here, from the nodes' own schemas (declared types and ranges) plus each node's `cross_checks`
(rules between inputs, e.g. phases ≤ ddim_timesteps), in two places:
- `screen_prompt`, on every POST /prompt before ComfyUI validates it (host/registration.py hooks it in): each bad
  constant is replaced by a `RefusedValue` whose conversion fails, so ComfyUI's own validation reports it as an
  error on that one input, with our message, and the prompt is refused before anything runs;
- `check_values`, at the top of `execute`, for values that arrive through links or from in-process callers.
"""
import functools
import math

_NUMBER_KINDS = ("INT", "FLOAT")


class RefusedValue(str):
    """A prompt value the pack refuses: a string (so the error response stays JSON) whose conversion to the
    input's type raises ValueError with the reason. ComfyUI converts every constant widget value before anything
    else looks at it, and reports a failed conversion as an error on that input (execution.validate_inputs)."""

    def __new__(cls, original, reason):
        refused = super().__new__(cls, repr(original))
        refused.reason = reason
        return refused

    def _refuse(self, *_):
        raise ValueError(self.reason)

    def __reduce__(self):
        # ComfyUI deep-copies a queued prompt (a prompt whose other outputs are valid runs, carrying this value in
        # the node it will not run): copies must keep the reason
        return (_refused_from_text, (str.__str__(self), self.reason))

    def __deepcopy__(self, memo):
        return self  # immutable

    # Not __str__: ComfyUI formats the value into its error message. So STRING inputs cannot be refused this way
    # (str() always succeeds); the nodes check their few text inputs in validate_inputs.
    __bool__ = __int__ = __float__ = __index__ = _refuse


def _refused_from_text(text, reason):
    refused = str.__new__(RefusedValue, text)
    refused.reason = reason
    return refused


@functools.lru_cache(maxsize=None)
def widget_specs(node_cls):
    """{input id: (kind, min, max)} of a node's INT / FLOAT / BOOLEAN widgets, from its schema."""
    specs = {}
    for entry in node_cls.define_schema().inputs:
        kind = entry.get_io_type()
        if kind in _NUMBER_KINDS + ("BOOLEAN",):
            specs[entry.id] = (kind, getattr(entry, "min", None), getattr(entry, "max", None))
    return specs


def is_link(value):
    return isinstance(value, list) and len(value) == 2


def _number_text(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def value_problem(name, kind, low, high, value):
    """Why `value` cannot be input `name` of this kind and range, or None. Numbers in strings are read as ComfyUI
    reads them (it converts "12" to 12)."""
    problem = type_problem(name, kind, low, high, value)
    if problem or kind not in _NUMBER_KINDS:
        return problem
    number = _as_number(value, kind)
    if low is not None and number < low or high is not None and number > high:
        return f"{name} = {_number_text(number)} is outside its range {_number_text(low)}..{_number_text(high)}."
    return None


def _shown(value, limit=60):
    """repr(value), cut to `limit` characters: a whole prompt list in a widget shifted by one stays one line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 1]}… ({len(text)} characters)"


def type_problem(name, kind, low, high, value):
    """value_problem without the range: what ComfyUI's own checks let through or answer with a raw error."""
    if isinstance(value, RefusedValue):
        return value.reason
    if kind == "BOOLEAN":
        if isinstance(value, bool):
            return None
        return f"{name} must be true or false (a JSON boolean), got {_shown(value)}; a string such as \"false\" " \
               "would count as true."
    number = _as_number(value, kind)
    what = "a whole number" if kind == "INT" else "a number"
    if number is None:
        return f"{name} must be {what}, got {_shown(value)}."
    if isinstance(number, float) and math.isnan(number):
        return f"{name} is NaN (not a number); give {what} in {_number_text(low)}..{_number_text(high)}."
    if kind == "INT" and not (math.isfinite(number) and float(number).is_integer()):
        return f"{name} must be {what}, got {_number_text(number)}."
    return None


def _as_number(value, kind):
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value) if kind == "INT" else float(value)
        except ValueError:
            try:
                return float(value)  # "2.5" for an INT: reported as not whole, not as unreadable
            except ValueError:
                return None
    return None


def input_problems(node_cls, values, ranges=True):
    """{input id: message} for the constant widget values in `values` (links and absent inputs are skipped); the
    node's cross_checks run on the inputs that passed their own checks. ranges=False leaves a number outside its
    declared range unreported (ComfyUI's own check says it at /prompt) but still keeps it from the cross checks."""
    specs = widget_specs(node_cls)
    problems = {}
    good = {}
    for name, value in values.items():
        spec = specs.get(name)
        if spec is None or is_link(value):
            continue
        problem = value_problem(name, *spec, value)
        if problem:
            if ranges or type_problem(name, *spec, value):
                problems[name] = problem
        elif spec[0] in _NUMBER_KINDS:
            good[name] = _as_number(value, spec[0])
        else:
            good[name] = value
    cross = getattr(node_cls, "cross_checks", None)
    if cross is not None:
        for name, problem in cross(good).items():
            problems.setdefault(name, problem)
    return problems


def check_values(node_cls, **values):
    """Raise ValueError naming every bad input; for execute(), where linked values arrive unchecked."""
    problems = input_problems(node_cls, values)
    if problems:
        raise ValueError(" ".join(problems.values()))


def screen_prompt(prompt, node_classes):
    """Replace each bad constant input of the pack's nodes in an API prompt by a RefusedValue (in place)."""
    if not isinstance(prompt, dict):
        return prompt
    for node in prompt.values():
        if not isinstance(node, dict) or not isinstance(node.get("inputs"), dict):
            continue
        node_cls = node_classes.get(node.get("class_type"))
        if node_cls is None:
            continue
        inputs = node["inputs"]
        for name, problem in input_problems(node_cls, inputs, ranges=False).items():
            inputs[name] = RefusedValue(inputs[name], problem)
    return prompt
