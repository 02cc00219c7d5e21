"""How smooth the generative map's canvas stays as the number of points grows: pan and zoom frames per second in a
real browser (Debian's chromium driven by Playwright), at 10,000 points (the baseline), 100,000 and 1,000,000.

The page runs the map widget's own ES module (``MapView``'s front end, unchanged) against an in-page stand-in for the
widget model, so nothing but the canvas is timed: no kernel, no JupyterLab. The points are ``--clusters`` Gaussian
blobs drawn in the page from a seeded generator (the same points every run). Each measurement drives the canvas
with real DOM events, one per animation frame for ``--seconds``: wheel zooms about the centre (in, then out) and a
shift-drag pan back and forth. Reported per size: frames per second (redraws the canvas actually made over the
elapsed time), the median and worst redraw time (ms, the points' raster alone), the points drawn, the time from mounting the widget to its first
picture (data loaded, hover grid built, first raster), and the ratio of
frames per second to the 10,000-point baseline measured in the same browser. The display's refresh (about 60 Hz)
caps frames per second; a redraw time well under 16 ms means headroom.

    python -m latentlab.benchmarks.map_fps --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
from pathlib import Path

#: Point counts measured; the first is the baseline.
SIZES = (10_000, 100_000, 1_000_000)

_PAGE = """<!doctype html><html><body style="margin:0"><div id="host"></div><script type="module">
const SRC = %(src)s;
const { default: widget } = await import(URL.createObjectURL(new Blob([SRC], { type: "text/javascript" })));
function points(n, clusters, seed) {
  let s = seed >>> 0;
  const rnd = () => { s = (Math.imul(s, 1664525) + 1013904223) >>> 0; return (s + 0.5) / 4294967296; };
  const xy = new Float32Array(2 * n), rgb = new Uint8Array(3 * n), centres = [];
  for (let c = 0; c < clusters; c++) centres.push([rnd() * 20 - 10, rnd() * 20 - 10, 0.3 + rnd(), rnd() * 255, rnd() * 255, rnd() * 255]);
  for (let i = 0; i < n; i++) { const c = centres[i %% clusters];
    const r = Math.sqrt(-2 * Math.log(rnd())), a = 2 * Math.PI * rnd();
    xy[2*i] = c[0] + c[2] * r * Math.cos(a); xy[2*i+1] = c[1] + c[2] * r * Math.sin(a);
    rgb[3*i] = c[3]; rgb[3*i+1] = c[4]; rgb[3*i+2] = c[5]; }
  return [xy, rgb];
}
window.mount = (n, clusters, seed) => {
  const host = document.getElementById("host"); host.innerHTML = "";
  const [xy, rgb] = points(n, clusters, seed);
  const state = { coords: new DataView(xy.buffer), colors: new DataView(rgb.buffer), selected: [], hover_thumb: "",
                  marker: [], landed: [], path: [], mode: "select", axes: ["PC1", "PC2"], width: 480, height: 480 };
  const model = { get: (k) => state[k], on: () => {}, send: () => {} };
  const t0 = performance.now();
  widget.render({ model, el: host });
  const canvas = document.querySelector("canvas.ll-map");
  // the first draw happens in an animation frame after render() returns: wait for it (the draw counter)
  return new Promise((done) => { const wait = () => Number(canvas.dataset.draws) > 0
    ? done(performance.now() - t0) : requestAnimationFrame(wait); wait(); });
};
window.drive = (kind, seconds) => new Promise((done) => {
  const canvas = document.querySelector("canvas.ll-map"), r = canvas.getBoundingClientRect();
  const cx = r.left + r.width / 2, cy = r.top + r.height / 2;
  const draws0 = Number(canvas.dataset.draws), times = [];
  let frame = 0, x = cx;
  if (kind === "pan") canvas.dispatchEvent(new PointerEvent("pointerdown", { clientX: x, clientY: cy, shiftKey: true, bubbles: true }));
  const t0 = performance.now();
  const tick = () => {
    const ms = Number(canvas.dataset.ms); if (frame > 0) times.push(ms);
    if (performance.now() - t0 > seconds * 1000 && times.length >= 2) {  // a busy machine: still a few frames
      if (kind === "pan") canvas.dispatchEvent(new PointerEvent("pointerup", { clientX: x, clientY: cy, bubbles: true }));
      const elapsed = (performance.now() - t0) / 1000;
      done({ draws: Number(canvas.dataset.draws) - draws0, elapsed, times, points: Number(canvas.dataset.points) });
      return;
    }
    if (kind === "zoom") {
      const dy = (Math.floor(frame / 30) %% 2 === 0) ? -40 : 40;  // 30 frames in, 30 out
      canvas.dispatchEvent(new WheelEvent("wheel", { clientX: cx, clientY: cy, deltaY: dy, bubbles: true, cancelable: true }));
    } else {
      x += (Math.floor(frame / 40) %% 2 === 0) ? 3 : -3;
      canvas.dispatchEvent(new PointerEvent("pointermove", { clientX: x, clientY: cy, shiftKey: true, bubbles: true }));
    }
    frame++;
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
});
window.ready = true;
</script></body></html>"""


def measure(sizes=SIZES, *, seconds: float = 3.0, clusters: int = 12, seed: int = 0, chromium: str | None = None,
            screenshot: Path | None = None) -> list[dict]:
    """Frames per second of zoom and pan at each point count, in one browser; see the module notes."""
    from playwright.sync_api import sync_playwright

    from latentlab.widgets._front import MAP_JS

    chromium = chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise RuntimeError("this benchmark needs Debian's chromium (apt-get install chromium) and playwright")
    rows = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 600, "height": 600})
        page.set_content(_PAGE % {"src": json.dumps(MAP_JS)})
        page.wait_for_function("() => window.ready === true", timeout=60_000)
        for n in sizes:
            first = page.evaluate(f"() => window.mount({int(n)}, {int(clusters)}, {int(seed)})")
            row = {"points": int(n), "first_draw_ms": first}
            for kind in ("zoom", "pan"):
                out = page.evaluate(f"() => window.drive('{kind}', {float(seconds)})")
                times = out["times"] or [float("nan")]
                row[kind] = {"fps": out["draws"] / out["elapsed"], "median_ms": statistics.median(times),
                             "worst_ms": max(times), "points_drawn": out["points"]}
            if screenshot is not None and n == max(sizes):
                page.locator("canvas.ll-map").screenshot(path=str(screenshot))
            rows.append(row)
        browser.close()
    base = rows[0]
    for row in rows:
        for kind in ("zoom", "pan"):
            row[kind]["vs_baseline"] = row[kind]["fps"] / base[kind]["fps"]
    return rows


def table(rows: list[dict]) -> str:
    head = ("| points | first draw ms | zoom fps | zoom redraw ms (median / worst) | pan fps "
            "| pan redraw ms (median / worst) | fps vs 10k (zoom / pan) |")
    lines = [head, "|" + " --- |" * 7]
    for r in rows:
        z, p = r["zoom"], r["pan"]
        lines.append(f"| {r['points']:,} | {r['first_draw_ms']:.0f} | {z['fps']:.1f} | {z['median_ms']:.1f} / {z['worst_ms']:.1f} | "
                     f"{p['fps']:.1f} | {p['median_ms']:.1f} / {p['worst_ms']:.1f} | "
                     f"{z['vs_baseline']:.2f} / {p['vs_baseline']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentlab.benchmarks.map_fps", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="point counts; the first is the baseline")
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    p.add_argument("--clusters", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--screenshot", type=Path, help="the canvas at the largest size, after the pan")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path, help="append the table to this file")
    args = p.parse_args(argv)
    rows = measure(args.sizes, seconds=args.seconds, clusters=args.clusters, seed=args.seed,
                   screenshot=args.screenshot)
    head = (f"map canvas pan/zoom, headless chromium ({platform.machine()}, {os.cpu_count()} cores), "
            f"{args.seconds:g} s per measurement, {args.clusters} clusters, seed {args.seed}")
    print(head)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write(f"\n{head}\n\n{table(rows)}\n")


if __name__ == "__main__":
    main()
