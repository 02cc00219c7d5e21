"""The small anywidget front ends latentlab needs (widgets layer, private): a clickable thumbnail grid, a 2-D map on
a canvas, and a plain 2-D plot canvas (points, arrows, paths) that can also be drawn on. Neither jupyter-scatter, plotly's FigureWidget nor bqplot reports "a click on an empty spot
at (x, y)" to Python (checked in their sources), which the atlas explorer is built around."""

from __future__ import annotations

import anywidget
import traitlets

GRID_JS = r"""
function render({ model, el }) {
  el.classList.add("ll-grid");
  const draw = () => {
    el.innerHTML = "";
    const sel = new Set(model.get("selected"));
    const labels = model.get("labels");
    const cols = model.get("columns");
    el.style.display = "grid";
    el.style.gridTemplateColumns = `repeat(${cols}, ${model.get("size")}px)`;
    el.style.gap = "4px";
    model.get("images").forEach((src, i) => {
      const cell = document.createElement("div");
      cell.className = "ll-cell" + (sel.has(i) ? " ll-selected" : "");
      cell.dataset.index = i;
      cell.style.cssText = `cursor:pointer;text-align:center;font:11px sans-serif;border:3px solid ${sel.has(i) ? "#e8590c" : "transparent"};border-radius:4px`;
      const img = document.createElement("img");
      img.src = src; img.width = model.get("size") - 6; img.height = model.get("size") - 6;
      img.style.imageRendering = "pixelated";
      cell.appendChild(img);
      const lab = document.createElement("div"); lab.textContent = labels[i] ?? ""; cell.appendChild(lab);
      cell.addEventListener("click", () => model.send({ type: "toggle", index: i }));
      el.appendChild(cell);
    });
  };
  model.on("change:images", draw); model.on("change:selected", draw); model.on("change:labels", draw);
  draw();
}
export default { render };
"""

MAP_JS = r"""
function render({ model, el }) {
  // A scatter that stays smooth at a million points: points are rasterised into one pixel buffer (no per-point
  // canvas calls), redraws are coalesced to one per animation frame, and overlays (marker, landing, path, lasso)
  // are drawn over the cached raster without redrawing the points. Wheel: zoom about the cursor; shift-drag (or the
  // right/middle button): pan; "reset view" returns to the whole map. A data-space grid answers hover in O(nearby).
  const W = model.get("width"), H = model.get("height"), PAD = 16;
  const wrap = document.createElement("div");
  wrap.style.cssText = `position:relative;width:${W}px;height:${H}px`;
  const canvas = document.createElement("canvas");
  canvas.width = W; canvas.height = H; canvas.className = "ll-map";
  canvas.dataset.draws = "0";  // counted by tests and the fps benchmark; the first draw comes in an animation frame
  canvas.style.cssText = "border:1px solid #ccc;cursor:crosshair";
  const tip = document.createElement("img");
  tip.className = "ll-tip";
  tip.style.cssText = "position:absolute;display:none;pointer-events:none;border:2px solid #333;width:64px;height:64px;image-rendering:pixelated";
  const reset = document.createElement("button");
  reset.className = "ll-map-reset"; reset.textContent = "reset view";
  reset.title = "wheel: zoom · shift-drag: pan";
  reset.style.cssText = "position:absolute;top:4px;right:4px;display:none;font-size:11px;padding:1px 6px";
  wrap.appendChild(canvas); wrap.appendChild(tip); wrap.appendChild(reset); el.appendChild(wrap);
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(W, H);
  const buf = new Uint32Array(img.data.buffer);
  const rgba = (r, g, b) => ((255 << 24) | (b << 16) | (g << 8) | r) >>> 0;  // little-endian pixel order
  const WHITE = rgba(255, 255, 255), GREY = rgba(212, 212, 212);  // grey: rgba(170,170,170,0.5) over white
  let xy = new Float32Array(0), n = 0, packed = new Uint32Array(0), sel = new Uint8Array(0), nSel = 0;
  let bounds = [0, 1, 0, 1], view = [0, 1, 0, 1];
  let stroke = [], draws = 0, dirty = true, pending = false;
  const sx = () => (W - 2 * PAD) / (view[1] - view[0]), sy = () => (H - 2 * PAD) / (view[3] - view[2]);
  const toPx = (x, y) => [PAD + (x - view[0]) * sx(), H - PAD - (y - view[2]) * sy()];
  const toData = (px, py) => [view[0] + (px - PAD) / sx(), view[2] + (H - PAD - py) / sy()];
  // data-space grid: point indices sorted by cell (counting sort), built once per data
  let G = 1, start = new Int32Array(2), order = new Int32Array(0);
  const cellX = (x) => Math.min(G - 1, Math.max(0, Math.floor((x - bounds[0]) / (bounds[1] - bounds[0]) * G)));
  const cellY = (y) => Math.min(G - 1, Math.max(0, Math.floor((y - bounds[2]) / (bounds[3] - bounds[2]) * G)));
  const load = () => {
    const b = model.get("coords"), c = model.get("colors");
    xy = new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
    const col = new Uint8Array(c.buffer, c.byteOffset, c.byteLength);
    n = xy.length / 2;
    packed = new Uint32Array(n);
    for (let i = 0; i < n; i++) packed[i] = rgba(col[3*i] | 0, col[3*i+1] | 0, col[3*i+2] | 0);
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (let i = 0; i < n; i++) { const x = xy[2*i], y = xy[2*i+1];
      if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y; }
    if (!(x1 > x0)) { x0 -= 1; x1 += 1; } if (!(y1 > y0)) { y0 -= 1; y1 += 1; }
    bounds = [x0, x1, y0, y1]; view = bounds.slice();
    G = Math.max(1, Math.min(1024, Math.ceil(Math.sqrt(n / 4))));
    start = new Int32Array(G * G + 1); order = new Int32Array(n);
    const cell = new Int32Array(n);
    for (let i = 0; i < n; i++) { cell[i] = cellY(xy[2*i+1]) * G + cellX(xy[2*i]); start[cell[i] + 1]++; }
    for (let k = 0; k < G * G; k++) start[k + 1] += start[k];
    const fill = start.slice(0, G * G);
    for (let i = 0; i < n; i++) order[fill[cell[i]]++] = i;
    selection();
  };
  const selection = () => {
    sel = new Uint8Array(n); nSel = 0;
    for (const i of model.get("selected")) if (i >= 0 && i < n && !sel[i]) { sel[i] = 1; nSel++; }
    dirty = true; request();
  };
  const raster = () => {
    const t0 = performance.now();
    buf.fill(WHITE);
    const ax = sx(), ay = sy(), ox = PAD - view[0] * ax, oy = H - PAD + view[2] * ay;
    const zoom = Math.min((bounds[1] - bounds[0]) / (view[1] - view[0]), (bounds[3] - bounds[2]) / (view[3] - view[2]));
    const base = n > 200000 ? 1 : n > 20000 ? 2 : n > 2000 ? 4 : 8;
    const s = Math.max(1, Math.min(base * 3, Math.round(base * Math.sqrt(Math.max(1, zoom)))));
    const h = s >> 1;
    let shown = 0;
    const any = nSel > 0;
    for (let pass = 0; pass < (any ? 2 : 1); pass++) {
      for (let i = 0; i < n; i++) {
        if (any && (pass === 0) === (sel[i] === 1)) continue;
        const px = Math.floor(xy[2*i] * ax + ox), py = Math.floor(oy - xy[2*i+1] * ay);
        if (px < -h || px >= W + h || py < -h || py >= H + h) continue;
        const colour = any && pass === 0 ? GREY : packed[i];
        if (s === 1) { buf[py * W + px] = colour; }
        else { for (let y = Math.max(0, py - h), ye = Math.min(H, py - h + s); y < ye; y++)
                 for (let x = Math.max(0, px - h), xe = Math.min(W, px - h + s); x < xe; x++) buf[y * W + x] = colour; }
        shown++;
      }
    }
    dirty = false;
    canvas.dataset.points = shown;
    canvas.dataset.ms = (performance.now() - t0).toFixed(2);
  };
  const overlays = () => {
    const mark = model.get("marker");
    if (mark.length === 2) { const [px, py] = toPx(mark[0], mark[1]);
      ctx.strokeStyle = "#000"; ctx.lineWidth = 2; ctx.beginPath(); ctx.arc(px, py, 7, 0, 2 * Math.PI); ctx.stroke();
      // where the generated image really landed (its own embedding, projected with the same map)
      const land = model.get("landed");
      if (land.length === 2) { const [lx, ly] = toPx(land[0], land[1]);
        ctx.setLineDash([3, 3]); ctx.beginPath(); ctx.moveTo(px, py); ctx.lineTo(lx, ly); ctx.stroke(); ctx.setLineDash([]);
        ctx.fillStyle = "#e03131"; ctx.beginPath(); ctx.moveTo(lx, ly - 6); ctx.lineTo(lx + 6, ly); ctx.lineTo(lx, ly + 6);
        ctx.lineTo(lx - 6, ly); ctx.closePath(); ctx.fill(); ctx.stroke(); } }
    const path = model.get("path");
    if (path.length > 1) { ctx.strokeStyle = "#e8590c"; ctx.lineWidth = 2; ctx.beginPath();
      path.forEach((p, j) => { const [px, py] = toPx(p[0], p[1]); j ? ctx.lineTo(px, py) : ctx.moveTo(px, py); });
      ctx.stroke(); }
    const axes = model.get("axes");
    ctx.fillStyle = "#555"; ctx.font = "11px sans-serif";
    if (axes.length === 2) { ctx.textAlign = "right"; ctx.fillText(axes[0] + " →", W - 4, H - 3);
      ctx.save(); ctx.translate(11, 4); ctx.rotate(-Math.PI / 2); ctx.fillText(axes[1] + " →", 0, 0); ctx.restore();
      ctx.textAlign = "left"; }
    if (stroke.length > 1) { ctx.strokeStyle = "#1c7ed6"; ctx.lineWidth = 1.5; ctx.beginPath();
      stroke.forEach((p, j) => j ? ctx.lineTo(p[0], p[1]) : ctx.moveTo(p[0], p[1])); ctx.stroke(); }
  };
  const draw = () => {
    pending = false;
    if (dirty) raster();
    ctx.putImageData(img, 0, 0);
    overlays();
    const whole = view.every((v, j) => v === bounds[j]);
    reset.style.display = whole ? "none" : "block";
    canvas.dataset.view = JSON.stringify(view);
    canvas.dataset.draws = ++draws;
  };
  const request = () => { if (!pending) { pending = true; requestAnimationFrame(draw); } };
  const nearest = (px, py) => {
    if (n === 0) return -1;
    const ax = sx(), ay = sy(), [x, y] = toData(px, py), rx = 8 / ax, ry = 8 / ay;
    let best = -1, bd = 64;
    const cx0 = cellX(x - rx), cx1 = cellX(x + rx), cy0 = cellY(y - ry), cy1 = cellY(y + ry);
    for (let cy = cy0; cy <= cy1; cy++) for (let cx = cx0; cx <= cx1; cx++) {
      const k = cy * G + cx;
      for (let j = start[k]; j < start[k + 1]; j++) { const i = order[j];
        const d = ((xy[2*i] - x) * ax) ** 2 + ((xy[2*i+1] - y) * ay) ** 2;
        if (d < bd) { bd = d; best = i; } } }
    return best;
  };
  const pos = (e) => { const r = canvas.getBoundingClientRect();  // inside the border: the drawing's own pixels
    return [e.clientX - r.left - canvas.clientLeft, e.clientY - r.top - canvas.clientTop]; };
  const setView = (v) => {
    const bw = bounds[1] - bounds[0], bh = bounds[3] - bounds[2];
    const w = Math.min(Math.max(v[1] - v[0], bw * 1e-4), bw * 4), h = Math.min(Math.max(v[3] - v[2], bh * 1e-4), bh * 4);
    const cx = (v[0] + v[1]) / 2, cy = (v[2] + v[3]) / 2;
    view = [cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2]; dirty = true; request();
  };
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const [px, py] = pos(e), [x, y] = toData(px, py), f = Math.exp(Math.max(-300, Math.min(300, e.deltaY)) * 0.002);
    setView([x - (x - view[0]) * f, x + (view[1] - x) * f, y - (y - view[2]) * f, y + (view[3] - y) * f]);
  }, { passive: false });
  reset.addEventListener("click", (e) => { e.stopPropagation(); view = bounds.slice(); dirty = true; request(); });
  canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  let down = false, pan = null, lastHover = -2;
  // Pointer events, with the pointer captured: a drag keeps its moves when it leaves the canvas, and cancelling the
  // pointerdown keeps the host page from seeing a mouse drag (JupyterLab takes a shift-drag for cell selection).
  canvas.addEventListener("pointerdown", (e) => {
    e.preventDefault(); e.stopPropagation();
    try { canvas.setPointerCapture(e.pointerId); } catch (_) { /* synthetic events have no live pointer */ }
    if (e.shiftKey || e.button !== 0) { pan = [...pos(e), view.slice()]; canvas.style.cursor = "grabbing"; return; }
    down = true; stroke = [pos(e)];
  });
  canvas.addEventListener("pointermove", (e) => {
    const [px, py] = pos(e);
    if (pan) { const [qx, qy, v] = pan, dx = (px - qx) / sx(), dy = (py - qy) / sy();
      view = [v[0] - dx, v[1] - dx, v[2] + dy, v[3] + dy]; dirty = true; request(); return; }
    if (down) { stroke.push([px, py]); request(); return; }
    const i = nearest(px, py);
    if (i !== lastHover) { lastHover = i; model.send({ type: "hover", index: i }); }
    if (i >= 0) { tip.style.left = (px + 12) + "px"; tip.style.top = (py + 12) + "px"; } else { tip.style.display = "none"; }
  });
  canvas.addEventListener("pointerleave", () => { tip.style.display = "none"; lastHover = -2; });
  // A cancelled pointer (a touch turned into a scroll, the OS taking it) ends the drag and does nothing: no click,
  // no lasso, no path from a stroke the user did not finish.
  canvas.addEventListener("pointercancel", () => {
    down = false; pan = null; stroke = []; canvas.style.cursor = "crosshair"; dirty = true; request();
  });
  canvas.addEventListener("pointerup", (e) => {
    if (pan) { pan = null; canvas.style.cursor = "crosshair"; return; }
    if (!down) return;
    down = false; const mode = model.get("mode");
    const moved = stroke.length > 3;
    if (mode === "select" && moved) {
      // point-in-polygon (ray casting) in data space, only for points inside the polygon's bounding box
      const poly = stroke.map(([px, py]) => toData(px, py)); const hits = [];
      let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
      for (const [x, y] of poly) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
      for (let i = 0; i < n; i++) { const x = xy[2*i], y = xy[2*i+1];
        if (x < x0 || x > x1 || y < y0 || y > y1) continue;
        let inside = false;
        for (let a = 0, b = poly.length - 1; a < poly.length; b = a++) {
          const [xa, ya] = poly[a], [xb, yb] = poly[b];
          if ((ya > y) !== (yb > y) && x < (xb - xa) * (y - ya) / (yb - ya) + xa) inside = !inside; }
        if (inside) hits.push(i); }
      model.send({ type: "lasso", indices: hits });
    } else if (mode === "path" && moved) {
      model.send({ type: "path", points: stroke.map(([px, py]) => toData(px, py)) });
    } else {
      const [px, py] = stroke[stroke.length - 1]; const i = nearest(px, py);
      model.send({ type: "click", x: toData(px, py)[0], y: toData(px, py)[1], index: i });
    }
    stroke = []; request();
  });
  model.on("change:hover_thumb", () => { const t = model.get("hover_thumb");
    if (t) { tip.src = t; tip.style.display = "block"; } else { tip.style.display = "none"; } });
  model.on("change:coords", load); model.on("change:colors", load);
  model.on("change:selected", selection);
  for (const name of ["marker", "landed", "path", "axes"]) model.on(`change:${name}`, request);
  load();
}
export default { render };
"""


PLOT_JS = r"""
function render({ model, el }) {
  const W = model.get("width"), H = model.get("height");
  const wrap = document.createElement("div");
  wrap.style.cssText = "display:inline-block;margin:2px;font:12px sans-serif;text-align:center";
  const title = document.createElement("div"); title.className = "ll-plot-title";
  const canvas = document.createElement("canvas");
  canvas.width = W; canvas.height = H; canvas.className = "ll-plot";
  canvas.dataset.draws = "0";
  canvas.style.cssText = "border:1px solid #ccc;background:#fff";
  wrap.appendChild(title); wrap.appendChild(canvas); el.appendChild(wrap);
  const ctx = canvas.getContext("2d");
  const toPx = (x, y) => { const b = model.get("bounds");
    return [(x - b[0]) / (b[1] - b[0]) * W, H - (y - b[2]) / (b[3] - b[2]) * H]; };
  const toData = (px, py) => { const b = model.get("bounds");
    return [b[0] + px / W * (b[1] - b[0]), b[2] + (H - py) / H * (b[3] - b[2])]; };
  let stroke = [];
  const draw = () => {
    title.textContent = model.get("title");
    canvas.style.cursor = model.get("drawable") ? "crosshair" : "default";
    ctx.clearRect(0, 0, W, H);
    let points = 0;
    for (const L of model.get("layers")) {
      ctx.globalAlpha = L.alpha ?? 1; ctx.fillStyle = ctx.strokeStyle = L.color ?? "#333";
      ctx.lineWidth = L.width ?? 1;
      const xy = L.xy ?? [];
      if (L.kind === "points") {
        const r = L.size ?? 1.5;
        for (let i = 0; i + 1 < xy.length; i += 2) { const [px, py] = toPx(xy[i], xy[i+1]);
          ctx.fillRect(px - r, py - r, 2 * r, 2 * r); points++; }
      } else if (L.kind === "arrows") {
        const d = L.dxy ?? [];
        for (let i = 0; i + 1 < xy.length; i += 2) {
          const [ax, ay] = toPx(xy[i], xy[i+1]); const [bx, by] = toPx(xy[i] + d[i], xy[i+1] + d[i+1]);
          ctx.beginPath(); ctx.moveTo(ax, ay); ctx.lineTo(bx, by); ctx.stroke();
          const ang = Math.atan2(by - ay, bx - ax), h = Math.min(5, Math.hypot(bx - ax, by - ay) / 2);
          ctx.beginPath(); ctx.moveTo(bx, by);
          ctx.lineTo(bx - h * Math.cos(ang - 0.5), by - h * Math.sin(ang - 0.5));
          ctx.lineTo(bx - h * Math.cos(ang + 0.5), by - h * Math.sin(ang + 0.5)); ctx.closePath(); ctx.fill(); }
      } else if (L.kind === "lines") {
        for (const p of L.paths ?? []) { ctx.beginPath();
          for (let i = 0; i + 1 < p.length; i += 2) { const [px, py] = toPx(p[i], p[i+1]);
            i ? ctx.lineTo(px, py) : ctx.moveTo(px, py); }
          ctx.stroke(); }
      } else if (L.kind === "text") {
        ctx.font = "12px sans-serif"; const [px, py] = toPx(xy[0], xy[1]); ctx.fillText(L.text ?? "", px, py);
      }
    }
    ctx.globalAlpha = 1;
    if (stroke.length) { ctx.fillStyle = "#e8590c";
      for (const [px, py] of stroke) ctx.fillRect(px - 2, py - 2, 4, 4); }
    canvas.dataset.points = String(points);
    canvas.dataset.draws = String(Number(canvas.dataset.draws) + 1);
  };
  const pos = (e) => { const r = canvas.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
  let down = false;
  canvas.addEventListener("mousedown", (e) => { if (!model.get("drawable")) return; down = true; stroke = [pos(e)]; draw(); });
  canvas.addEventListener("mousemove", (e) => { if (!down) return; stroke.push(pos(e)); draw(); });
  const finish = () => { if (!down) return; down = false;
    const pts = stroke.map(([px, py]) => toData(px, py)); stroke = [];
    model.set("drawn", [...model.get("drawn"), ...pts]); model.save_changes(); draw(); };
  canvas.addEventListener("mouseup", finish); canvas.addEventListener("mouseleave", finish);
  for (const k of ["layers", "bounds", "title", "drawable"]) model.on("change:" + k, draw);
  draw();
}
export default { render };
"""


class ThumbGrid(anywidget.AnyWidget):
    """Thumbnails (data URLs) in a grid; a click toggles an item in ``selected`` (synced both ways)."""

    _esm = GRID_JS
    images = traitlets.List(traitlets.Unicode()).tag(sync=True)
    labels = traitlets.List(traitlets.Unicode()).tag(sync=True)
    selected = traitlets.List(traitlets.Int()).tag(sync=True)
    columns = traitlets.Int(8).tag(sync=True)
    size = traitlets.Int(72).tag(sync=True)

    def __init__(self, **kw):
        super().__init__(**kw)
        self.on_msg(self._on_front)

    def _on_front(self, _, content, buffers):
        if content.get("type") == "toggle":
            i = int(content["index"])
            self.selected = [j for j in self.selected if j != i] if i in self.selected else [*self.selected, i]


class MapView(anywidget.AnyWidget):
    """A 2-D scatter on a canvas: ``coords`` (float32 x, y pairs) and ``colors`` (uint8 RGB) as binary buffers,
    hover thumbnails fetched lazily, lasso selection, clicks anywhere, and drawn paths (custom messages)."""

    _esm = MAP_JS
    coords = traitlets.Bytes(b"").tag(sync=True)
    colors = traitlets.Bytes(b"").tag(sync=True)
    selected = traitlets.List(traitlets.Int()).tag(sync=True)
    hover_thumb = traitlets.Unicode("").tag(sync=True)
    marker = traitlets.List(traitlets.Float()).tag(sync=True)
    #: Where the image generated at ``marker`` landed on the map (drawn as a red diamond, dashed from the click).
    landed = traitlets.List(traitlets.Float()).tag(sync=True)
    path = traitlets.List(traitlets.List(traitlets.Float())).tag(sync=True)
    mode = traitlets.Unicode("select").tag(sync=True)
    axes = traitlets.List(traitlets.Unicode()).tag(sync=True)
    width = traitlets.Int(480).tag(sync=True)
    height = traitlets.Int(480).tag(sync=True)


class PlotCanvas(anywidget.AnyWidget):
    """A 2-D plot on a canvas: ``layers`` of points, arrows, polylines and text in data coordinates (``bounds`` =
    ``[x0, x1, y0, y1]``); with ``drawable`` on, dragging on it appends data-coordinate points to ``drawn``. The
    canvas carries ``data-points`` (points drawn in the last render) and ``data-draws`` (renders so far) for tests."""

    _esm = PLOT_JS
    layers = traitlets.List(traitlets.Dict()).tag(sync=True)
    bounds = traitlets.List(traitlets.Float(), default_value=[-3.0, 3.0, -3.0, 3.0]).tag(sync=True)
    title = traitlets.Unicode("").tag(sync=True)
    drawable = traitlets.Bool(False).tag(sync=True)
    drawn = traitlets.List(traitlets.List(traitlets.Float())).tag(sync=True)
    width = traitlets.Int(260).tag(sync=True)
    height = traitlets.Int(260).tag(sync=True)


def flat(points) -> list[float]:
    """An ``(n, 2)`` tensor or array as the flat, rounded list the plot canvas takes."""
    import torch

    t = torch.as_tensor(points, dtype=torch.float32).reshape(-1)
    return [round(v, 3) for v in t.tolist()]
