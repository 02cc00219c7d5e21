"""The SD3 family: Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``), with or without its T5 encoder.

One responsibility: SD3's side of the adapter interface -- prompts through two CLIP encoders (+ T5 when loaded)
into joint ``prompt_embeds`` (CLIP tokens padded to the T5 width, then the T5 tokens, or zeros without T5) and
``pooled_prompt_embeds`` (both CLIPs' pooled outputs), classifier-free guidance in one batch of [negative, positive],
and the transformer's velocity at timestep ``sigma * num_train_timesteps``. Latents are the 16-channel VAE layout
the pipeline itself uses (the transformer patches them internally), with ``(z - shift_factor) * scaling_factor``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from latentlab.backend.engine import import_diffusers
from latentlab.backend.families.flow import FlowFamily
from latentlab.backend.records import Conditioning

if TYPE_CHECKING:
    from latentlab.backend.engine import Engine
    from latentlab.sampling import Sampling

__all__ = ["SD3Family"]

#: The T5 length StableDiffusion3Pipeline uses when called without ``max_sequence_length``.
SD3_MAX_SEQUENCE_LENGTH = 256


class SD3Family(FlowFamily):
    family = "sd3"
    pipelines = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
    default_steps, default_guidance = 28, 7.0

    def size_patch(self, pipe: Any) -> int:
        return int(pipe.transformer.config.patch_size)

    def facts_from_configs(self, folder, vae_factor: int) -> dict:
        import json
        from pathlib import Path

        facts = super().facts_from_configs(folder, vae_factor)
        try:
            cfg = json.loads((Path(folder) / "transformer" / "config.json").read_text())
        except (OSError, ValueError):
            return facts
        s = int(cfg.get("sample_size", 128)) * vae_factor
        return facts | {"size": (s, s), "size_multiple": vae_factor * int(cfg.get("patch_size", 2))}

    def token_limit(self, pipe: Any):
        if getattr(pipe, "text_encoder_3", None) is not None:
            return pipe.tokenizer_3, SD3_MAX_SEQUENCE_LENGTH
        return pipe.tokenizer, pipe.tokenizer.model_max_length

    def encode_prompt(self, pipe: Any, prompt: str, device: torch.device) -> Conditioning:
        emb, _, pooled, _ = pipe.encode_prompt(prompt=[prompt], prompt_2=None, prompt_3=None, device=device,
                                               num_images_per_prompt=1, do_classifier_free_guidance=False)
        return Conditioning(emb, pooled)

    def check_conditioning(self, pipe: Any, conditioning: Conditioning) -> None:
        super().check_conditioning(pipe, conditioning)
        if conditioning.pooled_prompt_embeds is None:
            raise ValueError("`conditioning` must carry pooled_prompt_embeds for an SD3 model (use "
                             "lab.encode_prompt of this model)")

    def pipeline_class(self, pipe: Any, kind: str):
        diffusers = import_diffusers()
        return (diffusers.StableDiffusion3Img2ImgPipeline if kind == "img2img"
                else diffusers.StableDiffusion3Pipeline)

    def call_kwargs(self, engine: Engine, cond: Conditioning, negative: Conditioning, sampling: Sampling) -> dict:
        b, dev = len(cond), engine.device
        kw: dict[str, Any] = {"prompt_embeds": cond.prompt_embeds.to(dev),
                              "pooled_prompt_embeds": cond.pooled_prompt_embeds.to(dev),
                              "guidance_scale": sampling.guidance_scale}
        if sampling.guidance_scale > 1.0:
            neg = negative.map(lambda t: t.expand(b, *t.shape[1:]).to(dev))
            kw["negative_prompt_embeds"] = neg.prompt_embeds
            kw["negative_pooled_prompt_embeds"] = neg.pooled_prompt_embeds
        return kw

    def velocity(self, engine, x, sigma, cond, negative, sampling):
        pipe, b = engine.pipe, len(x)
        guided = sampling.guidance_scale > 1.0
        both = Conditioning.cat([negative.map(lambda t: t.expand(b, *t.shape[1:])), cond]) if guided else cond
        xin = torch.cat([x, x]) if guided else x
        t = (sigma * pipe.scheduler.config.num_train_timesteps).to(x.dtype).expand(len(xin))
        out = pipe.transformer(hidden_states=xin, timestep=t,
                               encoder_hidden_states=both.prompt_embeds.to(x.device, x.dtype),
                               pooled_projections=both.pooled_prompt_embeds.to(x.device, x.dtype),
                               return_dict=False)[0]
        if guided:
            uncond, text = out.chunk(2)
            out = uncond + sampling.guidance_scale * (text - uncond)
        return out
