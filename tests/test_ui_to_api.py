"""Tests for examples/ui_to_api.py, the UI workflow -> API prompt converter.

The pure tests use hand-written node definitions (excerpts of the stock ones
in the ``/object_info`` format) and need no ComfyUI.  The host tests load the
ComfyUI checkout, build ``object_info`` from it and check that real workflow
templates convert into prompts that ComfyUI's own validation accepts, apart
from the model files that do not exist on a test machine.
"""

import asyncio
import json
import sys
from importlib import resources
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "examples"))

from ui_to_api import FRONTEND_ONLY_TYPES, object_info_from_host, ui_to_api  # noqa: E402


# --------------------------------------------------------------------------
# Builders for hand-written workflows and node definitions
# --------------------------------------------------------------------------

def definition(required, optional=None, output=()):
    """A node definition in /object_info format; input_order follows the dicts."""
    inputs = {"required": required, "optional": optional or {}}
    return {
        "input": inputs,
        "input_order": {section: list(specs) for section, specs in inputs.items()},
        "output": list(output),
    }


def node(node_id, node_type, widgets=None, inputs=(), outputs=(), mode=0, **extra):
    """A UI-format node; ``inputs`` are (name, type, link) or (name, type, link, widget_name)."""
    ui_node = {
        "id": node_id,
        "type": node_type,
        "mode": mode,
        "inputs": [_input_slot(*spec) for spec in inputs],
        "outputs": [{"name": out_type, "type": out_type, "links": []} for out_type in outputs],
        **extra,
    }
    if widgets is not None:
        ui_node["widgets_values"] = widgets
    return ui_node


def _input_slot(name, slot_type, link, widget_name=None):
    slot = {"name": name, "type": slot_type, "link": link}
    if widget_name:
        slot["widget"] = {"name": widget_name}
    return slot


def workflow(nodes, links=()):
    """A UI workflow; ``links`` are [id, from_node, from_slot, to_node, to_slot, type]."""
    return {"nodes": list(nodes), "links": [list(link) for link in links], "groups": [], "extra": {}, "version": 0.4}


SAMPLER_NAMES = ["euler", "dpmpp_2m"]
SCHEDULERS = ["normal", "karras"]

# Excerpts of the stock definitions: same input names, types and order.
STOCK_OBJECT_INFO = {
    "CheckpointLoaderSimple": definition(
        {"ckpt_name": [["v1-5-pruned-emaonly-fp16.safetensors"]]}, output=["MODEL", "CLIP", "VAE"]),
    "CLIPTextEncode": definition(
        {"text": ["STRING", {"multiline": True, "dynamicPrompts": True}], "clip": ["CLIP"]},
        output=["CONDITIONING"]),
    "EmptyLatentImage": definition(
        {"width": ["INT", {"default": 512}], "height": ["INT", {"default": 512}],
         "batch_size": ["INT", {"default": 1}]},
        output=["LATENT"]),
    "KSampler": definition(
        {"model": ["MODEL"], "seed": ["INT", {"default": 0, "control_after_generate": True}],
         "steps": ["INT", {"default": 20}], "cfg": ["FLOAT", {"default": 8.0}],
         "sampler_name": [SAMPLER_NAMES], "scheduler": [SCHEDULERS], "positive": ["CONDITIONING"],
         "negative": ["CONDITIONING"], "latent_image": ["LATENT"], "denoise": ["FLOAT", {"default": 1.0}]},
        output=["LATENT"]),
    "VAEDecode": definition({"samples": ["LATENT"], "vae": ["VAE"]}, output=["IMAGE"]),
    "SaveImage": definition({"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}),
}


def template_path(name):
    """Path of a template shipped by the comfyui_workflow_templates package, or skip."""
    pytest.importorskip("comfyui_workflow_templates", reason="needs the comfyui_workflow_templates package")
    path = resources.files("comfyui_workflow_templates") / "templates" / name
    if not path.is_file():
        pytest.skip(f"template {name} is not in this version of comfyui_workflow_templates")
    return path


def load_template(name):
    return json.loads(template_path(name).read_text(encoding="utf-8"))


# The default text-to-image template, as the frontend would queue it.
DEFAULT_TEMPLATE_PROMPT = {
    "3": {"class_type": "KSampler", "inputs": {
        "seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
        "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {
        "text": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    # The template stores no widgets_values for SaveImage: the frontend shows the default.
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


# --------------------------------------------------------------------------
# Pure tests: widget mapping
# --------------------------------------------------------------------------

def test_default_template_maps_stock_widgets():
    """KSampler's stored control value after the seed must not shift steps/cfg/..."""
    assert ui_to_api(load_template("default.json"), STOCK_OBJECT_INFO) == DEFAULT_TEMPLATE_PROMPT


def test_widget_order_follows_input_order_then_optional():
    node_def = definition({"b": ["INT"], "a": ["STRING"]}, optional={"c": ["FLOAT"]})
    node_def["input_order"]["required"] = ["a", "b"]
    prompt = ui_to_api(workflow([node(1, "Node", widgets=["text", 7, 0.5])]), {"Node": node_def})
    assert prompt["1"]["inputs"] == {"a": "text", "b": 7, "c": 0.5}


def test_sockets_and_forced_inputs_take_no_widget_slot():
    node_def = definition({"model": ["MODEL"], "width": ["INT"],
                           "height": ["INT", {"forceInput": True}], "label": ["STRING"]})
    prompt = ui_to_api(workflow([node(1, "Node", widgets=[64, "x"])]), {"Node": node_def})
    assert prompt["1"]["inputs"] == {"width": 64, "label": "x"}


@pytest.mark.parametrize(("name", "options", "has_control"), [
    ("seed", {"control_after_generate": True}, True),
    ("value", {"control_after_generate": True}, True),  # V3 PrimitiveInt style
    ("seed", {}, True),  # legacy naming convention
    ("noise_seed", {}, True),
    ("seed", {"control_after_generate": False}, False),  # explicit opt-out wins
    ("steps", {}, False),
])
def test_int_control_after_generate_slot(name, options, has_control):
    node_def = definition({name: ["INT", options], "after": ["STRING"]})
    stored = [5, "randomize", "next"] if has_control else [5, "next"]
    prompt = ui_to_api(workflow([node(1, "Node", widgets=stored)]), {"Node": node_def})
    assert prompt["1"]["inputs"] == {name: 5, "after": "next"}


def test_combo_control_and_remote_widgets_are_skipped():
    node_def = definition({
        "choice": ["COMBO", {"options": ["a", "b"], "control_after_generate": True}],
        "file": ["COMBO", {"remote": {"route": "/files", "refresh_button": True}}],
        "after": ["STRING"],
    })
    # choice, its control and filter; file, auto-refresh toggle and refresh button; after.
    stored = ["b", "fixed", "", "f.png", False, "refresh", "next"]
    prompt = ui_to_api(workflow([node(1, "Node", widgets=stored)]), {"Node": node_def})
    assert prompt["1"]["inputs"] == {"choice": "b", "file": "f.png", "after": "next"}


def test_trailing_frontend_values_are_ignored():
    """LoadImage stores its upload button's value after the image name."""
    node_def = definition({"image": [["example.png"], {"image_upload": True}]}, output=["IMAGE", "MASK"])
    prompt = ui_to_api(workflow([node(1, "LoadImage", widgets=["example.png", "image"])]), {"LoadImage": node_def})
    assert prompt["1"]["inputs"] == {"image": "example.png"}


def test_dict_widgets_values_are_keyed_by_name():
    node_def = definition({"a": ["INT"], "b": ["STRING"]})
    prompt = ui_to_api(workflow([node(1, "Node", widgets={"b": "x", "a": 3, "extra": 1})]), {"Node": node_def})
    assert prompt["1"]["inputs"] == {"a": 3, "b": "x"}


def test_list_widget_values_are_wrapped_so_they_do_not_read_as_links():
    node_def = definition({"tags": ["COMBO", {"options": ["a", "b"], "multi_select": True}]})
    prompt = ui_to_api(workflow([node(1, "Node", widgets=[["a", "b"]])]), {"Node": node_def})
    assert prompt["1"]["inputs"] == {"tags": {"__value__": ["a", "b"]}}


def test_missing_widgets_values_fall_back_to_definition_defaults():
    node_def = definition({"size": ["INT", {"default": 8}], "mode": [["first", "second"]]})
    prompt = ui_to_api(workflow([node(1, "Node")]), {"Node": node_def})
    assert prompt["1"]["inputs"] == {"size": 8, "mode": "first"}


def test_missing_required_widget_value_raises():
    node_def = definition({"width": ["INT"], "height": ["INT", {"default": 8}]})
    with pytest.raises(ValueError, match=r"node 12 \(Node\).*'height'"):
        ui_to_api(workflow([node(12, "Node", widgets=[64])]), {"Node": node_def})


def test_missing_optional_widget_value_is_left_to_the_backend():
    node_def = definition({"model": ["MODEL"]}, optional={"strength": ["FLOAT", {"default": 1.0}]})
    prompt = ui_to_api(workflow([node(1, "Node", widgets=[])]), {"Node": node_def})
    assert prompt["1"]["inputs"] == {}


# --------------------------------------------------------------------------
# Pure tests: links and frontend-only nodes
# --------------------------------------------------------------------------

SOURCE_DEF = definition({}, output=["MODEL", "INT"])
SINK_DEF = definition({"model": ["MODEL"], "steps": ["INT"], "cfg": ["FLOAT"]})
PASS_DEF = definition({"clip": ["CLIP"], "model": ["MODEL"], "strength": ["FLOAT"]}, output=["MODEL"])
LINK_OBJECT_INFO = {"Source": SOURCE_DEF, "Sink": SINK_DEF, "Pass": PASS_DEF}


def sink(node_id=3, model_link=None, steps_link=None):
    """A Sink whose 'steps' widget is converted to an input when steps_link is given."""
    inputs = [("model", "MODEL", model_link)]
    if steps_link is not None:
        inputs.append(("steps", "INT", steps_link, "steps"))
    return node(node_id, "Sink", widgets=[20, 7.5], inputs=inputs)


def test_links_become_node_id_and_slot():
    prompt = ui_to_api(workflow(
        [node(1, "Source", outputs=["MODEL", "INT"]), sink(model_link=10)],
        [[10, 1, 0, 3, 0, "MODEL"]]), LINK_OBJECT_INFO)
    assert prompt == {
        "1": {"class_type": "Source", "inputs": {}},
        "3": {"class_type": "Sink", "inputs": {"model": ["1", 0], "steps": 20, "cfg": 7.5}},
    }


def test_converted_widget_takes_link_and_keeps_its_value_slot():
    prompt = ui_to_api(workflow(
        [node(1, "Source", outputs=["MODEL", "INT"]), sink(model_link=10, steps_link=11)],
        [[10, 1, 0, 3, 0, "MODEL"], [11, 1, 1, 3, 1, "INT"]]), LINK_OBJECT_INFO)
    assert prompt["3"]["inputs"] == {"model": ["1", 0], "steps": ["1", 1], "cfg": 7.5}


def test_version_1_link_objects_are_read():
    graph = workflow([node(1, "Source", outputs=["MODEL", "INT"]), sink(model_link=10)])
    graph["links"] = [{"id": 10, "origin_id": 1, "origin_slot": 0, "target_id": 3, "target_slot": 0,
                       "type": "MODEL"}]
    assert ui_to_api(graph, LINK_OBJECT_INFO)["3"]["inputs"]["model"] == ["1", 0]


def test_bypassed_node_is_rewired_to_its_input_of_the_same_type():
    bypassed = node(2, "Pass", widgets=[1.0], mode=4, outputs=["MODEL"],
                    inputs=[("clip", "CLIP", None), ("model", "MODEL", 10)])
    prompt = ui_to_api(workflow(
        [node(1, "Source", outputs=["MODEL", "INT"]), bypassed, sink(model_link=11)],
        [[10, 1, 0, 2, 1, "MODEL"], [11, 2, 0, 3, 0, "MODEL"]]), LINK_OBJECT_INFO)
    assert "2" not in prompt
    assert prompt["3"]["inputs"]["model"] == ["1", 0]


def test_bypass_prefers_the_input_at_the_output_index():
    """Two same-typed inputs: output 1 stands in for input 1, not the first LATENT."""
    object_info = {"Latents": definition({}, output=["LATENT", "LATENT"]),
                   "Swap": definition({"a": ["LATENT"], "b": ["LATENT"]}, output=["LATENT", "LATENT"]),
                   "Use": definition({"samples": ["LATENT"]})}
    swap = node(2, "Swap", mode=4, outputs=["LATENT", "LATENT"],
                inputs=[("a", "LATENT", 10), ("b", "LATENT", 11)])
    prompt = ui_to_api(workflow(
        [node(1, "Latents", outputs=["LATENT", "LATENT"]), swap, node(3, "Use", inputs=[("samples", "LATENT", 12)])],
        [[10, 1, 0, 2, 0, "LATENT"], [11, 1, 1, 2, 1, "LATENT"], [12, 2, 1, 3, 0, "LATENT"]]), object_info)
    assert prompt["3"]["inputs"]["samples"] == ["1", 1]


def test_chained_bypassed_nodes_are_all_skipped():
    first = node(2, "Pass", widgets=[1.0], mode=4, outputs=["MODEL"],
                 inputs=[("clip", "CLIP", None), ("model", "MODEL", 10)])
    second = node(4, "Pass", widgets=[1.0], mode=4, outputs=["MODEL"],
                  inputs=[("clip", "CLIP", None), ("model", "MODEL", 11)])
    prompt = ui_to_api(workflow(
        [node(1, "Source", outputs=["MODEL", "INT"]), first, second, sink(model_link=12)],
        [[10, 1, 0, 2, 1, "MODEL"], [11, 2, 0, 4, 1, "MODEL"], [12, 4, 0, 3, 0, "MODEL"]]), LINK_OBJECT_INFO)
    assert set(prompt) == {"1", "3"}
    assert prompt["3"]["inputs"]["model"] == ["1", 0]


def test_bypassed_node_without_matching_input_feeds_nothing():
    decoder = node(2, "Decode", mode=4, outputs=["IMAGE"],
                   inputs=[("samples", "LATENT", 10), ("vae", "VAE", None)])
    object_info = {"Latent": definition({}, output=["LATENT"]),
                   "Decode": definition({"samples": ["LATENT"], "vae": ["VAE"]}, output=["IMAGE"]),
                   "Save": definition({"images": ["IMAGE"]})}
    prompt = ui_to_api(workflow(
        [node(1, "Latent", outputs=["LATENT"]), decoder, node(3, "Save", inputs=[("images", "IMAGE", 11)])],
        [[10, 1, 0, 2, 0, "LATENT"], [11, 2, 0, 3, 0, "IMAGE"]]), object_info)
    assert prompt["3"]["inputs"] == {}


def test_muted_node_is_dropped_and_consumers_lose_the_input():
    prompt = ui_to_api(workflow(
        [node(1, "Source", outputs=["MODEL", "INT"], mode=2), sink(model_link=10, steps_link=11)],
        [[10, 1, 0, 3, 0, "MODEL"], [11, 1, 1, 3, 1, "INT"]]), LINK_OBJECT_INFO)
    # The converted 'steps' widget does not fall back to its stored value either.
    assert prompt == {"3": {"class_type": "Sink", "inputs": {"cfg": 7.5}}}


def test_reroutes_pass_their_link_through():
    reroutes = [node(5, "Reroute", inputs=[("", "*", 10)], outputs=["MODEL"]),
                node(6, "Reroute", inputs=[("", "*", 11)], outputs=["MODEL"])]
    prompt = ui_to_api(workflow(
        [node(1, "Source", outputs=["MODEL", "INT"]), *reroutes, sink(model_link=12)],
        [[10, 1, 0, 5, 0, "MODEL"], [11, 5, 0, 6, 0, "MODEL"], [12, 6, 0, 3, 0, "MODEL"]]), LINK_OBJECT_INFO)
    assert set(prompt) == {"1", "3"}
    assert prompt["3"]["inputs"]["model"] == ["1", 0]


def test_primitive_node_provides_its_value_to_linked_widgets():
    primitive = node(7, "PrimitiveNode", widgets=[42, "fixed"], outputs=["INT"])
    prompt = ui_to_api(workflow(
        [primitive, sink(3, steps_link=20), sink(4, steps_link=21)],
        [[20, 7, 0, 3, 1, "INT"], [21, 7, 0, 4, 1, "INT"]]), LINK_OBJECT_INFO)
    assert set(prompt) == {"3", "4"}
    assert prompt["3"]["inputs"]["steps"] == prompt["4"]["inputs"]["steps"] == 42


def test_notes_are_dropped():
    notes = [node(8, "Note", widgets=["remember"]), node(9, "MarkdownNote", widgets=["# title"])]
    prompt = ui_to_api(workflow([*notes, node(1, "Source", outputs=["MODEL", "INT"])]), LINK_OBJECT_INFO)
    assert set(prompt) == {"1"}


# --------------------------------------------------------------------------
# Pure tests: workflows that cannot be converted
# --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0, 4])
def test_unknown_node_type_raises_even_when_bypassed(mode):
    with pytest.raises(ValueError, match=r"node 5: unknown node type 'Gone'"):
        ui_to_api(workflow([node(5, "Gone", mode=mode)]), LINK_OBJECT_INFO)


def test_subgraph_instance_raises_not_implemented():
    graph = workflow([node(5, "9c1f4d2e-subgraph")])
    graph["definitions"] = {"subgraphs": [{"id": "9c1f4d2e-subgraph", "nodes": [], "links": []}]}
    with pytest.raises(NotImplementedError, match="node 5 is a subgraph"):
        ui_to_api(graph, LINK_OBJECT_INFO)


def test_widget_filled_at_queue_time_raises_not_implemented():
    object_info = {"WebcamCapture": definition({"image": ["WEBCAM", {}], "width": ["INT"]})}
    with pytest.raises(NotImplementedError, match=r"node 2 \(WebcamCapture\).*'image'"):
        ui_to_api(workflow([node(2, "WebcamCapture", widgets=["", 640])]), object_info)


def test_dangling_link_raises():
    with pytest.raises(ValueError, match="link 99"):
        ui_to_api(workflow([sink(model_link=99)]), LINK_OBJECT_INFO)


# --------------------------------------------------------------------------
# Host tests: real templates against the ComfyUI checkout
# --------------------------------------------------------------------------

# Templates that use only core nodes and no subgraphs, chosen to cover the
# stock SD1.5/SDXL graphs, PrimitiveNodes, bypassed and muted nodes and V3 nodes.
VALIDATED_TEMPLATES = [
    "default.json",
    "sdxl_simple_example.json",  # PrimitiveNodes feeding converted widgets
    "image_qwen_image.json",  # a bypassed LoRA loader
    "hunyuan_video_text_to_video.json",  # a muted VAEDecode, V3 video nodes
    "video_wan2_2_14B_t2v.json",  # a whole bypassed alternative pipeline
    "area_composition.json",
    "lora_multiple.json",
    "hiresfix_latent_workflow.json",
    "flux_schnell.json",
]

MODEL_FILE_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")


@pytest.fixture(scope="module")
def comfy_host(host):
    """ComfyUI with its built-in nodes (and this pack), started once by the pack's one loader, and described."""
    return object_info_from_host(), host.execution


def node_types(graph):
    """The backend node types a workflow needs."""
    return {n["type"] for n in graph["nodes"]} - FRONTEND_ONLY_TYPES


def is_missing_model_file(error):
    """A combo rejected a model file name because no models are installed."""
    received = error.get("extra_info", {}).get("received_value")
    return error["type"] == "value_not_in_list" and str(received).endswith(MODEL_FILE_EXTENSIONS)


def test_object_info_from_host_describes_v1_and_v3_nodes(comfy_host):
    object_info, _ = comfy_host
    ksampler = object_info["KSampler"]  # a V1 node
    assert ksampler["input_order"]["required"][:3] == ["model", "seed", "steps"]
    assert ksampler["input"]["required"]["seed"][1]["control_after_generate"] is True
    create_video = object_info["CreateVideo"]  # a V3 io.ComfyNode
    assert create_video["input_order"]["required"] == ["images", "fps"]
    assert create_video["output"] == ["VIDEO"]
    assert json.loads(json.dumps(object_info)) == object_info


def test_host_definitions_match_the_stock_excerpts(comfy_host):
    object_info, _ = comfy_host
    assert ui_to_api(load_template("default.json"), object_info) == DEFAULT_TEMPLATE_PROMPT


@pytest.mark.parametrize("template", VALIDATED_TEMPLATES)
def test_template_prompt_passes_comfyui_validation(comfy_host, template):
    object_info, execution = comfy_host
    graph = load_template(template)
    unknown = node_types(graph) - set(object_info)
    if unknown:
        pytest.skip(f"{template} uses node types this ComfyUI did not load: {sorted(unknown)}")

    prompt = ui_to_api(graph, object_info)
    valid, error, _, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))

    unexpected = {node_id: [e for e in entry["errors"] if not is_missing_model_file(e)]
                  for node_id, entry in node_errors.items()}
    assert {node_id: errors for node_id, errors in unexpected.items() if errors} == {}
    assert valid or error["type"] == "prompt_outputs_failed_validation"


def test_every_core_template_converts(comfy_host):
    """No false 'missing widget' errors on any real workflow this ComfyUI can describe."""
    object_info, _ = comfy_host
    templates_dir = template_path("default.json").parent
    converted = 0
    for path in sorted(templates_dir.iterdir()):
        if path.suffix != ".json":
            continue
        graph = json.loads(path.read_text(encoding="utf-8"))
        # index*.json files list the templates; subgraphs are not supported.
        if not isinstance(graph, dict) or "nodes" not in graph or graph.get("definitions", {}).get("subgraphs"):
            continue
        if node_types(graph) <= set(object_info):
            assert ui_to_api(graph, object_info), path.name
            converted += 1
    assert converted >= len(VALIDATED_TEMPLATES)
