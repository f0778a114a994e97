"""The real ComfyUI server starts with this pack in custom_nodes and lists all its nodes."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import headless


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def test_server_lists_every_node_of_the_pack(host, tmp_path):
    base = tmp_path / "comfy_base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "comfyui-attention-lab").symlink_to(headless.REPO, target_is_directory=True)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(headless.host_pythonpath() + [os.environ.get("PYTHONPATH", "")]))
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"],
        cwd=host.root, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 180
        info = None
        while time.time() < deadline and server.poll() is None:
            try:
                info = get_json(f"http://127.0.0.1:{port}/object_info")
                break
            except OSError:
                time.sleep(1)
        assert info is not None, "server did not answer /object_info:\n" + (tmp_path / "server.log").read_text()[-3000:]
        ours = [node.define_schema().node_id for node in host.module("nodes").NODES]
        missing = [n for n in ours if n not in info]
        assert not missing, f"nodes missing from /object_info: {missing}"
        for name in ours:
            assert info[name]["category"].startswith("attention_lab/")
            assert info[name]["python_module"].startswith("custom_nodes.")
        # a plain install: the example workflows' images are in LoadImage's list without copying anything by hand
        offered = info["LoadImage"]["input"]["required"]["image"][0]
        for path in (headless.REPO / "examples" / "inputs").glob("*.png"):
            assert path.name in offered, (path.name, offered)
            assert (base / "input" / path.name).read_bytes() == path.read_bytes()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
