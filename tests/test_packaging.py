"""The pack installs and loads the way ComfyUI, the Manager and the registry expect."""

import ast
import importlib.metadata
import logging
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import headless

ROOT = Path(__file__).resolve().parents[1]


def test_dependencies_agree_and_torch_is_not_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert sorted(project["dependencies"]) == sorted(requirements)
    assert not any(dep.split("=")[0].split(">")[0].strip() == "torch" for dep in requirements)


def test_registry_metadata_as_comfyui_reads_it(host):
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(ROOT))
    assert config.project.name == "comfyui-attention-lab"
    assert config.tool_comfy.display_name == "Attention Lab"
    assert config.tool_comfy.publisher_id and config.tool_comfy.icon
    assert config.tool_comfy.web == "web" and (ROOT / "web").is_dir()
    assert config.project.supported_comfyui_version.startswith(">=")


def test_missing_optional_dependency_logs_one_line_and_comfyui_still_loads_the_pack(host, tmp_path):
    inputs = tmp_path / "input"
    shutil.copytree(ROOT / "examples" / "inputs", inputs)
    script = textwrap.dedent(f"""
        import asyncio, logging, sys
        sys.modules["sklearn"] = None  # as if scikit-learn were not installed
        sys.path[:0] = {[str(host.root)] + headless.host_pythonpath()!r}
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        import folder_paths, nodes
        # an input folder that has the example images already: nothing to copy, no line about it
        folder_paths.set_input_directory({str(inputs)!r})
        records = []
        logging.getLogger().addHandler(type("H", (logging.Handler,), {{"emit": lambda self, r: records.append(r.getMessage())}})())
        assert asyncio.run(nodes.load_custom_node({str(ROOT)!r}))
        ours = [m for m in records if m.startswith("[Attention Lab]")]
        print(ours)
        assert len(ours) == 1 and "scikit-learn" in ours[0], ours
        assert "DemoModelLoader" in nodes.NODE_CLASS_MAPPINGS
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=host.root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_one_host_per_process(host):
    assert headless.load_host() is host
    with pytest.raises(SystemExit, match="one process, one host"):
        headless.load_host(cpu=False)


def test_each_module_of_the_pack_exists_once_when_the_host_loads_first(host):
    """The order examples/run.py has: ComfyUI loads the pack, then `attention_lab.*` is imported; the
    names ComfyUI gave the pack's submodules and `attention_lab.*` are one set of modules."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "examples")!r})
        import headless
        host = headless.load_host()
        from attention_lab.attention_patches.router import AttentionRouter
        from attention_lab.nodes import patching
        assert patching.AttentionRouter is AttentionRouter
        assert host.pack.nodes is sys.modules["attention_lab.nodes"]
        assert host.pack.nodes.__spec__.name == "attention_lab.nodes"
        comfy_names = [name for name in sys.modules if name.startswith(host.pack.__name__ + ".")]
        assert comfy_names, sorted(sys.modules)
        for name in comfy_names:
            assert sys.modules[name] is sys.modules["attention_lab." + name.split(".", 1)[1]], name
        assert host.nodes.NODE_CLASS_MAPPINGS["DemoModelLoader"].__module__ == "attention_lab.nodes.demo"
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_headless_host_loads_comfyuis_own_image_nodes(host):
    # nodes_images.py imports server -> utils.install_util; loaded in the wrong order, `utils`
    # is comfy/utils.py and these stock nodes vanish from workflows run through examples/run.py
    for name in ("ImageCrop", "ImageStitch", "SaveAnimatedWEBP"):
        assert name in host.nodes.NODE_CLASS_MAPPINGS, name


def test_loaded_pack_offers_the_example_inputs_to_loadimage(host):
    """The host's input folder starts empty (examples/headless.py): the pack, loading, put the example images there."""
    import folder_paths

    inputs = sorted((ROOT / "examples" / "inputs").glob("*.png"))
    assert inputs
    offered = host.nodes.NODE_CLASS_MAPPINGS["LoadImage"].INPUT_TYPES()["required"]["image"][0]
    for path in inputs:
        assert path.name in offered, (path.name, offered)
        assert (Path(folder_paths.get_input_directory()) / path.name).read_bytes() == path.read_bytes()


def test_example_inputs_never_replace_the_users_files(host, tmp_path, caplog):
    offer = host.module("nodes.example_inputs").offer_example_inputs
    inputs = sorted((ROOT / "examples" / "inputs").glob("*.png"))
    assert len(inputs) >= 2
    users = tmp_path / "input"
    users.mkdir()
    (users / inputs[0].name).write_bytes(b"the user's own image")
    with caplog.at_level(logging.INFO, logger="attention_lab"):
        copied = offer(users)
    assert (users / inputs[0].name).read_bytes() == b"the user's own image"
    assert copied == [p.name for p in inputs[1:]]
    for path in inputs[1:]:
        assert (users / path.name).read_bytes() == path.read_bytes()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[Attention Lab]")]
    assert len(lines) == 1 and str(users) in lines[0] and inputs[1].name in lines[0], lines
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="attention_lab"):
        assert offer(users) == []  # the next start: nothing to copy, nothing said
    assert not [r for r in caplog.records if r.getMessage().startswith("[Attention Lab]")]


def test_example_inputs_create_a_missing_input_folder_and_survive_an_unwritable_one(host, tmp_path, caplog):
    offer = host.module("nodes.example_inputs").offer_example_inputs
    fresh = tmp_path / "new" / "input"
    assert offer(fresh) and fresh.is_dir()
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="attention_lab"):
        assert offer(blocked / "input") == []
    assert any("could not copy the example input images" in r.getMessage() for r in caplog.records)


# What ComfyUI's server imports while it starts (its custom-node-like comfy_extras and model code load
# later, with a warning when a dependency is missing); the torch family is the machine's to choose.
HOST_STARTUP = ("main.py", "server.py", "execution.py", "nodes.py", "folder_paths.py",
                "app", "comfy_api", "comfy_execution", "utils")
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}


def _distribution(module: str) -> str:
    names = importlib.metadata.packages_distributions().get(module, [module])
    return re.sub(r"[-_.]+", "-", names[0]).lower()


def test_ci_installs_what_the_host_imports_at_startup_beyond_its_requirements():
    """Issue 28 §3: on a fresh machine the host's server failed to import `requests`, which its
    requirements.txt leaves to other packages to bring; .ci/run installs every such module by name."""
    from conftest import COMFY_ROOT

    if COMFY_ROOT is None:
        pytest.skip("no ComfyUI host")
    local = {p.stem for p in COMFY_ROOT.iterdir()}
    files = [f for name in HOST_STARTUP for f in ([COMFY_ROOT / name] if name.endswith(".py")
                                                 else sorted((COMFY_ROOT / name).rglob("*.py")))]
    imported = set()
    for path in files:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level: what importing runs
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported - local - TORCH_FAMILY if m not in sys.stdlib_module_names}
    required = {re.sub(r"[-_.]+", "-", re.split(r"[<>=~!\[; ]", line.strip())[0]).lower()
                for line in (COMFY_ROOT / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")}
    unlisted = {_distribution(m) for m in third_party} - required
    ci = (ROOT / ".ci" / "run").read_text()
    installed = {re.sub(r"[-_.]+", "-", word).lower()
                 for line in ci.splitlines() if re.match(r"\s*pip install -c \S+ [a-z]", line)
                 for word in line.split()[4:]}
    assert "requests" in third_party  # the import the issue found missing: the scan sees it
    assert unlisted <= installed, f".ci/run does not install {sorted(unlisted - installed)}, which the host " \
                                  "imports at start-up without listing it in its requirements.txt"
