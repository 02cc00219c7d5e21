"""The Flux.1 family (``FluxPipeline``): the guidance-distilled "dev" style and the guidance-free "schnell" style.

One responsibility: Flux's side of the adapter interface --

- prompts: T5 token embeddings as ``prompt_embeds`` and CLIP's pooled output as ``pooled_prompt_embeds``;
- latents: 16 channels in the VAE layout above the backend; the pipeline's 2x2 token packing
  (``(b, c, h, w) -> (b, h/2 * w/2, 4c)``) happens only here, in :meth:`FluxFamily.pack` / :meth:`unpack`;
- guidance: a model with a guidance embedding ("dev") takes ``guidance_scale`` as an input (one branch); a model
  without ("schnell") runs true classifier-free guidance (``true_cfg_scale``, two branches) when it is above 1;
- the schedule: sigmas ``linspace(1, 1/N, N)`` shifted by ``mu`` from the packed token count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from latentlab.backend.families.base import Family
from latentlab.backend.families.flow import FlowFamily, swapped_attn_processors
from latentlab.backend.records import Conditioning
from latentlab.sampling import Sampling

if TYPE_CHECKING:
    from latentlab.backend.engine import Engine

__all__ = ["FluxFamily", "pack", "unpack"]

#: The T5 length FluxPipeline uses when called without ``max_sequence_length``.
FLUX_MAX_SEQUENCE_LENGTH = 512


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) -> (b, h/2 * w/2, 4c): each 2x2 latent patch becomes one token (FluxPipeline's packing).

    >>> pack(torch.arange(16.).view(1, 1, 4, 4))[0, :2].tolist()
    [[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0]]
    """
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` for a latent of ``h`` x ``w``.

    >>> z = torch.randn(2, 16, 6, 4)
    >>> bool((unpack(pack(z), 6, 4) == z).all())
    True
    """
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Positions (0, row, col) of the packed tokens of an ``h`` x ``w`` latent (the transformer's RoPE ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


class MixedTextBias:
    """Flux attention over two prompts' tokens side by side (:class:`~latentlab.backend.AttentionMix`): the
    text-key bias of :func:`~latentlab.backend.families.textmix.text_key_bias` handed to the layer's own processor
    as its additive attention mask. Flux puts the text first: the context of a double-stream block, the first
    ``2 * tokens`` positions of a single-stream block's sequence; image keys are unbiased."""

    def __init__(self, processor, weight: torch.Tensor, tokens: int):
        self.processor, self.weight, self.tokens = processor, weight, int(tokens)
        self._bias: dict[tuple, torch.Tensor] = {}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from latentlab.backend.families.textmix import attention_bias

        if attention_mask is not None:
            raise RuntimeError("attention interpolation: this Flux model masks its attention, which attention "
                               "interpolation does not support; use prediction mixing (PredictionMix)")
        rows = hidden_states.shape[0]
        keys = hidden_states.shape[1] + (0 if encoder_hidden_states is None else encoder_hidden_states.shape[1])
        key = (rows, keys, hidden_states.dtype, hidden_states.device)
        if key not in self._bias:
            self._bias[key] = attention_bias(self.weight, self.tokens, keys, rows=rows, like=hidden_states)
        return self.processor(attn, hidden_states, encoder_hidden_states, self._bias[key], image_rotary_emb)


def mixed_text(transformer, weight: torch.Tensor, tokens: int):
    """Run every attention layer of a Flux ``transformer`` through :class:`MixedTextBias` for the block (its own
    processors restored after)."""
    procs = {name: MixedTextBias(p, weight, tokens) for name, p in transformer.attn_processors.items()}
    return swapped_attn_processors(transformer, procs)


class FluxFamily(FlowFamily):
    family = "flux"
    latent_patch = 2
    pipelines = ("FluxPipeline", "FluxImg2ImgPipeline")
    needs_pooled, display_name = True, "a Flux"

    def facts_from_configs(self, folder, vae_factor: int) -> dict:
        s = 128 * vae_factor  # FluxPipeline.default_sample_size
        return super().facts_from_configs(folder, vae_factor) | {"size": (s, s)}

    def embedded_guidance(self, pipe: Any) -> bool:
        return bool(pipe.transformer.config.guidance_embeds)

    def guidance_mode(self, pipe: Any) -> str:
        return "embedded" if self.embedded_guidance(pipe) else "true_cfg"

    def default_sampling(self, pipe: Any) -> Sampling:
        s = super().default_sampling(pipe)
        if not self.embedded_guidance(pipe):  # schnell: a few steps, no guidance
            return s.replace(num_inference_steps=4, guidance_scale=1.0)
        return s

    def image_seq_len(self, pipe: Any, h: int, w: int) -> int:
        return (h // 2) * (w // 2)

    def pipeline_sigmas(self, steps: int):
        return np.linspace(1.0, 1 / steps, steps)

    def token_limit(self, pipe: Any):
        return pipe.tokenizer_2, FLUX_MAX_SEQUENCE_LENGTH

    def display_tokenizer(self, pipe: Any):
        return self.token_limit(pipe)  # Flux's prompt_embeds are the T5 tokens

    def encode_prompt(self, pipe: Any, prompt: str, device: torch.device) -> Conditioning:
        emb, pooled, _ = pipe.encode_prompt(prompt=[prompt], prompt_2=None, device=device, num_images_per_prompt=1)
        return Conditioning(emb, pooled)


    def attention_mix_unsupported(self, pipe: Any) -> str | None:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        if self.needs_mask:  # Chroma: its own text mask would have to be merged with the bias
            return Family.attention_mix_unsupported(self, pipe)
        for p in pipe.transformer.attn_processors.values():
            if type(p) is not FluxAttnProcessor:
                return f"needs diffusers' default attention processors, but this model runs {type(p).__name__}"
        return None

    def generate_attention_mix(self, engine, z, mix, negative, sampling):
        """Both prompts' tokens in every attention, their share set by the text-key bias (:class:`MixedTextBias`);
        true classifier-free guidance calls the transformer once per branch, each with the same bias (the negative's
        two halves are the same tokens)."""
        from latentlab.backend.families.textmix import join

        cond, neg = join(mix, negative)
        with mixed_text(engine.pipe.transformer, mix.weight, mix.a.prompt_embeds.shape[1]):
            return self.generate(engine, z, cond, neg, sampling)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return pack(latents)

    def unpack(self, latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return unpack(latents, h, w)


    def call_kwargs(self, engine: Engine, cond: Conditioning, negative: Conditioning, sampling: Sampling) -> dict:
        b, dev = len(cond), engine.device
        kw: dict[str, Any] = {"prompt_embeds": cond.prompt_embeds.to(dev),
                              "pooled_prompt_embeds": cond.pooled_prompt_embeds.to(dev)}
        if self.embedded_guidance(engine.pipe):
            kw["guidance_scale"] = sampling.guidance_scale
        elif sampling.guidance_scale > 1.0:
            neg = negative.map(lambda t: t.expand(b, *t.shape[1:]).to(dev))
            kw.update(true_cfg_scale=sampling.guidance_scale, negative_prompt_embeds=neg.prompt_embeds,
                      negative_pooled_prompt_embeds=neg.pooled_prompt_embeds)
        return kw

    def velocity(self, engine, x, sigma, cond, negative, sampling):
        pipe, (b, _, h, w) = engine.pipe, x.shape
        dev, dt = x.device, x.dtype
        tokens = pack(x)
        img_ids = image_ids(h, w, dev, dt)
        guidance = None
        if self.embedded_guidance(pipe):
            guidance = torch.full([1], sampling.guidance_scale, device=dev, dtype=torch.float32).expand(b)
        t = sigma.to(dt).expand(b)

        def call(c: Conditioning):
            txt_ids = torch.zeros(c.prompt_embeds.shape[1], 3, device=dev, dtype=dt)
            return pipe.transformer(hidden_states=tokens, timestep=t, guidance=guidance,
                                    pooled_projections=c.pooled_prompt_embeds.to(dev, dt),
                                    encoder_hidden_states=c.prompt_embeds.to(dev, dt), txt_ids=txt_ids,
                                    img_ids=img_ids, return_dict=False)[0]

        out = call(cond)
        if not self.embedded_guidance(pipe) and sampling.guidance_scale > 1.0:
            neg = call(negative.map(lambda t_: t_.expand(b, *t_.shape[1:])))
            out = neg + sampling.guidance_scale * (out - neg)
        return unpack(out, h, w)
