"""Explainer widgets for the course, live for any prompt and any model: a timestep scrubber (x_t and the predicted
clean image at every step, with seed, guidance and steps sliders), a tokens view (prompt -> tokens -> the
conditioning rows the denoiser attends to), and a two-prompt trajectory map (where the denoising paths of two
prompts split). Each takes one model or several side by side (e.g. the UNet model and its flow twin)."""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence

import ipywidgets as widgets
import torch

from latentlab import _checks
from latentlab.sampling import Sampling
from latentlab.widgets._base import WorkerPanel, check_text
from latentlab.widgets._front import PlotCanvas, flat

_PATH_COLORS = ("#1c7ed6", "#e8590c")
PREFILL_CHUNK = 4  # images decoded per background turn of the scrubber's worker


def _labs(lab, names) -> dict[str, object]:
    """One model or several as ``{name: lab}``; each must be a latentlab Lab (trajectories and tokens)."""
    if names is not None and (isinstance(names, str) or not isinstance(names, (list, tuple))
                              or not all(isinstance(n, str) for n in names)):
        raise TypeError(f"`names` must be a list of strings (one per model) or None, got {names!r}")
    if isinstance(lab, Mapping):
        items = dict(lab)
    elif isinstance(lab, (list, tuple)):
        items = {}
        for i, one in enumerate(lab):
            base = (names[i] if names else None) or getattr(one, "model_id", None) or f"model {i + 1}"
            items[base if base not in items else f"{base} ({i + 1})"] = one
    else:
        items = {(names[0] if names else None) or getattr(lab, "model_id", None) or "model": lab}
    if not items:
        raise ValueError("`lab` is empty: give a model (e.g. latentlab.Lab.default()) or several")
    for name, one in items.items():
        for attr in ("trajectory", "decode", "encode_prompt", "noise"):
            if not callable(getattr(one, attr, None)):
                raise TypeError(f"`lab` {name!r} must be a latentlab.Lab (it needs `{attr}`), got {type(one).__name__}")
    return {str(k): v for k, v in items.items()}


def _short(name: str) -> str:
    return name if len(name) <= 40 else "…" + name[-39:]


class _Run:
    """One model's trajectory, expanded to positions 0..n: ``xt[k]`` the latent before step k (k = 0: the noise,
    k = n: the final latent) and ``x0[k]`` the clean latent predicted at step k (k = n: the final latent)."""

    def __init__(self, lab, z: torch.Tensor, traj):
        lat, x0 = traj.latents[:, 0], traj.x0[:, 0]
        self.n = lat.shape[0]
        self.xt = torch.cat([z.float().cpu(), lat])
        self.x0 = torch.cat([x0, lat[-1:]])
        self.timesteps = tuple(float(t) for t in traj.timesteps) + (0.0,)
        self.lab = lab
        self.png: dict[tuple[str, int], bytes] = {}
        steps = self.xt[1:] - self.xt[:-1]
        chord = (self.xt[-1] - self.xt[0]).flatten().norm().clamp_min(1e-12)
        self._chord_ratio = float(steps.flatten(1).norm(dim=1).sum() / chord)  # a property of the run: once

    def chord_ratio(self) -> float:
        """Path length / straight distance from noise to the final latent (1 = straight)."""
        return self._chord_ratio


class _Superseded(Exception):
    """Raised from a trajectory's step callback when a newer request has come: the old trajectory stops."""


class TimestepScrubber(WorkerPanel):
    """Scrub through the denoising of a new prompt: at every step, the noisy latent x_t and the clean image the model
    predicts from it, for one model or several side by side.

    One trajectory call per model (at compute batch 1) and then lookups: the images at the shown step are decoded
    first, the rest in the background (a few per turn), so scrubbing is a lookup once they are in. Seed, guidance and steps sliders
    start a new trajectory. With a UNet model and a flow model side by side, "path length / chord" shows which
    path is straighter (1.0 = a straight line from noise to image).

    Parameters
    ----------
    lab : Lab, or a list or dict of Labs
        The model(s); a dict names them.
    prompt : str
    seed : int
    sampling : Sampling, optional
        Starting steps and guidance (each model's defaults otherwise).

    Examples
    --------
    >>> import latentlab as ll
    >>> from latentlab.widgets import TimestepScrubber
    >>> w = TimestepScrubber(ll.Lab.default(), "a large red star on a blue background", 3)
    >>> w.wait()
    True
    >>> w.step.value = 5; w.wait()
    True
    >>> len(w.rows[0]["x0"].value) > 0
    True
    """

    torch_threads = 1  # one image at a time (see WorkerPanel.torch_threads)

    def __init__(self, lab, prompt: str, seed: int = 0, *, sampling: Sampling | None = None, upscale: int = 3,
                 names: Sequence[str] | None = None):
        super().__init__(upscale=upscale)
        self.labs = _labs(lab, names)
        first = next(iter(self.labs.values()))
        s = first.sampling(sampling)
        check_text(prompt)
        self.prompt = widgets.Text(value=prompt, description="prompt", continuous_update=False,
                                   layout=widgets.Layout(width="440px"))
        self.seed = widgets.IntSlider(value=_checks.seed(seed), min=0, max=max(999, int(seed)), description="seed",
                                      continuous_update=False)
        self.guidance = widgets.FloatSlider(value=float(s.guidance_scale), min=0.0, max=12.0, step=0.5,
                                            description="guidance", continuous_update=False)
        self.n_steps = widgets.IntSlider(value=int(s.num_inference_steps), min=2, max=50, description="steps",
                                         continuous_update=False)
        self.step = widgets.IntSlider(value=0, min=0, max=int(s.num_inference_steps), description="step",
                                      continuous_update=True, layout=widgets.Layout(width="440px"))
        self.step.add_class("ll-scrub-step")
        self.player = widgets.Play(value=0, min=0, max=int(s.num_inference_steps), interval=150,
                                   description="play")
        widgets.jslink((self.player, "value"), (self.step, "value"))
        self.status = widgets.HTML("")
        self.status.add_class("ll-scrub-status")
        self.rows = []
        boxes = []
        px = f"{64 * upscale // 2 + 40}px"
        for name in self.labs:
            row = {"label": widgets.HTML(f"<b>{html.escape(_short(name))}</b>"),
                   "xt": widgets.Image(format="png", layout=widgets.Layout(width=px, height=px)),
                   "x0": widgets.Image(format="png", layout=widgets.Layout(width=px, height=px)),
                   "info": widgets.HTML("")}
            row["xt"].add_class("ll-scrub-xt")
            row["x0"].add_class("ll-scrub-x0")
            self.rows.append(row)
            boxes.append(widgets.VBox([row["label"], widgets.HBox([
                widgets.VBox([widgets.HTML("x<sub>t</sub> (what the model sees)"), row["xt"]]),
                widgets.VBox([widgets.HTML("predicted x<sub>0</sub>"), row["x0"]])]), row["info"]]))
        self.children = [widgets.HBox([self.prompt]), widgets.HBox([self.seed, self.guidance, self.n_steps]),
                         widgets.HBox([self.player, self.step]), widgets.HBox([self.busy, self.status]),
                         self.error, widgets.HBox(boxes)]
        self.runs: list[_Run] = []
        self.ready_seconds: float | None = None
        self.done_seconds: float | None = None
        self._generation = 0
        for w in (self.prompt, self.seed, self.guidance, self.n_steps):
            w.observe(lambda _: self.recompute(), "value")
        self.step.observe(lambda _: self.show(), "value")
        self.recompute()

    # --- work -------------------------------------------------------------------------------------------------

    def recompute(self) -> None:
        """New trajectories for the current prompt, seed, guidance and steps (in the background). Each model's
        images at the slider's step are drawn as soon as its trajectory reaches that step (``ready_seconds``: every
        model's pair on screen); the rest of the steps follow (``done_seconds``), then background decoding."""
        self._generation += 1
        generation = self._generation

        def job():
            start = time.perf_counter()
            prompt = check_text(self.prompt.value)
            seed = _checks.seed(self.seed.value)
            n_req, self.ready_seconds, self.done_seconds = int(self.n_steps.value), None, None
            runs, shown = [], {}
            for j, lab in enumerate(self.labs.values()):
                s = lab.sampling(num_inference_steps=n_req, guidance_scale=float(self.guidance.value))
                z = lab.noise(seed)
                on_step = self._streamer(j, lab, z, min(int(self.step.value), n_req), n_req, generation, shown, start)
                try:
                    traj = lab.trajectory(z, lab.encode_prompt(prompt), sampling=s, batch_size=1, on_step=on_step)
                except _Superseded:
                    return  # a newer request waits: stop computing for this one
                runs.append(_Run(lab, z, traj))
            if generation != self._generation:
                return
            n = runs[0].n
            for j, run in enumerate(runs):  # the streamed pair is already decoded
                run.png.update(shown.get(j, {}))
            self.runs = runs
            self.step.max = self.player.max = n
            self.step.value = min(self.step.value, n)
            self._draw(self.step.value)
            self.done_seconds = time.perf_counter() - start
            if self.ready_seconds is None:
                self.ready_seconds = self.done_seconds
            self.status.value = (f"<span style='color:#555'>{n} steps · on screen in {self.ready_seconds:.2f} s, "
                                 f"every step ready in {self.done_seconds:.2f} s (one trajectory per model, then "
                                 "lookups)</span>")
            self._prefill(generation)

        self.submit(job, tag="trajectories")

    def _streamer(self, j: int, lab, z: torch.Tensor, k: int, n: int, generation: int, shown: dict, start: float):
        """The ``on_step`` of model ``j``'s trajectory: stop if a newer prompt waits; when the step the slider shows
        (``k``; the final latent when ``k == n``) is computed, decode and draw that pair in the model's row."""
        row, prev = self.rows[j], [z.float().cpu()]

        def on_step(i, _start, lat, x0):
            if generation != self._generation:
                raise _Superseded
            if i == min(k, n - 1):
                xt, pred = (lat, lat) if k >= n else (prev[0], x0)
                images = lab.decode(torch.cat([xt, pred]), batch_size=2)
                shown[j] = {("xt", k): self.png(images[0]), ("x0", k): self.png(images[1])}
                row["xt"].value, row["x0"].value = shown[j][("xt", k)], shown[j][("x0", k)]
                row["info"].value = (f"<span class='ll-scrub-info'>step {k}/{n} · computing the other "
                                     "steps…</span>")
                if len(shown) == len(self.rows) and self.ready_seconds is None:
                    self.ready_seconds = time.perf_counter() - start
            prev[0] = lat

        return on_step

    def _decode(self, run: _Run, keys: list[tuple[str, int]]) -> None:
        todo = [k for k in keys if k not in run.png]
        if not todo:
            return
        lat = torch.stack([(run.xt if kind == "xt" else run.x0)[k] for kind, k in todo])
        images = run.lab.decode(lat, batch_size=len(todo))
        for key, img in zip(todo, images):
            run.png[key] = self.png(img)

    def _draw(self, k: int) -> None:
        for run, row in zip(self.runs, self.rows):
            k = min(k, run.n)
            self._decode(run, [("xt", k), ("x0", k)])
            row["xt"].value, row["x0"].value = run.png[("xt", k)], run.png[("x0", k)]
            t = run.timesteps[min(k, len(run.timesteps) - 1)]
            moved = float((run.xt[k] - run.xt[0]).flatten().norm() / (run.xt[-1] - run.xt[0]).flatten().norm().clamp_min(1e-12))
            row["info"].value = (f"<span class='ll-scrub-info'>step {k}/{run.n} · timestep {t:.0f} · "
                                 f"{100 * moved:.0f} % of the way (straight-line distance) · "
                                 f"path length / chord {run.chord_ratio():.3f}</span>")

    def _prefill(self, generation: int) -> None:
        """Decode the positions not shown yet, nearest to the slider first, a few per worker turn."""
        if generation != self._generation or not self.runs:
            return
        k0 = self.step.value
        order = sorted(range(self.runs[0].n + 1), key=lambda k: abs(k - k0))
        for run in self.runs:
            missing = [(kind, k) for k in order for kind in ("xt", "x0") if (kind, k) not in run.png]
            if missing:
                self._decode(run, missing[:PREFILL_CHUNK])
                # its own tag: the next chunk must never take the place of a waiting user request (a step or a
                # new prompt submitted meanwhile), which a same-tag submit would drop
                self.submit(lambda: self._prefill(generation), tag="prefill")
                return

    def show(self) -> None:
        """Show the current step: a lookup once decoded (else one decode), on the widget's worker so that one thread
        writes the images; a background decode chunk is at most a few images, so a lookup waits little."""
        if not self.runs:
            return
        generation = self._generation

        def job():
            self._draw(self.step.value)
            self._prefill(generation)

        self.submit(job, tag="show")

    def decoded(self) -> int:
        """How many step images are decoded so far (all: 2 (n + 1) per model)."""
        return sum(len(r.png) for r in self.runs)


class TokenView(WorkerPanel):
    """Prompt -> tokens -> conditioning: the text encoder's tokens (start and end tokens included), its limit (77
    for CLIP; the tokens past it are cut off and shown struck through), and the conditioning rows of the kept
    tokens as a heat map (one row per token; the first 64 dimensions) with each row's norm.

    Examples
    --------
    >>> import latentlab as ll
    >>> from latentlab.widgets import TokenView
    >>> w = TokenView(ll.Lab.default(), "a small red star")
    >>> w.wait()
    True
    >>> w.result.tokens[1:-1]
    ('a</w>', 'small</w>', 'red</w>', 'star</w>')
    """

    torch_threads = 1  # one image at a time (see WorkerPanel.torch_threads)

    def __init__(self, lab, prompt: str, *, names: Sequence[str] | None = None, upscale: int = 6):
        super().__init__(upscale=upscale)
        self.labs = _labs(lab, names)
        for name, one in self.labs.items():
            if not callable(getattr(one, "tokens", None)):
                raise TypeError(f"`lab` {name!r} must be a latentlab.Lab (it needs `tokens`), got {type(one).__name__}")
        check_text(prompt)
        self.prompt = widgets.Textarea(value=prompt, description="prompt", continuous_update=False,
                                       layout=widgets.Layout(width="520px", height="60px"))
        self.views = [widgets.HTML("") for _ in self.labs]
        for v in self.views:
            v.add_class("ll-tokens")
        self.heatmaps = [widgets.Image(format="png") for _ in self.labs]
        self.results: list = []
        self.children = [self.prompt, widgets.HBox([self.busy]), self.error,
                         *[widgets.VBox([v, h]) for v, h in zip(self.views, self.heatmaps)]]
        self.prompt.observe(lambda _: self.update(), "value")
        self.update()

    @property
    def result(self):
        """The first model's :class:`~latentlab.backend.records.Tokens`."""
        return self.results[0] if self.results else None

    def update(self) -> None:
        def job():
            prompt = self.prompt.value
            from latentlab.sampling import check_prompt

            check_prompt(prompt)
            results = [one.tokens(prompt) for one in self.labs.values()]
            for (name, _), res, view, heat in zip(self.labs.items(), results, self.views, self.heatmaps):
                chips = []
                for i, tok in enumerate(res.tokens):
                    cut = i >= res.kept
                    style = ("background:#f1f3f5;color:#adb5bd;text-decoration:line-through" if cut
                             else "background:#e7f5ff;color:#1864ab")
                    chips.append(f"<span class='ll-token{' ll-token-cut' if cut else ''}' title='id {res.ids[i]}' "
                                 f"style='{style};border-radius:3px;padding:1px 4px;margin:1px;display:inline-block;"
                                 f"font:12px monospace'>{html.escape(tok)}</span>")
                note = (f"<b style='color:#c92a2a'>{len(res.tokens) - res.kept} tokens past the limit are cut off"
                        "</b>" if res.truncated else f"{res.limit - len(res.tokens)} tokens to spare")
                norms = res.embeds.norm(dim=1)
                view.value = (f"<div><b>{html.escape(_short(name))}</b> · {html.escape(res.encoder)}: "
                              f"<span class='ll-token-count'>{len(res.tokens)}</span> tokens of a limit of "
                              f"{res.limit} (start and end included) · {note}</div><div>{''.join(chips)}</div>"
                              f"<div style='color:#555;font-size:12px'>conditioning rows: {res.embeds.shape[0]} × "
                              f"{res.embeds.shape[1]} · row norms from {float(norms.min()):.1f} to "
                              f"{float(norms.max()):.1f}</div>")
                heat.value = self.png(_heatmap(res.embeds))
            self.results = results

        self.submit(job, tag="tokens")


def _heatmap(embeds: torch.Tensor, width: int = 64) -> torch.Tensor:
    """(tokens, dim) -> a (3, tokens, width) diverging image: blue negative, red positive, per-map scale."""
    e = embeds[:, :width].float()
    scale = e.abs().quantile(0.98).clamp_min(1e-6) if e.numel() > 1 else e.abs().max().clamp_min(1e-6)
    v = (e / scale).clamp(-1, 1)
    pos, neg = v.clamp_min(0), (-v).clamp_min(0)
    return torch.stack([1 - neg, 1 - pos - neg * 0.6, 1 - pos]).clamp(0, 1)


class TrajectoryMap(WorkerPanel):
    """Two prompts from the same noise: their denoising paths on one map (PCA of every step's latent, or UMAP),
    where they split, and how straight each path is -- for one model or several side by side.

    The paths start at the same point (the same seed's noise) and end at two different images; the map marks the
    first step at which they are half as far apart as they end up ("split"). Drag "step" to move along both paths
    and see both predicted clean images there.

    Examples
    --------
    >>> import latentlab as ll
    >>> from latentlab.widgets import TrajectoryMap
    >>> w = TrajectoryMap(ll.Lab.default(), "a large red star on a blue background",
    ...                   "a large red circle on a blue background", 1)
    >>> w.wait()
    True
    >>> 0 < w.summary[0]["split"] <= w.summary[0]["steps"]
    True
    """

    torch_threads = 1  # one image at a time (see WorkerPanel.torch_threads)

    def __init__(self, lab, prompt_a: str, prompt_b: str, seed: int = 0, *, method: str = "pca",
                 sampling: Sampling | None = None, names: Sequence[str] | None = None, upscale: int = 2,
                 size: int = 300):
        super().__init__(upscale=upscale)
        self.labs = _labs(lab, names)
        for one in self.labs.values():
            one.sampling(sampling)  # a bad `sampling` is refused here, not later inside the widget
        self.sampling_arg = sampling
        method = _checks.choice(method, "method", ("pca", "umap"))
        check_text(prompt_a, "prompt_a"), check_text(prompt_b, "prompt_b")
        _checks.positive_int(size, "size", minimum=64)
        lay = widgets.Layout(width="420px")
        self.prompt_a = widgets.Text(value=prompt_a, description="A", continuous_update=False, layout=lay)
        self.prompt_b = widgets.Text(value=prompt_b, description="B", continuous_update=False, layout=lay)
        self.seed = widgets.IntSlider(value=_checks.seed(seed), min=0, max=max(999, int(seed)), description="seed",
                                      continuous_update=False)
        self.method = widgets.Dropdown(options=["pca", "umap"], value=method, description="map")
        self.space = widgets.Dropdown(options=[("x_t (the path)", "xt"), ("predicted x0", "x0")], value="xt",
                                      description="points")
        self.step = widgets.IntSlider(value=0, min=0, max=1, description="step", continuous_update=True)
        self.step.add_class("ll-trajmap-step")
        self.maps = [PlotCanvas(width=size, height=size) for _ in self.labs]
        for m in self.maps:
            m.add_class("ll-trajmap")
        self.thumbs = [(widgets.Image(format="png"), widgets.Image(format="png")) for _ in self.labs]
        self.captions = [widgets.HTML("") for _ in self.labs]
        for c in self.captions:
            c.add_class("ll-trajmap-caption")
        cols = [widgets.VBox([m, widgets.HBox([a, b]), c]) for m, (a, b), c in zip(self.maps, self.thumbs, self.captions)]
        self.children = [self.prompt_a, self.prompt_b, widgets.HBox([self.seed, self.method, self.space]),
                         self.step, widgets.HBox([self.busy]), self.error, widgets.HBox(cols)]
        self.summary: list[dict] = []
        self._runs: list[tuple[_Run, _Run, torch.Tensor]] = []
        for w in (self.prompt_a, self.prompt_b, self.seed, self.method, self.space):
            w.observe(lambda _: self.recompute(), "value")
        self.step.observe(lambda _: self.submit(self._draw, tag="show"), "value")
        self.recompute()

    def recompute(self) -> None:
        def job():
            a = check_text(self.prompt_a.value, "prompt A")
            b = check_text(self.prompt_b.value, "prompt B")
            seed = _checks.seed(self.seed.value)
            runs, summary = [], []
            for name, lab in self.labs.items():
                s = lab.sampling(self.sampling_arg)
                z = lab.noise([seed, seed])
                traj = lab.trajectory(z, lab.encode_prompt([a, b]), sampling=s, batch_size=1)
                pair = []
                for i in range(2):
                    one = type(traj)(traj.timesteps, traj.latents[:, i : i + 1], traj.x0[:, i : i + 1],
                                     traj.images[i : i + 1])
                    pair.append(_Run(lab, z[i : i + 1], one))
                ra, rb = pair
                pts = torch.cat([getattr(ra, self.space.value), getattr(rb, self.space.value)]).flatten(1)
                coords = self._project(pts)
                dist = (ra.xt - rb.xt).flatten(1).norm(dim=1)
                # the first step at which the paths are half as far apart as they end up (None: they never part)
                split = (int(torch.nonzero(dist >= 0.5 * dist.max())[0, 0])
                         if float(dist.max()) > 1e-6 * float(ra.xt[0].norm()) else None)
                runs.append((ra, rb, coords))
                summary.append({"model": name, "steps": ra.n, "split": split,
                                "timestep": None if split is None else ra.timesteps[split],
                                "straightness": (ra.chord_ratio(), rb.chord_ratio()),
                                "final_distance": float(dist[-1])})
            self._runs, self.summary = runs, summary
            self.step.max = max(r[0].n for r in runs)
            self._draw()

        self.submit(job, tag="trajectories")

    def _project(self, pts: torch.Tensor) -> torch.Tensor:
        from latentlab.project import PCA, UMAP

        if self.method.value == "umap":
            return UMAP(2, n_neighbors=min(10, len(pts) - 1), random_state=0).fit_transform(pts)
        return PCA(2, random_state=0).fit_transform(pts)

    def _draw(self) -> None:
        k0 = self.step.value
        for (ra, rb, coords), info, canvas, (ta, tb), cap in zip(self._runs, self.summary, self.maps, self.thumbs,
                                                                  self.captions):
            n1 = ra.n + 1
            ca, cb = coords[:n1], coords[n1:]
            lo, hi = coords.min(0).values, coords.max(0).values
            pad = (hi - lo).clamp_min(1e-6) * 0.12
            k = min(k0, ra.n)
            split = info["split"]
            canvas.bounds = [float(lo[0] - pad[0]), float(hi[0] + pad[0]), float(lo[1] - pad[1]), float(hi[1] + pad[1])]
            canvas.title = f"{_short(info['model'])}"
            layers = [
                {"kind": "lines", "paths": [flat(ca)], "color": _PATH_COLORS[0], "width": 2},
                {"kind": "lines", "paths": [flat(cb)], "color": _PATH_COLORS[1], "width": 2},
                {"kind": "points", "xy": flat(ca), "color": _PATH_COLORS[0], "size": 2},
                {"kind": "points", "xy": flat(cb), "color": _PATH_COLORS[1], "size": 2},
                {"kind": "points", "xy": flat(torch.stack([ca[k], cb[k]])), "color": "#000", "size": 4},
                {"kind": "text", "xy": flat(ca[0]), "text": " noise", "color": "#000"},
            ]
            if split is not None:
                layers += [{"kind": "points", "xy": flat(torch.stack([ca[split], cb[split]])), "color": "#2b8a3e",
                            "size": 5},
                           {"kind": "text", "xy": flat(ca[split]), "text": f" split (step {split})", "color": "#2b8a3e"}]
            canvas.layers = layers
            for run, img in ((ra, ta), (rb, tb)):
                if ("x0", k) not in run.png:
                    run.png[("x0", k)] = self.png(run.lab.decode(run.x0[k : k + 1], batch_size=1)[0])
                img.value = run.png[("x0", k)]
            sa, sb = info["straightness"]
            where = ("never split (the same image)" if split is None else
                     f"split at step {split} of {info['steps']} (timestep {info['timestep']:.0f})")
            cap.value = (f"<span style='font-size:12px'><b style='color:{_PATH_COLORS[0]}'>A</b> and "
                         f"<b style='color:{_PATH_COLORS[1]}'>B</b> {where} · "
                         f"path length / chord A {sa:.3f}, B {sb:.3f} · "
                         f"predicted x<sub>0</sub> at step {k} below the map</span>")
