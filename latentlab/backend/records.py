"""Records the backend hands out: conditioning, denoising trajectories, inversions (plain data, torch only)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Conditioning", "Inversion", "Trajectory"]


@dataclass(frozen=True)
class Conditioning:
    """What conditions the UNet for a batch: ``prompt_embeds`` (batch, tokens, dim) and, for SDXL,
    ``pooled_prompt_embeds`` (batch, dim). Interpolate the fields with :mod:`latentlab.ops` like any latent."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def __getitem__(self, idx) -> Conditioning:
        idx = slice(idx, idx + 1) if isinstance(idx, int) else idx
        pooled = None if self.pooled_prompt_embeds is None else self.pooled_prompt_embeds[idx]
        return Conditioning(self.prompt_embeds[idx], pooled)

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        pooled = None if items[0].pooled_prompt_embeds is None else torch.cat([c.pooled_prompt_embeds for c in items])
        return Conditioning(torch.cat([c.prompt_embeds for c in items]), pooled)

    def weighted_sum(self, weights: torch.Tensor | Sequence[float]) -> Conditioning:
        """One item: ``sum_i weights[i] * item_i`` of every field (weights as given: normalise them for a mean,
        sign them for arithmetic)."""
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if len(w) != len(self):
            raise ValueError(f"`weights` must have {len(self)} values (one per item), got {len(w)}")
        return self.map(lambda t: (w.to(t.dtype).view(-1, *[1] * (t.ndim - 1)) * t).sum(0, keepdim=True))

    def map(self, fn) -> Conditioning:
        """Apply ``fn`` to every tensor field (e.g. an interpolation)."""
        pooled = None if self.pooled_prompt_embeds is None else fn(self.pooled_prompt_embeds)
        return Conditioning(fn(self.prompt_embeds), pooled)


@dataclass(frozen=True)
class Trajectory:
    """One denoising run step by step: ``latents[i]`` after step ``i``, ``x0[i]`` the clean latent the model
    predicted at step ``i`` (both ``(steps, batch, C, h, w)``, float32, CPU), and the final ``images``."""

    timesteps: tuple[float, ...]
    latents: torch.Tensor
    x0: torch.Tensor
    images: torch.Tensor


@dataclass(frozen=True)
class Tokens:
    """How a prompt reaches the model: the text encoder's ``tokens`` (strings, start and end tokens included) and
    their ``ids``, the encoder's ``limit`` (77 for CLIP), how many of the tokens are ``kept`` (the rest are cut off),
    and ``embeds``, the conditioning rows of the kept tokens ``(kept, dim)`` -- what the denoiser attends to."""

    tokens: tuple[str, ...]
    ids: tuple[int, ...]
    limit: int
    kept: int
    embeds: torch.Tensor
    encoder: str

    @property
    def truncated(self) -> bool:
        return len(self.tokens) > self.limit


@dataclass(frozen=True)
class Inversion:
    """DDIM inversion of clean latents: ``noise`` (the latents at the last timestep), the ``reconstruction``
    denoised from it again, its decoded ``images``, and per item the ``latent_rmse`` and the ``psnr`` (dB) of those
    images against the decoded original latents."""

    noise: torch.Tensor
    reconstruction: torch.Tensor
    images: torch.Tensor
    latent_rmse: torch.Tensor
    psnr: torch.Tensor
