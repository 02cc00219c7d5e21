"""The Lumina 2 family (``Lumina2Pipeline``, Lumina-Image 2.0): a flow transformer over Gemma-2 text features.

One responsibility: Lumina 2's side of the adapter interface --

- latents: the 16-channel VAE layout the pipeline itself uses (the transformer patches them 2x2 inside), with the
  VAE's shift and scale (FlowFamily);
- prompts: Gemma-2's second-to-last hidden states over ``system prompt + " <Prompt Start> " + prompt``, with the
  text ``attention_mask`` (a prefix: the transformer keeps that many text tokens). The negative prompt is encoded
  *without* the system prompt, as the pipeline does. The tokens view shows the system-prompted sequence;
- the model's time runs the other way (``t = 1 - sigma``) and it predicts the negative velocity;
- guidance: classifier-free guidance with the pipeline's defaults: on every step (``cfg_trunc_ratio=1``) and
  renormalised to the conditional prediction's norm along the last axis (``cfg_normalization=True``);
- the schedule: sigmas ``linspace(1, 1/N, N)`` with the dynamic shift ``mu`` computed, as the installed pipeline
  computes it, from ``latents.shape[1]`` -- the latent *channel* count, not the token count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from latentlab.backend.families.base import PromptTokens
from latentlab.backend.families.flow import FlowFamily, renormalised_cfg
from latentlab.backend.records import Conditioning
from latentlab.sampling import Sampling

if TYPE_CHECKING:
    from latentlab.backend.engine import Engine

__all__ = ["Lumina2Family"]

#: The Gemma length Lumina2Pipeline uses when called without ``max_sequence_length``.
LUMINA2_MAX_SEQUENCE_LENGTH = 256


class Lumina2Family(FlowFamily):
    family = "lumina2"
    pipelines = ("Lumina2Pipeline",)
    weight_components = ("transformer", "vae", "text_encoder")
    needs_mask, display_name = True, "a Lumina 2"
    transformer_patches = True
    default_steps, default_guidance = 30, 4.0
    own_img2img = True  # diffusers has no Lumina 2 img2img pipeline: FlowFamily's loop

    # --- the schedule ---------------------------------------------------------------------------------------------

    def pipeline_sigmas(self, steps: int):
        return np.linspace(1.0, 1 / steps, steps)

    def image_seq_len(self, pipe: Any, h: int, w: int) -> int:
        return int(pipe.vae.config.latent_channels)  # Lumina2Pipeline's latents.shape[1] (see the module notes)

    def mu(self, pipe: Any, h: int, w: int, steps: int) -> float | None:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = pipe.scheduler.config  # the pipeline passes mu whether or not the scheduler shifts dynamically
        return calculate_shift(self.image_seq_len(pipe, h, w), cfg.get("base_image_seq_len", 256),
                               cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                               cfg.get("max_shift", 1.15))

    # --- prompts ------------------------------------------------------------------------------------------------

    def token_limit(self, pipe: Any):
        # the tokens the text encoder reads: the pipeline's system prompt, " <Prompt Start> " and the prompt
        return PromptTokens(pipe.tokenizer, lambda prompt: pipe.tokenizer(
            f"{pipe.system_prompt} <Prompt Start> {prompt}").input_ids), LUMINA2_MAX_SEQUENCE_LENGTH

    def display_tokenizer(self, pipe: Any):
        return self.token_limit(pipe)

    def encode_prompt(self, pipe: Any, prompt: str, device: torch.device) -> Conditioning:
        emb, mask, _, _ = pipe.encode_prompt([prompt], do_classifier_free_guidance=False, device=device)
        return Conditioning(emb, attention_mask=mask.to(emb.dtype))

    @torch.no_grad()
    def negative(self, pipe: Any, encoded: Conditioning, negative_prompt: str) -> Conditioning:
        _, _, emb, mask = pipe.encode_prompt([""], do_classifier_free_guidance=True, negative_prompt=[negative_prompt],
                                             device=encoded.prompt_embeds.device)
        return Conditioning(emb, attention_mask=mask.to(emb.dtype))

    # --- denoising ----------------------------------------------------------------------------------------------

    def call_kwargs(self, engine: Engine, cond: Conditioning, negative: Conditioning, sampling: Sampling) -> dict:
        b, dev = len(cond), engine.device
        kw: dict[str, Any] = {"prompt_embeds": cond.prompt_embeds.to(dev),
                              "prompt_attention_mask": cond.attention_mask.to(dev).long(),
                              "guidance_scale": sampling.guidance_scale}
        if sampling.guidance_scale > 1.0:
            neg = negative.map(lambda t: t.expand(b, *t.shape[1:]).to(dev))
            kw.update(negative_prompt_embeds=neg.prompt_embeds,
                      negative_prompt_attention_mask=neg.attention_mask.long())
        return kw

    def velocity(self, engine, x, sigma, cond, negative, sampling):
        pipe, b = engine.pipe, len(x)
        dev, dt = x.device, x.dtype
        n_train = pipe.scheduler.config.num_train_timesteps
        t = (1 - (sigma * n_train).to(dt) / n_train).expand(b)  # as the pipeline rounds

        def call(c: Conditioning):
            c = c.map(lambda f: f.expand(b, *f.shape[1:]))
            return pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=c.prompt_embeds.to(dev, dt),
                                    encoder_attention_mask=c.attention_mask.to(dev).long(), return_dict=False)[0]

        out = call(cond)
        if sampling.guidance_scale > 1.0:
            neg = call(negative)
            out = renormalised_cfg(out, neg, sampling.guidance_scale)
        return -out
