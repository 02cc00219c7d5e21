"""The Qwen-Image family (``QwenImagePipeline``): an MMDiT over Qwen2.5-VL text features and a video VAE.

One responsibility: Qwen-Image's side of the adapter interface --

- latents: 16 channels in the VAE layout ``(b, 16, h, w)`` above the backend. The VAE is a video VAE that works on
  ``(b, C, frames, h, w)``; images are one frame, added and removed only here (:meth:`QwenImageFamily.vae_decode`,
  :meth:`vae_encode`). Its latents are normalised per channel, ``(z - latents_mean) / latents_std``; the pipeline
  draws its noise as ``(b, 1, 16, h, w)`` (the same numbers as the VAE layout) and packs 2x2 patches into tokens as
  Flux does;
- prompts: the last hidden states of Qwen2.5-VL over the pipeline's prompt template, without its first 34 tokens,
  each prompt at its own length with an ``attention_mask`` (conditionings of several prompts are padded with masked
  zero tokens, as the pipeline pads a batch). The tokens view shows those tokens;
- guidance: "true" classifier-free guidance (two branches above 1, with the negative prompt), renormalised to the
  conditional prediction's norm per token, as the pipeline does with ``true_cfg_scale`` and a ``negative_prompt``;
- the schedule: sigmas ``linspace(1, 1/N, N)`` with the dynamic shift ``mu`` from the token count (the scheduler's
  config adds its exponential shift and terminal value).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from latentlab.backend.families.base import PromptTokens
from latentlab.backend.families.flow import FlowFamily, renormalised_cfg
from latentlab.backend.families.flux import pack, unpack
from latentlab.backend.records import Conditioning
from latentlab.sampling import Sampling

if TYPE_CHECKING:
    from latentlab.backend.engine import Engine

__all__ = ["QwenImageFamily"]


class QwenImageFamily(FlowFamily):
    family = "qwenimage"
    latent_patch = 2
    pipelines = ("QwenImagePipeline", "QwenImageImg2ImgPipeline")
    weight_components = ("transformer", "vae", "text_encoder")
    needs_mask, display_name = True, "a Qwen-Image"
    default_steps, default_guidance = 50, 4.0
    own_img2img = True  # the flow img2img recipe (FlowFamily.img2img), on latents rather than pixels

    def facts_from_configs(self, folder, vae_factor: int) -> dict:
        s = 128 * vae_factor  # QwenImagePipeline.default_sample_size
        return super().facts_from_configs(folder, vae_factor) | {"size": (s, s)}

    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.vae.config.z_dim)

    def guidance_mode(self, pipe: Any) -> str:
        return "true_cfg"

    def pipeline_sigmas(self, steps: int):
        return np.linspace(1.0, 1 / steps, steps)

    # --- prompts ------------------------------------------------------------------------------------------------

    def token_limit(self, pipe: Any):
        # the tokens whose hidden states become prompt_embeds: the template around the prompt, its first
        # prompt_template_encode_start_idx tokens dropped
        return PromptTokens(pipe.tokenizer, lambda prompt: pipe.tokenizer(pipe.prompt_template_encode.format(prompt))
                            .input_ids[pipe.prompt_template_encode_start_idx:]), int(pipe.tokenizer_max_length)

    def display_tokenizer(self, pipe: Any):
        return self.token_limit(pipe)

    def encode_prompt(self, pipe: Any, prompt: str, device: torch.device) -> Conditioning:
        emb, mask = pipe.encode_prompt([prompt], device=device)
        mask = emb.new_ones(emb.shape[:2]) if mask is None else mask.to(emb.dtype)
        return Conditioning(emb, attention_mask=mask)

    # --- latents and the VAE ------------------------------------------------------------------------------------

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return pack(latents)

    def unpack(self, latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return unpack(latents, h, w)

    @staticmethod
    def _stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1).to(like.device, like.dtype)
        return mean, std

    def scale(self, vae: Any, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(vae, z)
        return (z - mean) / std

    def unscale(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(vae, latents)
        return latents * std + mean

    def vae_factors(self, vae: Any) -> tuple[float, float]:
        return 1.0, 0.0  # per-channel statistics instead (scale/unscale)

    def vae_decode(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(self.unscale(vae, latents).unsqueeze(2), return_dict=False)[0][:, :, 0]

    def vae_encode(self, vae: Any, images: torch.Tensor) -> torch.Tensor:
        return self.scale(vae, vae.encode(images.unsqueeze(2)).latent_dist.mean[:, :, 0])

    # --- denoising ----------------------------------------------------------------------------------------------

    @staticmethod
    def _mask(c: Conditioning, device) -> torch.Tensor | None:
        m = c.attention_mask.to(device).long()
        return None if bool(m.all()) else m  # the pipeline passes no mask when nothing is masked

    def call_kwargs(self, engine: Engine, cond: Conditioning, negative: Conditioning, sampling: Sampling) -> dict:
        b, dev = len(cond), engine.device
        # Masks go in whole (the pipeline drops an all-ones mask itself, and warns when none is given).
        kw: dict[str, Any] = {"prompt_embeds": cond.prompt_embeds.to(dev),
                              "prompt_embeds_mask": cond.attention_mask.to(dev).long(), "true_cfg_scale": 1.0}
        if sampling.guidance_scale > 1.0:
            neg = negative.map(lambda t: t.expand(b, *t.shape[1:]).to(dev))
            kw.update(true_cfg_scale=sampling.guidance_scale, negative_prompt_embeds=neg.prompt_embeds,
                      negative_prompt_embeds_mask=neg.attention_mask.long())
        return kw

    def velocity(self, engine, x, sigma, cond, negative, sampling):
        pipe, (b, _, h, w) = engine.pipe, x.shape
        dev, dt = x.device, x.dtype
        tokens = pack(x)
        t = (sigma * pipe.scheduler.config.num_train_timesteps).to(dt).expand(b) / 1000  # as the pipeline rounds
        shapes = [[(1, h // 2, w // 2)]] * b

        def call(c: Conditioning):
            c = c.map(lambda f: f.expand(b, *f.shape[1:]))
            return pipe.transformer(hidden_states=tokens, timestep=t, guidance=None,
                                    encoder_hidden_states_mask=self._mask(c, dev),
                                    encoder_hidden_states=c.prompt_embeds.to(dev, dt), img_shapes=shapes,
                                    return_dict=False)[0]

        out = call(cond)
        if sampling.guidance_scale > 1.0:
            neg = call(negative)
            out = renormalised_cfg(out, neg, sampling.guidance_scale)
        return unpack(out, h, w)
