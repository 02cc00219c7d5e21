"""AtlasExplorer: a 2-D map of an atlas that you can hover, lasso, click anywhere (the image at that point is
generated) and draw on (a morph video along the path)."""

from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import torch

from latentlab import _checks
from latentlab.atlas.inverse import METHODS, SPACES, check_map_request
from latentlab.backend import Backend, Conditioning
from latentlab.sampling import Sampling
from latentlab.widgets._base import Panel, check_folder_arg, data_url, free_path
from latentlab.widgets._front import MapView, ThumbGrid
from latentlab.widgets._worker import LatestWorker

#: Categorical colours (Tableau 10 then 10 lighter ones).
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac", "#a0cbe8", "#ffbe7d", "#ff9d9a", "#8cd17d", "#f1ce63", "#86bcb6", "#d4a6c8", "#fabfd2",
           "#d7b5a6", "#79706e"]
MAX_GRID = 48


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))


class AtlasExplorer(Panel):
    """Explore an :class:`~latentlab.atlas.Atlas` on a 2-D map (PCA or UMAP of its noise, final latents, CLIP image
    embeddings or the prompts' CLIP text embeddings), coloured by any item attribute.

    - **zoom and pan** in every mode: the mouse wheel zooms about the cursor, shift-drag (or the right button) pans,
      "reset view" shows the whole map again; the canvas stays at 60 frames/s at 1,000,000 points (BENCHMARKS.md);
    - **hover**: the item's thumbnail (fetched lazily, one at a time; the coordinates travel as one binary buffer);
    - **select** mode: lasso points; the selection and the image grid below stay in sync both ways (click a grid
      thumbnail to drop it; unselected points are greyed, not hidden);
    - **generate** mode: click anywhere -- also an empty spot -- and the image whose own embedding lands nearest the
      click is generated (``faithful=True``, :meth:`latentlab.atlas.AtlasMap.generate`: candidates from the nearest
      items, refined and verified by projecting each with the same map); the map shows where it really landed (a
      red diamond, dashed from the click) and the readout its distance beside the nearest existing item's. The
      preview model draws the plain inverse-distance blend of the nearest items meanwhile. ``faithful=False``: only
      that blend (on a PCA map of noise, the nearest item moved within the PCA plane), with no landing shown;
    - **path** mode: draw a path; keyframes are taken along it (each such a blend, recorded as a
      :class:`~latentlab.morph.Mix`) and a morph video is rendered with the same renderer, manifest and resume as
      the command line.
    """

    def __init__(self, lab: Backend, atlas, *, space: str = "image_embeds", method: str = "pca",
                 color_by: str = "prompt", k: int = 8, path_keyframes: int = 5, path_frames: int = 48,
                 sampling: Sampling | None = None, upscale: int = 4, output_dir: str | Path = ".",
                 preview: object = "auto", faithful: bool = True, clip=None):
        super().__init__(lab, sampling=sampling, upscale=upscale, preview=preview)
        check_map_request(atlas, space, method)
        self.atlas, self.k = atlas, _checks.positive_int(k, "k")
        if not isinstance(faithful, bool):
            raise TypeError(f"`faithful` must be a bool, got {type(faithful).__name__}")
        if clip is not None and not callable(getattr(clip, "embed_images", None)):
            raise TypeError(f"`clip` must be a latentlab.CLIP (or have embed_images), got {type(clip).__name__}")
        self.faithful, self._clip = faithful, clip
        self.landing = None  # the last generated image's Landing (faithful mode)
        self.path_keyframes = _checks.positive_int(path_keyframes, "path_keyframes", minimum=2)
        _checks.positive_int(path_frames, "path_frames", minimum=2)
        self.output_dir = check_folder_arg(output_dir, "output_dir")
        keys = sorted(k for k, v in atlas.items[0].items() if isinstance(v, (str, int)))
        if not isinstance(color_by, str):
            raise TypeError(f"`color_by` must be the name of an atlas field ({', '.join(keys)}), got "
                            f"{type(color_by).__name__}")
        self.space = widgets.Dropdown(options=list(SPACES), value=space, description="space")
        self.method = widgets.Dropdown(options=list(METHODS), value=method, description="projection")
        self.color_by = widgets.Dropdown(options=keys, value=color_by if color_by in keys else keys[0],
                                         description="colour by")
        self.mode = widgets.ToggleButtons(options=[("select (lasso)", "select"), ("generate (click)", "generate"),
                                                   ("path (draw)", "path")], value="select")
        self.map = MapView()
        self.map.add_class("ll-atlas-map")
        self.legend = widgets.HTML("")
        self.grid = ThumbGrid(columns=8, size=64)
        self.grid.add_class("ll-selection-grid")
        self.selection_info = widgets.HTML("")
        self.generated = widgets.Image(format="png", layout=widgets.Layout(width="192px", height="192px"))
        self.generated.add_class("ll-generated")
        self.generated_info = widgets.HTML("")
        self.path_frames = widgets.IntText(value=path_frames, description="path frames",
                                           layout=widgets.Layout(width="200px"))
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="render")
        self.video = widgets.Video(format="mp4", autoplay=True, loop=True, controls=True,
                                   layout=widgets.Layout(width="256px"))
        self.manifest = widgets.HTML("")
        self.manifest.add_class("ll-manifest")
        self._render_worker = LatestWorker(lambda busy: None, self.show_error)
        self.coords: torch.Tensor | None = None
        self._pca = None
        self._atlas_map = None
        has_thumbs = atlas.thumbnails.shape[-1] > 0
        self.children = [
            widgets.HBox([self.space, self.method, self.color_by]), widgets.HBox([self.mode, self.busy]), self.error,
            widgets.HBox([self.map, widgets.VBox([self.legend, self.frame_state, self.generated, self.generated_info,
                                                  self.path_frames, self.progress, self.video, self.manifest])]),
            self.selection_info, self.grid,
        ]
        if not has_thumbs:
            self.show_error("this atlas has no thumbnails: hover and the selection grid show nothing (rebuild it "
                            "with build_atlas(..., thumbnail=64))")
        self.mode.observe(lambda ch: setattr(self.map, "mode", ch["new"]), "value")
        for w in (self.space, self.method):
            w.observe(lambda _: self.project(), "value")
        self.color_by.observe(lambda _: self._colour(), "value")
        self.map.on_msg(self._on_map)
        self.map.observe(self._map_selected, "selected")
        self.grid.observe(self._grid_selected, "selected")
        self._colour()
        self.project()

    # --- map ------------------------------------------------------------------------------------------------------

    def project(self) -> None:
        """Compute the 2-D map of the chosen space with the chosen projection (in the background)."""
        space, method = self.space.value, self.method.value

        def work():
            from latentlab.atlas import AtlasMap

            m = AtlasMap(self.atlas, space=space, method=method, clip=self._clip)
            self._atlas_map, self._pca = m, m.projector_ if method == "pca" else None
            self.coords = m.coords_
            name = {"image_embeds": "CLIP image", "noise": "noise", "latents": "latent", "prompt_embeds": "CLIP text"}[space]
            self.map.axes = [f"{name} {method.upper()}-1", f"{name} {method.upper()}-2"]
            self.map.coords = self.coords.numpy().astype(np.float32).tobytes()
            self.map.marker, self.map.landed, self.map.path = [], [], []

        self.submit(work, tag="map")

    def _colour(self) -> None:
        labels = [str(v) for v in self.atlas.labels(self.color_by.value)]
        names = list(dict.fromkeys(labels))
        colours = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
        self.map.colors = np.array([_rgb(colours[v]) for v in labels], dtype=np.uint8).tobytes()
        shown = names[:20]
        self.legend.value = "".join(f"<span style='color:{colours[n]}'>●</span> {html.escape(n)}<br>"
                                    for n in shown) + (f"… and {len(names) - 20} more" if len(names) > 20 else "")

    # --- messages from the map ------------------------------------------------------------------------------

    def _on_map(self, _, content, buffers) -> None:
        kind = content.get("type")
        if kind == "hover":
            self.hover(int(content.get("index", -1)))
        elif kind == "lasso":
            self.map.selected = sorted(int(i) for i in content.get("indices", []))
        elif kind == "click":
            i = int(content.get("index", -1))
            if self.mode.value == "select":
                if i >= 0:
                    sel = list(self.map.selected)
                    self.map.selected = [j for j in sel if j != i] if i in sel else sorted([*sel, i])
            else:
                self.generate_at((float(content["x"]), float(content["y"])))
        elif kind == "path":
            self.render_path([(float(x), float(y)) for x, y in content.get("points", [])])

    def hover(self, index: int) -> None:
        if 0 <= index < len(self.atlas) and self.atlas.thumbnails.shape[-1] > 0:
            self.map.hover_thumb = data_url(self.atlas.thumbnails[index].float() / 255)
        else:
            self.map.hover_thumb = ""

    # --- selection, both ways -----------------------------------------------------------------------------------

    def _map_selected(self, change) -> None:
        sel = list(change["new"])[:MAX_GRID]
        if self.atlas.thumbnails.shape[-1] > 0:
            self.grid.images = [data_url(self.atlas.thumbnails[i].float() / 255) for i in sel]
        self.grid.labels = [str(self.atlas.items[i].get(self.color_by.value, i)) for i in sel]
        self._grid_items = sel
        self.grid.selected = list(range(len(sel)))
        more = len(change["new"]) - len(sel)
        self.selection_info.value = (f"<b>{len(change['new'])}</b> selected" + (f" (grid shows the first {MAX_GRID})"
                                     if more > 0 else "") + " — click a thumbnail to drop it")

    def _grid_selected(self, change) -> None:
        items = getattr(self, "_grid_items", [])
        kept = {items[i] for i in change["new"] if i < len(items)}
        dropped = [i for i in items if i not in kept]
        if dropped:
            self.map.selected = [i for i in self.map.selected if i not in dropped]

    # --- inverse projection: the image at a point ------------------------------------------------------------

    def point_inputs(self, point: tuple[float, float]) -> tuple[torch.Tensor, Conditioning, dict]:
        """Initial noise and conditioning at a map point (see the class notes), plus how they were made: the map's
        inverse-distance blend (:meth:`latentlab.atlas.AtlasMap.blend_inputs`), with the in-plane move for noise
        on a PCA map."""
        if self._atlas_map is None:
            raise RuntimeError("the map is still being computed")
        z, cond, how = self._atlas_map.blend_inputs(self.lab, point, k=self.k)
        if self._pca is not None and self.space.value == "noise":
            from latentlab.project import inverse_pca

            z = inverse_pca(self._pca, point, self.atlas.noise.float(), self.coords)[None]
            how["noise"] = "nearest item moved in the PCA plane, on the Gaussian shell"
        else:
            how["noise"] = f"spherical blend of the {len(how['items'])} nearest items"
        return z, cond, how

    def generate_at(self, point: tuple[float, float]) -> None:
        self.map.marker, self.map.landed = [float(point[0]), float(point[1])], []

        def work():
            z, cond, how = self.point_inputs(point)
            top = sorted(zip(how["weights"], how["items"]), reverse=True)[:3]
            near = ", ".join(f"{html.escape(str(self.atlas.items[i]['prompt']))} (seed {self.atlas.items[i]['seed']}, "
                             f"w {wt:.2f})" for wt, i in top)
            head = f"at ({point[0]:.2f}, {point[1]:.2f})"
            if not self.faithful:
                self.generated_info.value = f"{head}: {html.escape(how['noise'])}; nearest: {near}"
                self.live(z, cond, lambda image: setattr(self.generated, "value", self.png(image)))
                return
            self.generated_info.value = f"{head}: searching for the image that lands here...; nearest: {near}"
            if self.preview is not None:
                self._draw_preview(z, cond, lambda image: setattr(self.generated, "value", self.png(image)),
                                   "the nearest items' blend; searching for the faithful image")
            image, landing = self._atlas_map.generate(self.lab, point, k=self.k, sampling=self.sampling)
            self.landing = landing
            self.generated.value = self.png(image)
            self.map.landed = [float(v) for v in landing.landed]
            verdict = "nearer than" if landing.beats_nearest_item else "not nearer than"
            self.generated_info.value = (
                f"{head}: landed <b>{landing.error:.3f}</b> of the map's diagonal from the click, {verdict} the nearest "
                f"existing item ({landing.nearest_item:.3f}) · {html.escape(landing.how['construction'])}, best of "
                f"{landing.candidates} candidates · nearest: {near}")
            self._state("final", f"final · {(self.sampling or self.lab.sampling()).num_inference_steps} steps · "
                        f"landed {landing.error:.3f} from the click")

        self.submit(work, tag="live")

    # --- a path on the map -> a morph video -------------------------------------------------------------------

    def path_keyframes_at(self, points: list[tuple[float, float]]):
        """``path_keyframes`` points evenly spaced by arc length along ``points``, each as a Mix keyframe
        (:meth:`latentlab.atlas.AtlasMap.path_keyframes`)."""
        if self._atlas_map is None:
            raise RuntimeError("the map is still being computed")
        if len(points) < 2:
            raise ValueError("draw a path of at least two points")
        from latentlab.morph import Keyframe, Mix

        blends = self._atlas_map.path_blends([tuple(q) for q in points], self.path_keyframes, k=self.k,
                                             lab=self.lab if self.faithful else None, sampling=self.sampling)
        return tuple(Keyframe(mix=Mix(**b)) for b in blends)

    def render_path(self, points: list[tuple[float, float]]) -> Path | None:
        from latentlab.morph import MorphSettings, manifest_path, render_morph

        try:
            if self.coords is None:
                raise RuntimeError("the map is still being computed")
            settings = MorphSettings(keyframes=self.path_keyframes_at(points), n_frames=int(self.path_frames.value),
                                     sampling=self.sampling)
        except (TypeError, ValueError, RuntimeError) as e:
            self.show_error(e)
            return None
        self.map.path = [list(map(float, q)) for q in points]
        out = free_path(self.output_dir, "atlas-path")
        self.progress.max, self.progress.value = settings.n_frames, 0

        def work():
            render_morph(self.lab, settings, out, upscale=self.upscale, progress=False,
                         on_progress=lambda done, total: setattr(self.progress, "value", done))
            self.video.value = out.read_bytes()
            self.manifest.value = (f"wrote <code>{html.escape(str(out))}</code> ({settings.n_frames} frames, "
                                   f"{len(settings.keyframes)} keyframes along the path) and "
                                   f"<code>{html.escape(str(manifest_path(out)))}</code>")

        self._render_worker.submit(work)
        return out

    def wait(self, timeout: float = 300.0) -> bool:
        return self._worker.wait(timeout) and self._render_worker.wait(timeout)

