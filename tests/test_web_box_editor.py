"""The box editor (web/bounded_boxes.js) in a real headless Chromium against a real ComfyUI server.

The server is ComfyUI's main.py with this pack symlinked into a temp base
directory's custom_nodes; the page is the frontend of `comfyui-frontend-package`.
Boxes are drawn, moved, resized and removed with real mouse and key events on the
node's canvas; the node's `boxes` widget, the saved workflow and the API prompt
(`app.graphToPrompt()`) must carry them. The editor reads the boxes text through
the node's own parser (nodes/bounded.py `editor_view`); tests/box_format_cases.json
holds the cases its formatter and that parser share. With ATTENTION_LAB_SCREENSHOTS
set to a folder, the tests save what the browser shows there.
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
from pathlib import Path

import pytest

import headless
from attention_lab.attention_patches import bounded as ba

NODE = "BoundedAttentionLayout"
EXTENSION_URL = "/extensions/comfyui-attention-lab/bounded_boxes.js"  # [project] name in pyproject.toml
POINTER_MS = 40  # per pointer move (selenium's default, 250 ms, makes each drag take seconds)
TOLERANCE = 0.02  # normalised; a few screen pixels of a ~400 px canvas
BOX_CASES = json.loads((Path(__file__).parent / "box_format_cases.json").read_text())
EXAMPLES = [headless.REPO / "examples" / name for name in ("bounded_two_subjects.json", "bounded_three_subjects.json")]
SCREENSHOTS = os.environ.get("ATTENTION_LAB_SCREENSHOTS")
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
EDITOR_JS = NODE_JS + "const editor = node.widgets.find(w => w.name === 'box_editor').boxEditor;"


def _new_node(driver, widgets: dict, size=None, pos=(80, 100)) -> int:
    """A fresh graph with one layout node; widget values set as the UI sets them (value, then its callback)."""
    return driver.execute_script(f"""
        app.graph.clear();
        const node = LiteGraph.createNode("{NODE}");
        app.graph.add(node);
        node.pos = arguments[1];
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [0, 0];
        for (const [name, value] of Object.entries(arguments[0])) {{
          const widget = node.widgets.find(w => w.name === name);
          widget.value = value;
          widget.callback?.(widget.value);
        }}
        if (arguments[2]) node.setSize([arguments[2][0], node.computeSize()[1] + arguments[2][1]]);
        app.canvas.setDirty(true, true);
        return node.id;""", widgets, list(pos), size)


def _editor_canvas(driver, node_id):
    """The node's editor canvas, once it is laid out and shows the node's current inputs."""
    return _wait(driver, NODE_JS + """
        const widget = node.widgets.find(w => w.name === 'box_editor');
        const editor = widget?.boxEditor;
        const c = widget?.element.querySelector('canvas');
        const current = !editor || editor.shown === JSON.stringify(editor.inputs());
        return current && c?.isConnected && c.getBoundingClientRect().width > 100 ? c : null;""",
                 "the node's box editor canvas", node_id, timeout=30)


def _editor_state(driver, node_id) -> dict:
    return driver.execute_script(EDITOR_JS + """
        const rect = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
        return {boxes: editor.boxes, subjects: editor.subjects, messages: editor.messages.innerText,
                size: editor.sizeLabel.innerText, canvas: rect(editor.canvas), messagesRect: rect(editor.messages),
                sizeRect: rect(editor.sizeLabel), container: rect(editor.container),
                lines: [...editor.messages.children].map(l => [l.innerText, getComputedStyle(l).fontSize]),
                overflow: editor.messages.scrollWidth - editor.messages.clientWidth};""", node_id)


def _screenshot(driver, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SCREENSHOTS) / f"{name}.png"))


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
    node_id = _new_node(driver, {"prompt": "a red ball and a blue cube and a green cone",
                                 "subjects": "red ball\nblue cube\ngreen cone", "boxes": "[]",
                                 "width": 768, "height": 512}, size=(460, 120))
    canvas = _editor_canvas(driver, node_id)
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
    _wait(driver, EDITOR_JS + "return JSON.stringify(editor.boxes) === '[[0.5,0.5,0.8,0.9]]';",
          "the typed box on the canvas", node_id, timeout=10)
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
    _screenshot(driver, "editor")
    saved = driver.execute_script(NODE_JS + "return [node.serialize().widgets_values, node.widgets.length];", node_id)
    values, widget_count = saved
    assert text in values and len(values) == widget_count - 1, f"workflow widgets_values: {values}"


def _overlap(a, b) -> bool:
    """Whether two [left, top, right, bottom] rectangles share any area."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_messages_are_wrapped_on_their_own_lines_under_the_canvas(browser):
    driver = browser
    # the node as it is created (nodeCreated's size), and a box the node would refuse: the longest message
    node_id = _new_node(driver, {"prompt": "a ginger kitten and a gray puppy in a yard",
                                 "subjects": "ginger kitten\ngray puppy", "boxes": "[[0.05, 0.2, 1.45, 0.8]]"})
    _editor_canvas(driver, node_id)
    _screenshot(driver, "messages")
    state = _editor_state(driver, node_id)
    problem = ("boxes: the box of 'ginger kitten': [0.05, 0.2, 1.45, 0.8] lies outside [0, 1]; "
               "boxes are normalised [x0, y0, x1, y1]")  # nodes/bounded.py's words for it
    hint = "drag on empty space to draw the box of “gray puppy”"
    assert [text for text, _ in state["lines"]] == [problem, hint], state["lines"]
    assert all(float(size.removesuffix("px")) >= 12 for _, size in state["lines"]), state["lines"]
    canvas, messages, size, container = state["canvas"], state["messagesRect"], state["sizeRect"], state["container"]
    assert state["size"] == "512 × 512", state["size"]
    assert messages[1] >= canvas[3] - 0.5 and size[1] >= canvas[3] - 0.5, f"text over the canvas: {state}"
    assert not _overlap(messages, size), f"the messages run over the size label: {state}"
    assert state["overflow"] <= 0, f"the messages do not wrap: {state}"
    assert messages[3] <= container[3] + 0.5 and messages[2] <= container[2] + 0.5, f"messages cut off: {state}"
    assert messages[3] - messages[1] >= 3 * 14, f"the problem should wrap to at least two lines here: {state}"


def test_dragging_from_empty_space_next_to_a_box_draws_and_its_edge_still_resizes(browser):
    driver = browser
    node_id = _new_node(driver, {"prompt": "a red ball and a blue cube", "subjects": "red ball\nblue cube",
                                 "boxes": "[[0.3, 0.3, 0.6, 0.6]]", "width": 512, "height": 512})
    canvas = _editor_canvas(driver, node_id)
    side = canvas.size["width"]
    assert 180 <= side <= 260, f"the node as created should show a canvas of about 206 px, not {canvas.size}"
    px = 1 / side
    # 4 screen pixels right of the right edge is empty space: it draws the second subject's box
    _drag(driver, canvas, (0.6 + 4 * px, 0.4), (0.9, 0.8))
    boxes = _boxes(driver, node_id)
    assert _near(boxes[0], [0.3, 0.3, 0.6, 0.6]), f"the first box moved or resized: {boxes}"
    assert len(boxes) == 2 and _near(boxes[1], [0.6 + 4 * px, 0.4, 0.9, 0.8]), f"no box drawn: {boxes}"
    _screenshot(driver, "drawn_next_to_a_box")
    # on the drawn line (1 px outside) and 2 px inside, the edge still resizes
    _drag(driver, canvas, (0.3 - px, 0.45), (0.2, 0.45))
    _drag(driver, canvas, (0.45, 0.3 + 2 * px), (0.45, 0.1))
    boxes = _boxes(driver, node_id)
    assert _near(boxes[0], [0.2, 0.1, 0.6, 0.6]), f"edges: {boxes}"


def test_the_editor_syncs_on_events_not_every_frame_and_lets_go_of_a_removed_node(browser):
    driver = browser
    driver.execute_script("""
        // every ResizeObserver of the page, with what it still observes
        if (!window.attentionLabObservers) {
          const Original = window.ResizeObserver;
          window.attentionLabObservers = [];
          window.ResizeObserver = class extends Original {
            constructor(callback) { super(callback); this.targets = new Set(); attentionLabObservers.push(this); }
            observe(target, options) { this.targets.add(target); return super.observe(target, options); }
            unobserve(target) { this.targets.delete(target); return super.unobserve(target); }
            disconnect() { this.targets.clear(); return super.disconnect(); }
          };
        }""")
    node_id = _new_node(driver, {"prompt": "a red ball and a blue cube", "subjects": "red ball\nblue cube",
                                 "boxes": "[[0.1, 0.1, 0.4, 0.4]]", "width": 512, "height": 512})
    _editor_canvas(driver, node_id)
    calls = driver.execute_script(EDITOR_JS + """
        window.attentionLabSyncs = 0;
        const sync = editor.sync.bind(editor);
        editor.sync = () => { attentionLabSyncs++; return sync(); };
        for (let i = 0; i < 30; i++) app.canvas.draw(true, true);
        const idle = attentionLabSyncs;
        const widget = node.widgets.find(w => w.name === 'height');
        widget.value = 256;
        widget.callback?.(widget.value);
        return [idle, attentionLabSyncs];""", node_id)
    assert calls[0] == 0, f"the editor synced {calls[0]} times in 30 frames with nothing changed"
    assert calls[1] >= 1, "changing the height widget did not sync the editor"
    _wait(driver, EDITOR_JS + "return editor.sizeLabel.innerText === '512 × 256';", "the new size", node_id)

    # a linked width: the other node's value, followed when it changes
    driver.execute_script(NODE_JS + """
        const source = LiteGraph.createNode("PrimitiveInt");
        app.graph.add(source);
        source.pos = [700, 40];
        source.widgets[0].value = 1024;
        source.connect(0, node, node.inputs.findIndex(i => i.name === 'width'));
        app.canvas.draw(true, true);""", node_id)
    _wait(driver, EDITOR_JS + "app.canvas.draw(true, true); return editor.sizeLabel.innerText === '1024 × 256';",
          "the linked width", node_id, timeout=10)
    driver.execute_script(NODE_JS + "app.graph.findNodesByType('PrimitiveInt')[0].widgets[0].value = 256;", node_id)
    _wait(driver, EDITOR_JS + "app.canvas.draw(true, true); return editor.sizeLabel.innerText === '256 × 256';",
          "the linked width's new value", node_id, timeout=10)

    watching = driver.execute_script(EDITOR_JS + """
        const element = node.widgets.find(w => w.name === 'box_editor').element;
        const inside = t => element === t || element.contains(t);
        const count = () => attentionLabObservers.filter(o => [...o.targets].some(inside)).length;
        const before = count();
        app.graph.remove(node);
        return [before, count()];""", node_id)
    assert watching[0] >= 1, "no ResizeObserver watched the editor"
    assert watching[1] == 0, f"{watching[1]} ResizeObserver(s) still watch the removed node's editor"


def test_the_editor_writes_what_the_node_reads_and_draws_what_it_parses(browser):
    driver = browser
    written = driver.execute_async_script(f"""
        const done = arguments[arguments.length - 1];
        import("{EXTENSION_URL}").then(m => done(arguments[0].map(c => m.formatBoxes(c.boxes))),
                                       e => done(String(e)));""", BOX_CASES["formatted"])
    assert written == [case["text"] for case in BOX_CASES["formatted"]]

    node_id = _new_node(driver, {"prompt": "a cat and a dog", "subjects": "cat\ndog", "boxes": "[]"})
    _editor_canvas(driver, node_id)
    for case in BOX_CASES["typed"]:
        before = _editor_state(driver, node_id)["boxes"]
        driver.execute_script(NODE_JS + """
            for (const [name, value] of Object.entries(arguments[1])) {
              const widget = node.widgets.find(w => w.name === name);
              widget.value = value;
              widget.callback?.(widget.value);
            }""", node_id, {"subjects": case["subjects"], "width": case["width"], "height": case["height"],
                            "boxes": case["text"]})
        _editor_canvas(driver, node_id)
        state = _editor_state(driver, node_id)
        assert state["boxes"] == (before if case["shown"] is None else case["shown"]), (case, state)
        assert state["subjects"] == case["subjects"].split("\n"), (case, state)
        problem = [text for text, _ in state["lines"] if text.startswith("boxes: ")]
        assert (case["problem"] in problem[0]) if case["problem"] else not problem, (case, state["lines"])


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_the_bounded_examples_open_with_no_node_over_another(browser, example):
    driver = browser
    driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        app.loadGraphData(arguments[0]).then(() => done(true), e => done(String(e)));""",
                                json.loads(example.read_text()))
    node_id = driver.execute_script(f"return app.graph.findNodesByType('{NODE}')[0].id;")
    _editor_canvas(driver, node_id)
    driver.execute_script("app.canvas.ds.scale = 0.62; app.canvas.ds.offset = [10, 120]; app.canvas.setDirty(true, true);"
                          "app.canvas.draw(true, true);")
    _screenshot(driver, example.stem)
    nodes = driver.execute_script("""
        return app.graph.nodes.map(n => ({id: n.id, type: n.type, bounds: Array.from(n.getBounding()),
                                          min: n.computeSize()}));""")
    layout = next(n for n in nodes if n["type"] == NODE)
    width, height = layout["bounds"][2], layout["bounds"][3]
    assert width >= layout["min"][0] and height >= layout["min"][1] - 1, f"the layout node is not at its grown size: {layout}"
    rects = {n["id"]: (n["type"], [n["bounds"][0], n["bounds"][1], n["bounds"][0] + n["bounds"][2],
                                   n["bounds"][1] + n["bounds"][3]]) for n in nodes}
    overlapping = [(rects[a], rects[b]) for a in rects for b in rects if a < b and _overlap(rects[a][1], rects[b][1])]
    assert not overlapping, f"{example.name}: overlapping nodes {overlapping}"
