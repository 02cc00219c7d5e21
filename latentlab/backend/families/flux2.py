"""The Flux.2 family: ``Flux2Pipeline`` (Flux.2 dev: Mistral-3 text encoder, guidance embedding) and
``Flux2KleinPipeline`` (Flux.2 klein: Qwen-3 text encoder, classifier-free guidance unless step-distilled).

One responsibility: Flux.2's side of the adapter interface --

- latents: the VAE's own layout ``(b, 32, h, w)`` above the backend. The pipeline works on 2x2 *patchified*
  latents ``(b, 128, h/2, w/2)`` normalised per patchified channel by the VAE's batch-norm statistics
  (``(x - running_mean) / sqrt(running_var + eps)``), packed into tokens ``(b, h/2 * w/2, 128)``. Patching, packing
  and the normalisation happen only here; in the VAE layout the normalisation is per channel *and* 2x2 phase.
- noise: the pipeline draws its noise in the patchified shape; :meth:`Flux2Family.noise` draws exactly that for
  each seed (one CPU generator per item) and unpatchifies it, so ``lab.noise`` is the pipeline's own noise.
- prompts: hidden states of three text-encoder layers stacked into ``prompt_embeds`` (no pooled embedding), over
  the chat-templated prompt (Flux.2 dev puts its system message first). The tokens view shows that templated
  sequence, so rows and tokens line up.
- guidance: Flux.2 dev takes ``guidance_scale`` as an input (embedded guidance, one branch); klein runs
  classifier-free guidance with an empty negative prompt above 1, and ignores guidance when step-distilled.
- the schedule: sigmas ``linspace(1, 1/N, N)`` shifted by Flux.2's empirical ``mu``, which depends on the token
  count *and* the number of steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from latentlab.backend.families.base import PromptTokens
from latentlab.backend.families.flow import FlowFamily
from latentlab.backend.families.flux import pack, unpack
from latentlab.backend.records import Conditioning
from latentlab.sampling import Sampling

if TYPE_CHECKING:
    from latentlab.backend.engine import Engine

__all__ = ["Flux2Family", "patchify", "unpatchify"]

#: The text length both Flux.2 pipelines use when called without ``max_sequence_length``.
FLUX2_MAX_SEQUENCE_LENGTH = 512


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) -> (b, 4c, h/2, w/2), channels ordered (c, row in patch, column in patch) as
    ``Flux2Pipeline._patchify_latents``.

    >>> z = torch.randn(2, 3, 4, 6)
    >>> bool((unpatchify(patchify(z)) == z).all()), tuple(patchify(z).shape)
    (True, (2, 12, 2, 3))
    """
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`patchify`."""
    b, c4, h, w = latents.shape
    x = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def _ids(coords: list[torch.Tensor], b: int, device) -> torch.Tensor:
    """Position ids (b, tokens, 4) as the pipelines build them: every combination of the four coordinates."""
    return torch.cartesian_prod(*coords).unsqueeze(0).expand(b, -1, -1).to(device)


def templated_tokens(pipe: Any, klein: bool) -> PromptTokens:
    """The tokens the text encoder sees: the pipeline's chat template applied, then its tokenizer."""
    tok = pipe.tokenizer

    def ids(prompt: str) -> list[int]:
        if klein:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
            return tok(text).input_ids
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        messages = format_input(prompts=[prompt], system_message=pipe.system_message)
        return tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=True,
                                       return_dict=True)["input_ids"][0]

    inner = getattr(tok, "tokenizer", tok)  # a processor (Pixtral) holds its tokenizer
    return PromptTokens(inner, ids, padding_side=getattr(inner, "padding_side", "right"))


class Flux2Family(FlowFamily):
    family = "flux2"
    latent_patch = 2
    weight_components = ("transformer", "vae", "text_encoder")
    pipelines = ("Flux2Pipeline", "Flux2KleinPipeline")
    display_name = "a Flux.2"
    own_img2img = True  # diffusers has no Flux.2 img2img pipeline: the flow recipe of FlowFamily.img2img
    default_steps, default_guidance = 50, 4.0

    @staticmethod
    def klein(pipe: Any) -> bool:
        return type(pipe).__name__ == "Flux2KleinPipeline"

    @staticmethod
    def distilled(pipe: Any) -> bool:
        config = getattr(pipe, "config", {})
        return bool(config.get("is_distilled", False)) if hasattr(config, "get") else False

    def facts_from_configs(self, folder, vae_factor: int) -> dict:
        s = 128 * vae_factor  # both pipelines' default_sample_size
        return super().facts_from_configs(folder, vae_factor) | {"size": (s, s)}

    def guidance_mode(self, pipe: Any) -> str:
        if not self.klein(pipe):
            return "embedded"
        return "none" if self.distilled(pipe) else "cfg"

    def default_sampling(self, pipe: Any) -> Sampling:
        s = super().default_sampling(pipe)
        if self.klein(pipe) and self.distilled(pipe):  # a few steps, no guidance
            return s.replace(num_inference_steps=4, guidance_scale=1.0)
        return s

    def pipeline_class(self, pipe: Any, kind: str):
        return type(pipe)  # dev and klein are separate text-to-image pipelines over different text encoders

    # --- the schedule ---------------------------------------------------------------------------------------------

    def pipeline_sigmas(self, steps: int):
        return np.linspace(1.0, 1 / steps, steps)

    def mu(self, pipe: Any, h: int, w: int, steps: int) -> float | None:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return compute_empirical_mu(image_seq_len=self.image_seq_len(pipe, h, w), num_steps=steps)

    # --- prompts ------------------------------------------------------------------------------------------------

    def token_limit(self, pipe: Any):
        return templated_tokens(pipe, self.klein(pipe)), FLUX2_MAX_SEQUENCE_LENGTH

    def display_tokenizer(self, pipe: Any):
        return self.token_limit(pipe)

    def encode_prompt(self, pipe: Any, prompt: str, device: torch.device) -> Conditioning:
        emb, _ = pipe.encode_prompt(prompt=[prompt], device=device, num_images_per_prompt=1)
        return Conditioning(emb)

    # --- latents and the VAE ------------------------------------------------------------------------------------

    def noise(self, seed, shape: tuple[int, int, int]) -> torch.Tensor:
        from latentlab.seeds import noise

        c, h, w = shape
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
        return torch.cat([unpatchify(noise(s, (1, 4 * c, h // 2, w // 2))) for s in seeds])

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return patchify(latents)  # Flux2Pipeline(latents=) takes the patchified 4-D layout and packs it itself

    def unpack(self, latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if latents.ndim == 4:  # klein's output_type="latent": already the VAE layout (unnormalised; see generate)
            return latents
        return unpack(latents, h, w)  # dev's packed tokens: the same order as Flux.1's packing

    def comfyui_layout(self, latents: torch.Tensor) -> torch.Tensor:
        return patchify(latents)  # ComfyUI's Flux.2 latents: 128 normalised patchified channels, no scale

    def vae_factors(self, vae: Any) -> tuple[float, float]:
        return 1.0, 0.0  # per-channel batch-norm statistics instead (scale/unscale)

    @staticmethod
    def _stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def scale(self, vae: Any, z: torch.Tensor) -> torch.Tensor:
        p = patchify(z)
        mean, std = self._stats(vae, p)
        return unpatchify((p - mean) / std)

    def unscale(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        p = patchify(latents)
        mean, std = self._stats(vae, p)
        return unpatchify(p * std + mean)

    # --- denoising ----------------------------------------------------------------------------------------------

    def call_kwargs(self, engine: Engine, cond: Conditioning, negative: Conditioning, sampling: Sampling) -> dict:
        b, dev = len(cond), engine.device
        kw: dict[str, Any] = {"prompt_embeds": cond.prompt_embeds.to(dev), "guidance_scale": sampling.guidance_scale}
        if self.klein(engine.pipe) and sampling.guidance_scale > 1.0 and not self.distilled(engine.pipe):
            kw["negative_prompt_embeds"] = negative.prompt_embeds.expand(b, *negative.prompt_embeds.shape[1:]).to(dev)
        return kw

    def generate(self, engine, z, cond, negative, sampling):
        out = super().generate(engine, z, cond, negative, sampling)
        if self.klein(engine.pipe) and sampling.scheduler == "FlowMatchEulerDiscreteScheduler":
            return self.scale(engine.pipe.vae, out)  # klein returns the VAE's own latents, unnormalised
        return out

    def velocity(self, engine, x, sigma, cond, negative, sampling):
        pipe, (b, _, h, w) = engine.pipe, x.shape
        dev, dt = x.device, x.dtype
        tokens = pack(x)
        n = tokens.shape[1]
        img_ids = _ids([torch.arange(1), torch.arange(h // 2), torch.arange(w // 2), torch.arange(1)], b, dev)
        klein = self.klein(pipe)
        guidance = None if klein else torch.full([1], sampling.guidance_scale, device=dev,
                                                 dtype=torch.float32).expand(b)
        t = (sigma * pipe.scheduler.config.num_train_timesteps).to(dt).expand(b) / 1000  # as the pipeline rounds

        def call(c: Conditioning):
            emb = c.prompt_embeds.expand(b, *c.prompt_embeds.shape[1:]).to(dev, dt)
            txt_ids = _ids([torch.arange(1)] * 3 + [torch.arange(emb.shape[1])], b, dev)
            return pipe.transformer(hidden_states=tokens, timestep=t, guidance=guidance, encoder_hidden_states=emb,
                                    txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0][:, :n]

        out = call(cond)
        if klein and not self.distilled(pipe) and sampling.guidance_scale > 1.0:
            neg = call(negative)
            out = neg + sampling.guidance_scale * (out - neg)
        return unpack(out, h, w)
