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
 * carry the boxes as the Python side parses them (nodes/bounded.py), and typing
 * in the text widget redraws the canvas.
 *
 * Aspect ratio: the node's own width/height widgets; when one of them is driven
 * by a link, the linked node's value (its widget of that name, else its first
 * number widget); square when neither gives a positive number.
 */
import { app } from "../../scripts/app.js";

const NODE_TYPE = "BoundedAttentionLayout";
const EDITOR_WIDGET = "box_editor";
const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"];
const GRAB_PX = 8; // how near (screen pixels) an edge must be to grab it
const CLOSE_PX = 14; // side of the ✕ button (screen pixels)
const MIN_SIDE = 0.02; // smallest box side, normalised: a box never rounds to empty
const DECIMALS = 3;
const EDITOR_MIN_HEIGHT = 220;
const HELP =
  "Drag on empty space: draw the next subject's box. Drag inside a box: move it. " +
  "Drag an edge or corner: resize. ✕, right-click, or select + Delete: remove.";

/** Distinct colour of the i-th subject: the palette, then golden-angle hues. */
function subjectColour(i) {
  return i < PALETTE.length ? PALETTE[i] : `hsl(${Math.round((i * 137.5) % 360)}, 75%, 55%)`;
}

/** One subject per non-empty line, as nodes/bounded.py parse_subjects reads them. */
function parseSubjects(text) {
  return String(text ?? "")
    .split(/\r?\n/)
    .map((s) => s.trim())
    .filter((s) => s);
}

const clamp01 = (v) => Math.min(1, Math.max(0, v));
const round = (v) => Number(v.toFixed(DECIMALS));

/**
 * The boxes of `text` in subject order, normalised, as nodes/bounded.py parse_boxes reads them:
 * a JSON list or {subject: box}; pixel boxes (whole numbers, some > 1) divided by width/height.
 * Returns {boxes, problem}: entries that are not 4 numbers become null; boxes outside [0, 1]
 * are shown clamped; `problem` says what the sampler would reject (or "" if nothing).
 */
function parseBoxes(text, subjects, width, height) {
  let data;
  try {
    data = JSON.parse(text);
  } catch (e) {
    return { boxes: null, problem: `boxes: not valid JSON (${e.message})` };
  }
  const problems = [];
  if (data && typeof data === "object" && !Array.isArray(data)) {
    const unknown = Object.keys(data).filter((k) => !subjects.includes(k));
    if (unknown.length) problems.push(`not among the subjects: ${unknown.join(", ")}`);
    data = subjects.map((s) => data[s] ?? null);
  }
  if (!Array.isArray(data)) {
    return { boxes: null, problem: "boxes: expected a JSON list of [x0, y0, x1, y1] boxes" };
  }
  const isBox = (b) => Array.isArray(b) && b.length === 4 && b.every((c) => typeof c === "number" && isFinite(c));
  const numbers = data.filter(isBox).flat();
  const pixels = numbers.some((c) => c > 1) && numbers.every((c) => Number.isInteger(c));
  const boxes = data.map((b, i) => {
    if (b === null) return null;
    if (!isBox(b)) {
      problems.push(`box ${i + 1} is not [x0, y0, x1, y1]`);
      return null;
    }
    const scaled = pixels ? [b[0] / width, b[1] / height, b[2] / width, b[3] / height] : b;
    if (scaled.some((c) => c < 0 || c > 1)) problems.push(`box ${i + 1} lies outside the image`);
    const [x0, y0, x1, y1] = scaled.map(clamp01);
    return [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
  });
  if (boxes.length > subjects.length) problems.push(`${boxes.length} boxes for ${subjects.length} subjects`);
  return { boxes, problem: problems.length ? "boxes: " + problems.join("; ") : "" };
}

/** The `boxes` widget text: normalised boxes rounded to 3 decimals, null for a removed one, none trailing. */
function formatBoxes(boxes) {
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

class BoxEditor {
  constructor(node) {
    this.node = node;
    this.boxes = []; // normalised [x0, y0, x1, y1] or null, index = subject
    this.subjects = [];
    this.size = [1, 1]; // image width, height
    this.problem = ""; // what the sampler would reject in the boxes text
    this.notice = ""; // why the last pointer action did nothing
    this.selected = -1;
    this.drag = null;
    this.seen = null; // the inputs the canvas shows, to redraw only when they change

    this.container = document.createElement("div");
    Object.assign(this.container.style, {
      display: "flex", alignItems: "center", justifyContent: "center", overflow: "hidden",
    });
    this.canvas = document.createElement("canvas");
    this.canvas.className = "attention-lab-box-editor";
    this.canvas.tabIndex = 0; // focusable, for the Delete key
    this.canvas.title = HELP;
    Object.assign(this.canvas.style, { outline: "none", touchAction: "none", cursor: "crosshair" });
    this.container.append(this.canvas);

    this.widget = node.addDOMWidget(EDITOR_WIDGET, "attention_lab_box_editor", this.container, {
      serialize: false, // the boxes live in the `boxes` widget; this one is a view of it
      getMinHeight: () => EDITOR_MIN_HEIGHT,
      onDraw: () => this.sync(),
    });
    // not in widgets_values either: saved workflows keep the node's Python widgets only
    this.widget.serialize = false;

    for (const name of ["subjects", "boxes", "width", "height"]) {
      const widget = this.widgetNamed(name);
      if (!widget) continue;
      const previous = widget.callback;
      widget.callback = (...args) => {
        const result = previous?.apply(widget, args);
        this.sync();
        return result;
      };
    }
    this.canvas.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    this.canvas.addEventListener("pointermove", (e) => this.onPointerMove(e));
    this.canvas.addEventListener("pointerup", (e) => this.onPointerUp(e));
    this.canvas.addEventListener("pointercancel", (e) => this.onPointerUp(e));
    this.canvas.addEventListener("contextmenu", (e) => this.onContextMenu(e));
    this.canvas.addEventListener("keydown", (e) => this.onKeyDown(e));
    new ResizeObserver(() => this.render()).observe(this.container);
  }

  widgetNamed(name) {
    return this.node.widgets?.find((w) => w.name === name);
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

  /** Read subjects, boxes text and image size; redraw when any changed. Cheap when nothing did. */
  sync() {
    if (this.drag) return; // the pointer owns the boxes until it is released
    const width = this.dimension("width");
    const height = this.dimension("height");
    const size = width && height ? [width, height] : [1, 1];
    const subjectsText = String(this.widgetNamed("subjects")?.value ?? "");
    const boxesText = String(this.widgetNamed("boxes")?.value ?? "");
    const seen = JSON.stringify([subjectsText, boxesText, size]);
    if (seen === this.seen) return;
    this.seen = seen;
    this.subjects = parseSubjects(subjectsText);
    this.size = size;
    const { boxes, problem } = parseBoxes(boxesText, this.subjects, size[0], size[1]);
    if (boxes) this.boxes = boxes; // unparsable text: keep showing the last boxes
    this.problem = problem;
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
    this.node.setDirtyCanvas(true, true);
  }

  /** Pointer position, normalised to the image, clamped to it. */
  point(e) {
    const r = this.canvas.getBoundingClientRect();
    return { x: clamp01((e.clientX - r.left) / r.width), y: clamp01((e.clientY - r.top) / r.height) };
  }

  /** Grab distances and ✕ size in normalised units (screen pixels over the canvas's drawn size). */
  tolerance() {
    const r = this.canvas.getBoundingClientRect();
    return { gx: GRAB_PX / r.width, gy: GRAB_PX / r.height, cx: CLOSE_PX / r.width, cy: CLOSE_PX / r.height };
  }

  closeButton(box) {
    const { gx, gy, cx, cy } = this.tolerance();
    return [box[2] - gx - cx, box[1] + gy, box[2] - gx, box[1] + gy + cy];
  }

  /** What is under p: {index, action: "close" | "resize" | "move", edges} or null; the selected box first. */
  hitTest(p) {
    const { gx, gy } = this.tolerance();
    const order = this.boxes.map((_, i) => i).reverse();
    if (this.selected >= 0) order.unshift(this.selected);
    for (const index of order) {
      const box = this.boxes[index];
      if (!box) continue;
      const [x0, y0, x1, y1] = box;
      if (index === this.selected) {
        const [a, b, c, d] = this.closeButton(box);
        if (p.x >= a && p.x <= c && p.y >= b && p.y <= d) return { index, action: "close" };
      }
      const withinX = p.x >= x0 - gx && p.x <= x1 + gx;
      const withinY = p.y >= y0 - gy && p.y <= y1 + gy;
      if (!withinX || !withinY) continue;
      const edges = {
        x0: Math.abs(p.x - x0) <= gx, y0: Math.abs(p.y - y0) <= gy,
        x1: Math.abs(p.x - x1) <= gx && !(Math.abs(p.x - x0) <= gx), y1: Math.abs(p.y - y1) <= gy && !(Math.abs(p.y - y0) <= gy),
      };
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
    const availableWidth = this.container.clientWidth;
    const availableHeight = this.container.clientHeight;
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
    ctx.fillStyle = "rgba(255, 255, 255, 0.5)";
    ctx.textAlign = "right";
    ctx.textBaseline = "bottom";
    const sized = this.dimension("width") && this.dimension("height");
    ctx.fillText(sized ? `${this.size[0]} × ${this.size[1]}` : "square (no width/height)", width - 4, height - 3);
    ctx.textAlign = "left";
    const next = this.freeSubject();
    const message =
      this.notice || this.problem || (next >= 0 && !this.drag ? `drag to draw the box of “${this.subjects[next]}”` : "");
    if (message) {
      ctx.fillStyle = this.problem && !this.notice ? "#ff6b6b" : "rgba(255, 255, 255, 0.7)";
      ctx.fillText(message, 4, height - 3, width - 8);
    }
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
