"""Lab over a tiny in-process Stable Diffusion pipeline: shapes from configs, parity with plain diffusers."""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["a red star", "a blue ring", "a red star"]


def test_shapes_come_from_the_configs(tiny_lab):
    assert tiny_lab.vae_scale_factor == 2
    assert tiny_lab.default_size() == (16, 16)
    assert tiny_lab.latent_shape() == (4, 8, 8)
    assert tiny_lab.latent_shape(height=24, width=32) == (4, 12, 16)
    assert tiny_lab.noise([1, 2]).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"`height` must be a multiple of the VAE factor 2, got 15"):
        tiny_lab.latent_shape(height=15)


def test_generate_equals_plain_diffusers_call_bit_for_bit(tiny_lab, tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    z = tiny_lab.noise([1, 2, 3])
    # batch_size=3: one call of exactly the pipeline's batch (by default, CPU calls are padded to CPU_BATCH_SIZE items).
    ours = tiny_lab.generate(z, tiny_lab.encode_prompt(PROMPTS), num_inference_steps=3, guidance_scale=3.0,
                             batch_size=3)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, latents=z, num_inference_steps=3, guidance_scale=3.0, output_type="pt").images
    assert ours.shape == (3, 3, 16, 16) and ours.dtype == torch.float32
    assert torch.equal(ours, theirs)


def test_seeded_generation_is_reproducible_and_bitwise_batch_size_independent(tiny_lab):
    # 20 items: more than one padded call at the CPU default batch size.
    seeds, prompts = list(range(5, 25)), list("abcdefghijklmnopqrst")
    z, cond = tiny_lab.noise(seeds), tiny_lab.encode_prompt(prompts)
    a = tiny_lab.generate(z, cond)
    assert torch.equal(a, tiny_lab.generate(tiny_lab.noise(seeds), cond))
    # Alone, in threes, or shuffled among the others: the same bits for the same seed (CPU calls padded to CPU_BATCH_SIZE).
    for i in (0, 7, 19):
        alone = tiny_lab.generate(tiny_lab.noise(seeds[i]), tiny_lab.encode_prompt(prompts[i]))
        assert torch.equal(alone[0], a[i])
    assert torch.equal(tiny_lab.generate(z[2:5], cond[2:5]), a[2:5])
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiny_lab.generate(z[perm], cond[perm]), a[perm])
    # Prompt encodings do not depend on which prompts were encoded together either.
    fresh = type(tiny_lab)(pipe=tiny_lab.pipe, model_id="x")
    assert torch.equal(fresh.encode_prompt(["j", "a"]).prompt_embeds, cond[[9, 0]].prompt_embeds)


def test_without_padding_batch_size_changes_float_rounding_only(tiny_lab):
    """What batch invariance buys: unpadded batches of different sizes may differ in the last float bits."""
    tiny_lab.batch_invariant = False
    z, cond = tiny_lab.noise([5, 6, 7, 8]), tiny_lab.encode_prompt(["a", "b", "c", "d"])
    a = tiny_lab.generate(z, cond)
    one_by_one = tiny_lab.generate(z, cond, batch_size=1)
    torch.testing.assert_close(one_by_one, a, rtol=0, atol=1e-5)


def test_out_of_memory_halves_the_batch_and_remembers(tiny_lab, monkeypatch):
    tiny_lab.batch_invariant = False
    sizes = []
    original = tiny_lab.pipe.__call__

    def fake_pipe(*args, **kwargs):
        sizes.append(kwargs["latents"].shape[0])
        if kwargs["latents"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(type(tiny_lab.pipe), "__call__", lambda self, *a, **k: fake_pipe(*a, **k))
    z, cond = tiny_lab.noise([1, 2, 3, 4, 5]), tiny_lab.encode_prompt("a")
    tiny_lab.batch_size = None
    with pytest.warns(RuntimeWarning, match="out of memory: retrying with batch_size=2"):
        out = tiny_lab.generate(z, cond)
    assert out.shape[0] == 5 and sizes[:3] == [5, 2, 2] and tiny_lab._auto_batch == 2


def test_prompt_encodings_are_cached(tiny_lab, monkeypatch):
    calls = []
    original = tiny_lab.pipe.encode_prompt
    monkeypatch.setattr(tiny_lab.pipe, "encode_prompt", lambda p, *a, **k: calls.append(list(p)) or original(p, *a, **k))
    first = tiny_lab.encode_prompt("a red star")
    again = tiny_lab.encode_prompt(["a blue ring", "a red star", "a blue ring"])
    assert calls == [["a red star"], ["a blue ring"]]  # each distinct prompt encoded once
    assert first.prompt_embeds.shape == (1, 16, 16) and len(again) == 3
    assert torch.equal(again.prompt_embeds[1], first.prompt_embeds[0])


def test_vae_round_trip_and_errors(tiny_lab):
    images = torch.rand(2, 3, 16, 16)
    z = tiny_lab.encode(images)
    assert z.shape == (2, 4, 8, 8)
    assert tiny_lab.decode(z).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"`images` must have 3 channels"):
        tiny_lab.encode(torch.rand(2, 4, 16, 16))
    with pytest.raises(ValueError, match=r"`latents` must have shape \(batch, 4, h, w\), got \(1, 3, 8, 8\)"):
        tiny_lab.generate(torch.zeros(1, 3, 8, 8), tiny_lab.encode_prompt("x"))
    with pytest.raises(ValueError, match=r"`conditioning` must have 1 or 2 items"):
        tiny_lab.generate(tiny_lab.noise([1, 2]), tiny_lab.encode_prompt(["a", "b", "c"]))


def test_sdxl_layout_pooled_embeds_and_parity(tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline

    from latentlab.backend import Lab

    lab = Lab.from_pretrained(tiny_sdxl_path, device="cpu")
    assert lab.family == "sdxl" and lab.latent_shape() == (4, 8, 8)
    cond = lab.encode_prompt(["a red star", "a blue ring"])
    assert cond.prompt_embeds.shape == (2, 16, 32) and cond.pooled_prompt_embeds.shape == (2, 16)
    z = lab.noise([1, 2])
    ours = lab.generate(z, cond, num_inference_steps=3, guidance_scale=3.0, batch_size=2)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    # Given the same embeddings the pipeline computes the same bits. (Prompts are encoded one per text-encoder call
    # for batch invariance; the pipeline encodes its batch at once: equal to float rounding, checked below.)
    theirs = pipe(prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled_prompt_embeds, latents=z,
                  num_inference_steps=3, guidance_scale=3.0, output_type="pt").images
    assert ours.shape == (2, 3, 16, 16)
    assert torch.equal(ours, theirs)
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt(["a red star", "a blue ring"], device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.prompt_embeds, emb, rtol=0, atol=1e-5)
    torch.testing.assert_close(cond.pooled_prompt_embeds, pooled, rtol=0, atol=1e-5)


def test_trajectory_x0_satisfies_the_ddim_update(tiny_lab):
    """With deterministic DDIM, every step is x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, where
    eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t): the captured x0 must satisfy it at every step."""
    z = tiny_lab.noise([3, 4])
    traj = tiny_lab.trajectory(z, tiny_lab.encode_prompt(["a red star", "a blue ring"]), num_inference_steps=5,
                               guidance_scale=3.0)
    assert traj.latents.shape == traj.x0.shape == (5, 2, 4, 8, 8) and len(traj.timesteps) == 5
    sched = tiny_lab.pipe.scheduler
    ac = sched.alphas_cumprod.double()
    step = sched.config.num_train_timesteps // 5
    x_t = z.double()
    for i, t in enumerate(traj.timesteps):
        a_t = ac[int(t)]
        prev = int(t) - step
        a_prev = ac[prev] if prev >= 0 else sched.final_alpha_cumprod.double()
        x0 = traj.x0[i].double()
        eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        torch.testing.assert_close(traj.latents[i].double(), expected, rtol=1e-4, atol=1e-4)
        x_t = traj.latents[i].double()
    same = tiny_lab.generate(z, tiny_lab.encode_prompt(["a red star", "a blue ring"]), num_inference_steps=5,
                             guidance_scale=3.0)
    assert torch.equal(traj.images, same)


# --- latent edits -------------------------------------------------------------------------------------------------


def _plain_img2img(pipe_cls, path, z0, seeds, cond, **kw):
    pipe = pipe_cls.from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    extra = {} if cond.pooled_prompt_embeds is None else {"pooled_prompt_embeds": cond.pooled_prompt_embeds}
    return pipe(prompt_embeds=cond.prompt_embeds, image=z0, generator=[torch.Generator().manual_seed(s) for s in seeds],
                output_type="pt", **extra, **kw).images


@pytest.mark.parametrize("layout", ["sd", "sdxl"])
def test_img2img_equals_the_diffusers_img2img_pipeline(layout, tiny_sd_path, tiny_sdxl_path):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    from latentlab.backend import Lab

    path, cls = (tiny_sd_path, StableDiffusionImg2ImgPipeline) if layout == "sd" else (
        tiny_sdxl_path, StableDiffusionXLImg2ImgPipeline)
    lab = Lab.from_pretrained(path, device="cpu")
    z0 = lab.encode(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    cond = lab.encode_prompt(["a red star", "a blue ring"])
    ours = lab.img2img(z0, cond, strength=0.6, seed=[3, 4], num_inference_steps=5, guidance_scale=3.0, batch_size=2)
    theirs = _plain_img2img(cls, path, z0, [3, 4], cond, strength=0.6, num_inference_steps=5, guidance_scale=3.0)
    assert torch.equal(ours, theirs)


def test_img2img_strength_controls_how_much_of_the_image_survives(tiny_lab):
    z0 = tiny_lab.encode(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    cond = tiny_lab.encode_prompt("a red star")
    dist = [(tiny_lab.img2img(z0, cond, strength=s, seed=0, num_inference_steps=10, output_type="latent") - z0)
            .norm().item() for s in (0.1, 0.5, 1.0)]
    assert dist[0] < dist[1] < dist[2]
    with pytest.raises(ValueError, match=r"`strength` must be in \(0, 1\], got 0"):
        tiny_lab.img2img(z0, cond, strength=0)
    with pytest.raises(ValueError, match=r"`strength` 0.05 x `num_inference_steps` 10 runs no step"):
        tiny_lab.img2img(z0, cond, strength=0.05, num_inference_steps=10)
    with pytest.raises(ValueError, match=r"`seed` must be an int .* or 1 ints, got \[1, 2\]"):
        tiny_lab.img2img(z0, cond, seed=[1, 2])


def test_inpaint_keeps_the_unmasked_latent_exactly_and_changes_the_masked_part(tiny_lab):
    z0 = tiny_lab.encode(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)))
    cond = tiny_lab.encode_prompt(["a red star", "a blue ring"])
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:] = 1  # right half of the image = right half of the 8x8 latent
    out = tiny_lab.inpaint(z0, cond, mask, seed=5, num_inference_steps=6, output_type="latent")
    assert torch.equal(out[..., :4], z0[..., :4])
    assert (out[..., 4:] - z0[..., 4:]).abs().mean() > 0.1
    with pytest.raises(ValueError, match=r"`mask` must be image-sized \(16, 16\) or latent-sized \(8, 8\), got \(4, 4\)"):
        tiny_lab.inpaint(z0, cond, torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"`mask` values must be in \[0, 1\]"):
        tiny_lab.inpaint(z0, cond, torch.full((1, 1, 8, 8), 2.0))


@pytest.mark.slow
def test_ddim_inversion_round_trip_on_the_embedded_model():
    """On a trained model (a random tiny UNet is no smooth denoiser, so inversion says little there)."""
    from latentlab.backend import Lab
    from latentlab.embedded import world

    lab = Lab.default()
    b = world.sample(3, seed=5, prompts=world.held_out_prompts())
    z0, cond = lab.encode(b.images), lab.encode_prompt(b.captions)
    coarse = lab.invert(z0, cond, num_inference_steps=10)
    fine = lab.invert(z0, cond, num_inference_steps=50)
    assert fine.noise.shape == fine.reconstruction.shape == z0.shape and fine.images.shape == (3, 3, 64, 64)
    assert (fine.latent_rmse < coarse.latent_rmse).all()
    assert fine.psnr.mean() > 33  # measured 37-43 dB; 10 steps: 30-39 dB
    # The reported reconstruction is what the ordinary sampler makes from the inverted noise.
    regen = lab.generate(fine.noise, cond, num_inference_steps=50, guidance_scale=1.0, output_type="latent")
    torch.testing.assert_close(regen, fine.reconstruction, rtol=0, atol=1e-5)
    # Guidance breaks the approximation (the well-known reason for null-text inversion): worse reconstructions.
    guided = lab.invert(z0, cond, num_inference_steps=10, guidance_scale=4.0)
    assert guided.latent_rmse.mean() > coarse.latent_rmse.mean()


def test_non_finite_low_precision_decodes_are_redone_in_float32(tiny_lab):
    """fp16 VAEs (SDXL's especially) can overflow to inf/NaN; those items are decoded again in float32."""
    vae = tiny_lab.pipe.vae
    z = tiny_lab.noise([1, 2])
    reference = tiny_lab.decode(z)
    vae.to(torch.bfloat16)

    def overflow_item_0_in_low_precision(module, args, output):
        if output.dtype != torch.float32:
            output = output.clone()
            output[0] = float("inf")
        return output

    handle = vae.decoder.register_forward_hook(overflow_item_0_in_low_precision)
    try:
        out = tiny_lab.decode(z)
    finally:
        handle.remove()
    assert torch.isfinite(out).all()
    # item 0 was redone in float32 (from the float32 latents; the weights carry bfloat16 rounding)
    torch.testing.assert_close(out[0], reference[0], atol=2e-2, rtol=0)
    assert vae.dtype == torch.bfloat16  # and the VAE is back in its own dtype
    vae.to(torch.float32)


def test_turbo_checkpoints_get_turbo_defaults(tiny_sd_path, tmp_path):
    import shutil

    from latentlab.backend import Lab

    turbo = shutil.copytree(tiny_sd_path, tmp_path / "tiny-sd-turbo")
    lab = Lab.from_pretrained(turbo, device="cpu")
    assert (lab.defaults.num_inference_steps, lab.defaults.guidance_scale) == (4, 0.0)
    assert Lab.from_pretrained(tiny_sd_path, device="cpu").defaults.guidance_scale > 1


# --- the backend contract: sampling resolved once, schedulers, compute batch -------------------------------------


def test_sampling_is_resolved_in_one_place_and_recorded(tiny_lab):
    from latentlab.sampling import Sampling

    assert tiny_lab.defaults.complete
    s = tiny_lab.sampling(Sampling(num_inference_steps=7), guidance_scale=1.5)
    assert (s.num_inference_steps, s.guidance_scale, s.negative_prompt, s.scheduler) == (7, 1.5, "", "DDIMScheduler")
    assert tiny_lab.sampling(Sampling(num_inference_steps=7), num_inference_steps=None).num_inference_steps == 7
    with pytest.raises(ValueError, match=r"`guidance_scale` must be a finite number, got nan"):
        tiny_lab.generate(tiny_lab.noise(1), tiny_lab.encode_prompt("a"), guidance_scale=float("nan"))
    with pytest.raises(TypeError, match=r"`sampling` must be a latentlab.Sampling, got dict"):
        tiny_lab.sampling({"num_inference_steps": 3})
    # An explicit sampling record gives the same pixels as the same overrides.
    z, c = tiny_lab.noise([1, 2]), tiny_lab.encode_prompt(["a red star", "a blue ring"])
    assert torch.equal(tiny_lab.generate(z, c, sampling=Sampling(4, 2.0)),
                       tiny_lab.generate(z, c, num_inference_steps=4, guidance_scale=2.0))
    prov = tiny_lab.provenance(batch_size=4)
    assert prov["compute_batch"] == 4 and prov["batch_invariant"] is True and len(prov["model_fingerprint"]) == 16


def _count_unet_items(lab):
    items = []
    handle = lab.pipe.unet.register_forward_hook(lambda m, a, o: items.append(a[0].shape[0]))
    return items, handle


def test_batch_size_is_the_number_of_items_the_denoiser_sees(tiny_lab):
    z, c = tiny_lab.noise(list(range(10))), tiny_lab.encode_prompt("a red star")
    items, handle = _count_unet_items(tiny_lab)
    try:
        tiny_lab.generate(z, c, num_inference_steps=2, guidance_scale=1.0, batch_size=4)
        assert items == [4, 4] * 3  # 3 calls (4 + 4 + 2 padded to 4) x 2 steps, no guidance branch
        items.clear()
        tiny_lab.generate(z[:1], c, num_inference_steps=2, guidance_scale=3.0, batch_size=1)
        assert items == [2, 2]  # a single interactive image: one item (x2 for classifier-free guidance)
    finally:
        handle.remove()


@pytest.mark.parametrize("scheduler", ["EulerAncestralDiscreteScheduler", "DDPMScheduler"])
def test_stochastic_schedulers_are_seeded_per_item(tiny_lab, tiny_sd_path, scheduler):
    """The same seed gives the same image with a scheduler that draws noise while stepping: on every call, alone
    or in a batch, and equal to plain diffusers given one CPU generator per item."""
    import diffusers

    from latentlab.backend.engine import cpu_generators, step_seeds

    z, c = tiny_lab.noise([1, 2, 3]), tiny_lab.encode_prompt(["a red star", "a blue ring", "a green cross"])
    kw = dict(num_inference_steps=4, guidance_scale=3.0, scheduler=scheduler)
    a = tiny_lab.generate(z, c, **kw)
    assert torch.equal(a, tiny_lab.generate(z, c, **kw))  # no global RNG involved
    assert torch.equal(a[1:2], tiny_lab.generate(z[1:2], c[1:2], **kw))  # alone == in a batch
    # A different starting latent gets different step noise.
    assert not torch.equal(tiny_lab.generate(z[[0, 0]], c[[0, 0]], **kw)[1], a[1])
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_path, dtype=torch.float32)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt_embeds=c.prompt_embeds, negative_prompt_embeds=tiny_lab.encode_prompt("").prompt_embeds.expand(3, -1, -1),
                  latents=z, num_inference_steps=4, guidance_scale=3.0, generator=cpu_generators(step_seeds(z)),
                  output_type="pt").images
    assert torch.equal(tiny_lab.generate(z, c, batch_size=3, **kw), theirs)


def test_img2img_with_an_ancestral_scheduler_is_reproducible(tiny_lab):
    z0 = tiny_lab.encode(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)))
    c = tiny_lab.encode_prompt(["a red star", "a blue ring"])
    kw = dict(strength=0.7, seed=[5, 6], num_inference_steps=5, scheduler="EulerAncestralDiscreteScheduler")
    a = tiny_lab.img2img(z0, c, **kw)
    assert torch.equal(a, tiny_lab.img2img(z0, c, **kw))
    assert torch.equal(a[1:], tiny_lab.img2img(z0[1:], c[1:], **{**kw, "seed": 6}))


def _v_prediction_lab(tiny_sd_path, tmp_path, prediction_type):
    import shutil

    from latentlab.backend import Lab

    path = shutil.copytree(tiny_sd_path, tmp_path / f"tiny-{prediction_type}")
    cfg_file = path / "scheduler" / "scheduler_config.json"
    import json

    cfg = json.loads(cfg_file.read_text())
    cfg["prediction_type"] = prediction_type
    cfg_file.write_text(json.dumps(cfg))
    return Lab.from_pretrained(path, device="cpu")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_inversion_matches_ddim_inverse_scheduler_and_the_formulas(tiny_sd_path, tmp_path, prediction_type):
    """Inversion equals a plain loop over diffusers' DDIMInverseScheduler, and an independent float64 oracle of
    the DDIM inversion step for both parameterisations (v1's hand copy treated every output as noise)."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    lab = _v_prediction_lab(tiny_sd_path, tmp_path, prediction_type)
    z0 = lab.encode(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)))
    cond = lab.encode_prompt(["a red star", "a blue ring"])
    inv = lab.invert(z0, cond, num_inference_steps=5, batch_size=2)
    # Plain diffusers: the inverse scheduler stepping the UNet.
    sched = DDIMInverseScheduler.from_config(lab.pipe.scheduler.config)
    sched.set_timesteps(5)
    x = z0.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = lab.pipe.unet(x, t, encoder_hidden_states=cond.prompt_embeds).sample
            x = sched.step(out, t, x).prev_sample
    assert torch.equal(inv.noise, x)
    # Independent oracle, float64: x0 and eps from the model output, then x at the noisier level.
    ac = DDIMScheduler.from_config(lab.pipe.scheduler.config).alphas_cumprod.double()
    ratio = 1000 // 5
    y = z0.double()
    with torch.no_grad():
        for t in sched.timesteps.tolist():
            a_t = ac[t]
            a_s = ac[t - ratio] if t - ratio >= 0 else ac[0]
            out = lab.pipe.unet(y.float(), t, encoder_hidden_states=cond.prompt_embeds).sample.double()
            if prediction_type == "epsilon":
                eps, x0 = out, (y - (1 - a_s).sqrt() * out) / a_s.sqrt()
            else:  # v = sqrt(a) eps - sqrt(1 - a) x0, evaluated at the current latent y (level a_s)
                x0 = a_s.sqrt() * y - (1 - a_s).sqrt() * out
                eps = a_s.sqrt() * out + (1 - a_s).sqrt() * y
            y = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
    torch.testing.assert_close(inv.noise.double(), y, rtol=1e-4, atol=1e-4)


def test_inpaint_pixel_composite_keeps_the_original_pixels_outside_the_mask(tiny_lab):
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    z0 = tiny_lab.encode(images)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:] = 1
    out = tiny_lab.inpaint(z0, tiny_lab.encode_prompt("a red star"), mask, seed=1, image=images, feather=1.0)
    assert torch.equal(out[..., :4], images[..., :4])  # beyond the feather: the original, exactly
    assert (out[..., 12:] - images[..., 12:]).abs().mean() > 0.01  # inside: regenerated
    plain = tiny_lab.inpaint(z0, tiny_lab.encode_prompt("a red star"), mask, seed=1)
    assert not torch.equal(plain[..., :4], images[..., :4])  # the decoder alone does not keep pixels exactly
    with pytest.raises(ValueError, match=r"`image` must have shape \(1 or 1, 3, 16, 16\), got \(1, 3, 8, 8\)"):
        tiny_lab.inpaint(z0, tiny_lab.encode_prompt("a"), mask, image=torch.rand(1, 3, 8, 8))


def test_edits_are_composed_from_diffusers_pipelines(tiny_lab):
    import diffusers

    pipe = tiny_lab.pipeline("img2img")
    assert isinstance(pipe, diffusers.StableDiffusionImg2ImgPipeline)
    assert pipe.unet is tiny_lab.pipe.unet and pipe.vae is tiny_lab.pipe.vae  # the same components, no copies
    assert pipe.scheduler is not tiny_lab.pipe.scheduler
    with pytest.raises(ValueError, match=r"`scheduler` must name a diffusers scheduler class, got 'NoSuchScheduler'"):
        tiny_lab.pipeline("text2image", "NoSuchScheduler")


def test_optimize_is_opt_in_recorded_and_keeps_images_close(tiny_lab):
    """channels_last (and torch.compile) are opt-in: recorded in provenance, so cache keys and manifests change,
    while the images stay within float tolerance of the plain ones."""
    from latentlab.morph import frame_key

    z, cond = tiny_lab.noise([1, 2]), tiny_lab.encode_prompt(["a", "b"])
    plain = tiny_lab.generate(z, cond)
    key = frame_key(tiny_lab, z[:1], cond[0], tiny_lab.sampling())
    assert "optimizations" not in tiny_lab.provenance()
    tiny_lab.optimize(channels_last=True)
    assert tiny_lab.provenance()["optimizations"] == ["channels_last"]
    assert frame_key(tiny_lab, z[:1], cond[0], tiny_lab.sampling()) != key
    torch.testing.assert_close(tiny_lab.generate(z, cond), plain, atol=1e-4, rtol=0)
    tiny_lab.optimize(channels_last=True)  # idempotent
    assert tiny_lab.provenance()["optimizations"] == ["channels_last"]


def _streamed(lab, z, cond, **kw):
    seen = []
    traj = lab.trajectory(z, cond, on_step=lambda i, start, lat, x0: seen.append((i, start, lat, x0)), **kw)
    return traj, seen


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_trajectory_reports_each_step_as_it_ends(tiny_lab, batch_size):
    """``on_step`` sees every step of every compute batch (padding never shown), and what it sees is the
    trajectory's own record; a callback error surfaces; a non-callable is refused before any model work."""
    z = tiny_lab.noise([3, 4, 5])
    cond = tiny_lab.encode_prompt(["a red star", "a blue ring", "a green square"])
    traj, seen = _streamed(tiny_lab, z, cond, num_inference_steps=4, batch_size=batch_size)
    starts = sorted({s for _, s, _, _ in seen})
    assert starts == list(range(0, 3, batch_size))
    for i, start, lat, x0 in seen:
        n = lat.shape[0]
        assert n == min(batch_size, 3 - start) and lat.dtype == x0.dtype == torch.float32
        torch.testing.assert_close(lat, traj.latents[i, start : start + n], rtol=0, atol=0)
        torch.testing.assert_close(x0, traj.x0[i, start : start + n], rtol=0, atol=0)
    assert len(seen) == 4 * len(starts)
    with pytest.raises(TypeError, match="`on_step` must be callable"):
        tiny_lab.trajectory(z, cond, on_step=3)

    def stop(i, start, lat, x0):
        raise KeyboardInterrupt("stop here")

    with pytest.raises(KeyboardInterrupt, match="stop here"):  # a caller can stop a trajectory from its callback
        tiny_lab.trajectory(z, cond, on_step=stop)
