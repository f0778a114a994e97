/**
 * Box editor for BoundedAttentionLayout (Attention Lab).
 *
 * Every BoundedAttentionLayout node gets a canvas over the image's aspect ratio
 * with one box per line of its `subjects` widget. Drag on empty space to draw
 * the next subject's box, drag inside a box to move it, drag an edge or corner
 * to resize it; remove a box with its ✕, a right-click, or Delete when selected.
 *
 * The node's `boxes` STRING widget is the only storage: every edit writes
 * normalised JSON `[[x0, y0, x1, y1], ...]` (3 decimals, subject order, `null`
 * for a subject whose box was removed), so workflow JSON and the API prompt
 * carry the boxes. The text is read only in Python (nodes/bounded.py
 * `editor_view`, served at VIEW_ROUTE): typing in the text widget redraws the
 * canvas with the boxes, subjects and problems the node itself would see.
 *
 * Aspect ratio: the node's own width/height widgets; when one of them is driven
 * by a link, the linked node's value (its widget of that name, else its first
 * number widget); square when neither gives a positive number.
 */
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "BoundedAttentionLayout";
const EDITOR_WIDGET = "box_editor";
const VIEW_ROUTE = "/attention_lab/box_editor"; // nodes/bounded.py EDITOR_ROUTE
const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"];
// An edge grabs the pointer in a band just inside it (this share of the canvas's shorter side,
// within GRAB_INSIDE_PX, at most a quarter of the box's side so its middle still moves it) and
// GRAB_OUTSIDE_PX outside it (the drawn line); any further out is empty space, which draws.
const GRAB_INSIDE = 0.02;
const GRAB_INSIDE_PX = [3, 8];
const GRAB_OUTSIDE_PX = 2;
const CLOSE_PX = 14; // side of the ✕ button (screen pixels)
const MIN_SIDE = 0.02; // smallest box side, normalised: a box never rounds to empty
const DECIMALS = 3;
const EDITOR_MIN_HEIGHT = 270; // canvas and the message lines under it
const HELP =
  "Drag on empty space: draw the next subject's box. Drag inside a box: move it. " +
  "Drag an edge or corner: resize. ✕, right-click, or select + Delete: remove.";

/** Distinct colour of the i-th subject: the palette, then golden-angle hues. */
function subjectColour(i) {
  return i < PALETTE.length ? PALETTE[i] : `hsl(${Math.round((i * 137.5) % 360)}, 75%, 55%)`;
}

const clamp01 = (v) => Math.min(1, Math.max(0, v));
const round = (v) => Number(v.toFixed(DECIMALS));

/**
 * The `boxes` widget text: normalised boxes rounded to 3 decimals, null for a removed one, none trailing.
 * tests/box_format_cases.json holds what it must write and what nodes/bounded.py reads back from it.
 */
export function formatBoxes(boxes) {
  const kept = boxes.slice();
  while (kept.length && !kept[kept.length - 1]) kept.pop();
  return "[" + kept.map((b) => (b ? "[" + b.map((c) => String(round(c))).join(", ") + "]" : "null")).join(", ") + "]";
}

/** A box at least MIN_SIDE wide and high, inside [0, 1], grown from its top-left corner where it can. */
function withMinSide([x0, y0, x1, y1]) {
  if (x1 - x0 < MIN_SIDE) [x0, x1] = x0 + MIN_SIDE <= 1 ? [x0, x0 + MIN_SIDE] : [1 - MIN_SIDE, 1];
  if (y1 - y0 < MIN_SIDE) [y0, y1] = y0 + MIN_SIDE <= 1 ? [y0, y0 + MIN_SIDE] : [1 - MIN_SIDE, 1];
  return [x0, y0, x1, y1];
}

/** `callback` after `object[name]` (a LiteGraph hook), keeping what was there. */
function chain(object, name, callback) {
  const previous = object[name];
  object[name] = function (...args) {
    const result = previous?.apply(this, args);
    callback(...args);
    return result;
  };
}

class BoxEditor {
  constructor(node) {
    this.node = node;
    this.boxes = []; // normalised [x0, y0, x1, y1] or null, index = subject
    this.subjects = [];
    this.size = [1, 1]; // image width, height
    this.problem = ""; // what the node would refuse in the boxes text (nodes/bounded.py's words)
    this.notice = ""; // why the last pointer action did nothing
    this.selected = -1;
    this.drag = null;
    this.requested = null; // the inputs of the last view asked of the server
    this.shown = null; // the inputs the canvas shows

    // the canvas over the image's aspect ratio, then the message lines and the size, side by side, under it
    this.container = document.createElement("div");
    Object.assign(this.container.style, { display: "flex", flexDirection: "column", overflow: "hidden" });
    this.area = document.createElement("div");
    Object.assign(this.area.style, {
      display: "flex", alignItems: "center", justifyContent: "center", flex: "1 1 0", minHeight: "0", overflow: "hidden",
    });
    this.canvas = document.createElement("canvas");
    this.canvas.className = "attention-lab-box-editor";
    this.canvas.tabIndex = 0; // focusable, for the Delete key
    this.canvas.title = HELP;
    Object.assign(this.canvas.style, { flex: "none", outline: "none", touchAction: "none", cursor: "crosshair" });
    this.area.append(this.canvas);
    this.footer = document.createElement("div");
    this.footer.className = "attention-lab-box-editor-footer";
    Object.assign(this.footer.style, {
      display: "flex", alignItems: "flex-start", gap: "8px", flex: "none", minHeight: "32px", padding: "3px 2px 0",
      font: "12px/15px sans-serif", color: "rgba(255, 255, 255, 0.75)",
    });
    this.messages = document.createElement("div");
    this.messages.className = "attention-lab-box-editor-messages";
    Object.assign(this.messages.style, { flex: "1 1 0", minWidth: "0", overflowWrap: "anywhere", whiteSpace: "normal" });
    this.sizeLabel = document.createElement("div");
    this.sizeLabel.className = "attention-lab-box-editor-size";
    Object.assign(this.sizeLabel.style, { flex: "none", whiteSpace: "nowrap", color: "rgba(255, 255, 255, 0.5)" });
    this.footer.append(this.messages, this.sizeLabel);
    this.container.append(this.area, this.footer);

    this.widget = node.addDOMWidget(EDITOR_WIDGET, "attention_lab_box_editor", this.container, {
      serialize: false, // the boxes live in the `boxes` widget; this one is a view of it
      getMinHeight: () => EDITOR_MIN_HEIGHT,
      // The widget callbacks, loading and (dis)connecting sync the editor; only a linked width or
      // height can change with no event here (the other node's widget), so only that is read per frame.
      onDraw: () => {
        if (this.linkedDimension()) this.sync();
      },
    });
    // not in widgets_values either: saved workflows keep the node's Python widgets only
    this.widget.serialize = false;
    this.widget.boxEditor = this; // for other extensions and the browser test

    for (const name of ["subjects", "boxes", "width", "height"]) {
      const widget = this.widgetNamed(name);
      if (widget) chain(widget, "callback", () => this.sync());
    }
    chain(node, "onConfigure", () => this.sync());
    chain(node, "onConnectionsChange", () => this.sync());
    chain(node, "onRemoved", () => this.resizeObserver.disconnect());
    this.canvas.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    this.canvas.addEventListener("pointermove", (e) => this.onPointerMove(e));
    this.canvas.addEventListener("pointerup", (e) => this.onPointerUp(e));
    this.canvas.addEventListener("pointercancel", (e) => this.onPointerUp(e));
    this.canvas.addEventListener("contextmenu", (e) => this.onContextMenu(e));
    this.canvas.addEventListener("keydown", (e) => this.onKeyDown(e));
    this.resizeObserver = new ResizeObserver(() => this.render());
    this.resizeObserver.observe(this.area);
  }

  widgetNamed(name) {
    return this.node.widgets?.find((w) => w.name === name);
  }

  linkedDimension() {
    return !!this.node.inputs?.some((i) => (i.name === "width" || i.name === "height") && i.link != null);
  }

  /** Width or height of the image: the linked node's value when the input is linked, else the widget's. */
  dimension(name) {
    const slot = this.node.inputs?.findIndex((i) => i.name === name) ?? -1;
    if (slot >= 0 && this.node.inputs[slot].link != null) {
      const source = this.node.getInputNode(slot);
      const widget =
        source?.widgets?.find((w) => w.name === name) ?? source?.widgets?.find((w) => typeof w.value === "number");
      if (Number(widget?.value) > 0) return Number(widget.value);
    }
    const own = Number(this.widgetNamed(name)?.value);
    return own > 0 ? own : null;
  }

  /** The node's inputs the canvas draws: subjects and boxes text, image size. */
  inputs() {
    const width = this.dimension("width");
    const height = this.dimension("height");
    return {
      subjects: String(this.widgetNamed("subjects")?.value ?? ""),
      boxes: String(this.widgetNamed("boxes")?.value ?? ""),
      width: width && height ? width : 1,
      height: width && height ? height : 1,
    };
  }

  /** Ask the node's parser (nodes/bounded.py editor_view) what the inputs mean, when they changed; then redraw. */
  async sync() {
    if (this.drag) return; // the pointer owns the boxes until it is released
    const inputs = this.inputs();
    const key = JSON.stringify(inputs);
    if (key === this.requested) return;
    this.requested = key;
    let view;
    try {
      const response = await api.fetchApi(VIEW_ROUTE, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: key,
      });
      view = await response.json();
      if (!response.ok) throw new Error(view?.error ?? `HTTP ${response.status}`);
    } catch (e) {
      if (key === this.requested) this.requested = null; // ask again at the next change
      view = { subjects: this.subjects, boxes: null, problem: `box editor: the server could not read the boxes (${e.message})` };
    }
    if (key !== this.requested && this.requested !== null) return; // newer inputs are on their way
    if (this.drag) {
      this.requested = null; // the drag's commit asks again
      return;
    }
    this.shown = key;
    this.subjects = view.subjects;
    this.size = [inputs.width, inputs.height];
    if (view.boxes) this.boxes = view.boxes; // unreadable text: keep showing the last boxes
    this.problem = view.problem;
    if (this.selected >= this.boxes.length || !this.boxes[this.selected]) this.selected = -1;
    this.render();
  }

  /** Write the boxes to the `boxes` widget (the text, the workflow and the prompt follow it). */
  commit() {
    this.boxes = this.boxes.map((b) => (b ? withMinSide(b).map(round) : null));
    const text = formatBoxes(this.boxes);
    const widget = this.widgetNamed("boxes");
    if (widget && widget.value !== text) widget.value = text; // its setter updates the textarea and calls back
    this.sync();
    this.render();
    this.node.setDirtyCanvas(true, true);
  }

  /** Pointer position, normalised to the image, clamped to it. */
  point(e) {
    const r = this.canvas.getBoundingClientRect();
    return { x: clamp01((e.clientX - r.left) / r.width), y: clamp01((e.clientY - r.top) / r.height) };
  }

  /** Canvas size in screen pixels. */
  screen() {
    const r = this.canvas.getBoundingClientRect();
    return { w: r.width || 1, h: r.height || 1 };
  }

  /** The ✕ of a box, normalised [x0, y0, x1, y1]: inside its top-right corner. */
  closeButton(box) {
    const { w, h } = this.screen();
    const inset = 3;
    return [box[2] - (inset + CLOSE_PX) / w, box[1] + inset / h, box[2] - inset / w, box[1] + (inset + CLOSE_PX) / h];
  }

  /** What is under p: {index, action: "close" | "resize" | "move", edges} or null; the selected box first. */
  hitTest(p) {
    const { w, h } = this.screen();
    const band = Math.min(GRAB_INSIDE_PX[1], Math.max(GRAB_INSIDE_PX[0], GRAB_INSIDE * Math.min(w, h)));
    const [px, py] = [p.x * w, p.y * h];
    const order = this.boxes.map((_, i) => i).reverse();
    if (this.selected >= 0) order.unshift(this.selected);
    for (const index of order) {
      const box = this.boxes[index];
      if (!box) continue;
      if (index === this.selected) {
        const [a, b, c, d] = this.closeButton(box);
        if (p.x >= a && p.x <= c && p.y >= b && p.y <= d) return { index, action: "close" };
      }
      const [x0, y0, x1, y1] = [box[0] * w, box[1] * h, box[2] * w, box[3] * h];
      const out = GRAB_OUTSIDE_PX;
      if (px < x0 - out || px > x1 + out || py < y0 - out || py > y1 + out) continue;
      const inX = Math.min(band, (x1 - x0) / 4);
      const inY = Math.min(band, (y1 - y0) / 4);
      const edges = { x0: px <= x0 + inX, y0: py <= y0 + inY, x1: px >= x1 - inX, y1: py >= y1 - inY };
      if (edges.x0 || edges.y0 || edges.x1 || edges.y1) return { index, action: "resize", edges };
      return { index, action: "move" };
    }
    return null;
  }

  /** The first subject without a box, or -1. */
  freeSubject() {
    for (let i = 0; i < this.subjects.length; i++) if (!this.boxes[i]) return i;
    return -1;
  }

  remove(index) {
    this.boxes[index] = null;
    this.selected = -1;
    this.commit();
  }

  onPointerDown(e) {
    if (e.button !== 0) return;
    e.preventDefault();
    e.stopPropagation();
    this.canvas.focus();
    this.sync();
    this.notice = "";
    const p = this.point(e);
    const hit = this.hitTest(p);
    if (hit?.action === "close") {
      this.remove(hit.index);
      return;
    }
    if (hit) {
      this.selected = hit.index;
      this.drag = { ...hit, start: p, original: this.boxes[hit.index].slice() };
    } else {
      const index = this.freeSubject();
      if (index < 0) {
        this.selected = -1;
        this.notice = this.subjects.length
          ? "every subject has a box: remove one (✕, right-click, Delete) to draw it again"
          : "write the subjects first, one per line";
        this.render();
        return;
      }
      this.selected = index;
      this.boxes[index] = [p.x, p.y, p.x, p.y];
      this.drag = { index, action: "draw", start: p };
    }
    this.canvas.setPointerCapture(e.pointerId);
    this.render();
  }

  onPointerMove(e) {
    const p = this.point(e);
    if (!this.drag) {
      this.canvas.style.cursor = cursorFor(this.hitTest(p));
      return;
    }
    e.stopPropagation();
    const { index, action, start, original, edges } = this.drag;
    if (action === "draw") {
      this.boxes[index] = [Math.min(start.x, p.x), Math.min(start.y, p.y), Math.max(start.x, p.x), Math.max(start.y, p.y)];
    } else if (action === "move") {
      const [x0, y0, x1, y1] = original;
      const dx = Math.min(1 - x1, Math.max(-x0, p.x - start.x));
      const dy = Math.min(1 - y1, Math.max(-y0, p.y - start.y));
      this.boxes[index] = [x0 + dx, y0 + dy, x1 + dx, y1 + dy];
    } else {
      let [x0, y0, x1, y1] = original;
      const dx = p.x - start.x;
      const dy = p.y - start.y;
      if (edges.x0) x0 = clamp01(x0 + dx);
      if (edges.x1) x1 = clamp01(x1 + dx);
      if (edges.y0) y0 = clamp01(y0 + dy);
      if (edges.y1) y1 = clamp01(y1 + dy);
      // dragging an edge past the opposite one flips the box rather than emptying it
      this.boxes[index] = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
    }
    this.render();
  }

  onPointerUp(e) {
    if (!this.drag) return;
    e.stopPropagation();
    const { index, action } = this.drag;
    this.drag = null;
    const [x0, y0, x1, y1] = this.boxes[index];
    if (action === "draw" && (x1 - x0 < MIN_SIDE || y1 - y0 < MIN_SIDE)) {
      this.boxes[index] = null; // a click, not a drag: draw nothing
      this.selected = -1;
    }
    this.commit();
  }

  onContextMenu(e) {
    e.preventDefault();
    e.stopPropagation();
    const hit = this.hitTest(this.point(e));
    if (hit) this.remove(hit.index);
  }

  onKeyDown(e) {
    if (e.key === "Delete" || e.key === "Backspace") {
      if (this.selected >= 0 && this.boxes[this.selected]) this.remove(this.selected);
    } else if (e.key === "Escape") {
      this.selected = -1;
      this.render();
    } else {
      return;
    }
    // kept here, box selected or not: ComfyUI's window keybindings would delete the whole node
    e.preventDefault();
    e.stopPropagation();
  }

  render() {
    this.renderFooter();
    const availableWidth = this.area.clientWidth;
    const availableHeight = this.area.clientHeight;
    if (!availableWidth || !availableHeight) return; // not laid out yet
    const aspect = this.size[0] / this.size[1];
    const width = Math.max(1, Math.floor(Math.min(availableWidth, availableHeight * aspect)));
    const height = Math.max(1, Math.floor(width / aspect));
    const ratio = window.devicePixelRatio || 1;
    if (this.canvas.width !== Math.round(width * ratio) || this.canvas.height !== Math.round(height * ratio)) {
      this.canvas.width = Math.round(width * ratio);
      this.canvas.height = Math.round(height * ratio);
      this.canvas.style.width = `${width}px`;
      this.canvas.style.height = `${height}px`;
    }
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.fillStyle = "#1e1e1e";
    ctx.fillRect(0, 0, width, height);
    ctx.strokeStyle = "rgba(255, 255, 255, 0.08)";
    ctx.lineWidth = 1;
    for (let k = 1; k < 4; k++) {
      ctx.beginPath();
      ctx.moveTo((k * width) / 4, 0);
      ctx.lineTo((k * width) / 4, height);
      ctx.moveTo(0, (k * height) / 4);
      ctx.lineTo(width, (k * height) / 4);
      ctx.stroke();
    }
    ctx.font = "12px sans-serif";
    ctx.textBaseline = "top";
    this.boxes.forEach((box, i) => {
      if (box && i !== this.selected) this.drawBox(ctx, box, i, width, height, false);
    });
    if (this.selected >= 0 && this.boxes[this.selected]) {
      this.drawBox(ctx, this.boxes[this.selected], this.selected, width, height, true);
    }
  }

  /** The message lines and the image size under the canvas: wrapped to the node's width, never over the canvas. */
  renderFooter() {
    const sized = this.dimension("width") && this.dimension("height");
    this.sizeLabel.textContent = sized ? `${this.size[0]} × ${this.size[1]}` : "square (no width/height)";
    const next = this.freeSubject();
    const hint = this.drag?.action === "draw"
      ? `drawing the box of “${this.subjects[this.drag.index]}”`
      : next >= 0 ? `drag on empty space to draw the box of “${this.subjects[next]}”` : "";
    const lines = [
      [this.problem, "#ff6b6b"],
      [this.notice || hint, "rgba(255, 255, 255, 0.75)"],
    ].filter(([text]) => text);
    const shown = JSON.stringify(lines);
    if (shown === this.messages.dataset.shown) return;
    this.messages.dataset.shown = shown;
    this.messages.replaceChildren(...lines.map(([text, colour]) => {
      const line = document.createElement("div");
      line.textContent = text;
      line.style.color = colour;
      return line;
    }));
  }

  drawBox(ctx, box, index, width, height, selected) {
    const colour = index < this.subjects.length ? subjectColour(index) : "#888888";
    const label = index < this.subjects.length ? this.subjects[index] : `box ${index + 1}: no subject`;
    const [x0, y0, x1, y1] = [box[0] * width, box[1] * height, box[2] * width, box[3] * height];
    ctx.globalAlpha = selected ? 0.3 : 0.18;
    ctx.fillStyle = colour;
    ctx.fillRect(x0, y0, x1 - x0, y1 - y0);
    ctx.globalAlpha = 1;
    ctx.strokeStyle = colour;
    ctx.lineWidth = selected ? 3 : 2;
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    ctx.textBaseline = "top";
    const text = `${index + 1} ${label}`;
    const textWidth = Math.min(ctx.measureText(text).width + 6, Math.max(x1 - x0, 24));
    ctx.fillStyle = colour;
    ctx.fillRect(x0, y0, textWidth, 16);
    ctx.fillStyle = "#000";
    ctx.fillText(text, x0 + 3, y0 + 2, textWidth - 6);
    if (!selected) return;
    ctx.fillStyle = "#fff";
    for (const hx of [x0, (x0 + x1) / 2, x1]) {
      for (const hy of [y0, (y0 + y1) / 2, y1]) {
        if (hx !== (x0 + x1) / 2 || hy !== (y0 + y1) / 2) ctx.fillRect(hx - 3, hy - 3, 6, 6);
      }
    }
    const [a, b, c, d] = this.closeButton(box);
    ctx.fillStyle = "#000";
    ctx.fillRect(a * width, b * height, (c - a) * width, (d - b) * height);
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    ctx.moveTo(a * width + 3, b * height + 3);
    ctx.lineTo(c * width - 3, d * height - 3);
    ctx.moveTo(c * width - 3, b * height + 3);
    ctx.lineTo(a * width + 3, d * height - 3);
    ctx.stroke();
  }
}

function cursorFor(hit) {
  if (!hit) return "crosshair";
  if (hit.action === "close") return "pointer";
  if (hit.action === "move") return "move";
  const { x0, y0, x1, y1 } = hit.edges;
  if ((x0 && y0) || (x1 && y1)) return "nwse-resize";
  if ((x1 && y0) || (x0 && y1)) return "nesw-resize";
  return x0 || x1 ? "ew-resize" : "ns-resize";
}

app.registerExtension({
  name: "attention_lab.bounded_boxes",
  nodeCreated(node) {
    if (node.comfyClass !== NODE_TYPE) return;
    const editor = new BoxEditor(node);
    node.setSize([Math.max(node.size[0], 420), node.computeSize()[1]]);
    editor.sync();
  },
});
