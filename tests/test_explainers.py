"""The explainer widgets and the ToyLab, driven from Python (the browser tests drive them by mouse): what they show
must be what the model computes, for one model or several side by side."""

from __future__ import annotations

import pytest
import torch
from fakes import FakeBackend

pytest.importorskip("anywidget")

PROMPT = "a large red star on a blue background"


@pytest.fixture(scope="module")
def unet():
    import latentlab as ll

    return ll.Lab.default()


@pytest.fixture(scope="module")
def flow():
    import latentlab as ll

    return ll.Lab.default("embedded-shapes-flow")


def _same_image(png, lab, latent) -> bool:
    """The widget's PNG shows ``lab``'s decode of ``latent`` (to the 8-bit rounding: decodes at different compute
    batches differ in the last float bits)."""
    import io

    import numpy as np
    from PIL import Image

    from latentlab.video import png_bytes

    def pixels(data):
        return np.array(Image.open(io.BytesIO(bytes(data))).convert("RGB")).astype(int)

    shown, want = pixels(png), pixels(png_bytes(lab.decode(latent[None], batch_size=1)[0], upscale=3))
    return shown.shape == want.shape and np.abs(shown - want).max() <= 2


@pytest.mark.slow
def test_a_scrub_or_a_new_prompt_made_while_images_decode_is_never_dropped(unet):
    """The background decoding continues itself chunk by chunk on the widget's worker; a step or a prompt the user
    sets meanwhile waits on the same worker and must still run (a browser drag right after "ready" once showed
    nothing). The race, made deterministic: the worker held, a request queued, then a chunk finishing."""
    import threading

    from latentlab.sampling import Sampling
    from latentlab.widgets import TimestepScrubber

    w = TimestepScrubber(unet, PROMPT, 5, sampling=Sampling(num_inference_steps=6))
    assert w.wait()

    def race(request):
        for run in w.runs:
            run.png.clear()  # work left for the background decoding
        gate, inside = threading.Event(), threading.Event()
        w.submit(lambda: (inside.set(), gate.wait()), tag="test-gate")
        assert inside.wait(30)  # the worker is inside the gate
        request()  # the user's request waits
        w._prefill(w._generation)  # a decode chunk finishing, as on the worker: it queues the next chunk
        gate.set()
        assert w.wait()

    race(lambda: setattr(w.step, "value", 4))
    assert "step 4/6" in w.rows[0]["info"].value
    first = w.runs[0].xt[-1].clone()
    race(lambda: setattr(w.prompt, "value", "a small green ring on a black background"))
    assert not torch.equal(w.runs[0].xt[-1], first)  # the new prompt was computed
    assert w.error.value == ""


@pytest.mark.slow
def test_scrubber_shows_the_models_own_trajectory_step_by_step(unet, flow):
    from latentlab.sampling import Sampling
    from latentlab.widgets import TimestepScrubber

    s = Sampling(num_inference_steps=8)
    w = TimestepScrubber({"unet": unet, "flow": flow}, PROMPT, 5, sampling=s)
    assert w.wait()
    assert w.error.value == "" and w.ready_seconds is not None
    assert w.decoded() == 2 * 2 * 9  # everything decoded in the background, x_t and x0 at 9 positions
    for lab, run in zip((unet, flow), w.runs):
        traj = lab.trajectory(lab.noise(5), lab.encode_prompt(PROMPT), sampling=lab.sampling(s), batch_size=1)
        torch.testing.assert_close(run.xt[1:], traj.latents[:, 0])
        torch.testing.assert_close(run.x0[:-1], traj.x0[:, 0])
        torch.testing.assert_close(run.xt[0], lab.noise(5)[0])
    for k in (0, 3, 8):
        w.step.value = k
        assert w.wait()
        for lab, run, row in zip((unet, flow), w.runs, w.rows):
            assert _same_image(row["x0"].value, lab, run.x0[k]) and _same_image(row["xt"].value, lab, run.xt[k])
            assert f"step {k}/8" in row["info"].value
    assert all(f"path length / chord {run.chord_ratio():.3f}" in row["info"].value for run, row in zip(w.runs, w.rows))
    before = w.runs
    w.guidance.value = 1.0
    assert w.wait() and w.runs is not before and w.error.value == ""
    w.n_steps.value = 4
    assert w.wait() and w.step.max == 4 and w.runs[0].n == 4


@pytest.mark.slow
def test_scrubber_errors_are_clear_and_shown_in_the_widget(unet):
    from latentlab.widgets import TimestepScrubber

    with pytest.raises(TypeError, match="latentlab.Lab"):
        TimestepScrubber(FakeBackend(), PROMPT)  # no trajectories
    with pytest.raises(ValueError, match="empty"):
        TimestepScrubber({}, PROMPT)
    with pytest.raises(ValueError, match="prompt"):
        TimestepScrubber(unet, "   ")
    w = TimestepScrubber(unet, PROMPT, 1)
    assert w.wait()
    w.prompt.value = ""
    assert w.wait() and "empty" in w.error.value


def test_token_view_shows_tokens_limit_cut_and_rows(unet, flow):
    from latentlab.widgets import TokenView

    w = TokenView({"unet": unet, "flow": flow}, "a small red star")
    assert w.wait() and w.error.value == ""
    t = w.result
    assert t.tokens == ("<|startoftext|>", "a</w>", "small</w>", "red</w>", "star</w>", "<|endoftext|>")
    assert t.limit == 77 and t.kept == 6 and not t.truncated
    torch.testing.assert_close(t.embeds, unet.encode_prompt("a small red star").prompt_embeds[0, :6])
    assert w.views[0].value.count("class='ll-token'") == 6 and len(w.heatmaps[1].value) > 0
    w.prompt.value = "red " * 100
    assert w.wait()
    assert w.result.truncated and w.result.kept == 77 and len(w.result.tokens) == 102
    assert w.views[0].value.count("ll-token-cut") == 102 - 77 and "cut off" in w.views[0].value


@pytest.mark.slow
def test_trajectory_map_finds_where_two_prompts_split(unet, flow):
    from latentlab.sampling import Sampling
    from latentlab.widgets import TrajectoryMap

    w = TrajectoryMap({"unet": unet, "flow": flow}, PROMPT, "a small green ring on a black background", 2,
                      sampling=Sampling(num_inference_steps=10))
    assert w.wait() and w.error.value == ""
    for info, canvas in zip(w.summary, w.maps):
        assert info["steps"] == 10 and 1 <= info["split"] <= 10
        kinds = [layer["kind"] for layer in canvas.layers]
        assert kinds.count("lines") == 2 and len(canvas.layers[0]["paths"][0]) == 2 * 11
    w.step.value = 7
    assert w.wait() and "step 7" in w.captions[0].value
    w.prompt_b.value = PROMPT  # the same prompt: the paths never part
    assert w.wait() and all(info["split"] is None for info in w.summary) and "never split" in w.captions[0].value


@pytest.mark.slow
def test_toylab_trains_draws_and_reflows():
    from latentlab.widgets import ToyLab

    w = ToyLab("moons", chunk=40, points=256)
    assert w.wait() and w.error.value == ""
    before = [list(c.layers) for c in w.canvases.values()]
    w.step_button.click()
    assert w.wait()
    assert all(m.steps_done == 40 for m in w.models.values())
    assert [list(c.layers) for c in w.canvases.values()] != before
    w.train(600)
    assert w.models["flow"].steps_done == 640 and "<td>640</td>" in w.info.value
    snap = w.snapshot("flow")
    assert snap["particles"].shape == (256, 2) and snap["arrows"].shape == (225, 2)
    w.t.value = 0.5
    w.view.value = "noising"
    assert w.wait()
    assert w.snapshot("diffusion")["particles"].shape == (256, 2)
    w.slow.value = True
    w.step_button.click()
    assert w.wait() and w.models["diffusion"].steps_done == 660  # slow motion: 20 single steps, each drawn
    w.reflow(300)
    assert "reflow" in w.models and w.canvases["reflow"].layout.display is None
    # draw your own: three strokes' worth of points become the data
    w.preset.value = "draw your own"
    assert w.data_canvas.drawable
    w.data_canvas.drawn = [[x / 10, (x % 7) / 5] for x in range(30)]
    assert w.wait() and w.models["flow"].steps_done == 0 and w.data.shape == (4096, 2)
    w.player.value = 50
    assert w.t.value == 0.5
    with pytest.raises(ValueError, match="data"):
        ToyLab("squares")


@pytest.mark.slow
def test_explainers_work_on_any_family(flow_lab, tiny_lab, tiny_sdxl_path):
    """Any diffusers model a user loads: tiny SD3 (with and without T5), Flux dev/schnell, SD and SDXL pipelines,
    side by side in one widget; the tokens view's rows are the conditioning rows of the kept tokens."""
    from latentlab.backend import Lab
    from latentlab.widgets import TimestepScrubber, TokenView, TrajectoryMap

    sdxl = Lab.from_pretrained(tiny_sdxl_path, device="cpu")
    sdxl.defaults = sdxl.defaults.replace(num_inference_steps=3)
    labs = {"flow": flow_lab, "sd": tiny_lab, "sdxl": sdxl}
    w = TimestepScrubber(labs, "a red star", 1)
    assert w.wait() and w.error.value == "", w.error.value
    assert [r.n for r in w.runs] == [3, 3, 3] and w.decoded() == 3 * 2 * 4
    for lab, run in zip(labs.values(), w.runs):
        assert run.xt.shape[1:] == lab.latent_shape()  # (C, h, w): 16 channels for SD3/Flux, unpacked
    t = TokenView(labs, "a red star")
    assert t.wait() and t.error.value == "", t.error.value
    for lab, res in zip(labs.values(), t.results):
        assert res.kept == len(res.tokens)
        if lab.family == "flux2":  # the chat-templated sequence the text encoder reads, the prompt in it
            assert "a red star" in "".join(res.tokens).replace("</w>", " ")
        else:
            assert res.tokens[-1] in ("<|endoftext|>", "</s>")
        torch.testing.assert_close(res.embeds, lab.encode_prompt("a red star").prompt_embeds[0, : res.kept].float())
    m = TrajectoryMap(labs, "a red star", "a blue ring", 1)
    assert m.wait() and m.error.value == "", m.error.value
    assert all(info["steps"] == 3 for info in m.summary)


class _Counting:
    """A Lab that counts the steps its trajectories report and can act at a given step (from the worker)."""

    def __init__(self, lab, at=None):
        self.lab, self.steps, self.at = lab, [], at

    def __getattr__(self, name):
        return getattr(self.lab, name)

    def trajectory(self, *args, on_step=None, **kw):
        self.steps.append(0)

        def count(*a):
            self.steps[-1] += 1
            if self.at is not None:
                self.at(self)
            on_step(*a)

        return self.lab.trajectory(*args, on_step=count, **kw)


@pytest.mark.slow
def test_the_scrubber_draws_the_sliders_step_as_soon_as_it_is_computed_and_drops_a_superseded_prompt(unet):
    from latentlab.sampling import Sampling
    from latentlab.widgets import TimestepScrubber

    lab = _Counting(unet)
    w = TimestepScrubber(lab, PROMPT, 5, sampling=Sampling(num_inference_steps=6))
    assert w.wait()
    drawn_at = []
    w.rows[0]["x0"].observe(lambda _: drawn_at.append(lab.steps[-1]), "value")
    w.step.value = 1
    assert w.wait()
    drawn_at.clear()
    w.seed.value = 6  # a new trajectory, the slider at step 1
    assert w.wait()
    assert drawn_at[0] == 2  # on screen after the trajectory's second step, not its sixth
    assert w.ready_seconds is not None and w.done_seconds is not None and w.ready_seconds <= w.done_seconds
    assert "step 1/6" in w.rows[0]["info"].value and w.error.value == ""
    # a newer prompt while a trajectory runs stops it at its next step; only the newest is computed to the end
    newer = "a small green ring on a black background"
    lab.at = lambda c: (setattr(w.prompt, "value", newer), setattr(c, "at", None)) if c.steps[-1] == 3 else None
    w.seed.value = 7
    assert w.wait()
    assert lab.steps[-2:] == [3, 6] and w.error.value == ""  # stopped at the step the newer prompt came
    ref = unet.trajectory(unet.noise(7), unet.encode_prompt(newer), sampling=unet.sampling(num_inference_steps=6),
                          batch_size=1)
    torch.testing.assert_close(w.runs[0].xt[-1], ref.latents[-1, 0])
