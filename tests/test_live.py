"""Live single images (``Lab.generate_live``): the same bits as ``generate(..., batch_size=1)``, by a faster path
that must actually run, and that must step aside whenever it cannot be exact (hooks, LoRA layers, other families,
stochastic schedulers)."""

from __future__ import annotations

import pytest
import torch

from latentlab import _tensors
from latentlab.backend import Conditioning, PredictionMix


def _same(lab, z, cond, **kw):
    live = lab.generate_live(z, cond, **kw)
    plain = lab.generate(z, cond, batch_size=1, **kw)
    assert live.shape == plain.shape and live.dtype == torch.float32
    assert torch.equal(live, plain), (live - plain).abs().max()
    return live


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_live_images_are_generate_at_batch_one_bit_for_bit(unet_lab, guidance_scale):
    cond = unet_lab.encode_prompt(["a red star", "a blue ring", "a green cross"])
    z = unet_lab.noise([3, 4, 5])
    _same(unet_lab, z, cond, guidance_scale=guidance_scale)
    _same(unet_lab, z[:1], cond[1:2], guidance_scale=guidance_scale)
    _same(unet_lab, z, cond[:1], guidance_scale=guidance_scale, num_inference_steps=2)  # one conditioning for all
    live = unet_lab._live[False]
    assert live.speedups(unet_lab.sampling(guidance_scale=guidance_scale)) == ("own-loop", "jit-trace")
    assert live._traces, "the traced UNet never ran"


def test_the_embedded_models_live_images_and_previews():
    from latentlab.backend import Lab

    for name, steps in (("embedded-shapes-fast", (1, 2, 4)), ("embedded-shapes", (20,))):
        lab = Lab.default(name)
        cond = lab.encode_prompt("a small red star on a blue background")
        vae = Lab.default(name).set_preview_decoder(None)
        for k in steps:
            exact = _same(lab, lab.noise(7), cond, num_inference_steps=k)
            with_vae = vae.generate_live(vae.noise(7), cond, num_inference_steps=k, preview=True)
            assert (with_vae - exact).abs().max() < 0.05  # bfloat16 decode where native, else the same bits
            assert torch.equal(with_vae, exact) != _tensors.native_bfloat16()
            if lab.preview_decoder is not None:  # a packaged preview decoder: the same image, a little softer
                preview = lab.generate_live(lab.noise(7), cond, num_inference_steps=k, preview=True)
                assert (preview - exact).abs().mean() < 0.03 and not torch.equal(preview, exact)


def test_default_sets_a_packaged_preview_decoder(tmp_path, monkeypatch):
    """``Lab.default`` gives every embedded model the packaged preview decoder (one VAE, one latent space)."""
    from latentlab import embedded
    from latentlab.backend import Lab

    _tiny_decoder(factor=8).save_pretrained(tmp_path / "preview-decoder")
    assert Lab.default("embedded-shapes-fast").preview_decoder is None or embedded.preview_decoder_available()
    monkeypatch.setattr(embedded, "_PREVIEW", tmp_path / "preview-decoder")
    assert embedded.preview_decoder_path() == tmp_path / "preview-decoder"
    for name in ("embedded-shapes-fast", "embedded-shapes"):
        lab = Lab.default(name)
        assert type(lab.preview_decoder).__name__ == "AutoencoderTiny"
        image = lab.generate_live(lab.noise(0), lab.encode_prompt("a red star"), num_inference_steps=2, preview=True)
        assert image.shape == (1, 3, 64, 64)
        assert "decode:AutoencoderTiny" in lab._live[True].speedups(lab.sampling(num_inference_steps=2))
    monkeypatch.setattr(embedded, "_PREVIEW", tmp_path / "nothing-here")
    assert Lab.default("embedded-shapes-fast").preview_decoder is None
    with pytest.raises(FileNotFoundError, match="the embedded preview decoder is not trained yet"):
        embedded.preview_decoder_path()


def test_a_hook_or_new_processor_drops_the_trace_and_runs_eagerly(tiny_lab):
    cond, z = tiny_lab.encode_prompt("a red star"), tiny_lab.noise(2)
    _same(tiny_lab, z, cond)
    live = tiny_lab._live[False]
    assert live._traces
    seen = []
    block = tiny_lab.pipe.unet.down_blocks[0]
    handle = block.register_forward_hook(lambda m, a, out: seen.append(1))
    try:
        _same(tiny_lab, z, cond)
        assert seen and not any(isinstance(v, torch.jit.ScriptModule) for v in live._traces.values())
    finally:
        handle.remove()
    # Another attention processor (here one that doubles every attention output): the trace made with the old one
    # must not serve it.
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Doubling(AttnProcessor2_0):
        def __call__(self, *args, **kwargs):
            return 2 * super().__call__(*args, **kwargs)

    before = _same(tiny_lab, z, cond)
    tiny_lab.pipe.unet.set_attn_processor(Doubling())
    assert not torch.equal(_same(tiny_lab, z, cond), before)


def test_a_lora_layer_is_never_traced(tiny_lab):
    pytest.importorskip("peft")
    from peft import LoraConfig

    cond, z = tiny_lab.encode_prompt("a red star"), tiny_lab.noise(2)
    _same(tiny_lab, z, cond)
    tiny_lab.pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"],
                                              init_lora_weights="gaussian"))
    with torch.no_grad():  # peft starts B at zero (a no-op adapter)
        for name, p in tiny_lab.pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    with_lora = _same(tiny_lab, z, cond)
    tiny_lab.pipe.unet.disable_adapters()  # a Python flag inside the LoRA layers: a trace would have frozen it
    without = _same(tiny_lab, z, cond)
    assert not torch.equal(with_lora, without)


def test_other_families_schedulers_and_mixes_go_through_generate(tiny_lab, tiny_sd3_path):
    from latentlab.backend import Lab

    cond, z = tiny_lab.encode_prompt(["a red star", "a blue ring"]), tiny_lab.noise([1, 2])
    for scheduler in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"):
        _same(tiny_lab, z, cond, scheduler=scheduler)
    stochastic = tiny_lab.sampling(scheduler="EulerAncestralDiscreteScheduler")
    assert tiny_lab._live[False].speedups(stochastic) == ("own-loop", "jit-trace")  # the pipeline's generators
    mix = PredictionMix(cond[:1].map(lambda t: t.expand(2, *t.shape[1:])),
                        cond[1:].map(lambda t: t.expand(2, *t.shape[1:])), torch.tensor([0.25, 0.75]))
    assert torch.equal(tiny_lab.generate_live(z, mix), tiny_lab.generate(z, mix, batch_size=1))
    flow = Lab.from_pretrained(tiny_sd3_path, device="cpu")
    flow.defaults = flow.defaults.replace(num_inference_steps=3)
    _same(flow, flow.noise([1, 2]), flow.encode_prompt("a red star"))
    assert flow._live[False].speedups() == ()


def test_bad_input_is_refused_before_any_model_work(tiny_lab):
    cond = tiny_lab.encode_prompt("a red star")
    with pytest.raises(TypeError, match="`preview` must be a bool, got str"):
        tiny_lab.generate_live(tiny_lab.noise(1), cond, preview="yes")
    with pytest.raises(ValueError, match="`latents` must have shape"):
        tiny_lab.generate_live(torch.zeros(1, 3, 8, 8), cond)
    with pytest.raises(ValueError, match="`conditioning` must have 1 or 2 items"):
        tiny_lab.generate_live(tiny_lab.noise([1, 2]), Conditioning.cat([cond] * 3))
    with pytest.raises(ValueError, match="num_inference_steps"):
        tiny_lab.generate_live(tiny_lab.noise(1), cond, num_inference_steps=0)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_attention_mixes_run_the_traced_loop_bit_for_bit(unet_lab, guidance_scale):
    """An AttentionMix (the morph's and the Interpolator's default prompt path) takes the own, traced loop: the bias
    is an input of the trace, so one trace serves every weight, and each weight gives generate's bits."""
    from latentlab.backend import AttentionMix

    lab = unet_lab
    a = lab.encode_prompt(["a red star", "a red star", "a red star"])
    b = lab.encode_prompt(["a blue ring", "a blue ring", "a blue ring"])
    z = lab.noise([3, 4, 5])
    for w in ([0.0, 0.5, 1.0], [0.3, 0.7, 0.9]):
        _same(lab, z, AttentionMix(a, b, torch.tensor(w, dtype=torch.float64)), guidance_scale=guidance_scale)
    live = lab._live[False]
    mix_traces = [k for k in live._traces if k[-1]]
    assert len(mix_traces) == 1, "one trace for every weight"
    eager = type(live)(lab, trace=False)
    mix = AttentionMix(a[:1], b[:1], torch.tensor([0.4]))
    s = lab.sampling(guidance_scale=guidance_scale)
    assert torch.equal(eager(z[:1], mix, sampling=s), lab.generate(z[:1], mix, sampling=s, batch_size=1))
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(type(p) is AttnProcessor2_0 for p in lab.pipe.unet.attn_processors.values())  # restored


def _tiny_decoder(latent_channels: int = 4, factor: int = 2, seed: int = 0):
    """A random diffusers AutoencoderTiny with ``factor`` pixels per latent pixel (the tiny SD model's VAE: 2)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    n = factor.bit_length()  # one upsampling between consecutive blocks
    return AutoencoderTiny(encoder_block_out_channels=(8,) * n, decoder_block_out_channels=(8,) * n,
                           num_encoder_blocks=(1,) * n, num_decoder_blocks=(1,) * n, latent_channels=latent_channels,
                           force_upcast=False)


def test_a_preview_decoder_decodes_previews_and_nothing_else(tiny_lab, tmp_path):
    cond = tiny_lab.encode_prompt(["a red star", "a blue ring"])
    z = tiny_lab.noise([3, 4])
    exact = tiny_lab.generate_live(z, cond)
    vae_preview = tiny_lab.generate_live(z, cond, preview=True)
    decoder = _tiny_decoder()
    assert tiny_lab.set_preview_decoder(decoder) is tiny_lab and tiny_lab.preview_decoder is decoder
    preview = tiny_lab.generate_live(z, cond, preview=True)
    latents = tiny_lab.generate(z, cond, batch_size=1, output_type="latent")  # the same denoising, bit for bit
    with torch.no_grad():
        want = (tiny_lab.adapter.vae_decode(decoder, latents) / 2 + 0.5).clamp(0, 1)
    assert preview.shape == exact.shape and (preview - want).abs().max() < 2e-2  # bfloat16 where native
    assert (preview - vae_preview).abs().max() > 0.1  # really another decoder
    assert "decode:AutoencoderTiny" in tiny_lab._live[True].speedups()
    assert torch.equal(tiny_lab.generate_live(z, cond), exact)  # final images never use it
    assert torch.equal(tiny_lab.generate(z, cond, batch_size=1), exact)
    decoder.save_pretrained(tmp_path / "decoder")
    assert torch.equal(tiny_lab.set_preview_decoder(tmp_path / "decoder").generate_live(z, cond, preview=True), preview)
    assert torch.equal(tiny_lab.set_preview_decoder(None).generate_live(z, cond, preview=True), vae_preview)


def test_a_preview_decoder_is_checked_before_use(tiny_lab, tmp_path):
    with pytest.raises(TypeError, match=r"`decoder` must be None, a folder, or a VAE-like module .* got int"):
        tiny_lab.set_preview_decoder(3)
    with pytest.raises(FileNotFoundError, match="must be a folder with a config.json and safetensors weights"):
        tiny_lab.set_preview_decoder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"`decoder` cannot decode this model's latents \(1, 4, 8, 8\)"):
        tiny_lab.set_preview_decoder(_tiny_decoder(latent_channels=16))
    with pytest.raises(ValueError, match=r"to images \(1, 3, 16, 16\), got \(1, 3, 32, 32\)"):
        tiny_lab.set_preview_decoder(_tiny_decoder(factor=4))
    assert tiny_lab.preview_decoder is None  # nothing half-set
