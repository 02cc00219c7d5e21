"""Attention interpolation between two prompts (:class:`~latentlab.backend.AttentionMix`): what the families that
support it share.

One responsibility: turning an ``AttentionMix`` into one request -- both prompts' tokens side by side in one
conditioning (the negative likewise, with itself, which leaves its attention unchanged for any weight), and the
additive logit bias of those text keys, ``log(1 - w)`` on ``a``'s and ``log(w)`` on ``b``'s, one row per item --
plus the UNet family's cross-attention processor that applies it. SD3's joint attention applies the same bias in
:mod:`latentlab.backend.families.sd3`.

Why a bias: ``softmax([s_a + log(1 - w), s_b + log(w)])`` is ``[(1 - w) Z_a p_a, w Z_b p_b] / Z`` -- each prompt keeps
its own attention pattern ``p`` within a share of the attention, and weight 0 gives ``b``'s tokens exactly no
attention (``log 0 = -inf``), so the endpoints are each prompt's own generation up to float rounding.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from latentlab.backend.records import AttentionMix, Conditioning

__all__ = ["FusedCrossAttention", "fused_cross_attention", "join", "text_key_bias"]


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


class FusedCrossAttention:
    """diffusers' ``AttnProcessor2_0`` for cross attention over two prompts' tokens side by side, their logits
    biased by :func:`text_key_bias` (see the module notes); self attention (no ``encoder_hidden_states``) runs the
    module's own processor unchanged."""

    def __init__(self, weight: torch.Tensor, tokens_a: int, fallback):
        self.weight, self.tokens_a, self.fallback = weight, int(tokens_a), fallback
        self._bias: dict[tuple, torch.Tensor] = {}

    def bias(self, rows: int, keys: int, like: torch.Tensor) -> torch.Tensor:
        key = (rows, keys, like.dtype, like.device)
        if key not in self._bias:
            b = text_key_bias(self.weight, self.tokens_a, keys - self.tokens_a, rows=rows)
            self._bias[key] = b.to(like.device, like.dtype).view(rows, 1, 1, keys)
        return self._bias[key]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if encoder_hidden_states is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attention_mask is not None:
            raise RuntimeError("attention interpolation: this UNet masks its text tokens, which attention "
                               "interpolation does not support; use prediction mixing (PredictionMix)")
        import torch.nn.functional as F

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        ehs = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states

        def heads(x):
            return x.view(batch_size, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(ehs)), heads(attn.to_v(ehs))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        bias = self.bias(batch_size, key.shape[2], query)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * query.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# diffusers' Attention.forward reads the processor's signature on every call; answer it at once (see unet.py).
FusedCrossAttention.__call__.__signature__ = inspect.signature(FusedCrossAttention.__call__)


@contextlib.contextmanager
def fused_cross_attention(modules, weight: torch.Tensor, tokens_a: int):
    """Run the cross-attention ones of ``modules`` with :class:`FusedCrossAttention` for the block (processors
    restored after)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    cross = [m for m in modules if getattr(m, "is_cross_attention", False)]
    old = [m.processor for m in cross]
    proc = FusedCrossAttention(weight, tokens_a, AttnProcessor2_0())  # one for all layers: one bias per request
    for m in cross:
        m.set_processor(proc)
    try:
        yield
    finally:
        for m, p in zip(cross, old):
            m.set_processor(p)
