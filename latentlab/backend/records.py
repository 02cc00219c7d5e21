"""Records the backend hands out: conditioning, denoising trajectories, inversions (plain data, torch only)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from latentlab import _checks

__all__ = ["AttentionMix", "Conditioning", "Inversion", "PredictionMix", "Trajectory"]


def _item_slice(idx):
    """Indexing a record by an int keeps the batch axis (``c[-1]`` is the last item, as a batch of one)."""
    return slice(idx, idx + 1 or None) if isinstance(idx, int) else idx


@dataclass(frozen=True)
class Conditioning:
    """What conditions the denoiser for a batch: ``prompt_embeds`` (batch, tokens, dim); for SDXL, SD3 and Flux.1
    ``pooled_prompt_embeds`` (batch, dim); for families whose transformer masks its text tokens (Chroma, ...)
    ``attention_mask`` (batch, tokens), 1 where a token is attended. Interpolate the fields with
    :mod:`latentlab.ops` like any latent, through :meth:`map`.

    The mask is not interpolated: a combination of items attends to every token that any item it is made of
    attends to (an item with weight exactly 0 adds nothing, so a morph's keyframes keep their own masks), and
    padding that no item attends to stays masked.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def __post_init__(self):
        # The NaN policy at the record users build by hand: a (batch, tokens, dim) floating tensor of finite values,
        # the optional fields matching its batch (a tensor changed in place later is refused where it is used).
        e = _checks.tensor(self.prompt_embeds, "prompt_embeds", ndim=3, what="(batch, tokens, dim)")
        if self.pooled_prompt_embeds is not None:
            p = _checks.tensor(self.pooled_prompt_embeds, "pooled_prompt_embeds", ndim=2, what="(batch, dim)")
            if len(p) != len(e):
                raise ValueError(f"`pooled_prompt_embeds` must have {len(e)} items (one per prompt_embeds item), "
                                 f"got {len(p)}")
        if self.attention_mask is not None:
            m = _checks.tensor(self.attention_mask, "attention_mask", ndim=2, floating=False,
                               what="(batch, tokens)")
            if tuple(m.shape) != tuple(e.shape[:2]):
                raise ValueError(f"`attention_mask` must have the shape (batch, tokens) {tuple(e.shape[:2])} of "
                                 f"`prompt_embeds`, got {tuple(m.shape)}")

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def __getitem__(self, idx) -> Conditioning:
        idx = _item_slice(idx)
        pooled = None if self.pooled_prompt_embeds is None else self.pooled_prompt_embeds[idx]
        mask = None if self.attention_mask is None else self.attention_mask[idx]
        return Conditioning(self.prompt_embeds[idx], pooled, mask)

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Items of several conditionings as one. Masked items of different token counts (Qwen-Image encodes each
        prompt at its own length) are padded with masked zero tokens to the longest, as the pipelines pad a batch."""
        pooled = None if items[0].pooled_prompt_embeds is None else torch.cat([c.pooled_prompt_embeds for c in items])
        if not any(c.attention_mask is not None for c in items):
            return Conditioning(torch.cat([c.prompt_embeds for c in items]), pooled)
        n = max(c.prompt_embeds.shape[1] for c in items)
        embeds, masks = [], []
        for c in items:
            e = c.prompt_embeds
            m = e.new_ones(e.shape[:2]) if c.attention_mask is None else c.attention_mask.to(e.dtype)
            pad = n - e.shape[1]
            if pad:
                e = torch.cat([e, e.new_zeros(e.shape[0], pad, e.shape[2])], 1)
                m = torch.cat([m, m.new_zeros(m.shape[0], pad)], 1)
            embeds.append(e)
            masks.append(m)
        return Conditioning(torch.cat(embeds), pooled, torch.cat(masks))

    def weighted_sum(self, weights: torch.Tensor | Sequence[float]) -> Conditioning:
        """One item: ``sum_i weights[i] * item_i`` of every field (weights as given: normalise them for a mean,
        sign them for arithmetic)."""
        w = torch.from_numpy(_checks.real_values(weights, "weights", what="weights, one per item"))
        if len(w) != len(self):
            raise ValueError(f"`weights` must have {len(self)} values (one per item), got {len(w)}")
        return self.map(lambda t: (w.to(t.dtype).view(-1, *[1] * (t.ndim - 1)) * t).sum(0, keepdim=True))

    def map(self, fn) -> Conditioning:
        """Apply ``fn`` to every tensor field (e.g. an interpolation); see the class notes for the mask."""
        pooled = None if self.pooled_prompt_embeds is None else fn(self.pooled_prompt_embeds)
        embeds = fn(self.prompt_embeds)
        mask = None
        if self.attention_mask is not None:
            # ``fn`` on the mask with distinct positive per-item weights: nonzero exactly where an item that
            # contributes attends (distinct weights keep signed combinations such as a - b from cancelling).
            m = self.attention_mask.to(torch.float64)
            probe = m * (1 + torch.arange(len(m), dtype=torch.float64) * 0.6180339887).view(-1, 1)
            mask = (fn(probe.to(self.prompt_embeds.dtype)) != 0).to(self.prompt_embeds.dtype)
            if mask.shape != embeds.shape[:2]:
                raise ValueError(f"`fn` gave prompt_embeds of shape {tuple(embeds.shape)} but a mask of shape "
                                 f"{tuple(mask.shape)}: map a function that treats every field alike")
        return Conditioning(embeds, pooled, mask)


@dataclass(frozen=True)
class _PairMix:
    """Two conditionings per item and one weight per item in [0, 1] (0: exactly ``a``, 1: exactly ``b``): what the
    two ways of mixing prompts share (validation, slicing, batching)."""

    a: Conditioning
    b: Conditioning
    weight: torch.Tensor

    def __post_init__(self):
        kind = type(self).__name__
        for name in ("a", "b"):
            if not isinstance(getattr(self, name), Conditioning):
                raise TypeError(f"`{kind}.{name}` must be a Conditioning, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.weight, torch.Tensor):
            raise TypeError(f"`{kind}.weight` must be a 1-D tensor (one weight per item), got "
                            f"{type(self.weight).__name__}")
        if self.weight.ndim != 1 or self.weight.is_complex() or self.weight.dtype == torch.bool:
            raise TypeError(f"`{kind}.weight` must be a 1-D real tensor (one weight per item), got dtype "
                            f"{self.weight.dtype} and shape {tuple(self.weight.shape)}")
        if not (len(self.a) == len(self.b) == len(self.weight)):
            raise ValueError(f"`{kind}` needs as many items in `a`, `b` and `weight`, got {len(self.a)}, "
                             f"{len(self.b)} and {len(self.weight)}")
        w = self.weight.double()
        if not bool(torch.isfinite(w).all()) or bool(((w < 0) | (w > 1)).any()):
            bad = int((~(torch.isfinite(w) & (w >= 0) & (w <= 1))).sum())
            raise ValueError(f"`{kind}.weight` must lie in [0, 1], got {bad} of {len(w)} value(s) outside "
                             "(or NaN/infinite)")

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, idx):
        idx = _item_slice(idx)
        return type(self)(self.a[idx], self.b[idx], self.weight[idx])

    def map(self, fn):
        """``fn`` on every item-indexed tensor (both conditionings and the weights): batching and padding."""
        return type(self)(self.a.map(fn), self.b.map(fn), fn(self.weight))

    @classmethod
    def cat(cls, items: Sequence):
        return cls(Conditioning.cat([m.a for m in items]), Conditioning.cat([m.b for m in items]),
                   torch.cat([m.weight for m in items]))


@dataclass(frozen=True)
class PredictionMix(_PairMix):
    """Conditioning by *prediction mixing*: item ``i`` is denoised once with ``a[i]`` and once with ``b[i]`` from
    the same latent, and at every step the denoiser's two outputs are combined, ``(1 - weight[i]) * out_a +
    weight[i] * out_b``, before the scheduler steps (AID's "outer" interpolation taken to the model's output; as
    classifier-free guidance is linear, the mix of the guided outputs is the guided mix). Both copies then stay
    identical at every step, so this works the same for every model family, at twice the denoiser's work.

    Unlike interpolating the prompt encodings (``lerp(a, b, t)``), nothing is asked of the denoiser that it was
    not trained on: the midpoint of two encodings can name a third thing (blue and black backgrounds meet at green
    in the embedded model), a mix of two predictions cannot. Weight 0 is exactly ``a``'s generation, 1 ``b``'s.

    >>> import torch
    >>> from latentlab import Conditioning
    >>> a, b = Conditioning(torch.zeros(3, 4, 8)), Conditioning(torch.ones(3, 4, 8))
    >>> mix = PredictionMix(a, b, torch.tensor([0.0, 0.5, 1.0]))
    >>> len(mix), mix[1:].weight.tolist()
    (3, [0.5, 1.0])
    """


@dataclass(frozen=True)
class AttentionMix(_PairMix):
    """Conditioning by *attention interpolation* (AID's fused interpolation, He et al., "AID: Attention
    Interpolation of Text-to-Image Diffusion", 2024): item ``i`` is denoised once, and every attention over the
    text sees both prompts' tokens side by side -- ``a[i]``'s keys with their logits raised by ``log(1 - w)``,
    ``b[i]``'s by ``log(w)`` -- so one softmax shares the attention between the two prompts in proportion
    ``(1 - w) : w`` (each prompt's own attention pattern kept within its share). Nothing is asked about the
    midpoint of two encodings (which can name a third thing), and, unlike :class:`PredictionMix`, the model forms
    one picture from both prompts at every layer rather than averaging two pictures' predictions. Weight 0 is
    ``a``'s generation (``b``'s tokens get no attention at all), 1 ``b``'s, up to float rounding. In a UNet the
    cost of one generation (only the text keys double); in SD3/Flux the text tokens run through every transformer
    block, so more (1.6x on the embedded flow twin, whose text outnumbers its image tokens). Pooled embeddings
    (SDXL, SD3, Flux) are interpolated linearly.

    Supported where the adapter knows the text attention: SD 1.x/2.x and SDXL (cross attention), SD3 and Flux.1
    (joint attention, where the image keys keep their share and the two prompts split the text's); other families
    (Chroma, Lumina 2, Qwen-Image, Flux.2) refuse it before any model work.

    >>> import torch
    >>> from latentlab import Conditioning
    >>> a, b = Conditioning(torch.zeros(2, 4, 8)), Conditioning(torch.ones(2, 4, 8))
    >>> AttentionMix(a, b, torch.tensor([0.25, 0.75]))[0].weight.tolist()
    [0.25]
    """


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
