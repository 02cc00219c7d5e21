"""ToyLab: train a 2-D diffusion model and a 2-D flow-matching model live, on a preset or hand-drawn distribution,
and watch their vector fields and sampling paths (the "train it yourself" lesson)."""

from __future__ import annotations

import html
import threading
import time

import ipywidgets as widgets
import torch

from latentlab import toy2d
from latentlab.widgets._base import WorkerPanel
from latentlab.widgets._front import PlotCanvas, flat

_COLORS = {"data": "#495057", "diffusion": "#1c7ed6", "flow": "#e8590c", "reflow": "#2b8a3e"}
_DRAW = "draw your own"
STRAIGHTNESS_STEPS = 32  # straightness is measured on a fine path, whatever the steps slider says


class ToyLab(WorkerPanel):
    """Train both model families on points in the plane and look inside them while they learn.

    Left, the data (pick a preset, or choose "draw your own" and drag on the canvas). Then one canvas per model:
    at the time ``t`` of the slider (1 = noise, 0 = data) it shows the particles of a sampling run with ``steps``
    model calls, and the model's vector field on a grid -- the *denoising* field (where points move as ``t`` falls)
    or, with "noising", the data pushed forward by the noising process and the opposite field. ▶ trains
    continuously (the fields redraw as they learn), "step" trains one chunk, "slow motion" redraws after every
    single optimiser step; ▶ under the time slider plays the sampling run. "Reflow" trains a rectified flow on the
    flow model's own (noise, sample) pairs: nearly straight paths, so one step works.

    Every number shown is measured on the spot: loss, sliced Wasserstein distance of the samples to the data (same
    units as the points; 0 = the same distribution) and straightness (path length / chord; 1 = straight).

    Examples
    --------
    >>> from latentlab.widgets import ToyLab
    >>> w = ToyLab("moons", chunk=50)
    >>> w.train(100)  # blocking, for scripts; the buttons do this in the background
    >>> w.models["flow"].steps_done
    100
    """

    torch_threads = 1  # one image at a time (see WorkerPanel.torch_threads)

    def __init__(self, data: str | object = "moons", *, chunk: int = 100, points: int = 768, seed: int = 0,
                 size: int = 250):
        from latentlab import _checks

        super().__init__()
        self.chunk = _checks.positive_int(chunk, "chunk")
        self.points = _checks.positive_int(points, "points")
        self.seed = _checks.seed(seed)
        _checks.positive_int(size, "size", minimum=64)
        if not isinstance(data, str) and not (isinstance(data, torch.Tensor) or hasattr(data, "__array__")
                                              or isinstance(data, (list, tuple))):
            raise TypeError(f"`data` must be a preset name ({', '.join(toy2d.PRESETS)}) or (k, 2) points, got "
                            f"{type(data).__name__}")
        self._lock = threading.Lock()
        self._playing = False
        preset = data if isinstance(data, str) else _DRAW
        if isinstance(data, str):
            _checks.choice(data, "data", toy2d.PRESETS)
        self.preset = widgets.Dropdown(options=[*toy2d.PRESETS, _DRAW], value=preset, description="data")
        self.clear_button = widgets.Button(description="clear drawing", layout=widgets.Layout(width="120px"))
        self.play_button = widgets.ToggleButton(value=False, description="▶ train", tooltip="train continuously",
                                                layout=widgets.Layout(width="110px"))
        self.step_button = widgets.Button(description="step", tooltip=f"train {self.chunk} steps",
                                          layout=widgets.Layout(width="70px"))
        self.slow = widgets.Checkbox(value=False, description="slow motion", indent=False,
                                     layout=widgets.Layout(width="110px"))
        self.reset_button = widgets.Button(description="reset", layout=widgets.Layout(width="70px"))
        self.reflow_button = widgets.Button(description="reflow", tooltip="train a rectified flow from the flow model",
                                            layout=widgets.Layout(width="80px"))
        self.t = widgets.FloatSlider(value=0.0, min=0.0, max=1.0, step=0.01, description="t", readout_format=".2f",
                                     continuous_update=True, layout=widgets.Layout(width="360px"))
        # the samples (t = 0) first; ▶ replays the sampling run from the noise (t = 1)
        self.player = widgets.Play(value=100, min=0, max=100, step=4, interval=120, description="play sampling")
        self.player.observe(self._from_player, "value")
        self.steps = widgets.IntSlider(value=16, min=1, max=64, description="steps", continuous_update=False,
                                       layout=widgets.Layout(width="300px"))
        self.view = widgets.ToggleButtons(options=["denoising", "noising"], value="denoising")
        self.view.add_class("ll-toy-view")
        self.data_canvas = PlotCanvas(title="data", width=size, height=size)
        self.data_canvas.add_class("ll-toy-data")
        self.canvases = {k: PlotCanvas(title=k, width=size, height=size) for k in (*toy2d.KINDS, "reflow")}
        for k, c in self.canvases.items():
            c.add_class(f"ll-toy-{k}")
        self.canvases["reflow"].layout.display = "none"
        self.info = widgets.HTML("")
        self.info.add_class("ll-toy-info")
        self.models: dict[str, toy2d.ToyModel] = {}
        self.data = self._initial_data(data)
        self.children = [
            widgets.HBox([self.preset, self.clear_button]),
            widgets.HBox([self.play_button, self.step_button, self.slow, self.reset_button, self.reflow_button]),
            widgets.HBox([self.busy]), self.error,
            widgets.HBox([self.data_canvas, *self.canvases.values()]),
            widgets.HBox([self.player, self.t]), widgets.HBox([self.steps, self.view]), self.info,
        ]
        self.preset.observe(lambda _: self._on_preset(), "value")
        self.clear_button.on_click(lambda _: self._clear())
        self.data_canvas.observe(lambda _: self._on_drawn(), "drawn")
        self.play_button.observe(lambda ch: self._on_play(ch["new"]), "value")
        self.step_button.on_click(lambda _: self.submit(lambda: self._train_chunk(self.chunk)))
        self.reset_button.on_click(lambda _: self.submit(self._reset, tag="reset"))
        self.reflow_button.on_click(lambda _: self.submit(self._reflow))
        for w in (self.t, self.steps, self.view):
            w.observe(lambda _: self.submit(self._draw_models, tag="draw"), "value")
        self.data_canvas.drawable = preset == _DRAW
        self.submit(self._reset, tag="reset")

    # --- data -----------------------------------------------------------------------------------------------------

    def _initial_data(self, data) -> torch.Tensor:
        if isinstance(data, str):
            return toy2d.sample(data, 4096, seed=self.seed)
        return toy2d.from_points(data, 4096, seed=self.seed)

    def _on_preset(self) -> None:
        self.play_button.value = False  # new data: training stops, the models start again
        drawing = self.preset.value == _DRAW
        self.data_canvas.drawable = drawing
        if not drawing:
            self.data = toy2d.sample(self.preset.value, 4096, seed=self.seed)
            self.submit(self._reset, tag="reset")
        elif len(self.data_canvas.drawn) < 3:
            self._draw_data(hint="drag on this canvas to draw points")

    def _clear(self) -> None:
        self.data_canvas.drawn = []
        self._draw_data(hint="drag on this canvas to draw points")

    def _on_drawn(self) -> None:
        if self.preset.value != _DRAW:
            return
        drawn = self.data_canvas.drawn
        if len(drawn) < 3:
            return
        self.play_button.value = False
        self.data = toy2d.from_points(drawn, 4096, seed=self.seed)
        self.submit(self._reset, tag="reset")

    # --- training ---------------------------------------------------------------------------------------------

    def _reset(self) -> None:
        with self._lock:
            self.models = {}
            for i, kind in enumerate(toy2d.KINDS):
                self.models[kind] = toy2d.train(self.data, kind, steps=0, seed=self.seed + i)
            self.canvases["reflow"].layout.display = "none"
        self._draw_data()
        self._draw_models()

    def _train_chunk(self, n: int) -> None:
        with self._lock:
            if self.slow.value:
                for _ in range(min(n, 20)):  # slow motion: every optimiser step is drawn
                    for m in self._trainable():
                        m.fit(self.data, 1)
                    self._draw_models()
                    time.sleep(0.05)
                return
            for m in self._trainable():
                m.fit(self.data, n)
        self._draw_models()

    def _trainable(self) -> list[toy2d.ToyModel]:
        return [self.models[k] for k in toy2d.KINDS]

    def _on_play(self, playing: bool) -> None:
        self._playing = playing
        self.play_button.description = "⏸ pause" if playing else "▶ train"
        if playing:
            def loop():
                while self._playing:
                    self._train_chunk(self.chunk)
            self.submit(loop, tag="train")

    def train(self, steps: int) -> None:
        """Train both models ``steps`` more steps now (blocking; what the buttons do in the background)."""
        from latentlab import _checks

        steps = _checks.positive_int(steps, "steps")
        self.wait()
        with self._lock:
            for m in self._trainable():
                m.fit(self.data, steps)
        self._draw_models()

    def reflow(self, steps: int = 2000) -> toy2d.ToyModel:
        """Train the rectified flow of the current flow model now (blocking) and show it."""
        self.wait()
        return self._reflow(steps)

    def _reflow(self, steps: int = 2000) -> toy2d.ToyModel:
        with self._lock:
            self.models["reflow"] = toy2d.reflow(self.models["flow"], steps=steps, seed=self.seed)
        self.canvases["reflow"].layout.display = None
        self._draw_models()
        return self.models["reflow"]

    # --- drawing ----------------------------------------------------------------------------------------------

    def _draw_data(self, hint: str = "") -> None:
        layers = [{"kind": "points", "xy": flat(self.data[: self.points]), "color": _COLORS["data"], "size": 1.2,
                   "alpha": 0.6}]
        drawn = self.data_canvas.drawn
        if self.preset.value == _DRAW and drawn:
            layers.append({"kind": "points", "xy": flat(torch.tensor(drawn)), "color": "#e8590c", "size": 2.0})
        if hint:
            layers.append({"kind": "text", "xy": [-2.8, 2.7], "text": hint, "color": "#c92a2a"})
        self.data_canvas.layers = layers

    def snapshot(self, kind: str) -> dict:
        """What the ``kind`` canvas shows at the current settings: ``particles`` (n, 2) at time ``t``, the field
        ``grid`` and ``arrows`` (the step each grid point takes), and the measures."""
        m = self.models[kind]
        t, steps = float(self.t.value), int(self.steps.value)
        z = toy2d.noise(self.points, seed=self.seed + 1)
        path = m.sample(z, steps, path=True)
        k = min(steps, max(0, round((1 - t) * steps)))  # the sampling step at time t
        grid = toy2d.field_grid(-3, 3, 15)
        v = m.velocity(grid, min(max(t, 1e-3), 1.0))
        scale = 0.35 / v.norm(dim=1).clamp_min(1e-6).max().clamp_min(1e-6) * 3.0  # longest arrow ~1 unit
        if self.view.value == "noising":
            particles = toy2d.forward_noise(self.data[: self.points], t, "flow" if kind == "reflow" else kind,
                                            seed=self.seed + 2)
            arrows = v * scale
        else:
            particles = path[k]
            arrows = -v * scale
        loss = sum(m.losses[-50:]) / max(1, len(m.losses[-50:])) if m.losses else float("nan")
        return {"particles": particles, "grid": grid, "arrows": arrows, "path": path, "step": k,
                "loss": loss, "distance": toy2d.sliced_wasserstein(path[-1], self.data),
                "straightness": self._straightness(m, z), "steps_done": m.steps_done}

    def _straightness(self, m, z) -> float:
        """Path length / chord of a 32-step run: the same while the model does not train, so computed once per
        (model, training step) rather than on every t or step change."""
        key = (id(m), m.steps_done, len(z), self.seed)
        cache = self.__dict__.setdefault("_straight", {})
        if key not in cache:
            if len(cache) > 16:
                cache.clear()
            cache[key] = toy2d.straightness(m.sample(z, STRAIGHTNESS_STEPS, path=True))
        return cache[key]

    def _draw_models(self) -> None:
        rows = []
        for kind, m in list(self.models.items()):
            s = self.snapshot(kind)
            paths = [flat(s["path"][: s["step"] + 1, i]) for i in range(0, self.points, max(1, self.points // 24))]
            self.canvases[kind].layers = [
                {"kind": "arrows", "xy": flat(s["grid"]), "dxy": flat(s["arrows"]), "color": "#adb5bd"},
                {"kind": "lines", "paths": paths, "color": _COLORS[kind], "alpha": 0.5},
                {"kind": "points", "xy": flat(s["particles"]), "color": _COLORS[kind], "size": 1.3, "alpha": 0.7},
            ]
            self.canvases[kind].title = f"{kind} · {s['steps_done']} training steps"
            rows.append(f"<tr class='ll-toy-row-{kind}'><td style='color:{_COLORS[kind]}'>{html.escape(kind)}</td>"
                        f"<td>{s['steps_done']}</td><td class='ll-loss'>{s['loss']:.3f}</td>"
                        f"<td>{s['distance']:.3f}</td><td>{s['straightness']:.3f}</td></tr>")
        self.info.value = ("<table><tr><th>model</th><th>training steps</th><th>loss</th>"
                           f"<th>distance to data ({self.steps.value} steps)</th><th>path length / chord (32 steps)</th></tr>"
                           + "".join(rows) + "</table>")

    def _from_player(self, change) -> None:
        """The play button runs t from 1 down to 0 (its value counts up)."""
        self.t.value = round(1 - change["new"] / 100, 2)
