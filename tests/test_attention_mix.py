"""Attention interpolation (``AttentionMix``, morph prompt interpolation ``"attention"``).

The reference needs no processor of ours: a softmax over ``[a's tokens + log(1 - w), b's tokens + log(w)]`` is
exactly plain attention over a token list holding ``a``'s tokens ``p`` times and ``b``'s ``q`` times when
``w = q / (p + q)`` (each copy of a token adds its own ``exp(score)``). So an AttentionMix at weight 1/3 must equal
plain generation with the prompt ``[a, a, b]`` (and the negative three times), through the unmodified pipeline.
"""

import pytest
import torch
from helpers import mix_identities, two_prompts

from latentlab import AttentionMix, Conditioning, PredictionMix


def _repeated(lab, a: Conditioning, b: Conditioning, p: int, q: int) -> tuple[Conditioning, str]:
    """The reference conditioning: ``a``'s tokens p times then ``b``'s q times, pooled embeddings lerped at
    ``q / (p + q)``."""
    w = q / (p + q)
    pooled = None
    if a.pooled_prompt_embeds is not None:
        pooled = (a.pooled_prompt_embeds.float() * (1 - w) + b.pooled_prompt_embeds.float() * w).to(
            a.pooled_prompt_embeds.dtype)
    return Conditioning(torch.cat([a.prompt_embeds] * p + [b.prompt_embeds] * q, 1), pooled), w


def _negative_repeated(lab, n: int):
    """The lab's negative conditioning (SDXL's zeros for an empty prompt included) with its tokens repeated ``n``
    times (what the reference runs with)."""
    neg = lab.negative_conditioning(lab.sampling().negative_prompt)
    return Conditioning(torch.cat([neg.prompt_embeds] * n, 1), neg.pooled_prompt_embeds)


def _reference(lab, z, a, b, p, q, guidance):
    """Plain generation with the repeated-token prompt and negative, through the pipeline (no processor of ours)."""
    cond, _ = _repeated(lab, a, b, p, q)
    neg = _negative_repeated(lab, p + q)
    engine = lab  # Lab is the engine; its adapter.generate is the plain pipeline call
    s = lab.sampling(guidance_scale=guidance)
    with torch.no_grad():
        out = engine.adapter.generate(engine, z.to(engine.device, engine.dtype), cond, neg, s)
    return out.float().cpu()


def test_record_validates_like_prediction_mix_and_names_itself():
    a, b = Conditioning(torch.zeros(3, 2, 4)), Conditioning(torch.ones(3, 2, 4))
    m = AttentionMix(a, b, torch.tensor([0.0, 0.25, 1.0]))
    assert isinstance(m[1:], AttentionMix) and m[1].weight.tolist() == [0.25]
    both = AttentionMix.cat([m, m[:1]])
    assert isinstance(both, AttentionMix) and both.weight.tolist() == [0.0, 0.25, 1.0, 0.0]
    assert isinstance(m.map(lambda t: t[:2]), AttentionMix)
    with pytest.raises(ValueError, match=r"AttentionMix.weight.*\[0, 1\]"):
        AttentionMix(a, b, torch.tensor([0.0, -0.1, 1.0]))
    with pytest.raises(TypeError, match="AttentionMix.a"):
        AttentionMix(a.prompt_embeds, b, torch.tensor([0.0, 0.5, 1.0]))
    assert not isinstance(m, PredictionMix)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_unet_family_equals_plain_attention_over_repeated_tokens(unet_lab, guidance):
    """SD and SDXL (pooled embeddings, time ids), with and without classifier-free guidance: weight 1/3 is the
    prompt [a, a, b], 1/2 is [a, b], through the unmodified pipeline."""
    lab = unet_lab
    z, a, b = two_prompts(lab)
    for p, q in ((2, 1), (1, 1)):
        ref = _reference(lab, z, a, b, p, q, guidance)
        w = torch.full((2,), q / (p + q), dtype=torch.float64)
        ours = lab.generate(z, AttentionMix(a, b, w), guidance_scale=guidance, output_type="latent")
        assert (ours - ref).abs().max() < 1e-4, (p, q)
    plain_a = lab.generate(z, a, guidance_scale=guidance, output_type="latent")
    plain_b = lab.generate(z, b, guidance_scale=guidance, output_type="latent")
    ends = lab.generate(z, AttentionMix(a, b, torch.tensor([0.0, 1.0])), guidance_scale=guidance,
                        output_type="latent")
    assert (ends[0] - plain_a[0]).abs().max() < 1e-4 and (ends[1] - plain_b[1]).abs().max() < 1e-4
    mid = lab.generate(z, AttentionMix(a, b, torch.tensor([0.5, 0.5])), guidance_scale=guidance,
                       output_type="latent")
    lerped = lab.generate(z, Conditioning.cat([a, b]).map(lambda t: (t[:2] + t[2:]) / 2), guidance_scale=guidance,
                          output_type="latent")
    assert (mid - plain_a).abs().max() > 1e-3 and (mid - lerped).abs().max() > 1e-3  # neither endpoint nor lerp
    # the default processors are back (the request's swap is undone)
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(type(p) is AttnProcessor2_0 for p in lab.pipe.unet.attn_processors.values())


@pytest.mark.parametrize("kind", ["sd3", "sd3-no-t5"])
def test_sd3_joint_attention_keeps_endpoints_and_one_prompt_and_mixes_in_between(kind, request):
    """SD3's joint attention (text tokens in the sequence, their own queries too), with T5 and without it (whose
    256 trailing zero tokens are collapsed per half). Here the image keys share the softmax with the text, so the
    repeated-token identity does not apply (``[a, a, b]`` gives the text three times a prompt's share); the bias
    itself is checked against a hand-written softmax below."""
    from latentlab.backend import Lab

    path = request.getfixturevalue("tiny_sd3_path")
    extra = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3-no-t5" else {}
    lab = Lab.from_pretrained(path, device="cpu", **extra)
    lab.defaults = lab.defaults.replace(num_inference_steps=3)
    size = 8 * lab.vae_scale_factor
    z, a, b = two_prompts(lab, size)
    for guidance in (1.0, 2.5):
        d = mix_identities(lab, AttentionMix, z, a, b, guidance, [0.3, 0.6])
        assert d["ends_a"] < 2e-3 and d["ends_b"] < 2e-3
        assert d["same"] < 2e-3  # the two shares add up to one prompt's
        assert d["mid_a"] > 1e-2 and d["mid_b"] > 1e-2
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    assert all(type(p) is JointAttnProcessor2_0 for p in lab.pipe.transformer.attn_processors.values())


def test_the_joint_attention_bias_is_the_weighted_softmax(tiny_sd3_path):
    """One SD3 joint-attention layer, random inputs: MixedTextProcessor against the softmax written out, the image
    keys unweighted, ``a``'s text keys weighted ``1 - w``, ``b``'s ``w``, a collapsed last token counted ``r``
    times; rows are items in blocks (guidance's [negative, positive])."""
    from diffusers import SD3Transformer2DModel

    from latentlab.backend.families.sd3 import MixedTextProcessor

    attn = SD3Transformer2DModel.from_pretrained(tiny_sd3_path, subfolder="transformer").transformer_blocks[0].attn
    g = torch.Generator().manual_seed(0)
    w, r, half = torch.tensor([0.2, 0.9], dtype=torch.float64), 5, 3
    x = torch.randn(4, 6, attn.to_q.in_features, generator=g)
    c = torch.randn(4, 2 * half, attn.add_q_proj.in_features, generator=g)
    ours_img, ours_ctx = MixedTextProcessor(w, r)(attn, x, c)
    with torch.no_grad():
        def heads(t):
            return t.view(4, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        def norm(layer, t):
            return t if layer is None else layer(t)

        q = torch.cat([norm(attn.norm_q, heads(attn.to_q(x))), norm(attn.norm_added_q, heads(attn.add_q_proj(c)))], 2)
        k = torch.cat([norm(attn.norm_k, heads(attn.to_k(x))), norm(attn.norm_added_k, heads(attn.add_k_proj(c)))], 2)
        v = torch.cat([heads(attn.to_v(x)), heads(attn.add_v_proj(c))], 2)
        mult = torch.ones(4, 6 + 2 * half, dtype=torch.float64)
        ww = w.repeat(2)
        mult[:, 6 : 6 + half] *= (1 - ww)[:, None]
        mult[:, 6 + half :] *= ww[:, None]
        mult[:, [6 + half - 1, 6 + 2 * half - 1]] *= r
        e = torch.exp((q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5) * mult[:, None, None, :]
        out = ((e / e.sum(-1, keepdim=True)) @ v.double()).float().transpose(1, 2).reshape(4, -1, q.shape[1] * q.shape[-1])
        img = attn.to_out[1](attn.to_out[0](out[:, :6]))
        ctx = out[:, 6:] if attn.context_pre_only else attn.to_add_out(out[:, 6:])
    assert (ours_img - img).abs().max() < 1e-4 and (ours_ctx - ctx).abs().max() < 1e-4


#: The flow families that support AttentionMix (the others refuse it before any model work).
SUPPORTED = ("sd3", "sd3-no-t5", "flux", "flux-schnell")


@pytest.mark.slow
def test_every_flow_family_mixes_or_refuses_before_any_model_work(flow_lab):
    """Supported families: weight 0/1 are each prompt's own generation, a prompt mixed with itself is that prompt
    (the shares add up to one prompt's), a weight in between is neither; with and without guidance (Flux dev's
    embedded guidance, schnell's true CFG). The others refuse by name, before the transformer runs."""
    lab = flow_lab
    size = 8 * lab.vae_scale_factor
    z, a, b = two_prompts(lab, size)
    if lab.kind in SUPPORTED:
        for guidance in (1.0, 2.5):
            d = mix_identities(lab, AttentionMix, z, a, b, guidance, [0.3, 0.6])
            assert d["ends_a"] < 2e-3 and d["ends_b"] < 2e-3
            assert d["same"] < 2e-3
            assert d["mid_a"] > 1e-3 and d["mid_b"] > 1e-3
        return
    mix = AttentionMix(a, b, torch.tensor([0.5, 0.5]))
    calls = []
    handle = lab.pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match="AttentionMix.*not implemented.*PredictionMix"):
            lab.generate(z, mix)
    finally:
        handle.remove()
    assert not calls


def test_custom_processors_are_not_replaced_silently(tiny_lab):
    from diffusers.models.attention_processor import AttnProcessor

    z, a, b = two_prompts(tiny_lab)
    old = tiny_lab.pipe.unet.attn_processors
    tiny_lab.pipe.unet.set_attn_processor(AttnProcessor())
    try:
        with pytest.raises(ValueError, match="default attention processors.*AttnProcessor"):
            tiny_lab.generate(z, AttentionMix(a, b, torch.tensor([0.5, 0.5])))
    finally:
        tiny_lab.pipe.unet.set_attn_processor(old)


def test_batching_does_not_change_a_frame(tiny_lab):
    z, a, b = two_prompts(tiny_lab)
    mix = AttentionMix(a, b, torch.tensor([0.2, 0.7], dtype=torch.float64))
    together = tiny_lab.generate(z, mix, batch_size=2, output_type="latent")
    alone = torch.cat([tiny_lab.generate(z[i : i + 1], mix[i], batch_size=1, output_type="latent") for i in range(2)])
    assert (together - alone).abs().max() < 1e-5


def test_a_morph_with_prompt_attention_plans_keys_records_and_recreates_frames(tiny_lab, tmp_path):
    import json

    from latentlab.morph import Keyframe, MorphSettings, manifest_path, plan, render_frame, render_morph
    from latentlab.morph.render import _frame_key

    keys = (Keyframe("a red star", 1), Keyframe("a blue ring", 2))
    att = MorphSettings(keyframes=keys, n_frames=5, prompt_interpolation="attention")
    p = plan(tiny_lab, att)
    lat, cond = p.inputs(0, 5)
    assert isinstance(cond, AttentionMix) and cond.weight.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    _, mixed = plan(tiny_lab, MorphSettings(keyframes=keys, n_frames=5, prompt_interpolation="mix")).inputs(0, 5)
    assert _frame_key(b"x", lat[2:3], cond[2]) != _frame_key(b"x", lat[2:3], mixed[2])  # same numbers, other mode
    out = tmp_path / "m.gif"
    render_morph(tiny_lab, att, out)
    man = json.loads(manifest_path(out).read_text())
    assert man["settings"]["prompt_interpolation"] == "attention"
    frame = render_frame(tiny_lab, manifest_path(out), 2)
    assert (frame - tiny_lab.generate(lat[2:3], cond[2:3])).abs().max() < 1e-4
    assert (frame - tiny_lab.generate(lat[2:3], mixed[2:3])).abs().max() > 1e-3
    # a seed walk has nothing to mix: plain conditioning, however sliced
    walk = MorphSettings(keyframes=(Keyframe("a red star", 1), Keyframe(seed=2)), n_frames=4,
                         prompt_interpolation="attention")
    assert isinstance(plan(tiny_lab, walk).inputs(1, 3)[1], Conditioning)


def test_the_interpolator_widget_offers_attention(tiny_lab, tmp_path):
    from latentlab import slerp
    from latentlab.widgets import Interpolator

    w = Interpolator(tiny_lab, ("a red star", 1), ("a blue ring", 2), clip=None, frames=3, output_dir=tmp_path)
    assert w.wait() and "attention" in w.prompt_method.options
    w.prompt_method.value = "attention"
    assert w.wait()
    w.diagnose(3)
    ts = torch.tensor([0.0, 0.5, 1.0])
    a, b = (tiny_lab.encode_prompt(p).map(lambda t: t.expand(3, *t.shape[1:])) for p in ("a red star", "a blue ring"))
    want = tiny_lab.generate(slerp(tiny_lab.noise(1), tiny_lab.noise(2), ts)[:, 0], AttentionMix(a, b, ts.double()),
                             sampling=w.sampling)
    assert torch.equal(w._strip_images, want)


def test_a_morph_asks_the_model_first_and_refuses_before_any_work():
    from fakes import FakeBackend

    from latentlab.morph import Keyframe, MorphSettings, plan

    class NoAttention(FakeBackend):
        def attention_mix_unsupported(self):
            return "is not implemented for a Qwen-Image model"

    lab = NoAttention()
    s = MorphSettings(keyframes=(Keyframe("a red star", 1), Keyframe("a blue ring", 2)), n_frames=4,
                      prompt_interpolation="attention")
    with pytest.raises(ValueError, match="prompt_interpolation.*'attention'.*Qwen-Image.*'mix'"):
        plan(lab, s)
    assert not lab.generated and not lab.calls
    assert isinstance(plan(lab, MorphSettings(keyframes=s.keyframes, n_frames=4, prompt_interpolation="mix"))
                      .inputs(0, 4)[1], PredictionMix)


def test_the_default_prompt_path_is_resolved_per_model_and_recorded(tiny_lab, tmp_path, request):
    """``"auto"``: attention for the UNet family, else lerp; the manifest records what ran, and a frame is
    re-created the way it ran even if the model would now pick otherwise (or the settings predate the field)."""
    import json

    from fakes import FakeBackend

    from latentlab.morph import Keyframe, MorphSettings, manifest_path, plan, read_manifest, render_frame, render_morph

    keys = (Keyframe("a red star", 1), Keyframe("a blue ring", 2))
    s = MorphSettings(keyframes=keys, n_frames=5)
    assert s.prompt_interpolation == "auto" and plan(tiny_lab, s).prompt_method == "attention"

    class NoAttention(FakeBackend):
        def attention_mix_unsupported(self):
            return "is not implemented for this model"

    assert plan(NoAttention(), s).prompt_method == "lerp"
    # joint-attention families take it when asked, but "auto" stays on lerp (measured no cleaner on the flow twin)
    from latentlab.backend import Lab

    sd3 = Lab.from_pretrained(request.getfixturevalue("tiny_sd3_path"), device="cpu")
    assert sd3.attention_mix_unsupported() is None and sd3.default_prompt_interpolation() == "lerp"
    assert plan(sd3, s).prompt_method == "lerp"
    assert plan(sd3, MorphSettings(keyframes=keys, n_frames=5, prompt_interpolation="attention")).prompt_method == \
        "attention"
    assert isinstance(plan(NoAttention(), s).inputs(0, 5)[1], Conditioning)
    out = render_morph(tiny_lab, s, tmp_path / "m.gif", progress=False)
    man = json.loads(manifest_path(out).read_text())
    assert man["settings"]["prompt_interpolation"] == "auto" and man["prompt_method"] == "attention"
    lerped = MorphSettings(keyframes=keys, n_frames=5, prompt_interpolation="lerp")
    lat, lerp_cond = plan(tiny_lab, lerped).inputs(2, 3)
    want_lerp = tiny_lab.generate(lat, lerp_cond)
    assert (render_frame(tiny_lab, man, 2) - want_lerp).abs().max() > 1e-3  # attention ran
    assert (render_frame(tiny_lab, {**man, "prompt_method": "lerp"}, 2) - want_lerp).abs().max() < 1e-5
    old = {**man, "settings": {k: v for k, v in man["settings"].items() if k != "prompt_interpolation"}}
    old.pop("prompt_method")
    assert (render_frame(tiny_lab, old, 2) - want_lerp).abs().max() < 1e-5  # written before the field: lerp
    no_method = {k: v for k, v in man.items() if k != "prompt_method"}
    with pytest.raises(ValueError, match="'auto' but no resolved `prompt_method`"):
        read_manifest(no_method)
    with pytest.raises(ValueError, match="`prompt_method` must be one of"):
        read_manifest({**man, "prompt_method": "auto"})


def test_the_interpolator_offers_attention_only_where_the_model_takes_it(tmp_path):
    from fakes import FakeBackend

    from latentlab.widgets import Interpolator

    class NoAttention(FakeBackend):
        def attention_mix_unsupported(self):
            return "is not implemented for this model"

    w = Interpolator(NoAttention(), ("a red star", 1), ("a blue ring", 2), clip=None, frames=3, output_dir=tmp_path)
    assert "attention" not in w.prompt_method.options and w.prompt_method.value == "lerp"
    w = Interpolator(FakeBackend(), ("a red star", 1), ("a blue ring", 2), clip=None, frames=3, output_dir=tmp_path)
    assert "attention" in w.prompt_method.options and w.prompt_method.value == "attention"
