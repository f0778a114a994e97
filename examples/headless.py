"""Run this pack's workflows in ComfyUI without its server.

Used by `examples/run.py` (the README's main command) and by the test suite, so
the examples users drag into ComfyUI are exactly what the tests execute. Finds
the host (COMFYUI_PATH, the ComfyUI holding this pack in `custom_nodes/`, then
`~/comfy/ComfyUI`), loads this pack the way ComfyUI does (`load_custom_node`),
and executes API-format prompts through ComfyUI's own `PromptExecutor`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUBS = REPO / "tests" / "stubs"


def _is_comfyui(path: Path) -> bool:
    return (path / "comfy").is_dir() and (path / "nodes.py").is_file() and (path / "execution.py").is_file()


def find_comfyui() -> tuple[Path | None, str]:
    """(the ComfyUI root, how it was found) or (None, why none was found)."""
    tried = []
    env = os.environ.get("COMFYUI_PATH")
    if env:
        if _is_comfyui(Path(env)):
            return Path(env).resolve(), f"COMFYUI_PATH={env}"
        tried.append(f"COMFYUI_PATH={env} is not a ComfyUI checkout")
    if REPO.parent.name == "custom_nodes" and _is_comfyui(REPO.parent.parent):
        return REPO.parent.parent, f"the ComfyUI whose custom_nodes holds this pack ({REPO.parent.parent})"
    home = Path.home() / "comfy" / "ComfyUI"
    if _is_comfyui(home):
        return home, f"~/comfy/ComfyUI ({home})"
    tried.append(f"no ComfyUI at {home}")
    return None, "no ComfyUI host found: " + "; ".join(tried) + " (set COMFYUI_PATH)"


def announce_comfyui() -> Path | None:
    """The ComfyUI root for a command-line tool, printing which one was found, or why none was (to stderr)."""
    root, how = find_comfyui()
    if root is None:
        print(how, file=sys.stderr)
    else:
        print(f"ComfyUI host: {how}")
    return root


def _real_torchvision() -> bool:
    try:
        import torchvision
    except Exception:
        return False
    return STUBS not in Path(torchvision.__file__).resolve().parents


def host_pythonpath() -> list[str]:
    """Extra import paths a ComfyUI process here needs.

    ComfyUI's core imports `torchvision.transforms` at start-up, but the CPU torch
    wheel of our dev machines has no matching torchvision; the stand-in in
    tests/stubs is used only when the real one does not import.
    """
    return [] if _real_torchvision() else [str(STUBS)]


@dataclass
class _ServerStub:
    """What PromptExecutor needs of ComfyUI's PromptServer when there is no server."""

    client_id: str | None = None
    last_node_id: str | None = None
    last_prompt_id: str | None = None
    messages: list = field(default_factory=list)

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class Host:
    """A ComfyUI loaded in this process, with this pack loaded as a custom node."""

    def __init__(self, root: Path, output_dir: Path | None = None, cpu: bool = True):
        self.root = Path(root)
        for p in [str(self.root)] + host_pythonpath():
            if p not in sys.path:
                sys.path.insert(0, p)
        import comfy.cli_args

        # Must precede the first import of model_management. SDPA is the backend
        # CUDA users get; on the CPU it is also several times faster than the
        # sub-quadratic default. cpu=False lets ComfyUI pick its device (benchmarks).
        comfy.cli_args.args.cpu = cpu
        comfy.cli_args.args.use_pytorch_cross_attention = True
        import comfy.model_management  # noqa: F401
        # Before nodes, as main.py does: nodes.py puts comfy/ first on sys.path, and an `import
        # utils.install_util` after that finds comfy/utils.py, so the host's own comfy_extras/
        # nodes_images.py (ImageCrop, ImageStitch, SaveAnimatedWEBP...) would fail to load.
        import utils.extra_config  # noqa: F401
        import execution
        import folder_paths
        import nodes

        self.nodes, self.execution = nodes, execution
        if output_dir is not None:
            folder_paths.set_output_directory(str(output_dir))
        self.output_dir = Path(folder_paths.get_output_directory())
        # A fresh input folder, so a workflow's uploads land neither in the repo nor in the host's; the
        # pack offers it the example inputs when it loads (nodes/example_inputs.py), as it does a user's.
        self._inputs = tempfile.TemporaryDirectory(prefix="attention_lab_inputs_")
        folder_paths.set_input_directory(self._inputs.name)
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        before = set(nodes.NODE_CLASS_MAPPINGS)
        if not asyncio.run(nodes.load_custom_node(str(REPO), module_parent="custom_nodes")):
            raise RuntimeError(f"ComfyUI could not load the pack at {REPO}: see the log above")
        self.pack_nodes = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
        self.pack = sys.modules[str(REPO).replace(".", "_x_")]
        self.server = _ServerStub()
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC)
        self._object_info = None

    @property
    def object_info(self) -> dict:
        if self._object_info is None:
            from ui_to_api import object_info_from_host

            self._object_info = object_info_from_host()
        return self._object_info

    def to_prompt(self, workflow: dict) -> dict:
        """An API-format prompt from a UI-format workflow (API format passes through)."""
        if "nodes" not in workflow:
            return workflow
        from ui_to_api import ui_to_api

        return ui_to_api(workflow, self.object_info)

    def run(self, workflow: dict) -> dict:
        """Validate and execute; return {node id: ui output} or raise with ComfyUI's messages."""
        prompt = self.to_prompt(workflow)
        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            raise WorkflowError(f"invalid workflow: {error}\n{json.dumps(node_errors, indent=1, default=str)}")
        self.executor.execute(prompt, prompt_id, {}, outputs)
        if not self.executor.success:
            errors = [data for event, data in self.executor.status_messages if event == "execution_error"]
            raise WorkflowError(json.dumps(errors, indent=1, default=str))
        return self.executor.history_result["outputs"]

    def node_output(self, node_id: str):
        """The cached Python outputs of one node of the last run (tensors, models...)."""
        entry = self.executor.caches.outputs.get(str(node_id))
        return None if entry is None else getattr(entry, "outputs", entry)


class WorkflowError(RuntimeError):
    pass


CHECKPOINT_LOADERS = ("CheckpointLoaderSimple", "UNETLoader")


def needs_checkpoint(path: Path) -> bool:
    """Whether an example loads a user's checkpoint instead of the demo model (e.g. the Flux and SD3 ones).

    Those have no demo-model run: the suite runs them with tiny random models swapped in for
    the loader (tests/test_host_dit_examples.py), and they have no preview picture.
    """
    workflow = json.loads(Path(path).read_text())
    return any(node.get("type") in CHECKPOINT_LOADERS for node in workflow.get("nodes", []))


sys.path.insert(0, str(Path(__file__).resolve().parent))  # ui_to_api sits beside this file
