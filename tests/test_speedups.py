"""Exact speed-ups: what they change must be nothing (bit for bit), and they must actually run."""

from __future__ import annotations

import contextlib

import pytest
import torch

from latentlab.backend.families import unet as unet_family


def _without_cache(monkeypatch):
    monkeypatch.setattr(unet_family.UNetFamily, "denoising", lambda self, engine: contextlib.nullcontext())


def _every_request(lab):
    cond = lab.encode_prompt(["a red star", "a blue ring", "a green cross"])
    z = lab.noise([3, 4, 5])
    gen = lab.generate(z, cond, batch_size=2, output_type="latent")
    traj = lab.trajectory(z, cond, batch_size=3)
    i2i = lab.img2img(gen, cond, strength=0.7, seed=[1, 2, 3], output_type="latent", batch_size=3)
    inv = lab.invert(gen, cond, batch_size=3)
    return [gen, traj.latents, traj.x0, i2i, inv.noise]


def test_cached_cross_attention_changes_no_bit(unet_lab, monkeypatch):
    cached = _every_request(unet_lab)
    _without_cache(monkeypatch)
    plain = _every_request(unet_lab)
    for a, b in zip(cached, plain):
        assert torch.equal(a, b)


def test_cache_is_used_and_processors_are_restored(unet_lab):
    unet = unet_lab.pipe.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with unet_family.cached_cross_attention(unet) as proc:
        assert proc is not None
        cond = unet_lab.encode_prompt("a red star")
        unet_lab.adapter.generate(unet_lab, unet_lab.noise(0), cond, unet_lab.negative_conditioning(""),
                                  unet_lab.sampling())
        # 4 steps: the first computes the keys and values of every cross-attention layer, the other 3 reuse them
        layers = sum(1 for name in unet.attn_processors if name.endswith("attn2.processor"))
        assert layers > 0 and proc.hits == 3 * layers
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_a_new_or_modified_embedding_tensor_is_never_served_from_the_cache(tiny_lab):
    unet_lab = tiny_lab
    unet = unet_lab.pipe.unet
    x = torch.randn(2, 4, 8, 8)
    emb = unet_lab.encode_prompt(["a red star", "a blue ring"]).prompt_embeds
    ref = unet(x, 10, encoder_hidden_states=emb).sample
    with torch.no_grad(), unet_family.cached_cross_attention(unet) as proc:
        first = unet(x, 10, encoder_hidden_states=emb.clone()).sample
        same = emb.clone()
        unet(x, 10, encoder_hidden_states=same)
        same.mul_(2.0)  # modified in place: its version counter moves, so it is recomputed
        changed = unet(x, 10, encoder_hidden_states=same).sample
        assert proc.hits == 0
    assert torch.equal(first, ref.detach())
    assert torch.equal(changed, unet(x, 10, encoder_hidden_states=same).sample.detach())


def test_no_cache_with_autograd_or_custom_processors(tiny_lab):
    unet_lab = tiny_lab
    unet = unet_lab.pipe.unet
    x = torch.randn(1, 4, 8, 8)
    emb = unet_lab.encode_prompt("a red star").prompt_embeds
    with unet_family.cached_cross_attention(unet) as proc:
        for _ in range(2):
            out = unet(x, 10, encoder_hidden_states=emb).sample
        assert proc.hits == 0 and out.requires_grad is any(p.requires_grad for p in unet.parameters())
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())  # a user's own processors are left alone
    try:
        with unet_family.cached_cross_attention(unet) as proc:
            assert proc is None
            assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())
    finally:
        unet.set_default_attn_processor()


def test_threads_limits_and_restores():
    from latentlab import _tensors

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with _tensors.threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), _tensors.threads(1):
            raise RuntimeError("restored even on errors")
        assert torch.get_num_threads() == 2
        with _tensors.threads(4):  # never raises the count
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_one_image_widgets_run_their_jobs_on_one_thread():
    from latentlab.widgets import TimestepScrubber, ToyLab
    from latentlab.widgets._base import WorkerPanel

    assert TimestepScrubber.torch_threads == 1 and ToyLab.torch_threads == 1
    seen = []

    class Probe(WorkerPanel):
        torch_threads = 1

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = Probe()
        w.submit(lambda: seen.append(torch.get_num_threads()))
        assert w.wait()
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _count_lookups(monkeypatch, cls):
    """Count ``device``/``dtype`` lookups on the denoiser's class made by latentlab's own code."""
    import sys

    counts = {"device": 0, "dtype": 0}
    for name in counts:
        original = getattr(cls, name)

        def counted(self, _name=name, _original=original):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("latentlab"):
                counts[_name] += 1
            return _original.fget(self)

        monkeypatch.setattr(cls, name, property(counted))
    return counts


def test_a_request_looks_up_device_and_dtype_at_most_once(unet_lab, monkeypatch):
    cond = unet_lab.encode_prompt(["a red star", "a blue ring"])
    z = unet_lab.noise([3, 4])
    plain = unet_lab.generate(z, cond, batch_size=1)
    counts = _count_lookups(monkeypatch, type(unet_lab.denoiser))
    again = unet_lab.generate(z, cond, batch_size=1)  # two compute batches: the engine asks for both facts often
    assert torch.equal(plain, again)
    assert counts == {"device": 1, "dtype": 1}
    unet_lab.noise(7)
    assert counts == {"device": 2, "dtype": 2}
    unet_lab.encode_prompt("a red star")  # cached: needs neither
    assert counts == {"device": 2, "dtype": 2}


def test_pinned_facts_do_not_outlive_the_request(tiny_lab):
    engine = tiny_lab
    with engine.pinned():
        assert engine.dtype == torch.float32
        with engine.pinned():  # nested: the outer lookup
            assert engine.dtype == torch.float32
    engine.denoiser.to(torch.float64)
    try:
        assert engine.dtype == torch.float64  # not a stale answer from the last request
        assert tiny_lab.noise(0).dtype == torch.float64
    finally:
        engine.denoiser.to(torch.float32)


@pytest.mark.parametrize("path", ["tiny_sd_path", "tiny_sd3_path", "tiny_flux_path"])
def test_a_request_asks_the_pipeline_for_its_execution_device_once(request, path, monkeypatch):
    """The pipeline's ``_execution_device`` walks every component (each ``vae.device`` below is one walk); within a
    request it is answered once (two compute batches = two pipeline calls), outside one exactly as diffusers
    does, and the pipeline keeps its class's name (``save_pretrained``/``AutoPipeline`` read it)."""
    from diffusers import DiffusionPipeline

    from latentlab.backend import Lab

    lab = Lab.from_pretrained(request.getfixturevalue(path), device="cpu")
    lab.defaults = lab.defaults.replace(num_inference_steps=2)
    cond, z = lab.encode_prompt(["a red star", "a blue ring"]), lab.noise([3, 4])
    plain = lab.generate(z, cond, batch_size=1)
    pipe = lab.pipeline()
    original = type(pipe).__mro__[1]
    assert type(pipe).__name__ == original.__name__ and type(pipe).__module__ == original.__module__
    assert isinstance(pipe, original) and isinstance(pipe, DiffusionPipeline)
    assert pipe._execution_device == original._execution_device.fget(pipe)  # outside a request: diffusers' answer
    vae_cls = type(lab.pipe.vae)
    asked = []
    wrapped = vae_cls.device

    def counted(self):
        import sys

        if sys._getframe(1).f_globals.get("__name__", "").startswith("diffusers.pipelines"):  # _execution_device
            asked.append(1)
        return wrapped.fget(self)

    monkeypatch.setattr(vae_cls, "device", property(counted))
    again = lab.generate(z, cond, batch_size=1)
    assert torch.equal(plain, again)
    assert len(asked) == 1
    asked.clear()
    assert pipe._execution_device == torch.device("cpu") and len(asked) == 1  # not pinned between requests
    with lab.pinned():
        lab.generate(z, cond, batch_size=1)
        lab.generate(z, cond, batch_size=1)
        assert pipe._execution_device == torch.device("cpu")
    assert len(asked) == 2


@pytest.mark.slow
def test_a_compiled_unet_keeps_its_processors_and_its_frames(tiny_lab):
    """With ``optimize(compile=True)`` the key/value cache is left out: swapping processors every request made dynamo
    recompile the UNet (a compiled preview ran 0.92x the eager one). The frames stay within float reassociation."""
    unet = tiny_lab.pipe.unet
    cond, z = tiny_lab.encode_prompt("a red star"), tiny_lab.noise([0, 1])
    eager = tiny_lab.generate(z, cond, num_inference_steps=2, output_type="latent")
    assert not tiny_lab.compiled
    procs = [type(p) for p in unet.attn_processors.values()]
    tiny_lab.optimize(compile=True)
    assert tiny_lab.compiled and isinstance(tiny_lab.adapter.denoising(tiny_lab), contextlib.nullcontext)
    compiled = tiny_lab.generate(z, cond, num_inference_steps=2, output_type="latent")
    assert torch.allclose(compiled, eager, atol=2e-3)
    assert [type(p) for p in unet.attn_processors.values()] == procs  # never swapped


def test_module_facts_answer_as_diffusers_does_without_its_walks(tiny_lab, monkeypatch):
    """``module_facts`` is diffusers' ``device``/``dtype`` answer: plain, with keep-in-float32 modules (the
    first parameter outside them), and with a diffusers hook (layerwise casting: the compute dtype, not the stored
    one); only the hooked model needs diffusers' own (walking) properties."""
    import copy

    from diffusers import ModelMixin

    from latentlab.backend.engine import module_facts

    unet = copy.deepcopy(tiny_lab.pipe.unet)
    asked = []
    for name in ("device", "dtype"):
        original = getattr(ModelMixin, name)
        monkeypatch.setattr(ModelMixin, name, property(lambda self, _o=original, _n=name: asked.append(_n) or
                                                       _o.fget(self)))

    def diffusers_answer(m):
        n = len(asked)
        out = {"device": m.device, "dtype": m.dtype}
        del asked[n:]
        return out

    assert module_facts(unet) == diffusers_answer(unet) == {"device": torch.device("cpu"), "dtype": torch.float32}
    assert asked == []
    unet.to(torch.bfloat16)
    unet.conv_in.to(torch.float32)
    monkeypatch.setattr(unet, "_keep_in_fp32_modules", ["conv_in"], raising=False)
    assert module_facts(unet) == diffusers_answer(unet) and module_facts(unet)["dtype"] == torch.bfloat16
    monkeypatch.setattr(unet, "_keep_in_fp32_modules", None, raising=False)
    assert module_facts(unet)["dtype"] == diffusers_answer(unet)["dtype"] == torch.float32  # conv_in comes first
    assert asked == []
    hooked = copy.deepcopy(tiny_lab.pipe.unet)
    hooked.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert next(hooked.parameters()).dtype == torch.bfloat16
    assert module_facts(hooked) == diffusers_answer(hooked) and module_facts(hooked)["dtype"] == torch.float32
    assert set(asked) == {"device", "dtype"}  # the hook found: diffusers answered


def test_a_short_prompt_is_encoded_without_touching_logger_levels(tiny_lab, monkeypatch, caplog):
    """Setting a logger's level clears every logger's cache (~1.3 ms a prompt): only a prompt long enough that a text
    encoder might cut it (and log the dropped text) silences the loggers, and they come back as they were."""
    import logging

    calls = []
    original = logging.Logger.setLevel
    monkeypatch.setattr(logging.Logger, "setLevel", lambda self, level: calls.append(self.name) or
                        original(self, level))
    tiny_lab.encode_prompt("sun")  # 5 tokens with start and end (a tokenizer of characters), limit 16
    assert calls == []
    before = {name: logging.getLogger(name).level for name in ("transformers", type(tiny_lab.pipe).__module__)}
    with pytest.warns(UserWarning, match="cut to the text encoder's limit"):
        tiny_lab.encode_prompt(" ".join(["blue"] * 40))
    assert calls and not any("truncated" in r.getMessage() for r in caplog.records)
    assert {name: logging.getLogger(name).level for name in before} == before
