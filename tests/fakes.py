"""A small fake backend: implements latentlab.backend.Backend with cheap, deterministic per-item maths, and
records every denoiser call, so the layers above the backend (plan, pacing, render, manifest, resume, widgets)
are tested without diffusers."""

from __future__ import annotations

import hashlib
import json

import torch

from latentlab.backend import AttentionMix, Conditioning, Inversion, PredictionMix
from latentlab.sampling import Sampling
from latentlab.seeds import noise as seeded_noise


class FakeBackend:
    """Images are a smooth function of each item's latent and conditioning (so interpolations change them
    gradually); nothing depends on other items of a batch."""

    model_id = "fake/backend"

    def __init__(self, *, latent_size: int = 4, factor: int = 2, compute_batch: int = 4, weight: float = 1.0,
                 layout: str = "unet"):
        # layout "unet": 4 latent channels, prompt embeddings only (SD 1.x/2.x); "flow": 16 channels, pooled
        # embeddings and a VAE shift too (SD3/Flux), so the layers above the backend are tested on both.
        flow = layout == "flow"
        self.defaults = Sampling(num_inference_steps=4, guidance_scale=2.0, negative_prompt="",
                                 scheduler="FlowMatchEulerDiscreteScheduler" if flow else "DDIMScheduler")
        self.latent_size, self.factor, self._compute, self.weight = latent_size, factor, compute_batch, weight
        self.layout, self.channels = layout, 16 if flow else 4
        self.calls: list[int] = []  # items per denoiser call
        self.generated: list[int] = []  # items per generate() request
        self.live_calls = 0  # generate_live() requests

    @property
    def vae_scale_factor(self) -> int:
        return self.factor

    @property
    def vae_scaling_factor(self) -> float:
        return 0.5

    @property
    def vae_shift_factor(self) -> float:
        return 0.1 if self.layout == "flow" else 0.0

    def sampling(self, sampling=None, **overrides) -> Sampling:
        given = {k: v for k, v in overrides.items() if v is not None}
        return Sampling(**given).over(sampling or Sampling()).over(self.defaults)

    def compute_batch(self, batch_size=None) -> int:
        return batch_size or self._compute

    def provenance(self, batch_size=None) -> dict:
        return {"model": self.model_id, "model_fingerprint": hashlib.sha256(str(self.weight).encode()).hexdigest()[:16],
                "scheduler_config": {}, "compute_batch": self.compute_batch(batch_size), "batch_invariant": True,
                "device": "cpu", "dtype": "torch.float32"}

    def schedule(self, *, height, width, sampling=None):
        return {"mu": 0.5 if self.layout == "flow" else None}

    def latent_shape(self, *, height=None, width=None):
        h = (height or self.latent_size * self.factor) // self.factor
        w = (width or self.latent_size * self.factor) // self.factor
        return (self.channels, h, w)

    def noise(self, seed, *, height=None, width=None, dtype=None):
        n = len(seed) if isinstance(seed, (list, tuple)) else 1
        return seeded_noise(seed, (n, *self.latent_shape(height=height, width=width)), dtype=dtype or torch.float32)

    def encode_prompt(self, prompt):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(int(hashlib.sha256(p.encode()).hexdigest()[:8], 16))
            rows.append(torch.randn(1, 3, 8, generator=g))
        emb = torch.cat(rows)
        return Conditioning(emb, emb.mean(1) if self.layout == "flow" else None)

    def _images(self, latents, cond, s: Sampling):
        colour = torch.tanh(cond.prompt_embeds.mean(1)[:, :3]) * s.guidance_scale / 4  # (n, 3)
        x = latents[:, :3] * 0.3 * self.weight + colour[:, :, None, None] + 0.01 * s.num_inference_steps
        x = torch.nn.functional.interpolate(x, scale_factor=self.factor, mode="nearest")
        return torch.sigmoid(x)

    def generate_live(self, latents, conditioning, *, sampling=None, preview=False, **overrides):
        self.live_calls += 1
        return self.generate(latents, conditioning, sampling=sampling, batch_size=1, **overrides)

    def attention_mix_unsupported(self):
        return None

    def default_prompt_interpolation(self):
        return "attention" if self.attention_mix_unsupported() is None else "lerp"

    def generate(self, latents, conditioning, *, sampling=None, batch_size=None, output_type="pt", **overrides):
        s = self.sampling(sampling, **overrides)
        n = len(latents)
        if len(conditioning) == 1 and n > 1:
            conditioning = conditioning.map(lambda t: t.expand(n, *t.shape[1:]))
        size = self.compute_batch(batch_size)
        self.generated.append(n)
        outs = []
        for i in range(0, n, size):
            z, c = latents[i : i + size], conditioning[i : i + size]
            if isinstance(c, PredictionMix):  # a one-step "denoiser": the mix of the two predictions, twice the calls
                self.calls.append(2 * size)
                w = c.weight.float().view(-1, 1, 1, 1)
                outs.append((1 - w) * self._images(z, c.a, s) + w * self._images(z, c.b, s))
                continue
            if isinstance(c, AttentionMix):  # one call with both prompts: here, the weighted conditioning
                self.calls.append(size)
                w = c.weight.to(c.a.prompt_embeds.dtype)
                outs.append(self._images(z, Conditioning(torch.lerp(c.a.prompt_embeds, c.b.prompt_embeds,
                                                                    w.view(-1, 1, 1))), s))
                continue
            self.calls.append(size)
            outs.append(self._images(z, c, s))
        images = torch.cat(outs)
        return latents.clone() if output_type == "latent" else images

    def decode(self, latents, *, batch_size=None):
        return self._images(latents, self.encode_prompt([""] * len(latents)), self.defaults)

    def encode(self, images, *, batch_size=None):
        x = torch.nn.functional.avg_pool2d(images, self.factor)
        return torch.cat([x] + [x.mean(1, keepdim=True)] * (self.channels - 3), dim=1)

    def invert(self, latents, conditioning, *, sampling=None, batch_size=None, **overrides):
        images = self.decode(latents)
        return Inversion(noise=latents.clone(), reconstruction=latents.clone(), images=images,
                         latent_rmse=torch.zeros(len(latents)), psnr=torch.full((len(latents),), 40.0))


def manifest(path) -> dict:
    return json.loads(path.read_text())


class FakeCLIP:
    """The two calls the atlas makes of CLIP, as cheap deterministic maths (8-d embeddings)."""

    model_id = "fake/clip"

    def embed_images(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1)[:, :8].float()

    def embed_text(self, prompts):
        rows = [torch.randn(1, 8, generator=torch.Generator().manual_seed(
            int(hashlib.sha256(p.encode()).hexdigest()[:8], 16))) for p in prompts]
        return torch.cat(rows)
