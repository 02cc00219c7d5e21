"""Flow-matching families (SD3 with and without T5, Flux.1 dev and schnell, Chroma, Flux.2 dev and klein) against
the plain diffusers pipelines.

Tiny random pipelines built in-process (tests/conftest.py): every claim of the backend -- noise, generate,
encode/decode, img2img, inpainting, trajectories, inversion, conditioning arithmetic -- is checked against what the
pipeline itself computes, with latents in the VAE's layout everywhere above the backend.
"""

from __future__ import annotations

import pytest
import torch

from latentlab.backend import Conditioning, Lab
from latentlab.backend.families import flux as flux_family
from latentlab.backend.families import flux2 as flux2_family
from latentlab.backend.families.flow import SOLVERS, integrate, model_calls

SIZE = 16  # image pixels (the tiny VAEs have f=2: latents 8x8)


def _plain(lab):
    """A fresh plain pipeline of the same class over the same components (the reference)."""
    return type(lab.pipe)(**lab.pipe.components)


def _size(lab):
    """Image side of the tests: latents of 8 x 8 (the tiny VAEs have f=2; Lumina 2's pipeline needs f=8)."""
    return 8 * lab.vae_scale_factor


def _channels(lab):
    return lab.latent_shape()[0]  # 16 for SD3/Flux.1 and most; the tiny Flux.2 VAEs have 8 (real: 32)


def _theirs(lab, out):
    """A plain pipeline's ``output_type="latent"`` result in the VAE layout, normalised as the denoiser sees it
    (Flux.2 klein returns the VAE's own latents)."""
    if lab.kind == "flux2-klein":
        return lab.adapter.scale(lab.pipe.vae, out)
    return lab.adapter.unpack(out, 8, 8)


def _pipeline_kwargs(lab, cond, guidance):
    """What a user of the plain pipeline passes for these embeddings and this guidance."""
    neg = lab.encode_prompt("").map(lambda t: t.expand(len(cond), *t.shape[1:]))
    if lab.family in ("chroma", "lumina2"):
        cast = (lambda m: m.long()) if lab.family == "lumina2" else (lambda m: m)
        kw = {"prompt_embeds": cond.prompt_embeds, "prompt_attention_mask": cast(cond.attention_mask),
              "guidance_scale": guidance}
        if guidance > 1:
            neg = lab.negative_conditioning("").map(lambda t: t.expand(len(cond), *t.shape[1:]))
            kw.update(negative_prompt_embeds=neg.prompt_embeds,
                      negative_prompt_attention_mask=cast(neg.attention_mask))
        return kw
    if lab.family == "qwenimage":
        kw = {"prompt_embeds": cond.prompt_embeds, "prompt_embeds_mask": cond.attention_mask.long()}
        if guidance > 1:
            neg = lab.negative_conditioning("").map(lambda t: t.expand(len(cond), *t.shape[1:]))
            kw.update(true_cfg_scale=guidance, negative_prompt_embeds=neg.prompt_embeds,
                      negative_prompt_embeds_mask=neg.attention_mask.long())
        return kw
    if lab.family == "flux2":
        kw = {"prompt_embeds": cond.prompt_embeds, "guidance_scale": guidance}
        if lab.kind == "flux2-klein" and guidance > 1:
            kw["negative_prompt_embeds"] = neg.prompt_embeds
        return kw
    kw = {"prompt_embeds": cond.prompt_embeds, "pooled_prompt_embeds": cond.pooled_prompt_embeds}
    if lab.family == "flux" and not lab.pipe.transformer.config.guidance_embeds:
        if guidance > 1:
            kw.update(true_cfg_scale=guidance, negative_prompt_embeds=neg.prompt_embeds,
                      negative_pooled_prompt_embeds=neg.pooled_prompt_embeds)
    else:
        kw["guidance_scale"] = guidance
        if lab.family == "sd3" and guidance > 1:
            kw.update(negative_prompt_embeds=neg.prompt_embeds, negative_pooled_prompt_embeds=neg.pooled_prompt_embeds)
    return kw


def test_families_and_layouts(flow_lab):
    lab = flow_lab
    assert lab.family == lab.kind.split("-")[0]
    assert lab.latent_shape(height=_size(lab), width=_size(lab)) == (_channels(lab), 8, 8)
    assert lab.size_multiple == {"sd3": 2, "lumina2": 16}.get(lab.family, 4)
    prov = lab.provenance()
    assert prov["family"] == lab.family
    assert prov["guidance_mode"] == {"sd3": "cfg", "sd3-no-t5": "cfg", "flux": "embedded",
                                     "flux-schnell": "true_cfg", "chroma": "cfg", "lumina2": "cfg",
                                     "qwenimage": "true_cfg", "flux2": "embedded",
                                     "flux2-klein": "cfg"}[lab.kind]
    assert lab.sampling().scheduler == "FlowMatchEulerDiscreteScheduler"


def test_noise_is_the_pipelines_own_initial_noise(flow_lab):
    lab, seeds = flow_lab, [3, 1, 4]
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    pipe = lab.pipe
    if lab.family == "flux2":  # drawn 2x2-patchified (b, 4C, h/2, w/2), then packed into tokens
        packed, _ = pipe.prepare_latents(3, _channels(lab), _size(lab), _size(lab), torch.float32, "cpu", gens)
        theirs = flux_family.unpack(packed, 8, 8)
        assert torch.equal(pipe._pack_latents(flux2_family.patchify(theirs)), packed)
    elif lab.family == "qwenimage":  # drawn (b, 1, C, h, w): the same numbers as the VAE layout, then packed
        packed = pipe.prepare_latents(3, 16, _size(lab), _size(lab), torch.float32, "cpu", gens)
        theirs = flux_family.unpack(packed, 8, 8)
    elif lab.family in ("flux", "chroma"):
        packed, _ = pipe.prepare_latents(3, 16, _size(lab), _size(lab), torch.float32, "cpu", gens)
        theirs = flux_family.unpack(packed, 8, 8)
        assert torch.equal(flux_family.pack(theirs), packed)
        assert torch.equal(flux_family.pack(theirs), pipe._pack_latents(theirs, 3, 16, 8, 8))
    else:
        theirs = pipe.prepare_latents(3, 16, _size(lab), _size(lab), torch.float32, "cpu", gens)
    assert torch.equal(lab.noise(seeds, height=_size(lab), width=_size(lab)), theirs)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.slow
def test_generate_equals_the_plain_pipeline(flow_lab, guidance):
    lab = flow_lab
    z = lab.noise([1, 2], height=_size(lab), width=_size(lab))
    cond = lab.encode_prompt(["a red star", "a blue ring"])
    ours = lab.generate(z, cond, guidance_scale=guidance, batch_size=2, output_type="latent")
    pipe = _plain(lab)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(latents=lab.adapter.pack(z), height=_size(lab), width=_size(lab), num_inference_steps=3,
                  output_type="latent", **_pipeline_kwargs(lab, cond, guidance)).images
    theirs = _theirs(lab, theirs)
    assert (ours - theirs).abs().max() <= 2e-3
    # ... and the pipeline from the prompt text (its own encoding, its own seeded noise) gives the same image.
    kw = {"guidance_scale": guidance} if lab.family in ("sd3", "chroma", "lumina2", "flux2") or lab.kind == "flux" \
        else {}
    if lab.family == "qwenimage" and guidance > 1:
        kw = {"true_cfg_scale": guidance, "negative_prompt": ""}
    if lab.kind == "flux-schnell" and guidance > 1:
        kw = {"true_cfg_scale": guidance, "negative_prompt": ""}
    if lab.family == "sd3" and guidance > 1:
        kw["negative_prompt"] = ""
    text = pipe(prompt=["a red star", "a blue ring"], height=_size(lab), width=_size(lab), num_inference_steps=3,
                generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="latent", **kw).images
    assert (_theirs(lab, text) - ours).abs().max() <= 2e-3
    images = lab.decode(ours)
    assert images.shape == (2, 3, _size(lab), _size(lab)) and 0 <= images.min() and images.max() <= 1


def test_vae_scaling_matches_the_pipeline(flow_lab):
    lab = flow_lab
    vae = lab.pipe.vae
    z = lab.noise([5], height=_size(lab), width=_size(lab))
    if lab.family == "qwenimage":  # a video VAE (one frame) with per-channel statistics, as QwenImagePipeline
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
        with torch.no_grad():
            theirs = (vae.decode((z * std + mean).unsqueeze(2)).sample[:, :, 0] / 2 + 0.5).clamp(0, 1)
        assert torch.equal(lab.decode(z, batch_size=1), theirs)
        images = torch.rand(2, 3, _size(lab), _size(lab))
        with torch.no_grad():
            post = vae.encode((images * 2 - 1).unsqueeze(2)).latent_dist.mode()[:, :, 0]
        assert torch.allclose(lab.encode(images, batch_size=2), (post - mean) / std, atol=1e-6)
        return
    if lab.family == "flux2":  # batch-norm statistics over the patchified channels, as Flux2Pipeline applies them
        p = flux2_family.patchify(z)
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        with torch.no_grad():
            theirs = (vae.decode(flux2_family.unpatchify(p * std + mean)).sample / 2 + 0.5).clamp(0, 1)
        assert torch.equal(lab.decode(z, batch_size=1), theirs)
        images = torch.rand(2, 3, _size(lab), _size(lab))
        with torch.no_grad():
            ref = lab.pipe._encode_vae_image(images * 2 - 1, None)
        assert torch.allclose(flux2_family.patchify(lab.encode(images, batch_size=2)), ref, atol=1e-6)
        assert lab.vae_scaling_factor == 1.0 and lab.vae_shift_factor == 0.0
        return
    with torch.no_grad():
        theirs = (vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample / 2 + 0.5).clamp(0, 1)
    assert torch.equal(lab.decode(z, batch_size=1), theirs)  # one item per call, as the reference
    images = torch.rand(2, 3, _size(lab), _size(lab))
    with torch.no_grad():
        post = vae.encode(images * 2 - 1).latent_dist.mean
    assert torch.allclose(lab.encode(images, batch_size=2), (post - vae.config.shift_factor) * vae.config.scaling_factor)


@pytest.mark.slow
def test_trajectory_x0_and_final(flow_lab):
    lab = flow_lab
    z = lab.noise([7], height=_size(lab), width=_size(lab))
    cond = lab.encode_prompt("a green square")
    traj = lab.trajectory(z, cond, num_inference_steps=4)
    final = lab.generate(z, cond, num_inference_steps=4, output_type="latent")
    assert traj.latents.shape == traj.x0.shape == (4, 1, _channels(lab), 8, 8)
    assert (traj.latents[-1] - final).abs().max() <= 2e-3  # our Euler loop == the pipeline's
    # The last step goes to sigma 0: its x0 prediction is the final latent.
    assert torch.allclose(traj.x0[-1], traj.latents[-1], atol=1e-5)
    assert traj.timesteps[0] == pytest.approx(1000.0)


@pytest.mark.slow
def test_heun_is_second_order(flow_lab):
    lab = flow_lab
    z = lab.noise([9], height=_size(lab), width=_size(lab))
    cond = lab.encode_prompt("a white ring")
    ref = lab.generate(z, cond, num_inference_steps=200, output_type="latent", guidance_scale=1.0)
    euler = lab.generate(z, cond, num_inference_steps=6, output_type="latent", guidance_scale=1.0)
    heun = lab.generate(z, cond, num_inference_steps=6, output_type="latent", guidance_scale=1.0,
                        scheduler="FlowMatchHeunDiscreteScheduler")
    assert (heun - ref).norm() < (euler - ref).norm()


@pytest.mark.slow
def test_flow_inversion_regenerates_its_source_and_fireflow_beats_euler(flow_lab):
    lab = flow_lab
    cond = lab.encode_prompt("a large red circle")
    source = lab.generate(lab.noise([11], height=_size(lab), width=_size(lab)), cond, output_type="latent")

    def rel(inv):
        return float((inv.reconstruction - source).norm() / source.norm())

    inv = lab.invert(source, cond, num_inference_steps=50)  # plain Euler, guidance 1
    assert rel(inv) < 0.02
    assert inv.noise.shape == source.shape and inv.psnr.shape == (1,)
    # FireFlow at 8 model calls (7 steps) reconstructs at least as well as Euler at 24 calls.
    assert model_calls("fireflow", 7) == 8
    fire = lab.invert(source, cond, num_inference_steps=7, solver="fireflow")
    euler = lab.invert(source, cond, num_inference_steps=24, solver="euler")
    assert rel(fire) <= rel(euler)
    with pytest.raises(ValueError, match=r"`solver` must be one of \('euler', 'heun', 'fireflow'\)"):
        lab.invert(source, cond, solver="ddim")


@pytest.mark.slow
def test_img2img_equals_the_plain_img2img_pipeline(flow_lab):
    import diffusers

    lab = flow_lab
    cond = lab.encode_prompt("a red star")
    z0 = lab.generate(lab.noise([2], height=_size(lab), width=_size(lab)), cond, output_type="latent")
    blue = lab.encode_prompt("a blue star")
    # The flow families' own img2img loop (what Flux.2 runs: diffusers has no Flux.2 img2img pipeline) ...
    s = lab.sampling(guidance_scale=1.0, num_inference_steps=5)
    noise = lab.noise(5, height=_size(lab), width=_size(lab))
    with torch.no_grad():
        own = lab.adapter.img2img(lab, z0, noise, blue, lab.negative_conditioning(""), s, 0.6, None)
    if lab.adapter.own_img2img:
        via_lab = lab.img2img(z0, blue, strength=0.6, seed=5, guidance_scale=1.0, num_inference_steps=5,
                              output_type="latent")
        assert (via_lab - own).abs().max() <= 1e-4  # the same loop at a padded compute batch: float rounding
        # strength 1 starts from pure noise: it is generation from that seed's noise
        full = lab.img2img(z0, blue, strength=1.0, seed=5, guidance_scale=1.0, num_inference_steps=5,
                           output_type="latent")
        gen = lab.generate(noise, blue, guidance_scale=1.0, num_inference_steps=5, output_type="latent")
        assert (full - gen).abs().max() <= 2e-3
        assert (own - z0).abs().mean() < (gen - z0).abs().mean()  # strength 0.6 stays nearer its source
        return
    ours = lab.img2img(z0, lab.encode_prompt("a blue star"), strength=0.6, seed=5, guidance_scale=1.0,
                       num_inference_steps=5, output_type="latent")
    cls = diffusers.StableDiffusion3Img2ImgPipeline if lab.family == "sd3" else diffusers.FluxImg2ImgPipeline
    pipe = cls(**{k: v for k, v in lab.pipe.components.items() if k != "image_encoder" and k != "feature_extractor"})
    pipe.set_progress_bar_config(disable=True)
    kw = _pipeline_kwargs(lab, blue, 1.0)
    theirs = pipe(image=z0, strength=0.6, num_inference_steps=5, height=_size(lab), width=_size(lab),
                  generator=[torch.Generator().manual_seed(5)], output_type="latent", **kw).images
    assert (ours - lab.adapter.unpack(theirs, 8, 8)).abs().max() <= 2e-3
    assert (own - ours).abs().max() <= 2e-3  # ... is diffusers' flow img2img


@pytest.mark.slow
def test_inpaint_keeps_the_unmasked_latents(flow_lab):
    lab = flow_lab
    cond = lab.encode_prompt("a red star")
    z0 = lab.generate(lab.noise([2], height=_size(lab), width=_size(lab)), cond, output_type="latent")
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1

    out = lab.inpaint(z0, lab.encode_prompt("a blue ring"), mask, seed=3, output_type="latent",
                      num_inference_steps=4)
    assert torch.allclose(out[..., :4], z0[..., :4], atol=1e-6)
    assert not torch.allclose(out[..., 4:], z0[..., 4:], atol=1e-3)


def test_conditioning_arithmetic_and_blends(flow_lab):
    lab = flow_lab
    cond = lab.encode_prompt(["a red star", "a blue ring"])
    mid = cond.weighted_sum([0.5, 0.5])
    assert isinstance(mid, Conditioning)
    if cond.pooled_prompt_embeds is not None:
        assert mid.pooled_prompt_embeds.shape == cond.pooled_prompt_embeds[:1].shape
    if cond.attention_mask is not None:  # a blend attends to every token either prompt attends to
        assert torch.equal(mid.attention_mask, cond.attention_mask.amax(0, keepdim=True))
        direction = cond.weighted_sum([1.0, -1.0])  # arithmetic: no cancellation of the mask
        assert torch.equal(direction.attention_mask, cond.attention_mask.amax(0, keepdim=True))
        assert torch.equal(cond.weighted_sum([1.0, 0.0]).attention_mask, cond.attention_mask[:1])  # weight 0: none
    assert torch.allclose(mid.prompt_embeds, cond.prompt_embeds.mean(0, keepdim=True))
    out = lab.generate(lab.noise([1, 1], height=_size(lab), width=_size(lab)), Conditioning.cat([mid, cond[1]]),
                       output_type="latent")
    assert out.shape == (2, _channels(lab), 8, 8) and torch.isfinite(out).all()


def test_flow_models_refuse_what_does_not_apply(flow_lab):
    lab = flow_lab
    cond = lab.encode_prompt("a red star")
    with pytest.raises(ValueError, match=r"`scheduler` must be a flow-matching scheduler .* got 'DDIMScheduler'"):
        lab.generate(lab.noise([1], height=_size(lab), width=_size(lab)), cond, scheduler="DDIMScheduler")
    with pytest.raises(ValueError, match=rf"`latents` must have shape \(batch, {_channels(lab)}, h, w\), "
                                         r"got \(1, 4, 8, 8\)"):
        lab.generate(torch.zeros(1, 4, 8, 8), cond)
    bad = 17 if lab.family == "sd3" else 18
    with pytest.raises(ValueError, match=rf"`width` must be a multiple of (the VAE factor )?{lab.size_multiple}\b.*got {bad}"):
        lab.noise([1], height=_size(lab), width=bad)
    if lab.adapter.needs_pooled:
        with pytest.raises(ValueError, match="pooled_prompt_embeds"):
            lab.generate(lab.noise([1], height=_size(lab), width=_size(lab)), Conditioning(cond.prompt_embeds))
    if lab.adapter.needs_mask:
        with pytest.raises(ValueError, match="attention_mask"):
            lab.generate(lab.noise([1], height=_size(lab), width=_size(lab)), Conditioning(cond.prompt_embeds))
        with pytest.raises(ValueError, match=r"`attention_mask` must have the shape \(batch, tokens\)"):
            Conditioning(cond.prompt_embeds, attention_mask=cond.attention_mask[:, :5])


def test_unet_models_refuse_flow_schedulers(tiny_lab):
    with pytest.raises(ValueError, match=r"'FlowMatchEulerDiscreteScheduler' is a flow-matching scheduler"):
        tiny_lab.sampling(scheduler="FlowMatchEulerDiscreteScheduler")


def test_an_unsupported_pipeline_is_named(tiny_sd_path):
    from latentlab.backend.families import adapter_for

    class WanPipeline:  # stands for any pipeline class latentlab does not speak
        pass

    with pytest.raises(TypeError, match=r"does not support WanPipeline models; supported pipelines: "
                                        r"StableDiffusionPipeline, .*FluxPipeline"):
        adapter_for(WanPipeline())


def test_solvers_on_a_known_ode():
    """dx/dsigma = -x has the solution x(s) = x(1) e^(1 - s): orders of accuracy seen directly."""
    x1 = torch.ones(1)
    exact = torch.exp(torch.tensor(1.0))
    err = {}
    for solver in SOLVERS:
        err[solver] = [abs(float(integrate(lambda x, s: -x, x1, torch.linspace(1, 0, n + 1), solver=solver)) - exact)
                       for n in (8, 16)]
    assert err["euler"][0] / err["euler"][1] == pytest.approx(2, rel=0.15)  # first order
    for solver in ("heun", "fireflow"):
        assert err[solver][0] / err[solver][1] == pytest.approx(4, rel=0.25)  # second order
        assert err[solver][1] < err["euler"][1] / 10


def test_lab_loads_every_family_from_a_folder(tiny_sd3_path, tiny_flux_path, tiny_flux2_path, tiny_flux2_klein_path,
                                             tiny_chroma_path, tiny_lumina2_path):
    for path, family in ((tiny_sd3_path, "sd3"), (tiny_flux_path, "flux"), (tiny_flux2_path, "flux2"),
                         (tiny_flux2_klein_path, "flux2"), (tiny_chroma_path, "chroma"),
                         (tiny_lumina2_path, "lumina2")):
        lab = Lab.from_pretrained(path, device="cpu")
        assert lab.family == family and lab.model_id == str(path)


@pytest.mark.slow
def test_cli_renders_flow_models_at_any_size_and_recreates_frames(tiny_flux_path, tiny_sd3_path, tiny_flux2_path,
                                                                  tiny_chroma_path, tiny_lumina2_path,
                                                                  tiny_qwenimage_path, tmp_path, capsys):
    import json

    from latentlab.cli import main

    cases = ((tiny_flux_path, (16, 24)), (tiny_sd3_path, (12, 18)), (tiny_flux2_path, (24, 16)),
             (tiny_chroma_path, (16, 16)), (tiny_lumina2_path, (64, 96)), (tiny_qwenimage_path, (16, 24)))
    for i, (path, (h, w)) in enumerate(cases):
        out = tmp_path / f"{path.parent.name}.mp4"
        interp = "lerp" if i % 2 else "mix"  # the default (prediction mixing) and the encodings' interpolation
        assert main(["morph", "a red star", "a blue ring", "--model", str(path), "--frames", "4", "--steps", "2",
                     "--height", str(h), "--width", str(w), "--workers", "1", "--prompt-interp", interp,
                     "-o", str(out)]) == 0
        man = json.loads((tmp_path / f"{out.name}.json").read_text())
        assert man["settings"]["height"] == h and man["settings"]["width"] == w
        lab = Lab.from_pretrained(path, device="cpu")
        assert man["backend"]["family"] == lab.family and "guidance_mode" in man["backend"]
        assert man["schedule"] == lab.schedule(height=h, width=w, sampling=lab.sampling(num_inference_steps=2))
        if lab.family != "sd3":  # the dynamic shift of this image size (Flux.2: and step count) is recorded
            assert man["schedule"]["mu"] == pytest.approx(lab.adapter.mu(lab.pipe, h // 2, w // 2, 2))
        frame = tmp_path / f"{path.parent.name}-2.png"
        assert main(["frame", str(tmp_path / f"{out.name}.json"), "2", "-o", str(frame)]) == 0
        export = tmp_path / f"{path.parent.name}-export"
        assert main(["export", str(tmp_path / f"{out.name}.json"), "-o", str(export)]) == 0
        from latentlab import exports

        lab = Lab.from_pretrained(path, device="cpu")
        lat = exports.read_comfyui_latent(next(export.glob("*.latent")), scaling_factor=lab.vae_scaling_factor,
                                          shift_factor=lab.vae_shift_factor)
        f, c = lab.vae_scale_factor, lab.latent_shape()[0]
        # ComfyUI's Flux.2 latents are the 128 patchified channels (4 x 32; 4 x 8 in the tiny model) at f x 2.
        shape = (4, 4 * c, h // f // 2, w // f // 2) if lab.family == "flux2" else (4, c, h // f, w // f)
        assert lat.shape == shape
        if interp == "mix":  # no single conditioning per frame: said, not written
            assert not (export / "conditioning.safetensors").exists()
            assert "conditioning.safetensors not written" in capsys.readouterr().err
        else:
            conds = exports.read_comfyui_conditioning(export / "conditioning.safetensors")
            assert len(conds) == 4 and ("attention_mask" in conds[0][1]) == lab.adapter.needs_mask
        walk = tmp_path / f"{path.parent.name}-walk.mp4"
        assert main(["walk", "a red star", "--seeds", "1", "2", "--model", str(path), "--frames", "4", "--steps",
                     "2", "--height", str(h), "--width", str(w), "--workers", "1", "-o", str(walk)]) == 0
        grid = tmp_path / f"{path.parent.name}-grid.png"
        assert main(["grid", "a red star", "--seeds", "1", "2", "--model", str(path), "--steps", "2",
                     "--height", str(h), "--width", str(w), "-o", str(grid)]) == 0
        assert json.loads((tmp_path / f"{grid.name}.json").read_text())["height"] == h
    capsys.readouterr()
    # A size that is not a multiple of the model's factor: exit 2, one line naming the option and the factor.
    code = main(["morph", "a red star", "a blue ring", "--model", str(tiny_flux_path), "--width", "18",
                 "-o", str(tmp_path / "bad.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and "--width must be a multiple of 4" in err and "flux" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad.mp4").exists()


def test_python_m_latentlab_works_like_the_script():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "latentlab", "info"], capture_output=True, text=True, check=True)
    assert "model families: sd (StableDiffusionPipeline)" in out.stdout and "flux (FluxPipeline)" in out.stdout


@pytest.mark.parametrize("model", ["tiny_flux_path", "tiny_chroma_path", "tiny_flux2_path"])
@pytest.mark.slow
def test_atlas_and_widgets_work_on_a_flow_model(model, request, tmp_path):
    """The layers above the backend see a Flux model through the Backend protocol like any other."""
    from fakes import FakeCLIP

    from latentlab.atlas import Atlas, build_atlas
    from latentlab.widgets import Interpolator, SeedBrowser

    lab = Lab.from_pretrained(request.getfixturevalue(model), device="cpu")
    c = lab.latent_shape()[0]
    lab.defaults = lab.defaults.replace(num_inference_steps=2)
    lab.default_size = lambda: (SIZE, SIZE)  # the tiny model's native size (Flux's default is 1024)
    atlas = build_atlas(lab, ["a red star", "a blue ring"], [1, 2], clip=FakeCLIP(), thumbnail=16, progress=False)
    assert atlas.noise.shape == (4, c, 8, 8)
    assert sum(torch.equal(atlas.noise[i:i + 1], lab.noise(2)) for i in range(4)) == 2  # the model's own noise
    path = atlas.save(tmp_path / "atlas.safetensors")
    assert Atlas.load(path).noise.shape == (4, c, 8, 8)
    browser = SeedBrowser(lab, "a red star", page_size=4)
    assert browser.wait()
    interp = Interpolator(lab, ("a red star", 1), ("a blue ring", 2), clip=None, frames=4)
    assert interp.wait()
    from latentlab.widgets import Arithmetic, AtlasExplorer, DirectionSliders

    sliders = DirectionSliders.from_atlas(lab, atlas, "a red star", 1, n_components=2,
                                          prompt_pairs=[("a blue ring", "a red star")])
    assert sliders.wait()
    base = sliders.image.value
    sliders.sliders[next(iter(sliders.sliders))].value = 2.0
    assert sliders.wait() and sliders.image.value != base
    arith = Arithmetic(lab, ("a red star", 1), ("a red ring", 2), ("a blue ring", 3))
    assert arith.wait() and arith.result.value and "z-score" in arith.score.value
    explorer = AtlasExplorer(lab, atlas, space="noise", method="pca", path_frames=4, output_dir=tmp_path)
    assert explorer.wait()
    z, cond, _ = explorer.point_inputs((0.0, 0.0))
    assert z.shape == (1, c, 8, 8) and (cond.pooled_prompt_embeds is not None) == lab.adapter.needs_pooled
    explorer.render_path([explorer.coords[0].tolist(), explorer.coords[3].tolist()])
    assert explorer.wait() and (tmp_path / "atlas-path-1.mp4").exists()  # a path on the map became a morph


def test_embedded_models_by_name():
    from latentlab import embedded

    assert embedded.NAMES == ("embedded-shapes", "embedded-shapes-flow", "embedded-shapes-fast")
    assert embedded.model_path("embedded-shapes") == embedded.model_path()
    assert embedded.resolve("latentlab/embedded-shapes") == "embedded-shapes" and embedded.resolve("x") is None
    with pytest.raises(ValueError, match=r"`name` must be one of embedded-shapes, embedded-shapes-flow, "
                                         r"embedded-shapes-fast, got 'shapes'"):
        embedded.model_path("shapes")
    lab = Lab.from_pretrained("embedded-shapes")
    assert lab.model_id == "latentlab/embedded-shapes" and lab.defaults.num_inference_steps == 20
    if embedded.is_available("embedded-shapes-fast"):
        fast = Lab.from_pretrained("latentlab/embedded-shapes-fast")
        assert (fast.defaults.num_inference_steps, fast.defaults.guidance_scale) == embedded.SAMPLING[
            "embedded-shapes-fast"]
        assert fast.latent_shape() == lab.latent_shape()  # the same latent space: previews of the default model


def test_sd3_without_t5_runs_its_empty_t5_tokens_as_one(tiny_sd3_path):
    """The 256 zero 'T5' tokens of a T5-free SD3 are run as one token with a log-256 attention bias: the same
    images (parity test above, within 2e-3) from 17 context tokens instead of 272; the processors are restored."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    lab = Lab.from_pretrained(tiny_sd3_path, device="cpu", text_encoder_3=None, tokenizer_3=None)
    seen = []
    hook = lab.pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"].shape[1]), with_kwargs=True)
    try:
        lab.generate(lab.noise([1], height=SIZE, width=SIZE), lab.encode_prompt("a red star"), num_inference_steps=2)
    finally:
        hook.remove()
    assert seen == [17, 17]
    assert all(type(p) is JointAttnProcessor2_0 for p in lab.pipe.transformer.attn_processors.values())


def test_flow_trajectory_reports_each_step_as_it_ends(flow_lab):
    lab = flow_lab
    z = lab.noise([7, 8], height=_size(lab), width=_size(lab))
    cond = lab.encode_prompt(["a green square", "a red star"])
    seen = []
    traj = lab.trajectory(z, cond, num_inference_steps=3, on_step=lambda i, s, lat, x0: seen.append((i, s, lat, x0)))
    assert [(i, s) for i, s, _, _ in seen] == [(0, 0), (1, 0), (2, 0)]
    for i, _, lat, x0 in seen:
        torch.testing.assert_close(lat, traj.latents[i], rtol=0, atol=0)
        torch.testing.assert_close(x0, traj.x0[i], rtol=0, atol=0)
