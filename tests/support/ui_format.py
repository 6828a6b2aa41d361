"""UI-format (litegraph) workflows <-> API-format prompts, using the server's /object_info.

`api_to_ui` lays an API prompt out as a drag-and-drop workflow (what workflows/ ships);
`ui_to_api` turns it back the way the frontend's "queue prompt" does: widget values in the order of the
node's inputs (an extra control value after widgets with a control widget, see `_has_control`, and the
"upload" widget's value after an image_upload combo), links for connected inputs. A shipped UI workflow is correct when ui_to_api gives back its API twin.
"""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _spec(info: dict, name: str):
    for section in ("required", "optional"):
        if name in info["input"].get(section, {}):
            return info["input"][section][name]
    raise KeyError(name)


def _input_names(info: dict):
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    return list(order.get("required", [])) + list(order.get("optional", []))


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _type_name(kind) -> str:
    return "COMBO" if isinstance(kind, list) else kind


# INT inputs with these names get a control widget unless the input says otherwise (see _has_control).
SEED_NAMES = ("seed", "noise_seed")


def _has_control(name: str, spec) -> bool:
    """Whether the frontend puts a "control after generate" widget (and its value) after this input's widget.

    comfyui_frontend_package 1.32.9 (useIntWidget): `if (spec.control_after_generate ?? ["seed", "noise_seed"]
    .includes(spec.name))` adds the control, so an INT named seed or noise_seed gets one unless the input sets
    control_after_generate (False: none). A COMBO gets one only when it sets control_after_generate (addComboWidget).
    """
    options = (spec[1] or {}) if len(spec) > 1 else {}
    setting = options.get("control_after_generate")
    if setting is None:
        return spec[0] == "INT" and name in SEED_NAMES
    return bool(setting) and (spec[0] == "INT" or isinstance(spec[0], list) or spec[0] == "COMBO")


def _upload_widget(spec):
    """The value of the "upload" widget the frontend adds after a file combo with image_upload (the combo's name
    for it, "image" on LoadImage; serialized into widgets_values), or None when the input has none."""
    options = (spec[1] or {}) if len(spec) > 1 else {}
    return "image" if options.get("image_upload") else None


DEFAULT_SIZE = (300, 200)
NOTE_TYPES = ("Note", "MarkdownNote")  # the frontend's own virtual nodes: shown on the canvas, never in a prompt
NOTE_SIZE = (620, 180)
TITLE_HEIGHT, GAP = 30, 40  # LiteGraph draws a node's title above its pos; the space between nodes


def layout(api: dict, sizes: dict | None = None) -> dict:
    """{node key: (x, y)}: one column per link depth (a node sits right of everything it reads from), nodes of a
    column stacked top to bottom, each box (title included) `GAP` apart, at `sizes` ({key: (w, h)}, the
    frontend's own sizes; DEFAULT_SIZE without them)."""
    sizes = sizes or {}
    depth = {}

    def depth_of(key):
        if key not in depth:
            depth[key] = 0  # a cycle cannot occur in a valid prompt; this stops one anyway
            sources = [v[0] for v in api[key]["inputs"].values()
                       if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] in api]
            depth[key] = 1 + max((depth_of(src) for src in sources), default=-1)
        return depth[key]

    columns = {}
    for key in api:
        columns.setdefault(depth_of(key), []).append(key)
    positions, x = {}, 40
    for d in sorted(columns):
        y = 40 + TITLE_HEIGHT
        for key in columns[d]:
            positions[key] = (x, y)
            y += sizes.get(key, DEFAULT_SIZE)[1] + TITLE_HEIGHT + GAP
        x += max(sizes.get(key, DEFAULT_SIZE)[0] for key in columns[d]) + GAP
    return positions


def api_to_ui(api: dict, object_info: dict, sizes: dict | None = None, note: str | None = None,
              models=(), twin: str | None = None) -> dict:
    """The UI workflow of `api`; with `note`, a Markdown Note above the graph (id n + 1, so the graph's own nodes
    keep ids 1..n); `models` ({name, url, directory} dicts) go on the nodes whose widget value is that file name
    (the frontend's per-node check), the rest on the workflow (checked whatever the widgets say); `twin` (the API
    file's id) is kept in extra.fewstep_api_twin."""
    ids = {key: i + 1 for i, key in enumerate(api)}
    links, nodes = [], []
    out_links = {}
    for key, node in api.items():
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name in _input_names(info):
            spec = _spec(info, name)
            # an optional widget the API graph leaves out shows its default (what the frontend puts there)
            value = node["inputs"].get(name, (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
                                       .get("default"))
            linked = isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            if linked:
                link_id = len(links) + 1
                src, slot = value
                src_type = _type_name(object_info[api[src]["class_type"]]["output"][slot])
                links.append([link_id, ids[src], slot, ids[key], len(inputs), src_type])
                out_links.setdefault((src, slot), []).append(link_id)
                entry = {"name": name, "type": _type_name(spec[0]), "link": link_id}
                if _is_widget(spec):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            if _is_widget(spec):
                widgets.append(None if linked else value)
                if _has_control(name, spec):
                    widgets.append("fixed")
                if _upload_widget(spec) is not None:
                    widgets.append(_upload_widget(spec))
        nodes.append({"key": key, "inputs": inputs, "widgets": widgets, "info": info})
    sizes = sizes or {}
    positions = layout(api, sizes)
    top = NOTE_SIZE[1] + TITLE_HEIGHT + GAP if note else 0  # the note's row above the graph
    positions = {key: (x, y + top) for key, (x, y) in positions.items()}
    ui_nodes = []
    for order, n in enumerate(nodes):
        info, key = n["info"], n["key"]
        outputs = [{"name": name, "type": _type_name(kind), "links": out_links.get((key, slot), []), "slot_index": slot}
                   for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
        ui_nodes.append({
            "id": ids[key], "type": api[key]["class_type"], "title": api[key].get("_meta", {}).get("title"),
            "pos": list(positions[key]), "size": list(sizes.get(key, DEFAULT_SIZE)), "flags": {},
            "order": order, "mode": 0, "inputs": n["inputs"], "outputs": outputs,
            "properties": {"Node name for S&R": api[key]["class_type"]}, "widgets_values": n["widgets"],
        })
    unplaced = []
    for model in models:
        users = [node for node in ui_nodes if model["name"] in node["widgets_values"]]
        for node in users:
            node["properties"].setdefault("models", []).append(dict(model))
        if not users:
            unplaced.append(dict(model))
    if note:
        ui_nodes.append({
            "id": len(api) + 1, "type": "MarkdownNote", "title": "About this workflow",
            "pos": [40, 40 + TITLE_HEIGHT], "size": list(NOTE_SIZE), "flags": {}, "order": len(ui_nodes), "mode": 0,
            "inputs": [], "outputs": [], "properties": {}, "widgets_values": [note], "color": "#432", "bgcolor": "#653",
        })
    workflow = {"last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
                "groups": [], "config": {}, "extra": {"fewstep_api_twin": twin} if twin else {}, "version": 0.4}
    if unplaced:
        workflow["models"] = unplaced
    return workflow


def ui_to_api(ui: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) != 0 or node["type"] in NOTE_TYPES:
            continue
        info = object_info[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name in _input_names(info):
            spec = _spec(info, name)
            if _is_widget(spec):
                if not values:
                    raise ValueError(f"node {node['id']} ({node['type']}): widgets_values ran out at {name!r}")
                value = values.pop(0)
                if _has_control(name, spec):
                    if not values:
                        raise ValueError(f"node {node['id']} ({node['type']}): no control value after {name!r}")
                    values.pop(0)
                if _upload_widget(spec) is not None:
                    if not values or values.pop(0) != _upload_widget(spec):
                        raise ValueError(f"node {node['id']} ({node['type']}): no upload widget value after {name!r}")
                if name not in linked:
                    inputs[name] = value
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widgets_values left over: {values}")
        entry = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        api[str(node["id"])] = entry
    return api


def renumbered(api: dict) -> dict:
    """The API prompt with node ids 1..n in their order, as api_to_ui numbers them."""
    ids = {key: str(i + 1) for i, key in enumerate(api)}
    out = {}
    for key, node in api.items():
        inputs = {k: ([ids[v[0]], v[1]] if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) else v)
                  for k, v in node["inputs"].items()}
        out[ids[key]] = dict(node, inputs=inputs)
    return out
