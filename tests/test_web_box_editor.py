"""The box editor (web/bounded_boxes.js) in a real headless Chromium against a real ComfyUI server.

The server is ComfyUI's main.py with this pack symlinked into a temp base
directory's custom_nodes; the page is the frontend of `comfyui-frontend-package`.
Boxes are drawn, moved, resized and removed with real mouse and key events on the
node's canvas; the node's `boxes` widget, the saved workflow and the API prompt
(`app.graphToPrompt()`) must carry them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import headless
from attention_lab.attention_patches import bounded as ba

NODE = "BoundedAttentionLayout"
EXTENSION_URL = "/extensions/comfyui-attention-lab/bounded_boxes.js"  # [project] name in pyproject.toml
POINTER_MS = 40  # per pointer move (selenium's default, 250 ms, makes each drag take seconds)
TOLERANCE = 0.02  # normalised; a few screen pixels of a ~400 px canvas
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1400,1400"]


def _browser() -> tuple[str | None, str | None, str]:
    """(chromium binary, chromedriver, why not) found on PATH."""
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    why = "" if binary and driver else (
        "no chromium/chromedriver on PATH (apt-get install -y chromium chromium-driver)")
    return binary, driver, why


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, data: dict | None = None, timeout: float = 5.0):
    """GET the JSON at `url`, or POST `data` as JSON to it (and return nothing)."""
    body = None if data is None else json.dumps(data).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=timeout) as response:
        return json.load(response) if data is None else None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A running ComfyUI server with this pack under another folder name (as a git clone would be)."""
    root, how = headless.find_comfyui()
    if root is None:
        print(f"browser test skipped: {how}")
        pytest.skip(how)
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-Attention-Lab").symlink_to(headless.REPO, target_is_directory=True)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(headless.host_pythonpath() + [os.environ.get("PYTHONPATH", "")]))
    log_path = base / "server.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # a loaded CI machine imports torch and every node slowly
        info = None
        while time.time() < deadline and process.poll() is None and info is None:
            try:
                info = _request(url + "/object_info/" + NODE)
            except OSError:
                time.sleep(0.5)
        assert info and NODE in info, "server did not serve " + NODE + ":\n" + log_path.read_text()[-3000:]
        # a fresh user directory: no first-run template browser over the canvas
        _request(url + "/settings", {"Comfy.TutorialCompleted": True})
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(request):
    """Headless Chromium on the server's page, once the app and the pack's node are there."""
    binary, driver_path, why = _browser()
    if why:
        print(f"browser test skipped: {why}")
        pytest.skip(why)
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-test.txt)")
    server = request.getfixturevalue("server")  # only now: no server start where the browser test skips
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        driver.set_script_timeout(60)
        driver.get(server)
        _wait(driver, "return !!(window.app && app.graph && app.canvas && window.LiteGraph"
                      f" && LiteGraph.registered_node_types['{NODE}'])", "the ComfyUI app and the pack's node")
        yield driver
    finally:
        driver.quit()


def _wait(driver, script: str, what: str, *args, timeout: float = 90.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = driver.execute_script(script, *args)
            if value:
                return value
        except Exception:  # the page is still loading its modules
            pass
        time.sleep(0.25)
    logs = "\n".join(str(entry) for entry in driver.get_log("browser"))[-3000:]
    raise AssertionError(f"timed out waiting for {what}; browser console:\n{logs}")


NODE_JS = "const node = app.graph.getNodeById(arguments[0]);"


def _boxes(driver, node_id) -> list:
    return json.loads(driver.execute_script(NODE_JS + "return node.widgets.find(w => w.name === 'boxes').value;", node_id))


def _drag(driver, canvas, start, end):
    """Real mouse events: press at `start`, move in steps, release at `end` (normalised canvas points)."""
    from selenium.webdriver.common.action_chains import ActionChains

    size = canvas.size  # CSS pixels of the drawn canvas; offsets are from its centre
    def offset(p):
        return round((p[0] - 0.5) * size["width"]), round((p[1] - 0.5) * size["height"])
    chain = ActionChains(driver, duration=POINTER_MS).move_to_element_with_offset(canvas, *offset(start)).click_and_hold()
    for k in range(1, 6):
        chain.move_to_element_with_offset(canvas, *offset([start[i] + (end[i] - start[i]) * k / 5 for i in (0, 1)]))
    chain.release().perform()


def _near(actual, expected):
    return actual is not None and all(abs(a - e) <= TOLERANCE for a, e in zip(actual, expected, strict=True))


def test_extension_is_served_once(server):
    listed = _request(server + "/extensions")
    ours = [path for path in listed if path.endswith("/bounded_boxes.js")]
    assert ours == [EXTENSION_URL], f"expected the editor served once as {EXTENSION_URL}, /extensions lists {ours}"


def test_box_editor_draws_moves_resizes_deletes_and_the_prompt_carries_the_boxes(browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    driver = browser
    node_id = driver.execute_script(f"""
        app.graph.clear();
        const node = LiteGraph.createNode("{NODE}");
        app.graph.add(node);
        node.pos = [40, 40];
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [0, 0];
        const set = (name, value) => {{ node.widgets.find(w => w.name === name).value = value; }};
        set("prompt", "a red ball and a blue cube and a green cone");
        set("subjects", "red ball\\nblue cube\\ngreen cone");
        set("boxes", "[]");
        set("width", 768);
        set("height", 512);
        node.setSize([460, node.computeSize()[1] + 120]);
        app.canvas.setDirty(true, true);
        return node.id;""")
    canvas = _wait(driver, NODE_JS + """
        const c = node.widgets.find(w => w.name === 'box_editor')?.element.querySelector('canvas');
        return c && c.isConnected && c.getBoundingClientRect().width > 200 ? c : null;""",
                   "the node's box editor canvas", node_id, timeout=30)
    # the canvas keeps the image's aspect ratio (width 768, height 512)
    assert abs(canvas.size["width"] / canvas.size["height"] - 1.5) < 0.02, canvas.size

    # draw: two boxes, assigned to the subjects in order
    _drag(driver, canvas, (0.10, 0.20), (0.40, 0.70))
    boxes = _boxes(driver, node_id)
    assert len(boxes) == 1 and _near(boxes[0], [0.10, 0.20, 0.40, 0.70]), boxes
    _drag(driver, canvas, (0.55, 0.15), (0.90, 0.60))
    boxes = _boxes(driver, node_id)
    assert len(boxes) == 2 and _near(boxes[1], [0.55, 0.15, 0.90, 0.60]), boxes
    assert all(c == round(c, 3) for box in boxes for c in box), f"not rounded to 3 decimals: {boxes}"

    # move the first box (drag from inside it), resize the second by its bottom-right corner
    _drag(driver, canvas, (0.25, 0.45), (0.30, 0.50))
    _drag(driver, canvas, (0.90, 0.60), (0.95, 0.80))
    boxes = _boxes(driver, node_id)
    assert _near(boxes[0], [0.15, 0.25, 0.45, 0.75]), f"move: {boxes}"
    assert _near(boxes[1], [0.55, 0.15, 0.95, 0.80]), f"resize: {boxes}"

    # delete the first box: select it with a click, press Delete; the node itself stays (ComfyUI deletes
    # the selected node on Delete, and clicking the editor selects its node)
    ActionChains(driver).move_to_element_with_offset(canvas, round(-0.2 * canvas.size["width"]), 0).click() \
        .send_keys(Keys.DELETE).send_keys(Keys.DELETE).perform()  # the second, with no box selected, does nothing
    boxes = _boxes(driver, node_id)
    assert boxes[0] is None and _near(boxes[1], [0.55, 0.15, 0.95, 0.80]), f"delete: {boxes}"
    assert driver.execute_script(NODE_JS + "return !!node && node.graph === app.graph;", node_id), \
        "Delete on the box editor deleted the node"
    # the freed first subject gets the next drawn box; right-click removes the second
    _drag(driver, canvas, (0.05, 0.05), (0.30, 0.40))
    ActionChains(driver).move_to_element_with_offset(canvas, round(0.25 * canvas.size["width"]), 0).context_click().perform()
    boxes = _boxes(driver, node_id)
    assert len(boxes) == 1 and _near(boxes[0], [0.05, 0.05, 0.30, 0.40]), f"draw into the freed slot, right-click: {boxes}"

    # typing in the boxes text widget moves the canvas's boxes: dragging where the typed box is moves it
    textarea = driver.execute_script(NODE_JS + "return node.widgets.find(w => w.name === 'boxes').inputEl;", node_id)
    textarea.click()
    textarea.send_keys(Keys.CONTROL, "a")
    textarea.send_keys("[[0.5, 0.5, 0.8, 0.9]]")
    _drag(driver, canvas, (0.65, 0.70), (0.60, 0.60))
    boxes = _boxes(driver, node_id)
    assert len(boxes) == 1 and _near(boxes[0], [0.45, 0.40, 0.75, 0.80]), f"after typing and moving: {boxes}"

    # the saved workflow and the API prompt carry the boxes; the editor adds no input of its own
    text = driver.execute_script(NODE_JS + "return node.widgets.find(w => w.name === 'boxes').value;", node_id)
    inputs = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "app.graphToPrompt().then(p => done(p.output[String(arguments[0])].inputs), e => done({error: String(e)}));",
        node_id)
    assert inputs.get("boxes") == text, inputs
    assert "box_editor" not in inputs, inputs
    for box in json.loads(inputs["boxes"]):
        ba.check_box(box, "the prompt's box")  # what the sampler side accepts
    saved = driver.execute_script(NODE_JS + "return [node.serialize().widgets_values, node.widgets.length];", node_id)
    values, widget_count = saved
    assert text in values and len(values) == widget_count - 1, f"workflow widgets_values: {values}"
