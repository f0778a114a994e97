"""Convert a ComfyUI UI workflow (``workflow.json``) into an API prompt.

Example workflows are kept in the UI format because that is what people load
into ComfyUI, but ``execution.PromptExecutor`` (and so any test that runs an
example) only accepts the API prompt format.  The frontend performs this
conversion in JavaScript (``graphToPrompt``) when a workflow is queued; this
module mirrors that logic in Python so a workflow can be turned into a prompt
without a browser.

The converter works from node definitions in the ``/object_info`` format
rather than importing ComfyUI: the mapping from ``widgets_values`` to input
names is purely positional, and only the node definitions say which inputs own
a widget.  ``object_info_from_host`` builds those definitions from a ComfyUI
that is already loaded in this process.

Where the frontend would silently repair a workflow (a widget value missing
because the node definition gained an input since the workflow was saved, or
a node type that no longer exists), this converter raises instead: a stale
example should fail loudly rather than run with shifted values.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

# LiteGraph node modes (``LGraphEventMode``) that change what gets executed.
MODE_MUTED = 2  # "never": the node is left out of the prompt.
MODE_BYPASSED = 4  # consumers are wired to one of the node's own inputs.

# Nodes that exist only in the frontend and never reach the backend.
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
REROUTE_TYPE = "Reroute"
PRIMITIVE_TYPE = "PrimitiveNode"
FRONTEND_ONLY_TYPES = NOTE_TYPES | {REROUTE_TYPE, PRIMITIVE_TYPE}

# Input types for which the frontend creates a widget (its ``ComfyWidgets``
# table); every other type is a plain socket and has no ``widgets_values`` slot.
WIDGET_TYPES = frozenset({
    "INT", "FLOAT", "BOOLEAN", "STRING", "MARKDOWN", "COMBO", "IMAGEUPLOAD",
    "FILEUPLOAD", "COLOR", "IMAGECOMPARE", "TREESELECT", "MULTISELECT",
    "CHART", "GALLERIA", "SELECTBUTTON", "TEXTAREA",
})

# Widgets whose prompt value the frontend produces at queue time (a webcam
# capture, a render of a 3D scene, a microphone recording), so a saved
# workflow does not contain it.
QUEUE_TIME_WIDGET_TYPES = frozenset({"WEBCAM", "LOAD_3D", "LOAD_3D_ANIMATION", "AUDIO_RECORD"})

# Legacy convention: INT inputs with these names get a "control after
# generate" widget even when their definition does not ask for one.
SEED_INPUT_NAMES = frozenset({"seed", "noise_seed"})


@dataclass(frozen=True)
class _Widget:
    """One widget input of a node definition, in ``widgets_values`` order."""

    name: str
    required: bool
    # What the frontend shows before any value is loaded; None if nothing.
    default: Any
    # Frontend-only widgets (seed control, combo filter, refresh button...)
    # stored in ``widgets_values`` right after this widget's own value.
    trailing_slots: int


@dataclass(frozen=True)
class _Link:
    origin_id: Any
    origin_slot: int


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow into an API prompt.

    ``workflow`` is the parsed ``workflow.json``; ``object_info`` maps node
    class names to definitions as served by ComfyUI's ``/object_info``.
    Returns ``{node_id: {"class_type": ..., "inputs": {...}}}`` where a linked
    input is ``[origin_node_id, origin_slot]``.

    Raises ``ValueError`` for a node type missing from ``object_info``, for a
    required widget without a value and for broken links, and
    ``NotImplementedError`` for subgraphs and queue-time widgets.
    """
    graph = _Graph(workflow)
    for node in graph.nodes.values():
        _check_supported(node, graph, object_info)

    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY_TYPES or node.get("mode") in (MODE_MUTED, MODE_BYPASSED):
            continue
        prompt[str(node["id"])] = {
            "class_type": node["type"],
            "inputs": _node_inputs(node, object_info[node["type"]], graph),
        }

    # A link that resolved to a muted node points at nothing: the frontend
    # drops such inputs (it does not fall back to the widget value).
    for entry in prompt.values():
        inputs = entry["inputs"]
        for name in [n for n, v in inputs.items() if isinstance(v, list) and v[0] not in prompt]:
            del inputs[name]
    return prompt


def object_info_from_host() -> dict:
    """Build ``/object_info`` from the ComfyUI loaded in this process.

    Mirrors ``node_info`` in ComfyUI's ``server.py``, which is a closure inside
    ``PromptServer.__init__`` and so cannot be called without starting a
    server.  V3 nodes (``comfy_api`` ``ComfyNode`` subclasses) describe
    themselves through ``GET_NODE_INFO_V1``, as in the server.  The result is
    round-tripped through JSON so tuples become lists exactly as a client of
    ``/object_info`` would see them.

    ComfyUI must be importable and its nodes registered (e.g. after
    ``nodes.init_extra_nodes``); nodes whose description fails are logged and
    skipped, as the server does.
    """
    import folder_paths
    import nodes
    from comfy_api.internal import _ComfyNodeInternal

    def node_info(class_name: str) -> dict:
        node_class = nodes.NODE_CLASS_MAPPINGS[class_name]
        if issubclass(node_class, _ComfyNodeInternal):
            return node_class.GET_NODE_INFO_V1()
        input_types = node_class.INPUT_TYPES()
        info = {
            "input": input_types,
            "input_order": {section: list(specs.keys()) for section, specs in input_types.items()},
            "output": node_class.RETURN_TYPES,
            "output_is_list": getattr(node_class, "OUTPUT_IS_LIST", [False] * len(node_class.RETURN_TYPES)),
            "output_name": getattr(node_class, "RETURN_NAMES", node_class.RETURN_TYPES),
            "name": class_name,
            "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(class_name, class_name),
            "description": getattr(node_class, "DESCRIPTION", ""),
            "python_module": getattr(node_class, "RELATIVE_PYTHON_MODULE", "nodes"),
            "category": getattr(node_class, "CATEGORY", "sd"),
            "output_node": getattr(node_class, "OUTPUT_NODE", False) is True,
        }
        if hasattr(node_class, "OUTPUT_TOOLTIPS"):
            info["output_tooltips"] = node_class.OUTPUT_TOOLTIPS
        if getattr(node_class, "DEPRECATED", False):
            info["deprecated"] = True
        if getattr(node_class, "EXPERIMENTAL", False):
            info["experimental"] = True
        if hasattr(node_class, "API_NODE"):
            info["api_node"] = node_class.API_NODE
        return info

    object_info = {}
    with folder_paths.cache_helper:
        for class_name in nodes.NODE_CLASS_MAPPINGS:
            try:
                object_info[class_name] = json.loads(json.dumps(node_info(class_name)))
            except Exception:
                logging.exception("could not describe node %r; leaving it out of object_info", class_name)
    return object_info


class _Graph:
    """Nodes and links of a workflow, indexed for link resolution."""

    def __init__(self, workflow: dict):
        self.nodes = {node["id"]: node for node in workflow["nodes"]}
        self.links = dict(_parse_link(link) for link in workflow.get("links") or [])
        self.subgraph_ids = {sub["id"] for sub in (workflow.get("definitions") or {}).get("subgraphs") or []}

    def link(self, link_id: int, consumer: dict) -> tuple[_Link, dict]:
        """Return a link and its origin node, failing loudly if either is missing."""
        link = self.links.get(link_id)
        if link is None or link.origin_id not in self.nodes:
            raise ValueError(f"node {consumer['id']} ({consumer['type']}): link {link_id} "
                             "refers to a link or node that is not in the workflow")
        return link, self.nodes[link.origin_id]

    def input_source(self, node: dict, slot: dict) -> Any:
        """What feeds a linked input of an executed node.

        Returns ``[origin_id, origin_slot]`` of a real node output, the value
        of a PrimitiveNode linked directly to the input, or None when nothing
        executable feeds it (a dead end through a bypassed node or reroute).
        """
        link, origin = self.link(slot["link"], node)
        if origin["type"] == PRIMITIVE_TYPE:
            return _primitive_value(origin)
        return self._resolve_output(origin, link.origin_slot, slot["type"], set())

    def _resolve_input(self, node: dict, slot: dict, wanted_type: str, visited: set) -> list | None:
        if slot.get("link") is None:
            return None
        link, origin = self.link(slot["link"], node)
        return self._resolve_output(origin, link.origin_slot, wanted_type, visited)

    def _resolve_output(self, node: dict, output_slot: int, wanted_type: str, visited: set) -> list | None:
        """Walk back through bypassed nodes and reroutes to a real output."""
        key = (node["id"], output_slot)
        if key in visited:
            raise ValueError(f"node {node['id']} ({node['type']}): circular link through output {output_slot}")
        visited.add(key)

        inputs = node.get("inputs") or []
        if node.get("mode") == MODE_BYPASSED:
            index = _bypass_input_index(node, output_slot, wanted_type)
            if index is None:
                return None
            # The frontend continues with the bypassed node's own input type.
            return self._resolve_input(node, inputs[index], inputs[index]["type"], visited)
        if node["type"] == REROUTE_TYPE:
            return self._resolve_input(node, inputs[0], wanted_type, visited) if inputs else None
        if node["type"] == PRIMITIVE_TYPE:
            # A primitive only sets the widgets it is linked to directly
            # (see input_source); reached indirectly it feeds nothing.
            return None
        return [str(node["id"]), output_slot]


def _parse_link(link: list | dict) -> tuple[int, _Link]:
    """Read a link in either serialisation: the 0.4 array or the version 1 object."""
    if isinstance(link, dict):
        return link["id"], _Link(link["origin_id"], link["origin_slot"])
    link_id, origin_id, origin_slot = link[:3]
    return link_id, _Link(origin_id, origin_slot)


def _check_supported(node: dict, graph: _Graph, object_info: dict) -> None:
    """Reject nodes the converter cannot express, whatever their mode."""
    node_type = node["type"]
    if node_type in graph.subgraph_ids:
        raise NotImplementedError(
            f"node {node['id']} is a subgraph instance (subgraph {node_type}); subgraphs are not supported")
    if node_type in FRONTEND_ONLY_TYPES:
        return
    if node_type not in object_info:
        raise ValueError(f"node {node['id']}: unknown node type {node_type!r} (not in object_info)")
    for name, spec, _ in _ordered_inputs(object_info[node_type]):
        widget_type = _spec_type(spec)[0]
        if widget_type in QUEUE_TIME_WIDGET_TYPES:
            raise NotImplementedError(
                f"node {node['id']} ({node_type}): input {name!r} is a {widget_type} widget whose value "
                "the frontend produces when queueing; it cannot be converted")


def _node_inputs(node: dict, node_def: dict, graph: _Graph) -> dict:
    """Widget values first, then links, which override converted widgets (as the frontend does)."""
    widgets = _widgets(node_def)
    inputs = _widget_values(node, widgets)
    for slot in node.get("inputs") or []:
        if slot.get("link") is None:
            continue
        source = graph.input_source(node, slot)
        # Nothing upstream: a converted widget keeps its own value.
        if source is not None:
            inputs[slot["name"]] = source

    for widget in widgets:
        if widget.required and widget.name not in inputs:
            raise ValueError(
                f"node {node['id']} ({node['type']}): required widget input {widget.name!r} has no value "
                f"(widgets_values: {node.get('widgets_values')!r}); was the workflow saved with an older "
                f"definition of {node['type']}?")
    return inputs


def _widget_values(node: dict, widgets: list[_Widget]) -> dict:
    """Map the node's ``widgets_values`` onto input names.

    A list is positional, in widget creation order, with the frontend-only
    widgets' values interleaved.  A dict (written by some custom nodes'
    frontend extensions) is keyed by input name.  Without ``widgets_values``
    the frontend shows the definition defaults, so those are used.  Values
    past the last known widget (upload buttons, previews) are ignored, as the
    frontend ignores them.
    """
    values = node.get("widgets_values")
    inputs = {}
    if values is None:
        for widget in widgets:
            if widget.default is not None:
                inputs[widget.name] = _api_value(widget.default)
    elif isinstance(values, dict):
        for widget in widgets:
            if widget.name in values:
                inputs[widget.name] = _api_value(values[widget.name])
    else:
        position = 0
        for widget in widgets:
            if position < len(values):
                inputs[widget.name] = _api_value(values[position])
            position += 1 + widget.trailing_slots
    return inputs


def _widgets(node_def: dict) -> list[_Widget]:
    """List a definition's widget inputs in the order the frontend creates them."""
    widgets = []
    for name, spec, required in _ordered_inputs(node_def):
        widget_type, options = _spec_type(spec)
        if widget_type in WIDGET_TYPES and not options.get("forceInput"):
            widgets.append(_Widget(name, required, _default_value(spec, options),
                                   _trailing_slots(name, widget_type, options)))
    return widgets


def _ordered_inputs(node_def: dict) -> list[tuple[str, list, bool]]:
    """Required then optional inputs, following ``input_order`` where given.

    Inputs missing from ``input_order`` come last, as in the frontend's
    ``getOrderedInputSpecs``.
    """
    sections = {section: node_def.get("input", {}).get(section) or {} for section in ("required", "optional")}
    order = node_def.get("input_order") or {}
    ordered, seen = [], set()
    for section in ("required", "optional"):
        for name in order.get(section, []):
            if name in sections[section] and name not in seen:
                ordered.append((name, sections[section][name], section == "required"))
                seen.add(name)
    for section, specs in sections.items():
        for name, spec in specs.items():
            if name not in seen:
                ordered.append((name, spec, section == "required"))
                seen.add(name)
    return ordered


def _spec_type(spec: list) -> tuple[str, dict]:
    """The type the frontend picks a widget for, and the input's options.

    A list as type is the legacy COMBO spelling; ``widgetType`` overrides the
    socket type for V3 inputs.
    """
    input_type = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(input_type, list):
        input_type = "COMBO"
    return options.get("widgetType") or input_type, options


def _trailing_slots(name: str, widget_type: str, options: dict) -> int:
    """Count the frontend-only widgets created right after this input's widget.

    INT: a "control after generate" combo when the definition asks for it, or
    when the input is named like a seed and the definition does not say.
    COMBO: an auto-refresh toggle and optional refresh button for remote
    options, then a control combo and a filter text field.
    """
    control = options.get("control_after_generate")
    if widget_type == "INT":
        return 1 if (control if control is not None else name in SEED_INPUT_NAMES) else 0
    if widget_type == "COMBO" and not options.get("multi_select"):
        remote = options.get("remote")
        remote_slots = (1 + bool(remote.get("refresh_button"))) if remote else 0
        return remote_slots + (2 if control else 0)
    return 0


def _default_value(spec: list, options: dict) -> Any:
    """The value the frontend gives a fresh widget: the default, else a combo's first option."""
    if options.get("default") is not None:
        return options["default"]
    choices = spec[0] if isinstance(spec[0], list) else options.get("options")
    return choices[0] if choices else None


def _primitive_value(primitive: dict) -> Any:
    """What a PrimitiveNode writes into the widgets it is linked to: its own widget's value."""
    values = primitive.get("widgets_values")
    if not values:
        raise ValueError(f"node {primitive['id']} (PrimitiveNode) has no value to provide")
    return _api_value(values[0])


def _api_value(value: Any) -> Any:
    """Wrap list values: in a prompt a bare two-item list means a link."""
    return {"__value__": value} if isinstance(value, list) else value


def _bypass_input_index(node: dict, output_slot: int, wanted_type: str) -> int | None:
    """Pick the input of a bypassed node that stands in for one of its outputs.

    Same order of preference as the frontend (``ExecutableNodeDTO``): the
    input at the output's index if its type fits both the output and the
    consumer, else the first input of exactly the consumer's type, else the
    first input compatible with both.
    """
    inputs = node.get("inputs") or []
    if not inputs:
        return None
    if wanted_type in ("*", ""):
        return output_slot if output_slot < len(inputs) else 0
    output_type = node["outputs"][output_slot]["type"]
    if output_slot < len(inputs):
        opposite_type = inputs[output_slot]["type"]
        if _types_compatible(opposite_type, output_type) and _types_compatible(opposite_type, wanted_type):
            return output_slot
    for index, slot in enumerate(inputs):
        if slot["type"] == wanted_type:
            return index
    for index, slot in enumerate(inputs):
        if _types_compatible(slot["type"], output_type) and _types_compatible(slot["type"], wanted_type):
            return index
    return None


def _types_compatible(type_a: str, type_b: str) -> bool:
    """LiteGraph's ``isValidConnection``: ``*`` matches anything, unions are comma-separated."""
    if type_a in ("", "*", None) or type_b in ("", "*", None):
        return True
    set_a = set(str(type_a).lower().split(","))
    set_b = set(str(type_b).lower().split(","))
    return bool(set_a & set_b)
