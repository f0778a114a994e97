"""Load this pack, and run its workflows in ComfyUI without its server.

The one way in for everything outside ComfyUI: `examples/run.py` (the README's
main command), the tests, the benchmarks and `demo/train.py`, so the examples
users drag into ComfyUI are exactly what the tests execute.

- Importing this module registers the pack's folder as the package
  `attention_lab` (PACKAGE): `import attention_lab.attention_patches` works
  with no ComfyUI, for whatever needs only the plain-torch parts
  (`attention_patches/`, `inversion/`, `demo/`). The folder cannot simply go on
  sys.path: its `nodes/` would shadow ComfyUI's `nodes.py`.
- `load_host()` finds the host (COMFYUI_PATH, the ComfyUI holding this pack in
  `custom_nodes/`, then `~/comfy/ComfyUI`), loads this pack the way ComfyUI
  does (`load_custom_node`), and executes API-format prompts through ComfyUI's
  own `PromptExecutor`; `module("nodes.segment")` hands out the pack's modules.

ComfyUI names the pack's top module after its folder path and imports the rest
relative to it; here those imports resolve to the `attention_lab.*` modules
(`_ComfyNameForPack`), so every module exists once: a router, a technique or a
node class is the same object whether a test, a benchmark or ComfyUI's
executor got it, and `isinstance` holds across them.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUBS = REPO / "tests" / "stubs"
PACKAGE = "attention_lab"


class _ComfyNameForPack(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `<ComfyUI's name for this pack>.<sub>` with the module `attention_lab.<sub>`.

    ComfyUI's `load_custom_node` executes the pack's `__init__.py` as a module named
    after the folder's path; the `from .nodes import ...` in it then arrives here, and
    the submodule it gets is the one `import attention_lab.nodes` gives.
    """

    _init = str(REPO / "__init__.py")

    def find_spec(self, fullname, path=None, target=None):
        top, _, rest = fullname.partition(".")
        if not rest or top == PACKAGE or getattr(sys.modules.get(top), "__file__", None) != self._init:
            return None
        module = importlib.import_module(f"{PACKAGE}.{rest}")
        return importlib.util.spec_from_loader(fullname, self, is_package=hasattr(module, "__path__"))

    def create_module(self, spec):
        module = sys.modules[f"{PACKAGE}.{spec.name.partition('.')[2]}"]
        self._own_spec = module.__spec__  # the import system sets __spec__ to the alias's spec next
        return module

    def exec_module(self, module):
        module.__spec__ = self._own_spec


def register_pack() -> None:
    """Make this pack's folder importable as `attention_lab` (its `__init__`, ComfyUI's entry
    point, does not run: ComfyUI's own top module holds that), once per process."""
    if PACKAGE not in sys.modules:
        spec = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        spec.submodule_search_locations = [str(REPO)]
        sys.modules[PACKAGE] = importlib.util.module_from_spec(spec)
    if not any(isinstance(finder, _ComfyNameForPack) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ComfyNameForPack())


def module(name: str):
    """The pack's module `name` (e.g. "nodes.segment", "attention_patches.router"): `attention_lab.<name>`.
    Modules under `nodes/` import ComfyUI: load the host first (`load_host`)."""
    return importlib.import_module(f"{PACKAGE}.{name}")


register_pack()


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
        self.root, self.cpu = Path(root), cpu
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
        self.pack = sys.modules[str(REPO).replace(".", "_x_")]  # ComfyUI's top module of the pack (its entry point)
        self.server = _ServerStub()
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC)
        self._object_info = None

    @staticmethod
    def module(name: str):
        """The pack's module `name`, as this host runs it (see `module`)."""
        return module(name)

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


_host: Host | None = None


def load_host(cpu: bool = True, output_dir: Path | None = None) -> Host:
    """This process's ComfyUI host with the pack loaded: the first call starts it, later calls
    get the same one (a second start would load every node again). `cpu`: as `Host`;
    `output_dir`: where SaveImage writes (default: the host's own output folder)."""
    global _host
    if _host is None:
        root, how = find_comfyui()
        if root is None:
            raise SystemExit(how)
        _host = Host(root, output_dir=output_dir, cpu=cpu)
        return _host
    if _host.cpu != cpu:
        raise SystemExit(f"this process already holds a ComfyUI host with cpu={_host.cpu}: one process, one host "
                         "(run CPU and GPU work in separate processes)")
    if output_dir is not None:
        import folder_paths

        folder_paths.set_output_directory(str(output_dir))
        _host.output_dir = Path(output_dir)
    return _host


sys.path.insert(0, str(Path(__file__).resolve().parent))  # ui_to_api sits beside this file
