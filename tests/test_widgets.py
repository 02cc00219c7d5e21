"""Widgets without a browser: drive the Python state (set values, send the custom messages the front ends send)
and assert what the kernel does. The real-browser tests are in test_widgets_browser.py."""

from __future__ import annotations

import threading

import pytest
import torch
from fakes import FakeBackend

pytest.importorskip("anywidget")


def _front(widget, content):
    """What the front end does: a custom message."""
    widget._handle_msg({"content": {"data": {"method": "custom", "content": content}}, "buffers": []})


def _atlas(n=60, thumbs=8, seed=0):
    from latentlab.atlas import Atlas

    g = torch.Generator().manual_seed(seed)
    colours = ["red", "green", "blue"]
    items = [{"prompt": f"a {colours[i % 3]} star", "seed": i, "colour": colours[i % 3]} for i in range(n)]
    noise = torch.randn(n, 4, 4, 4, generator=g)
    emb = torch.randn(n, 16, generator=g) + torch.tensor([[i % 3 * 4.0] + [0.0] * 15 for i in range(n)])
    return Atlas(noise, noise.clone(), emb, emb.clone(),
                 (torch.rand(n, 3, thumbs, thumbs, generator=g) * 255).to(torch.uint8), items)


def test_latest_worker_drops_stale_requests_and_reports_errors():
    from latentlab.widgets._worker import LatestWorker

    ran, errors, busy = [], [], []
    gate, started = threading.Event(), threading.Event()
    w = LatestWorker(busy.append, errors.append)
    w.submit(lambda: (started.set(), gate.wait(30), ran.append(0)))
    assert started.wait(30)  # the first request is running: the next ones queue behind it
    for i in range(1, 10):
        w.submit(lambda i=i: ran.append(i), tag="frame")
    gate.set()
    assert w.wait(10)
    assert ran == [0, 9]  # the eight stale requests of the kind never ran
    # untagged requests are never dropped; kinds do not drop each other; order of first asking is kept
    gate.clear(), started.clear(), ran.clear()
    w.submit(lambda: (started.set(), gate.wait(30), ran.append("first")))
    assert started.wait(30)
    w.submit(lambda: ran.append("a"))
    w.submit(lambda: ran.append("s1"), tag="step")
    w.submit(lambda: ran.append("b"))
    w.submit(lambda: ran.append("s2"), tag="step")
    assert w.pending_tags == {"step"}
    gate.set()
    assert w.wait(10)
    assert ran == ["first", "a", "s2", "b"]
    w.submit(lambda: 1 / 0)
    assert w.wait(10)
    assert isinstance(errors[0], ZeroDivisionError) and busy[-1] is False


def test_seed_browser_picks_variations_and_code():
    from latentlab.widgets import SeedBrowser

    fake = FakeBackend()
    b = SeedBrowser(fake, "a red star", first_seed=10, page_size=6, variations=4)
    assert b.wait()
    assert b.grid.labels == [f"seed {s}" for s in range(10, 16)] and len(b.grid.images) == 6
    _front(b.grid, {"type": "toggle", "index": 1})
    _front(b.grid, {"type": "toggle", "index": 4})
    assert b.wait()
    assert b.picked == [11, 14] and len(b.variation_grid.images) == 4
    first_variations = list(b.variation_grid.images)
    b.strength.value = 0.9
    assert b.wait() and b.variation_grid.images != first_variations
    b.next.click()  # the picks stay picked across pages
    assert b.wait() and b.grid.labels[0] == "seed 16" and b.picked == [11, 14] and b.grid.selected == []
    b.code_button.click()
    assert "lab.noise([11, 14])" in b.code.value and "ll.Sampling(num_inference_steps=4" in b.code.value
    # Bad input is shown in the widget and leaves it usable.
    b.prompt.value = "   "
    assert "`prompt` is empty" in b.error.value
    b.prompt.value = "a blue ring"
    b.first.value = -3
    assert "`first seed` must be in [0, 2**64), got -3" in b.error.value
    b.first.value = 0
    assert b.wait() and b.error.value == "" and b.grid.labels[0] == "seed 0"


@pytest.mark.slow
def test_seed_browser_code_recreates_the_picked_images_on_the_embedded_model():
    import latentlab as ll
    from latentlab.widgets import SeedBrowser

    lab = ll.Lab.default()
    b = SeedBrowser(lab, "a large red star on a blue background", page_size=4, variations=2)
    assert b.wait()
    _front(b.grid, {"type": "toggle", "index": 2})
    assert b.wait() and b.picked == [2]
    scope: dict = {}
    exec("\n".join(b.code_lines()), scope)  # noqa: S102 - the printed code must run as printed
    assert torch.equal(scope["images"], b.images())


def test_interpolator_live_frame_norm_lesson_strip_and_video(tmp_path):
    from latentlab.widgets import Interpolator

    fake = FakeBackend()
    w = Interpolator(fake, ("a red star", 1), ("a blue ring", 2), clip=None, frames=5, output_dir=tmp_path)
    assert w.wait()
    first = w.frame.value
    assert first and w.norm_plot.value[:4] == b"\x89PNG" and "norm z-score" in w.info.value
    w.t.value = 0.9
    assert w.wait() and w.frame.value != first
    rows_slerp = w.diagnose(5)
    w.noise_method.value = "lerp"
    assert w.wait()
    rows_lerp = w.diagnose(5)
    assert rows_lerp[2]["norm_z"] < rows_slerp[2]["norm_z"] - 2  # the lerp midpoint leaves the typical shell
    assert rows_slerp[0]["angle_to_a"] < 1e-3 and abs(rows_slerp[-1]["angle_to_b"]) < 1e-3
    w.strip_button.click()
    assert w.wait()
    assert len(w.strip.images) == 5 and "Largest jump" in w.diagnostics.value
    assert "Estimated render time for 48 frames" in w.estimate.value
    w.video_frames.value = 6
    out = w.render_video()
    assert w.wait()
    assert out.exists() and w.video.value[4:8] == b"ftyp" and w.progress.value == 6
    assert out.with_name(out.name + ".json").exists() and str(out) in w.manifest.value
    # scrubbing the finished render is a lookup of the frames the encoder received, bit for bit
    from latentlab.morph import render_frame

    assert len(w.rendered) == 6 and not w.scrub.disabled and w.scrub.max == 5
    for k in (0, 3, 5):
        again = (render_frame(fake, out.with_name(out.name + ".json"), k)[0].permute(1, 2, 0) * 255).round()
        assert torch.equal(torch.from_numpy(w.rendered[k]), again.to(torch.uint8))
    calls = len(fake.generated)
    for k in (4, 1, 5, 0):
        w.scrub.value = k
        assert w.frame.value == w._png_uint8(w.rendered[k]) and f"render frame {k + 1}/6" in w.frame_state.value
    assert len(fake.generated) == calls  # no model ran
    w.prompt_b.value = ""
    assert "`B prompt` is empty" in w.error.value


def test_direction_sliders_move_the_image_and_validate_directions():
    from latentlab.widgets import DirectionSliders

    fake = FakeBackend()
    d = torch.zeros(4, 4, 4)
    d[0] = 1.0
    from latentlab.backend import Conditioning

    w = DirectionSliders(fake, "a red star", 3, noise_directions={"pc1": d},
                         prompt_directions={"red→blue": Conditioning(torch.ones(1, 3, 8))})
    assert w.wait()
    base = w.image.value
    w.sliders[("noise", "pc1")].value = 2.0
    assert w.wait() and w.image.value != base
    moved = w.image.value
    w.sliders[("prompt", "red→blue")].value = -1.0
    assert w.wait() and w.image.value != moved and "red→blue -1.0" in w.info.value
    with pytest.raises(ValueError, match=r"`noise_directions\['bad'\]` must be a tensor of shape \(4, 4, 4\)"):
        DirectionSliders(fake, "a", 1, noise_directions={"bad": torch.zeros(3)})


def test_direction_sliders_from_an_atlas():
    from latentlab.widgets import DirectionSliders

    fake = FakeBackend()
    w = DirectionSliders.from_atlas(fake, _atlas(), "a red star", 1, n_components=2,
                                    prompt_pairs=[("a blue star", "a red star")])
    assert w.wait()
    assert [n for _, n in w.sliders] == ["noise PC1 (σ)", "noise PC2 (σ)", "a blue star − a red star"]


def test_arithmetic_shows_the_in_distribution_score():
    from latentlab.widgets import Arithmetic

    fake = FakeBackend()
    w = Arithmetic(fake, ("a red star", 1), ("a red ring", 2), ("a blue ring", 3))
    assert w.wait() and w.result.value and all(t[3].value for t in w.terms)
    w.on_noise.value, w.renormalize.value = True, False
    assert w.wait()
    _, _, z_raw, _ = w.compute()
    w.renormalize.value = True
    assert w.wait()
    _, _, z_fixed, _ = w.compute()
    assert z_raw > 3 and abs(z_fixed) < 0.5  # a - b + c has a norm sqrt(3) too large until renormalised
    assert "out of distribution" not in w.score.value and "typical noise" in w.score.value


def test_atlas_explorer_hover_lasso_grid_click_and_path(tmp_path):
    from latentlab.morph import read_manifest, render_frame
    from latentlab.widgets import AtlasExplorer

    fake, atlas = FakeBackend(), _atlas()
    w = AtlasExplorer(fake, atlas, space="noise", method="pca", color_by="colour", path_frames=6,
                      output_dir=tmp_path)
    assert w.wait()
    assert len(w.map.coords) == 60 * 2 * 4 and len(w.map.colors) == 60 * 3
    _front(w.map, {"type": "hover", "index": 7})
    assert w.map.hover_thumb.startswith("data:image/png;base64,")
    _front(w.map, {"type": "lasso", "indices": [3, 1, 2]})
    assert w.map.selected == [1, 2, 3] and len(w.grid.images) == 3 and w.grid.selected == [0, 1, 2]
    _front(w.grid, {"type": "toggle", "index": 0})  # drop item 1 from the grid -> the map follows
    assert w.map.selected == [2, 3] and len(w.grid.images) == 2
    _front(w.map, {"type": "click", "x": 0.0, "y": 0.0, "index": 5})  # select mode: toggles the point
    assert 5 in w.map.selected
    w.mode.value = "generate"
    assert w.map.mode == "generate"
    _front(w.map, {"type": "click", "x": 0.3, "y": -0.2, "index": -1})  # an empty spot
    assert w.wait()
    assert w.generated.value and w.map.marker == [0.3, -0.2] and "PCA plane" in w.generated_info.value
    # Faithful by default: the image's own noise, projected with the same map, is where the diamond is drawn.
    assert w.landing is not None and w.map.landed == list(w.landing.landed)
    assert w.landing.error < 0.05 and "of the map's diagonal from the click" in w.generated_info.value
    w.mode.value = "path"
    c = w.coords
    pts = [c[0].tolist(), c[10].tolist(), c[20].tolist()]
    _front(w.map, {"type": "path", "points": pts})
    assert w.wait()
    out = tmp_path / "atlas-path-1.mp4"
    assert out.exists() and w.video.value and w.progress.value == 6
    man = read_manifest(out.with_name(out.name + ".json"))
    assert len(man["settings"]["keyframes"]) == 5 and man["settings"]["keyframes"][0]["mix"]["seeds"]
    assert render_frame(fake, man, 0).shape == (1, 3, 8, 8)  # the path's frames re-create from the manifest
    # The first keyframe lies on item 0: all its weight.
    assert man["settings"]["keyframes"][0]["mix"]["seed_weights"][0] == 1.0


@pytest.mark.slow
def test_atlas_explorer_on_clip_embeddings_and_umap_blends_neighbours():
    from latentlab.widgets import AtlasExplorer

    w = AtlasExplorer(FakeBackend(), _atlas(), space="image_embeds", method="pca")
    assert w.wait()
    z, cond, how = w.point_inputs((0.0, 0.0))
    assert z.shape == (1, 4, 4, 4) and len(cond) == 1 and "spherical blend" in how["noise"]
    assert abs(sum(how["weights"]) - 1) < 1e-3
    w.method.value = "umap"
    assert w.wait(600) and w.coords.shape == (60, 2)


def test_atlas_explorer_bad_input_is_shown_in_the_widget():
    from latentlab.atlas import Atlas
    from latentlab.widgets import AtlasExplorer

    a = _atlas()
    no_thumbs = Atlas(a.noise, a.latents, a.image_embeds, a.prompt_embeds,
                      torch.zeros(len(a), 3, 0, 0, dtype=torch.uint8), a.items)
    w = AtlasExplorer(FakeBackend(), no_thumbs)
    assert "this atlas has no thumbnails" in w.error.value
    _front(w.map, {"type": "hover", "index": 3})
    assert w.map.hover_thumb == ""
    assert w.wait()
    w.render_path([(0.0, 0.0)])
    assert "draw a path of at least two points" in w.error.value
    with pytest.raises(TypeError, match=r"`atlas` must be a latentlab.atlas.Atlas, got list"):
        AtlasExplorer(FakeBackend(), [])


def test_atlas_explorer_handles_100k_points():
    """Coordinates travel as one float32 buffer (800 KB at 100,000 points); thumbnails only on hover."""
    from latentlab.widgets import AtlasExplorer

    a = _atlas(n=100_000, thumbs=4)
    w = AtlasExplorer(FakeBackend(), a, space="image_embeds", method="pca")
    assert w.wait()
    assert len(w.map.coords) == 800_000 and len(w.map.colors) == 300_000
    _front(w.map, {"type": "lasso", "indices": list(range(0, 100_000, 2))})
    assert len(w.map.selected) == 50_000 and len(w.grid.images) == 48


class Hand:
    """The user's hand on a control, for tests: while it is down, the worker's ``quiet`` (the settle wait) ends only
    when a new request comes, never by timing out; ``lift()`` ends it as a rest would. ``moved(change)`` makes
    the change and waits (on an event, not a clock) until the widget has drawn its preview. No sleeps: the test
    means the same on a loaded machine."""

    def __init__(self, widget):
        self.w, self.down, self.drawn = widget, True, threading.Condition()
        worker = widget._worker

        def quiet(seconds):
            with worker._cond:
                worker._cond.wait_for(lambda: bool(worker._pending) or not self.down)
                return not worker._pending

        worker.quiet = quiet
        state = widget._state

        def counted(*a):
            state(*a)
            with self.drawn:
                self.drawn.notify_all()

        widget._state = counted

    def moved(self, change) -> None:
        before = self.w.drawn["preview"]
        change()
        with self.drawn:
            assert self.drawn.wait_for(lambda: self.w.drawn["preview"] > before, 60), "no preview was drawn"

    def lift(self) -> None:
        with self.w._worker._cond:
            self.down = False
            self.w._worker._cond.notify_all()


def test_live_widgets_draw_a_preview_while_moving_and_the_full_image_when_the_control_rests():
    from latentlab.widgets import Interpolator

    full, fast = FakeBackend(), FakeBackend(weight=2.0)
    w = Interpolator(full, ("a red star", 1), ("a blue ring", 2), clip=None, preview=fast)
    w.settle = 0.05  # the first image: drawn after a short real rest
    assert w.wait()
    assert w.drawn == {"preview": 1, "final": 1} and "final" in w.frame_state.value
    z, cond = w._at(torch.tensor([0.5]), full.noise(1), full.noise(2), full.encode_prompt("a red star"),
                    full.encode_prompt("a blue ring"))
    assert w.frame.value == w.png(full.generate(z, cond, batch_size=1))  # what rests on screen is the full model's
    # a drag: eight positions, each drawn as a preview before the next comes, the hand never resting -> no full
    # image during the drag; then the hand lifts -> exactly one full image, of the last position
    hand = Hand(w)
    for k in range(8):
        hand.moved(lambda k=k: setattr(w.t, "value", 0.1 + 0.1 * k))
    assert w.drawn == {"preview": 9, "final": 1} and "preview" in w.frame_state.value
    hand.lift()
    assert w.wait()
    assert w.drawn == {"preview": 9, "final": 2} and "final" in w.frame_state.value
    assert w.frame.value != w.png(fast.generate(*w._at(torch.tensor([0.8]), full.noise(1), full.noise(2),
                                                         full.encode_prompt("a red star"),
                                                         full.encode_prompt("a blue ring")), batch_size=1))
    assert fast.generated and all(n == 1 for n in fast.generated)  # previews at compute batch 1


def test_a_strip_asked_for_during_a_drag_does_not_leave_the_preview_on_screen():
    """Found in the browser: "Strip + diagnostics" clicked right after a drag replaced the pending full image, so the
    preview stayed on screen under a "preview" label. Only a newer move may drop the final image."""
    from latentlab.widgets import Interpolator

    full, fast = FakeBackend(), FakeBackend(weight=2.0)
    w = Interpolator(full, ("a red star", 1), ("a blue ring", 2), clip=None, preview=fast, frames=4)
    w.settle = 0.3
    assert w.wait()
    w.t.value = 0.7
    w.render_strip()  # while the move's job waits out the settle time
    assert w.wait()
    assert "final" in w.frame_state.value and w.drawn["final"] == 2
    z, cond = w._at(torch.tensor([0.7]), full.noise(1), full.noise(2), full.encode_prompt("a red star"),
                    full.encode_prompt("a blue ring"))
    assert w.frame.value == w.png(full.generate(z, cond, batch_size=1))
    assert len(w.strip.images) == 4  # and the strip ran after it
    hand = Hand(w)  # a newer move still drops the older final image: previews, one final at the end
    hand.moved(lambda: setattr(w.t, "value", 0.2))
    hand.moved(lambda: setattr(w.t, "value", 0.3))
    hand.lift()
    assert w.wait() and w.drawn["final"] == 3


def test_preview_model_must_share_the_latent_space_and_auto_is_off_for_other_models():
    from latentlab.widgets import DirectionSliders, Interpolator
    from latentlab.widgets._base import preview_lab

    full = FakeBackend()
    assert preview_lab(full, "auto") is None and preview_lab(full, None) is None
    with pytest.raises(ValueError, match="`preview` makes latents of shape"):
        Interpolator(full, ("a", 1), ("b", 2), clip=None, preview=FakeBackend(layout="flow"))
    with pytest.raises(ValueError, match="`preview` must be None, 'auto'"):
        DirectionSliders(full, "a red star", 1, preview="fast")
    with pytest.raises(TypeError, match="`preview` must be None"):
        DirectionSliders(full, "a red star", 1, preview=3)


def test_latest_worker_quiet_is_interrupted_by_a_new_request():
    from latentlab.widgets._worker import LatestWorker

    out, waiting = [], threading.Event()
    w = LatestWorker(lambda busy: None, out.append)

    def first():
        waiting.set()  # (a request arriving before the wait below starts is seen by it too)
        out.append(w.quiet(60.0))

    w.submit(first)
    assert waiting.wait(10)
    w.submit(lambda: out.append(w.quiet(0.05)))
    assert w.wait(10)
    assert out == [False, True]
