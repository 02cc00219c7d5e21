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
    ours = tiny_lab.generate(z, tiny_lab.encode_prompt(PROMPTS), num_inference_steps=3, guidance_scale=3.0)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, latents=z, num_inference_steps=3, guidance_scale=3.0, output_type="pt").images
    assert ours.shape == (3, 3, 16, 16) and ours.dtype == torch.float32
    assert torch.equal(ours, theirs)


def test_seeded_generation_is_reproducible_and_batch_size_independent(tiny_lab):
    z = tiny_lab.noise([5, 6, 7, 8])
    cond = tiny_lab.encode_prompt(["a", "b", "c", "d"])
    a = tiny_lab.generate(z, cond)
    b = tiny_lab.generate(tiny_lab.noise([5, 6, 7, 8]), cond)
    assert torch.equal(a, b)
    one_by_one = tiny_lab.generate(z, cond, batch_size=1)
    # CPU kernels may round differently for different batch sizes: equal to float32 noise, and as 8-bit images.
    torch.testing.assert_close(one_by_one, a, rtol=0, atol=1e-5)
    assert (one_by_one * 255).round().sub((a * 255).round()).abs().max() <= 1


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
    assert lab.is_sdxl and lab.latent_shape() == (4, 8, 8)
    cond = lab.encode_prompt(["a red star", "a blue ring"])
    assert cond.prompt_embeds.shape == (2, 16, 32) and cond.pooled_prompt_embeds.shape == (2, 16)
    z = lab.noise([1, 2])
    ours = lab.generate(z, cond, num_inference_steps=3, guidance_scale=3.0)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(["a red star", "a blue ring"], latents=z, num_inference_steps=3, guidance_scale=3.0,
                  output_type="pt").images
    assert ours.shape == (2, 3, 16, 16)
    assert torch.equal(ours, theirs)


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
