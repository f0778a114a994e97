"""The pack installs and loads the way ComfyUI, the Manager and the registry expect."""

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

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


def test_missing_optional_dependency_logs_one_line_and_comfyui_still_loads_the_pack(host):
    script = textwrap.dedent(f"""
        import asyncio, logging, sys
        sys.modules["sklearn"] = None  # as if scikit-learn were not installed
        sys.path[:0] = {[str(host.root)] + headless.host_pythonpath()!r}
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        import nodes
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


def test_headless_host_loads_comfyuis_own_image_nodes(host):
    # nodes_images.py imports server -> utils.install_util; loaded in the wrong order, `utils`
    # is comfy/utils.py and these stock nodes vanish from workflows run through examples/run.py
    for name in ("ImageCrop", "ImageStitch", "SaveAnimatedWEBP"):
        assert name in host.nodes.NODE_CLASS_MAPPINGS, name
