"""ONNX Runtime for the UNet's steps (Lab.optimize(onnx=True), --onnx): the same frames as plain diffusers within the
issue's 2e-3, ONNX Runtime really runs them, anything the export does not cover falls back to torch, and renders
(forked workers included) work and record it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from latentlab.backend import AttentionMix, Lab
from latentlab.backend.families import onnx_unet as ort

PROMPTS = ("a large red circle on a blue background", "a small yellow star on a black background")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTLAB_CACHE", str(tmp_path / "cache"))


def _runner(lab) -> ort.OnnxUNet:
    return ort.OnnxUNet.of(lab.pipe.unet)


def test_frames_equal_plain_diffusers_within_2e3_and_onnx_runtime_ran_them():
    lab = Lab.default().optimize(onnx=True)
    z = lab.noise([1, 2, 3, 4])
    cond = lab.encode_prompt([PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1]])
    neg = lab.negative_conditioning("")
    ours = lab.generate(z, cond, batch_size=4)
    pipe = Lab.default().pipe  # a fresh, plain pipeline
    theirs = pipe(prompt_embeds=cond.prompt_embeds, negative_prompt_embeds=neg.prompt_embeds.expand(4, -1, -1),
                  latents=z.clone(), num_inference_steps=lab.defaults.num_inference_steps,
                  guidance_scale=lab.defaults.guidance_scale, output_type="pt").images
    diff = float((ours - theirs).abs().max())
    assert 0 < diff <= 2e-3  # not bit for bit (other kernels), but within float rounding
    run = _runner(lab)
    assert run.calls == lab.defaults.num_inference_steps and run.fallbacks == 0
    assert lab.provenance()["optimizations"] == [f"onnxruntime:{ort.version()}"]


def test_attention_interpolation_and_other_sizes_run_on_onnx_runtime(tiny_sd_path):
    plain = Lab.from_pretrained(tiny_sd_path, device="cpu")
    lab = Lab.from_pretrained(tiny_sd_path, device="cpu").optimize(onnx=True)
    a, b = plain.encode_prompt(["a red star"] * 3), plain.encode_prompt(["a blue ring"] * 3)
    mix = AttentionMix(a, b, torch.tensor([0.0, 0.3, 1.0]))
    for z in (plain.noise([5, 6, 7]), plain.noise([5, 6, 7], height=32, width=24)):
        want = plain.generate(z, mix, num_inference_steps=3, output_type="latent")
        got = lab.generate(z, mix, num_inference_steps=3, output_type="latent")
        assert float((want - got).abs().max()) < 1e-4
    assert _runner(lab).calls == 6 and _runner(lab).fallbacks == 0
    want = plain.generate(plain.noise(1), a[0], num_inference_steps=3, output_type="latent")
    assert float((lab.generate(plain.noise(1), a[0], num_inference_steps=3, output_type="latent") - want
                  ).abs().max()) < 1e-4


def test_what_the_export_does_not_cover_runs_the_unets_own_forward(tiny_sd_path):
    lab = Lab.from_pretrained(tiny_sd_path, device="cpu").optimize(onnx=True)
    unet, run = lab.pipe.unet, _runner(lab)
    x, emb = torch.randn(2, 4, 8, 8), lab.encode_prompt(["a red star", "a blue ring"]).prompt_embeds
    with torch.no_grad():
        fast = unet(x, 10, encoder_hidden_states=emb).sample
        assert run.calls == 1
        own = type(unet).forward(unet, x, 10, encoder_hidden_states=emb).sample
    assert float((fast - own).abs().max()) < 1e-4
    grad = unet(x, 10, encoder_hidden_states=emb).sample  # autograd: torch
    assert grad.requires_grad and run.fallbacks == 1
    with torch.no_grad():
        unet(x, 10, encoder_hidden_states=emb, cross_attention_kwargs={"scale": 0.5})  # a LoRA scale: torch
        assert run.fallbacks == 2
        unet.conv_in.weight.mul_(1.5)  # the weights changed after the export (a LoRA fused, training): torch
        changed = unet(x, 10, encoder_hidden_states=emb).sample
        assert run.fallbacks == 3 and run.calls == 1
        assert torch.equal(changed, type(unet).forward(unet, x, 10, encoder_hidden_states=emb).sample)


def test_a_copy_of_an_optimized_unet_runs_its_own_weights(tiny_sd_path):
    import copy

    lab = Lab.from_pretrained(tiny_sd_path, device="cpu").optimize(onnx=True)
    unet = lab.pipe.unet
    twin = copy.deepcopy(unet)
    assert ort.OnnxUNet.of(twin) is None and ort.OnnxUNet.of(unet) is _runner(lab)
    x, emb = torch.randn(2, 4, 8, 8), lab.encode_prompt(["a red star", "a blue ring"]).prompt_embeds
    with torch.no_grad():
        twin.conv_in.bias.add_(0.5)  # a user's change to the copy: the copy must show it
        assert torch.equal(twin(x, 10, encoder_hidden_states=emb).sample,
                           type(twin).forward(twin, x, 10, encoder_hidden_states=emb).sample)
        unet(x, 10, encoder_hidden_states=emb)
    assert _runner(lab).calls == 1 and _runner(lab).fallbacks == 0  # the original still runs on ONNX Runtime
    _runner(lab).remove()
    assert "forward" not in unet.__dict__ and ort.OnnxUNet.of(unet) is None


def test_the_export_is_cached_by_the_weights(tiny_sd_path, monkeypatch):
    lab = Lab.from_pretrained(tiny_sd_path, device="cpu").optimize(onnx=True)
    files = list(ort.cache_folder().glob("unet-*.onnx"))
    assert len(files) == 1 and files[0].read_bytes() == _runner(lab).model
    monkeypatch.setattr(ort, "_export", lambda unet: pytest.fail("exported again"))
    Lab.from_pretrained(tiny_sd_path, device="cpu").optimize(onnx=True)  # the same weights: from the cache
    other = Lab.from_pretrained(tiny_sd_path, device="cpu")
    with torch.no_grad():
        other.pipe.unet.conv_in.bias.add_(0.1)
    with pytest.raises(pytest.fail.Exception, match="exported again"):
        other.optimize(onnx=True)  # other weights: another export


def test_a_damaged_cache_file_is_exported_again(tiny_sd_path):
    lab = Lab.from_pretrained(tiny_sd_path, device="cpu").optimize(onnx=True)
    good = _runner(lab).model
    (path,) = ort.cache_folder().glob("unet-*.onnx")
    path.write_bytes(good[: len(good) // 2])  # cut short (a full disk, a user's tool)
    again = Lab.from_pretrained(tiny_sd_path, device="cpu").optimize(onnx=True)
    image = again.generate(again.noise(0), again.encode_prompt("a red star"), num_inference_steps=2)
    assert _runner(again).calls == 2 and torch.isfinite(image).all()
    assert path.read_bytes() == good  # repaired


def test_optimize_refuses_what_it_cannot_run_before_any_export(tiny_sd_path, tiny_sd3_path, tiny_sdxl_path,
                                                               monkeypatch):
    monkeypatch.setattr(ort, "_export", lambda unet: pytest.fail("exported"))
    with pytest.raises(ValueError, match="`onnx=True` runs SD 1.x/2.x-style UNets; this is a sd3 model"):
        Lab.from_pretrained(tiny_sd3_path, device="cpu").optimize(onnx=True)
    with pytest.raises(ValueError, match="conditioned by text alone; this one also takes text_time"):
        Lab.from_pretrained(tiny_sdxl_path, device="cpu").optimize(onnx=True)
    with pytest.raises(ValueError, match="float32 models on the CPU; this one is torch.bfloat16"):
        Lab.from_pretrained(tiny_sd_path, device="cpu", dtype=torch.bfloat16).optimize(onnx=True)
    cache = ort.cache_folder().parent
    monkeypatch.undo()
    monkeypatch.setenv("LATENTLAB_CACHE", str(cache))
    lab = Lab.from_pretrained(tiny_sd_path, device="cpu").optimize(onnx=True)
    with pytest.raises(ValueError, match="already runs on ONNX Runtime"):
        lab.optimize(compile=True)
    lab.optimize(onnx=True)  # twice: once
    assert lab.provenance()["optimizations"] == [f"onnxruntime:{ort.version()}"]
    monkeypatch.setattr(ort, "available", lambda: False)
    with pytest.raises(ImportError, match=r'pip install "latentlab\[onnx\]"'):
        Lab.from_pretrained(tiny_sd_path, device="cpu").optimize(onnx=True)


def test_a_render_with_worker_processes_on_onnx_runtime_matches_torch_and_records_it(tmp_path):
    from latentlab.morph import (
        Keyframe,
        MorphSettings,
        cache_dir,
        manifest_path,
        read_manifest,
        render_frame,
        render_morph,
    )
    from latentlab.sampling import Sampling
    from latentlab.store import load

    settings = MorphSettings(keyframes=(Keyframe(PROMPTS[0], 0), Keyframe(PROMPTS[1], 0)), n_frames=8,
                             sampling=Sampling(num_inference_steps=6))
    plain = render_morph(Lab.default(), settings, tmp_path / "plain.gif", progress=False, keep_cache=True,
                         batch_size=4)
    lab = Lab.default().optimize(onnx=True)
    lab.generate(lab.noise(0), lab.encode_prompt(PROMPTS[0]), num_inference_steps=1)  # this process has a session
    assert _runner(lab).calls == 1
    out = render_morph(lab, settings, tmp_path / "onnx.gif", progress=False, keep_cache=True, workers=2,
                       batch_size=4)  # the forked workers make their own
    a, b = (read_manifest(manifest_path(p)) for p in (plain, out))
    assert b["backend"]["optimizations"] == [f"onnxruntime:{ort.version()}"] and b["workers"]["processes"] == 2
    fa = np.stack([load(cache_dir(plain) / f"{f['key']}.safetensors")[0]["frame"].numpy() for f in a["frames"]])
    fb = np.stack([load(cache_dir(out) / f"{f['key']}.safetensors")[0]["frame"].numpy() for f in b["frames"]])
    assert {f["key"] for f in a["frames"]}.isdisjoint(f["key"] for f in b["frames"])  # the cache keys know
    assert np.abs(fa.astype(int) - fb.astype(int)).max() <= 1  # uint8 frames: at most one level of rounding
    frame = render_frame(lab, json.loads(json.dumps(b)), 3)  # re-created on ONNX Runtime, in this process
    assert np.array_equal((frame[0].permute(1, 2, 0) * 255).round().byte().numpy(), fb[3])
    with pytest.warns(RuntimeWarning, match=r"optimizations \['onnxruntime'\], this model runs none"):
        render_frame(Lab.default(), b, 3)
