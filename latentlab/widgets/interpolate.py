"""Interpolator: two keyframes, a t slider, lerp or slerp per path, the live frame, the norm lesson, a strip of
frames with path diagnostics, a render-time estimate and a background video render."""

from __future__ import annotations

import html
import io
import math
import time
from pathlib import Path

import ipywidgets as widgets
import torch

from latentlab import _checks
from latentlab.backend import Backend, Conditioning
from latentlab.morph.plan import MIX_RECORDS
from latentlab.ops import lerp, norm_zscore, slerp
from latentlab.sampling import Sampling
from latentlab.widgets._base import Panel, check_folder_arg, check_key, check_text, data_url, free_path
from latentlab.widgets._front import ThumbGrid
from latentlab.widgets._worker import LatestWorker

_INTERP = {"slerp": slerp, "lerp": lerp}


def _angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return math.degrees(2 * math.atan2(float((a / a.norm() - b / b.norm()).norm()),
                                       float((a / a.norm() + b / b.norm()).norm())))


def norm_plot_png(za: torch.Tensor, zb: torch.Tensor, t: float, method: str) -> bytes:
    """The lesson of slerp as a picture: the latent's norm z-score along lerp and slerp, current ``t`` marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    ts = torch.linspace(0, 1, 41)
    fig = Figure(figsize=(4.2, 2.4), dpi=90)
    ax = fig.add_subplot()
    for name, colour in (("lerp", "#e8590c"), ("slerp", "#1c7ed6")):
        z = norm_zscore(_INTERP[name](za, zb, ts)[:, 0])
        ax.plot(ts, z, color=colour, label=name, lw=2 if name == method else 1)
    ax.axvline(t, color="#333", ls="--", lw=1)
    ax.axhspan(-3, 3, color="#2f9e44", alpha=0.12, label="typical noise (|z| < 3)")
    ax.set_xlabel("t")
    ax.set_ylabel("norm z-score")
    ax.set_title("Does the latent stay typical noise?", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


class Interpolator(Panel):
    """Between keyframes ``a`` and ``b``, each ``(prompt, seed)``.

    The noise path and the prompt path each use lerp or slerp; the frame at ``t`` follows the slider live (one
    image per move, at compute batch 1). "Strip" renders ``frames`` evenly spaced frames with, per frame, the noise's
    norm z-score, its angle to each keyframe's noise, the change from the previous frame (RMS pixels) and -- with a
    CLIP model -- the similarity to each prompt: why did it jump? The strip's timing gives the estimate of a full
    render; "Render video" renders with :func:`latentlab.morph.render_morph` in the background (manifest and resume
    as on the command line) and plays it inline.

    Examples
    --------
    >>> import latentlab as ll
    >>> from latentlab.widgets import Interpolator
    >>> w = Interpolator(ll.Lab.default(), ("a large red star on a blue background", 1),
    ...                  ("a small green ring on a black background", 2), clip=None)
    >>> w.t.value = 0.25; w.wait()
    True
    >>> len(w.frame.value) > 0
    True
    """

    def __init__(self, lab: Backend, a: tuple[str, int], b: tuple[str, int], *, clip="auto", frames: int = 8,
                 sampling: Sampling | None = None, upscale: int = 4, output_dir: str | Path = ".",
                 preview: object = "auto"):
        super().__init__(lab, sampling=sampling, upscale=upscale, preview=preview)
        check_key(a, "a"), check_key(b, "b")
        _checks.positive_int(frames, "frames", minimum=2)
        if not (clip is None or clip == "auto" or callable(getattr(clip, "similarity", None))):
            raise TypeError(f"`clip` must be None, 'auto' or a latentlab CLIP model, got {type(clip).__name__}")
        self._clip, self._clip_arg = None, clip
        self.output_dir = check_folder_arg(output_dir, "output_dir")
        lay = widgets.Layout(width="380px")
        self.prompt_a = widgets.Text(value=a[0], description="A prompt", continuous_update=False, layout=lay)
        self.seed_a = widgets.IntText(value=a[1], description="A seed", layout=widgets.Layout(width="180px"))
        self.prompt_b = widgets.Text(value=b[0], description="B prompt", continuous_update=False, layout=lay)
        self.seed_b = widgets.IntText(value=b[1], description="B seed", layout=widgets.Layout(width="180px"))
        self.t = widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.01, description="t", continuous_update=True,
                                     layout=widgets.Layout(width="380px"))
        self.noise_method = widgets.Dropdown(options=["slerp", "lerp"], value="slerp", description="noise path")
        default = self.lab.default_prompt_interpolation()  # the morph's default ("auto") for this model
        methods = ["lerp", "slerp", "mix"] + (["attention"] if self.lab.attention_mix_unsupported() is None else [])
        self.prompt_method = widgets.Dropdown(options=methods, value=default, description="prompt path")
        self.frame = widgets.Image(format="png", layout=widgets.Layout(width="256px", height="256px"))
        self.frame.add_class("ll-frame")
        self.norm_plot = widgets.Image(format="png")
        self.info = widgets.HTML("")
        self.n_strip = widgets.IntSlider(value=frames, min=3, max=24, description="strip frames")
        self.strip_button = widgets.Button(description="Strip + diagnostics")
        self.strip = ThumbGrid(columns=frames, size=72)
        self.diagnostics = widgets.HTML("")
        self.diagnostics.add_class("ll-diagnostics")
        self.estimate = widgets.HTML("")
        self.video_frames = widgets.IntText(value=48, description="video frames", layout=widgets.Layout(width="200px"))
        self.render_button = widgets.Button(description="Render video", button_style="primary")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="render")
        self.video = widgets.Video(format="mp4", autoplay=True, loop=True, controls=True,
                                   layout=widgets.Layout(width="256px"))
        self.manifest = widgets.HTML("")
        self.manifest.add_class("ll-manifest")
        # Scrubbing a finished render is a lookup of its own frames (what went to the encoder, bit for bit).
        self.scrub = widgets.IntSlider(value=0, min=0, max=0, description="render frame", disabled=True,
                                       continuous_update=True, layout=widgets.Layout(width="380px"))
        self.scrub.add_class("ll-render-scrub")
        self.rendered: list = []  # (H, W, 3) uint8 frames of the last render
        self._rendered_png: dict[int, bytes] = {}
        self.scrub.observe(lambda ch: self.show_rendered(ch["new"]), "value")
        self._seconds_per_frame: float | None = None
        self._render_worker = LatestWorker(lambda busy: None, self.show_error)
        self.children = [
            widgets.HBox([self.prompt_a, self.seed_a]), widgets.HBox([self.prompt_b, self.seed_b]),
            widgets.HBox([self.t, self.noise_method, self.prompt_method]), widgets.HBox([self.busy]), self.error,
            widgets.HBox([self.frame, widgets.VBox([self.frame_state, self.norm_plot, self.info])]),
            widgets.HBox([self.n_strip, self.strip_button]), self.strip, self.diagnostics, self.estimate,
            widgets.HBox([self.video_frames, self.render_button, self.progress]), self.video, self.manifest,
            self.scrub,
        ]
        for w in (self.prompt_a, self.seed_a, self.prompt_b, self.seed_b, self.t, self.noise_method,
                  self.prompt_method):
            w.observe(lambda _: self.update(), "value")
        self.strip_button.on_click(lambda _: self.render_strip())
        self.render_button.on_click(lambda _: self.render_video())
        self.update()

    # --- inputs ---------------------------------------------------------------------------------------------

    def _keys(self):
        pa, pb = check_text(self.prompt_a.value, "A prompt"), check_text(self.prompt_b.value, "B prompt")
        sa, sb = _checks.seed(self.seed_a.value, "A seed"), _checks.seed(self.seed_b.value, "B seed")
        za, zb = self.lab.noise(sa), self.lab.noise(sb)
        ca, cb = self.lab.encode_prompt(pa), self.lab.encode_prompt(pb)
        return (pa, sa, za, ca), (pb, sb, zb, cb)

    def _at(self, ts: torch.Tensor, za, zb, ca: Conditioning, cb: Conditioning):
        z = _INTERP[self.noise_method.value](za, zb, ts)[:, 0]
        if self.prompt_method.value in MIX_RECORDS:  # both prompts in every frame (as a morph makes them)
            w = ts.double().flatten()
            a, b = (c.map(lambda t: t.expand(len(w), *t.shape[1:])) for c in (ca, cb))
            return z, MIX_RECORDS[self.prompt_method.value](a, b, w)
        pick = _INTERP[self.prompt_method.value]
        cond = Conditioning.cat([ca, cb]).map(lambda t: pick(t[:1], t[1:], ts)[:, 0])
        return z, cond

    # --- live frame ---------------------------------------------------------------------------------------------

    def update(self) -> None:
        """Re-render the frame at ``t`` and the norm plot (in the background; only the latest request runs)."""
        try:
            (_, _, za, ca), (_, _, zb, cb) = self._keys()
        except (TypeError, ValueError) as e:
            self.show_error(e)
            return
        t = float(self.t.value)

        def work():
            z, cond = self._at(torch.tensor([t]), za, zb, ca, cb)
            t0 = time.perf_counter()

            def draw(image):
                seconds = time.perf_counter() - t0
                self.frame.value = self.png(image)
                self.info.value = (f"t = {t:.2f}: noise norm z-score <b>{float(norm_zscore(z)[0]):+.1f}</b> "
                                   f"({self.noise_method.value}); image in {seconds * 1000:.0f} ms")
                if not plotted:  # after the first image: the plot (matplotlib) must not delay a preview
                    plotted.append(True)
                    self.norm_plot.value = norm_plot_png(za, zb, t, self.noise_method.value)

            plotted: list[bool] = []
            self.live(z, cond, draw)

        self.submit(work, tag="live")

    # --- strip and diagnostics ---------------------------------------------------------------------------------

    def _clip_model(self):
        if self._clip is None and self._clip_arg is not None:
            if self._clip_arg == "auto":
                from latentlab import embedded

                if embedded.resolve(self.lab.model_id) is None:  # the embedded CLIP reads the embedded world only
                    self._clip_arg = None
                    return None
                from latentlab.clip import CLIP

                self._clip = CLIP.default()
            else:
                self._clip = self._clip_arg
        return self._clip

    def diagnose(self, n: int) -> list[dict]:
        """Render ``n`` evenly spaced frames and measure each (see the class notes). Also sets the estimate."""
        (pa, _, za, ca), (pb, _, zb, cb) = self._keys()
        ts = torch.linspace(0, 1, n)
        z, cond = self._at(ts, za, zb, ca, cb)
        t0 = time.perf_counter()
        images = self.lab.generate(z, cond, sampling=self.sampling)
        self._seconds_per_frame = (time.perf_counter() - t0) / n
        clip = self._clip_model()
        sims = clip.similarity(images, [pa, pb]) if clip is not None else None
        rows = []
        for i in range(n):
            row = {"t": float(ts[i]), "norm_z": float(norm_zscore(z[i : i + 1])[0]),
                   "angle_to_a": _angle_deg(z[i], za[0]), "angle_to_b": _angle_deg(z[i], zb[0]),
                   "change": None if i == 0 else float((images[i] - images[i - 1]).pow(2).mean().sqrt())}
            if sims is not None:
                row["clip_a"], row["clip_b"] = float(sims[i, 0]), float(sims[i, 1])
            rows.append(row)
        self._strip_images = images
        return rows

    def render_strip(self) -> None:
        n = int(self.n_strip.value)

        def work():
            rows = self.diagnose(n)
            self.strip.columns = n
            self.strip.labels = [f"t={r['t']:.2f}" for r in rows]
            self.strip.images = [data_url(im, upscale=1) for im in self._strip_images]
            changes = [r["change"] for r in rows if r["change"] is not None]
            jump = max(range(1, n), key=lambda i: rows[i]["change"]) if changes else None
            head = "<tr><th>t</th><th>norm z</th><th>∠A°</th><th>∠B°</th><th>Δ prev</th>"
            head += "<th>CLIP A</th><th>CLIP B</th></tr>" if "clip_a" in rows[0] else "</tr>"
            body = []
            for i, r in enumerate(rows):
                style = " style='background:#fff3bf'" if i == jump else ""
                cells = [f"{r['t']:.2f}", f"{r['norm_z']:+.1f}", f"{r['angle_to_a']:.0f}", f"{r['angle_to_b']:.0f}",
                         "" if r["change"] is None else f"{r['change']:.3f}"]
                if "clip_a" in r:
                    cells += [f"{r['clip_a']:.2f}", f"{r['clip_b']:.2f}"]
                body.append(f"<tr{style}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            note = (f"<p>Largest jump: between t={rows[jump - 1]['t']:.2f} and t={rows[jump]['t']:.2f} "
                    "(highlighted).</p>") if jump else ""
            self.diagnostics.value = f"<table class='ll-diag'>{head}{''.join(body)}</table>{note}"
            self._show_estimate()

        self.submit(work, tag="strip")

    def _show_estimate(self) -> None:
        if self._seconds_per_frame is None:
            self.estimate.value = "<i>Render a strip to estimate the video's render time.</i>"
            return
        n = max(2, int(self.video_frames.value))
        self.estimate.value = (f"Estimated render time for {n} frames: <b>~{self._seconds_per_frame * n:.0f} s</b> "
                               f"(measured on the strip: {self._seconds_per_frame:.2f} s per frame)")

    # --- video ------------------------------------------------------------------------------------------------

    def render_video(self) -> Path | None:
        """Render the morph A -> B with the current paths in the background; returns the planned output path."""
        from latentlab.morph import Keyframe, MorphSettings, manifest_path, render_morph

        try:
            (pa, sa, _, _), (pb, sb, _, _) = self._keys()
            settings = MorphSettings(keyframes=(Keyframe(pa, sa), Keyframe(pb, sb)),
                                     n_frames=int(self.video_frames.value), noise_interpolation=self.noise_method.value,
                                     prompt_interpolation=self.prompt_method.value, sampling=self.sampling)
        except (TypeError, ValueError, FileNotFoundError) as e:
            self.show_error(e)
            return None
        out = free_path(self.output_dir, "interpolation")
        self.progress.max, self.progress.value = settings.n_frames, 0
        self.render_button.disabled = True

        def work():
            frames: list = []
            try:
                render_morph(self.lab, settings, out, upscale=self.upscale, progress=False,
                             on_progress=lambda done, total: setattr(self.progress, "value", done),
                             on_frames=lambda start, fr: frames.extend(fr))
                self.video.value = out.read_bytes()
                self.manifest.value = f"wrote <code>{html.escape(str(out))}</code> and its manifest " \
                                      f"<code>{html.escape(str(manifest_path(out)))}</code>"
                self.rendered, self._rendered_png = frames, {}
                for k in range(len(frames)):  # encode every frame now, so that scrubbing is a lookup
                    self._rendered_png[k] = self._png_uint8(frames[k])
                self.scrub.max, self.scrub.disabled = len(frames) - 1, False
            finally:
                self.render_button.disabled = False

        self._render_worker.submit(work)
        return out

    def _png_uint8(self, frame) -> bytes:
        return self.png(torch.from_numpy(frame).permute(2, 0, 1).float() / 255)  # exact: k / 255 * 255 == k

    def show_rendered(self, k: int) -> None:
        """Show frame ``k`` of the last render: a lookup of the frame the video encoder received (no model runs)."""
        if not self.rendered:
            return
        k = min(max(int(k), 0), len(self.rendered) - 1)
        png = self._rendered_png.get(k)
        if png is None:
            png = self._rendered_png[k] = self._png_uint8(self.rendered[k])
        self.frame.value = png
        self.frame_state.value = (f"<span class='ll-rendered' style='color:#1c7ed6'>render frame {k + 1}/"
                                  f"{len(self.rendered)} · the video's own frame</span>")

    def wait(self, timeout: float = 300.0) -> bool:
        return self._worker.wait(timeout) and self._render_worker.wait(timeout)
