"""Attention interpolation between two prompts (:class:`~latentlab.backend.AttentionMix`): what the families that
support it share.

One responsibility: turning an ``AttentionMix`` into one request -- both prompts' tokens side by side in one
conditioning (the negative likewise, with itself, which leaves its attention unchanged for any weight), and the
additive logit bias of those text keys, ``log(1 - w)`` on ``a``'s and ``log(w)`` on ``b``'s, one row per item.
The UNet family's cross attention applies it in :class:`latentlab.backend.families.unet.FusedCrossAttention`,
SD3's joint attention in :class:`latentlab.backend.families.sd3.MixedTextProcessor`.

Why a bias: ``softmax([s_a + log(1 - w), s_b + log(w)])`` is ``[(1 - w) Z_a p_a, w Z_b p_b] / Z`` -- each prompt keeps
its own attention pattern ``p`` within a share of the attention, and weight 0 gives ``b``'s tokens exactly no
attention (``log 0 = -inf``), so the endpoints are each prompt's own generation up to float rounding.
"""

from __future__ import annotations

import torch

from latentlab.backend.records import AttentionMix, Conditioning

__all__ = ["attention_bias", "join", "text_key_bias"]


def join(mix: AttentionMix, negative: Conditioning) -> tuple[Conditioning, Conditioning]:
    """(conditioning, negative) for one request of ``mix``: ``a``'s and ``b``'s tokens concatenated per item,
    pooled embeddings interpolated linearly (in float32), masks concatenated; the negative concatenated with
    itself. The token counts of ``a``, ``b`` and the negative must agree (every family pads to a fixed length)."""
    la, lb, ln = mix.a.prompt_embeds.shape[1], mix.b.prompt_embeds.shape[1], negative.prompt_embeds.shape[1]
    if not la == lb == ln:
        raise ValueError(f"an AttentionMix needs as many text tokens in `a`, `b` and the negative prompt, got {la}, "
                         f"{lb} and {ln} (encode both prompts with lab.encode_prompt of this model)")
    pooled = None
    if mix.a.pooled_prompt_embeds is not None and mix.b.pooled_prompt_embeds is not None:
        pa, pb = mix.a.pooled_prompt_embeds, mix.b.pooled_prompt_embeds
        w = mix.weight.to(torch.float32).view(-1, *[1] * (pa.ndim - 1)).to(pa.device)
        pooled = (pa.float() * (1 - w) + pb.float() * w).to(pa.dtype)
    mask = None
    if mix.a.attention_mask is not None and mix.b.attention_mask is not None:
        mask = torch.cat([mix.a.attention_mask, mix.b.attention_mask], 1)
    cond = Conditioning(torch.cat([mix.a.prompt_embeds, mix.b.prompt_embeds], 1), pooled, mask)
    nmask = None if negative.attention_mask is None else torch.cat([negative.attention_mask] * 2, 1)
    neg = Conditioning(torch.cat([negative.prompt_embeds] * 2, 1), negative.pooled_prompt_embeds, nmask)
    return cond, neg


def text_key_bias(weight: torch.Tensor, tokens_a: int, tokens_b: int, *, rows: int) -> torch.Tensor:
    """The logit bias ``(rows, tokens_a + tokens_b)`` (float64) of the text keys: ``log(1 - w)`` on ``a``'s tokens,
    ``log(w)`` on ``b``'s, with item ``i``'s weight on rows ``i, i + m, i + 2m, ...`` (``m = len(weight)``): how
    the pipelines batch classifier-free guidance's [negative, positive] (the negative's two halves are the same
    tokens, so the bias leaves its attention unchanged)."""
    m = len(weight)
    if rows % m:
        raise RuntimeError(f"attention interpolation: the denoiser was called with {rows} rows, not a multiple of "
                           f"the {m} items; this pipeline batches in a way attention interpolation does not support")
    w = weight.detach().to(torch.float64).cpu()
    per_item = torch.cat([torch.log1p(-w)[:, None].expand(m, tokens_a), torch.log(w)[:, None].expand(m, tokens_b)], 1)
    return per_item.repeat(rows // m, 1)


def attention_bias(weight: torch.Tensor, tokens: int, keys: int, *, rows: int, like: torch.Tensor) -> torch.Tensor:
    """:func:`text_key_bias` of two halves of ``tokens`` text keys each, laid out text first and padded with zeros
    (unbiased keys, e.g. Flux's image tokens) to ``keys``, as an SDPA mask ``(rows, 1, 1, keys)`` in ``like``'s
    dtype and device. With ``keys == 2 * tokens`` it is a UNet cross attention's whole mask."""
    text = text_key_bias(weight, tokens, tokens, rows=rows)
    bias = torch.cat([text, text.new_zeros(rows, keys - text.shape[1])], 1)
    return bias.to(like.device, like.dtype).view(rows, 1, 1, keys)
