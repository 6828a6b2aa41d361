"""Every input and every output of every pack node has a tooltip (the frontend shows it on hover over the slot or
widget), read from the schemas of the node classes as the host loaded them."""
from __future__ import annotations


def _pack_nodes(comfy_host):
    """node id -> class, for the pack's nodes in the host's NODE_CLASS_MAPPINGS (the host's own module objects)."""
    prefix = comfy_host.nodes.NODE_CLASS_MAPPINGS["FewStepTCDSampler"].__module__.rsplit(".nodes.", 1)[0]
    return {node_id: cls for node_id, cls in comfy_host.nodes.NODE_CLASS_MAPPINGS.items()
            if cls.__module__.startswith(prefix + ".")}


def test_the_host_loaded_every_pack_node(comfy_host):
    from fewstep.nodes import NODES

    assert sorted(_pack_nodes(comfy_host)) == sorted(cls.define_schema().node_id for cls in NODES)


def test_every_input_and_output_has_a_tooltip(comfy_host):
    missing = []
    for node_id, cls in sorted(_pack_nodes(comfy_host).items()):
        schema = cls.define_schema()
        assert schema.outputs, f"{node_id} has no outputs"
        for kind, slots in (("input", schema.inputs), ("output", schema.outputs)):
            for index, slot in enumerate(slots):
                if not (slot.tooltip or "").strip():
                    missing.append(f"{node_id} {kind} {index} ({slot.display_name or slot.id or slot.get_io_type()})")
    assert not missing, "no tooltip: " + ", ".join(missing)
