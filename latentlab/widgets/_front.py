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
  const W = model.get("width"), H = model.get("height");
  const wrap = document.createElement("div");
  wrap.style.cssText = `position:relative;width:${W}px;height:${H}px`;
  const canvas = document.createElement("canvas");
  canvas.width = W; canvas.height = H; canvas.className = "ll-map";
  canvas.style.cssText = "border:1px solid #ccc;cursor:crosshair";
  const tip = document.createElement("img");
  tip.className = "ll-tip";
  tip.style.cssText = "position:absolute;display:none;pointer-events:none;border:2px solid #333;width:64px;height:64px;image-rendering:pixelated";
  wrap.appendChild(canvas); wrap.appendChild(tip); el.appendChild(wrap);
  const ctx = canvas.getContext("2d");
  let xy = new Float32Array(0), rgb = new Uint8Array(0), n = 0, bounds = [0, 1, 0, 1];
  let stroke = [];
  const toPx = (x, y) => [16 + (x - bounds[0]) / (bounds[1] - bounds[0]) * (W - 32),
                          H - 16 - (y - bounds[2]) / (bounds[3] - bounds[2]) * (H - 32)];
  const toData = (px, py) => [bounds[0] + (px - 16) / (W - 32) * (bounds[1] - bounds[0]),
                              bounds[2] + (H - 16 - py) / (H - 32) * (bounds[3] - bounds[2])];
  // spatial hash of points in pixel space for hover (fast at 100,000 points)
  let cells = new Map();
  const key = (cx, cy) => cx * 100003 + cy;
  const load = () => {
    const b = model.get("coords"); const c = model.get("colors");
    xy = new Float32Array(b.buffer, b.byteOffset, b.byteLength / 4);
    rgb = new Uint8Array(c.buffer, c.byteOffset, c.byteLength);
    n = xy.length / 2;
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (let i = 0; i < n; i++) { const x = xy[2*i], y = xy[2*i+1];
      if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y; }
    if (!(x1 > x0)) { x0 -= 1; x1 += 1; } if (!(y1 > y0)) { y0 -= 1; y1 += 1; }
    bounds = [x0, x1, y0, y1];
    cells = new Map();
    for (let i = 0; i < n; i++) { const [px, py] = toPx(xy[2*i], xy[2*i+1]);
      const k = key(Math.floor(px / 8), Math.floor(py / 8));
      if (!cells.has(k)) cells.set(k, []); cells.get(k).push(i); }
    draw();
  };
  const draw = () => {
    ctx.clearRect(0, 0, W, H);
    const sel = new Set(model.get("selected"));
    const any = sel.size > 0;
    const r = n > 20000 ? 1.2 : n > 2000 ? 2 : 4;
    for (let pass = 0; pass < 2; pass++) {
      for (let i = 0; i < n; i++) {
        const s = sel.has(i); if ((pass === 0) === (any && s)) continue;
        const [px, py] = toPx(xy[2*i], xy[2*i+1]);
        ctx.fillStyle = any && !s ? "rgba(170,170,170,0.5)" : `rgb(${rgb[3*i]},${rgb[3*i+1]},${rgb[3*i+2]})`;
        ctx.fillRect(px - r, py - r, 2 * r, 2 * r);
      }
    }
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
  const nearest = (px, py) => {
    let best = -1, bd = 64; const cx = Math.floor(px / 8), cy = Math.floor(py / 8);
    for (let dx = -1; dx <= 1; dx++) for (let dy = -1; dy <= 1; dy++) {
      for (const i of cells.get(key(cx + dx, cy + dy)) || []) {
        const [qx, qy] = toPx(xy[2*i], xy[2*i+1]); const d = (qx - px) ** 2 + (qy - py) ** 2;
        if (d < bd) { bd = d; best = i; } } }
    return best;
  };
  const pos = (e) => { const r = canvas.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
  let down = false, lastHover = -2;
  canvas.addEventListener("mousedown", (e) => { down = true; stroke = [pos(e)]; });
  canvas.addEventListener("mousemove", (e) => {
    const [px, py] = pos(e);
    if (down) { stroke.push([px, py]); draw(); return; }
    const i = nearest(px, py);
    if (i !== lastHover) { lastHover = i; model.send({ type: "hover", index: i }); }
    if (i >= 0) { tip.style.left = (px + 12) + "px"; tip.style.top = (py + 12) + "px"; } else { tip.style.display = "none"; }
  });
  canvas.addEventListener("mouseleave", () => { tip.style.display = "none"; lastHover = -2; });
  canvas.addEventListener("mouseup", (e) => {
    down = false; const mode = model.get("mode");
    const moved = stroke.length > 3;
    if (mode === "select" && moved) {
      // point-in-polygon (ray casting) for every point: fine at 100,000
      const poly = stroke; const hits = [];
      for (let i = 0; i < n; i++) { const [x, y] = toPx(xy[2*i], xy[2*i+1]); let inside = false;
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
    stroke = []; draw();
  });
  model.on("change:hover_thumb", () => { const t = model.get("hover_thumb");
    if (t) { tip.src = t; tip.style.display = "block"; } else { tip.style.display = "none"; } });
  model.on("change:coords", load); model.on("change:colors", load);
  model.on("change:selected", draw); model.on("change:marker", draw); model.on("change:landed", draw); model.on("change:path", draw);
  model.on("change:axes", draw);
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
