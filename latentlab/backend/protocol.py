"""The contract between the backend and the layers above it (morph, atlas, widgets, CLI).

One responsibility: list exactly what those layers may use of a backend, so that :class:`latentlab.backend.Lab`
and the small fake backend of the tests are interchangeable, and nothing above the backend guesses with
``getattr`` or reaches into a private name. Named ``Backend`` (``Generator`` would collide with
``torch.Generator``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from latentlab.backend.records import AttentionMix, Conditioning, Inversion, PredictionMix
from latentlab.sampling import Sampling

__all__ = ["Backend"]


@runtime_checkable
class Backend(Protocol):
    """What the upper layers need from a generation backend."""

    model_id: str
    """A name for the model (hub id, folder, or ``latentlab/embedded-shapes``)."""

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along each side."""

    @property
    def vae_scaling_factor(self) -> float:
        """The VAE's ``scaling_factor``: latents as the UNet sees them = the VAE's latents times this."""

    @property
    def vae_shift_factor(self) -> float:
        """The VAE's ``shift_factor`` (SD3/Flux; 0 for SD): latents as the denoiser sees them =
        ``(VAE latents - shift_factor) * scaling_factor``."""

    def sampling(self, sampling: Sampling | None = None, **overrides) -> Sampling:
        """A complete :class:`Sampling`: ``overrides`` over ``sampling`` over the model's defaults (validated)."""

    def compute_batch(self, batch_size: int | None = None) -> int:
        """How many items the denoiser sees per call for a request with this ``batch_size`` (None: the default)."""

    def provenance(self, batch_size: int | None = None) -> dict:
        """JSON-safe facts that determine the pixels besides the inputs: model id and fingerprint, scheduler
        config, compute batch and whether calls are padded to it, device, dtype. Cache keys and manifests use it."""

    def schedule(self, *, height: int, width: int, sampling: Sampling | None = None) -> dict:
        """The noise schedule a request at this image size runs, as JSON (flow models: the dynamic shift ``mu``
        from the image's token count, and the sigmas); manifests record it."""

    def latent_shape(self, *, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(channels, height // f, width // f) for an image size (default: the model's native size)."""

    def noise(self, seed: int | Sequence[int], *, height: int | None = None, width: int | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
        """Initial latents, one item per seed, the same on every device: the pipeline's own initial noise for those
        seeds, in the VAE layout (``dtype``: None for the model's; the draw itself is float32 on the CPU)."""

    def encode_prompt(self, prompt: str | Sequence[str]) -> Conditioning:
        """Text conditioning, one item per prompt."""

    def generate(self, latents: torch.Tensor, conditioning: Conditioning | PredictionMix | AttentionMix, *,
                 sampling: Sampling | None = None, batch_size: int | None = None, output_type: str = "pt",
                 **overrides) -> torch.Tensor:
        """Images (batch, 3, H, W) in [0, 1] (or final latents with ``output_type="latent"``); ``conditioning`` may
        mix two prompts' predictions per item (:class:`~latentlab.backend.PredictionMix`) or share the text
        attention between two prompts (:class:`~latentlab.backend.AttentionMix`)."""

    def attention_mix_unsupported(self) -> str | None:
        """Why this model cannot denoise an :class:`~latentlab.backend.AttentionMix` (a phrase after "it"), or
        None when it can."""

    def default_prompt_interpolation(self) -> str:
        """The morph's prompt path under ``"auto"`` for this model (``"attention"`` or ``"lerp"``)."""

    def generate_live(self, latents: torch.Tensor, conditioning: Conditioning | AttentionMix, *,
                      sampling: Sampling | None = None, preview: bool = False, **overrides) -> torch.Tensor:
        """What ``generate(..., batch_size=1)`` returns, for a live control, as fast as it can be exact;
        ``preview=True`` allows the last bits to differ for speed."""

    def decode(self, latents: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """Final latents -> images in [0, 1]."""

    def encode(self, images: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """Images in [0, 1] -> latents as the denoiser sees them."""

    def invert(self, latents: torch.Tensor, conditioning: Conditioning, *, sampling: Sampling | None = None,
               batch_size: int | None = None, **overrides) -> Inversion:
        """DDIM inversion of clean latents to the noise that regenerates them, with its reconstruction error."""
