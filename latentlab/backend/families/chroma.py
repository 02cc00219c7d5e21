"""The Chroma family (``ChromaPipeline``): a Flux.1-schnell-derived transformer with T5 only and masked text.

One responsibility: what Chroma changes from Flux.1 (:mod:`latentlab.backend.families.flux`, whose latent layout,
2x2 packing, VAE arithmetic and dynamic shift it shares):

- prompts: T5 token embeddings only (no pooled CLIP embedding), and an ``attention_mask`` that Chroma's
  transformer applies to the text tokens: every token of the prompt plus the first padding token is attended, the
  rest of the padding is not. The mask travels in :class:`~latentlab.backend.Conditioning` (combinations of
  prompts attend to every token any of them attends to);
- guidance: classifier-free guidance with a negative prompt, two branches above 1 (``guidance_scale``);
- img2img and inpainting: the flow families' own loop (see ``own_img2img`` below).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from latentlab.backend.families.flux import FLUX_MAX_SEQUENCE_LENGTH, FluxFamily, image_ids, pack, unpack
from latentlab.backend.records import Conditioning
from latentlab.sampling import Sampling

if TYPE_CHECKING:
    from latentlab.backend.engine import Engine

__all__ = ["ChromaFamily"]


class ChromaFamily(FluxFamily):
    family = "chroma"
    pipelines = ("ChromaPipeline", "ChromaImg2ImgPipeline")
    weight_components = ("transformer", "vae", "text_encoder")
    needs_pooled, needs_mask, display_name = False, True, "a Chroma"
    # diffusers' ChromaImg2ImgPipeline resizes a latent `image` as if it were pixels (its image processor is not
    # told the latent channels), so img2img/inpainting run FlowFamily's loop: FluxImg2ImgPipeline's recipe.
    own_img2img = True
    default_steps, default_guidance = 35, 5.0

    def embedded_guidance(self, pipe: Any) -> bool:
        return False

    def guidance_mode(self, pipe: Any) -> str:
        return "cfg"

    def default_sampling(self, pipe: Any) -> Sampling:
        return super(FluxFamily, self).default_sampling(pipe)  # not schnell's "4 steps, no guidance"

    def token_limit(self, pipe: Any):
        return pipe.tokenizer, FLUX_MAX_SEQUENCE_LENGTH

    def encode_prompt(self, pipe: Any, prompt: str, device: torch.device) -> Conditioning:
        emb, _, mask, *_ = pipe.encode_prompt(prompt=[prompt], device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
        return Conditioning(emb, attention_mask=mask)

    def call_kwargs(self, engine: Engine, cond: Conditioning, negative: Conditioning, sampling: Sampling) -> dict:
        b, dev = len(cond), engine.device
        kw: dict[str, Any] = {"prompt_embeds": cond.prompt_embeds.to(dev),
                              "prompt_attention_mask": cond.attention_mask.to(dev),
                              "guidance_scale": sampling.guidance_scale}
        if sampling.guidance_scale > 1.0:
            neg = negative.map(lambda t: t.expand(b, *t.shape[1:]).to(dev))
            kw.update(negative_prompt_embeds=neg.prompt_embeds, negative_prompt_attention_mask=neg.attention_mask)
        return kw

    def velocity(self, engine, x, sigma, cond, negative, sampling):
        pipe, (b, _, h, w) = engine.pipe, x.shape
        dev, dt = x.device, x.dtype
        tokens = pack(x)
        img_ids = image_ids(h, w, dev, dt)
        t = (sigma * pipe.scheduler.config.num_train_timesteps).to(dt).expand(b) / 1000  # as the pipeline rounds

        def call(c: Conditioning):
            c = c.map(lambda f: f.expand(b, *f.shape[1:]))
            mask = torch.cat([c.attention_mask.to(dev, dt), torch.ones(b, tokens.shape[1], device=dev, dtype=dt)], 1)
            txt_ids = torch.zeros(c.prompt_embeds.shape[1], 3, device=dev, dtype=dt)
            return pipe.transformer(hidden_states=tokens, timestep=t, encoder_hidden_states=c.prompt_embeds.to(dev, dt),
                                    txt_ids=txt_ids, img_ids=img_ids, attention_mask=mask, return_dict=False)[0]

        out = call(cond)
        if sampling.guidance_scale > 1.0:
            neg = call(negative)
            out = neg + sampling.guidance_scale * (out - neg)
        return unpack(out, h, w)
