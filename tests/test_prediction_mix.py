"""Prediction mixing (``PredictionMix``, morph prompt interpolation ``"mix"``): a hand-written diffusers loop as the
reference, every model family, the morph plan, frame keys, manifests and bad input."""

import pytest
import torch
from helpers import mix_identities, two_prompts

from latentlab import Conditioning, PredictionMix
from latentlab.backend.engine import mixed_predictions


def test_record_validates_slices_pads_and_concatenates():
    a, b = Conditioning(torch.zeros(3, 2, 4)), Conditioning(torch.ones(3, 2, 4))
    m = PredictionMix(a, b, torch.tensor([0.0, 0.25, 1.0]))
    assert len(m) == 3 and m[1].weight.tolist() == [0.25] and torch.equal(m[1:].b.prompt_embeds, b.prompt_embeds[1:])
    both = PredictionMix.cat([m, m[:1]])
    assert len(both) == 4 and both.weight.tolist() == [0.0, 0.25, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"weight.*\[0, 1\]"):
        PredictionMix(a, b, torch.tensor([0.0, 1.5, 1.0]))
    with pytest.raises(ValueError, match=r"weight.*\[0, 1\]"):
        PredictionMix(a, b, torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="as many items"):
        PredictionMix(a, b[:2], torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(TypeError, match="PredictionMix.b"):
        PredictionMix(a, b.prompt_embeds, torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(TypeError, match="1-D tensor"):
        PredictionMix(a, b, [0.0, 0.5, 1.0])


def test_generate_mixes_the_guided_predictions_like_a_hand_written_ddim_loop(tiny_lab):
    """The reference: diffusers' UNet and DDIMScheduler stepped by hand, each prompt's guided noise prediction
    computed separately and mixed -- no hook, no pipeline."""
    lab = tiny_lab
    z, a, b = two_prompts(lab)
    w = torch.tensor([0.3, 0.8])
    ours = lab.generate(z, PredictionMix(a, b, w), output_type="latent")
    sched = type(lab.pipe.scheduler).from_config(lab.pipe.scheduler.config)
    sched.set_timesteps(3)
    neg = lab.encode_prompt("").prompt_embeds.expand(2, -1, -1)
    x = z * sched.init_noise_sigma
    with torch.no_grad():
        def guided(x, t, c):
            out = lab.pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([neg, c])).sample
            u, v = out.chunk(2)
            return u + 3.0 * (v - u)

        for t in sched.timesteps:
            ww = w.view(-1, 1, 1, 1)
            eps = (1 - ww) * guided(x, t, a.prompt_embeds) + ww * guided(x, t, b.prompt_embeds)
            x = sched.step(eps, t, x).prev_sample
    assert (ours - x).abs().max() < 1e-4
    plain = lab.generate(z, a, output_type="latent")
    assert (ours - plain).abs().max() > 1e-2  # the mix is not one of the prompts


@pytest.mark.slow
def test_mixing_works_alike_on_every_flow_family(flow_lab):
    """Weight 0 is prompt a's generation and 1 is b's (the two copies of each item stay one), a mix of a prompt
    with itself is that prompt, and a weight in between is neither -- for every family's batching of guidance."""
    lab = flow_lab
    size = 8 * lab.vae_scale_factor
    z, a, b = two_prompts(lab, size)
    for guidance in (1.0, 2.5):
        d = mix_identities(lab, PredictionMix, z, a, b, guidance, [0.5, 0.5])
        assert d["ends_a"] <= 1e-4 and d["ends_b"] <= 1e-4
        assert d["same"] <= 1e-4
        assert d["mid_a"] > 1e-3 and d["mid_b"] > 1e-3


def test_one_item_conditionings_and_weights_broadcast(tiny_lab):
    z, a, b = two_prompts(tiny_lab)
    one = tiny_lab.generate(z, PredictionMix(a[:1], b[:1], torch.tensor([0.4])), output_type="latent")
    full = tiny_lab.generate(z, PredictionMix(a, b, torch.tensor([0.4, 0.4])), output_type="latent")
    assert torch.equal(one, full)


def test_requests_that_cannot_mix_say_so(tiny_lab):
    z, a, b = two_prompts(tiny_lab)
    mix = PredictionMix(a, b, torch.tensor([0.5, 0.5]))
    with pytest.raises(TypeError, match="mixing two prompts is for generate"):
        tiny_lab.trajectory(z, mix)
    with pytest.raises(ValueError, match="1 or 2 items"):
        tiny_lab.generate(z, PredictionMix(a.map(lambda t: t.repeat(2, 1, 1)[:3]), b.map(lambda t: t.repeat(2, 1, 1)[:3]),
                                           torch.tensor([0.5, 0.5, 0.5])))
    layer = torch.nn.Linear(2, 2)
    with mixed_predictions(layer, torch.tensor([0.5, 0.5])), pytest.raises(RuntimeError, match="multiple of 2 x 2"):
        layer(torch.zeros(3, 2))
    assert not layer._forward_hooks  # removed on exit


def test_a_morph_with_prompt_mix_plans_pairs_keys_frames_and_records_it(tiny_lab, tmp_path):
    import json

    from latentlab.morph import Keyframe, MorphSettings, manifest_path, plan, render_frame, render_morph
    from latentlab.morph.render import _frame_key

    keys = (Keyframe("a red star", 1), Keyframe("a blue ring", 2), Keyframe("a green cross"))
    mixed = MorphSettings(keyframes=keys, n_frames=7, prompt_interpolation="mix")
    lerped = MorphSettings(keyframes=keys, n_frames=7, prompt_interpolation="lerp")
    default = MorphSettings(keyframes=keys)
    assert default.prompt_interpolation == "auto" and plan(tiny_lab, default).prompt_method == "attention"
    p = plan(tiny_lab, mixed)
    lat, cond = p.inputs(0, 7)
    assert isinstance(cond, PredictionMix)
    ca, cb, cc = (tiny_lab.encode_prompt(s) for s in ("a red star", "a blue ring", "a green cross"))
    assert torch.equal(cond.a.prompt_embeds[0], ca.prompt_embeds[0]) and cond.weight[0] == 0
    assert torch.equal(cond.b.prompt_embeds[-1], cc.prompt_embeds[0]) and cond.weight[-1] == 1
    mid = 3  # the middle keyframe, t = 1 of segment 0 or t = 0 of segment 1: b's or a's prompt alone
    f = p.frames[mid]
    at_mid = cond.b[mid] if f["prompt_segment"] == 0 else cond.a[mid]
    assert torch.equal(at_mid.prompt_embeds, cb.prompt_embeds) and float(cond.weight[mid]) in (0.0, 1.0)
    lat2, cond2 = plan(tiny_lab, lerped).inputs(0, 7)
    assert torch.equal(lat, lat2)
    assert _frame_key(b"x", lat[2:3], cond[2]) != _frame_key(b"x", lat[2:3], cond2[2])
    out = tmp_path / "m.gif"
    render_morph(tiny_lab, mixed, out)
    man = json.loads(manifest_path(out).read_text())
    assert man["settings"]["prompt_interpolation"] == "mix"
    frame = render_frame(tiny_lab, manifest_path(out), 2)
    direct = tiny_lab.generate(lat[2:3], cond[2:3])
    assert (frame - direct).abs().max() < 1e-4 and (frame - tiny_lab.generate(lat2[2:3], cond2[2:3])).abs().max() > 1e-3


def test_prompt_mix_is_checked_where_it_cannot_apply(tmp_path):
    from latentlab.morph import Keyframe, MorphSettings

    with pytest.raises(ValueError, match="prompt_interpolation"):
        MorphSettings(keyframes=(Keyframe("a"), Keyframe("b")), prompt_interpolation="mixx")
    with pytest.raises(ValueError, match="noise_interpolation"):
        MorphSettings(keyframes=(Keyframe("a"), Keyframe("b")), noise_interpolation="mix")


def test_the_interpolator_widget_offers_the_mix_and_shows_it(tiny_lab, tmp_path):
    from latentlab import slerp
    from latentlab.widgets import Interpolator

    w = Interpolator(tiny_lab, ("a red star", 1), ("a blue ring", 2), clip=None, frames=3, output_dir=tmp_path)
    assert w.wait() and "mix" in w.prompt_method.options
    w.t.value = 0.5
    assert w.wait()
    lerp_frame = w.frame.value
    w.prompt_method.value = "mix"
    assert w.wait() and w.frame.value != lerp_frame
    w.diagnose(3)
    ts = torch.tensor([0.0, 0.5, 1.0])
    a, b = (tiny_lab.encode_prompt(p).map(lambda t: t.expand(3, *t.shape[1:])) for p in ("a red star", "a blue ring"))
    want = tiny_lab.generate(slerp(tiny_lab.noise(1), tiny_lab.noise(2), ts)[:, 0], PredictionMix(a, b, ts.double()),
                             sampling=w.sampling)
    assert torch.equal(w._strip_images, want)


def test_a_seed_walk_has_nothing_to_mix_and_does_not_pay_for_it(tiny_lab):
    from latentlab.morph import Keyframe, MorphSettings, plan

    walk = MorphSettings(keyframes=(Keyframe("a red star", 1), Keyframe(seed=2), Keyframe(seed=3)), n_frames=6,
                         loop=True, prompt_interpolation="mix")
    p = plan(tiny_lab, walk)
    assert not p.mixes
    _, cond = p.inputs(0, 6)
    assert isinstance(cond, Conditioning) and len(cond) == 6
    assert p.inputs(2, 3)[1].prompt_embeds.shape[0] == 1  # however sliced
    # a loop back to the first prompt mixes, a morph whose first two keyframes share a prompt mixes everywhere
    looped = MorphSettings(keyframes=(Keyframe("a red star", 1), Keyframe("a blue ring", 2)), n_frames=6, loop=True,
                           prompt_interpolation="mix")
    assert plan(tiny_lab, looped).mixes and isinstance(plan(tiny_lab, looped).inputs(0, 2)[1], PredictionMix)
    partly = MorphSettings(keyframes=(Keyframe("a red star", 1), Keyframe(seed=2), Keyframe("a blue ring")),
                           n_frames=7, prompt_interpolation="mix")
    assert isinstance(plan(tiny_lab, partly).inputs(0, 2)[1], PredictionMix)


def test_negative_indices_pick_one_item():
    a, b = Conditioning(torch.arange(6.0).view(3, 1, 2)), Conditioning(-torch.arange(6.0).view(3, 1, 2))
    m = PredictionMix(a, b, torch.tensor([0.0, 0.5, 1.0]))
    assert a[-1].prompt_embeds.tolist() == [[[4.0, 5.0]]] and m[-1].weight.tolist() == [1.0] and len(m[-2]) == 1
