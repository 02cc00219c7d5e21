"""What every model-family adapter answers: the narrow interface between the engine and one diffusers family.

One responsibility: the contract (and the defaults shared by every family). An adapter is stateless: it is asked
about a loaded pipeline and returns plain values, so one adapter serves every model of its family. Adding a family
is one new module with a subclass of :class:`Family` and its tiny parity test against the plain pipeline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from latentlab.backend.records import Conditioning
from latentlab.sampling import Sampling

if TYPE_CHECKING:
    from latentlab.backend.engine import Engine

__all__ = ["Family", "PromptTokens"]


class PromptTokens:
    """The tokens a family's text encoder actually reads for a prompt -- its template, system prompt or chat format
    applied (what :meth:`latentlab.Lab.tokens` and the truncation warning count), made by ``ids(prompt)``. Looks like
    a tokenizer to the engine: ``tok(prompt).input_ids`` and ``tok.convert_ids_to_tokens``."""

    def __init__(self, tokenizer: Any, ids: Callable[[str], list[int]], *, padding_side: str = "right"):
        self.tokenizer, self._ids, self.padding_side = tokenizer, ids, padding_side

    def __call__(self, prompt: str, **_: Any) -> SimpleNamespace:
        return SimpleNamespace(input_ids=list(self._ids(prompt)))

    def convert_ids_to_tokens(self, ids):
        return self.tokenizer.convert_ids_to_tokens(ids)


class Family:
    """Base class of the family adapters (see the module notes). Subclasses set the class attributes and
    implement the methods that raise ``NotImplementedError`` here."""

    #: Short family name recorded in provenance, manifests and cache keys ("sd", "sdxl", "sd3", "flux", "chroma",
    #: "lumina2", "qwenimage", "flux2").
    family: ClassVar[str] = ""
    #: The pipeline attribute of the network that runs every step.
    denoiser_name: ClassVar[str] = "unet"
    #: Latent pixels per token side (1: none; 2: latents are patched/packed 2x2 into tokens).
    latent_patch: ClassVar[int] = 1
    #: The pipeline's weight-holding components (the model fingerprint samples them; absent ones are skipped).
    weight_components: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder", "text_encoder_2")
    #: diffusers pipeline class names this adapter serves: text-to-image first, then img2img.
    pipelines: ClassVar[tuple[str, ...]] = ()
    #: Whether the conditioning must carry ``pooled_prompt_embeds`` (SDXL, SD3, Flux).
    needs_pooled: ClassVar[bool] = False
    #: Whether the conditioning must carry the text ``attention_mask`` (Chroma, Lumina 2).
    needs_mask: ClassVar[bool] = False
    #: The family's name in messages.
    display_name: ClassVar[str] = ""
    #: Whether img2img/inpainting run the adapter's own loop (:meth:`img2img`) rather than diffusers' img2img
    #: pipeline (``pipelines[1]``): for families whose diffusers has none.
    own_img2img: ClassVar[bool] = False
    #: The morph's prompt path under ``"auto"`` for this family where it can take an AttentionMix: ``"attention"``
    #: where it was measured better than lerp, else ``"lerp"`` (BENCHMARKS.md, "Attention interpolation").
    default_prompt_path: ClassVar[str] = "lerp"

    # --- facts ----------------------------------------------------------------------------------------------------

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        return type(pipe).__name__ in cls.pipelines

    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.vae.config.latent_channels)

    def size_patch(self, pipe: Any) -> int:
        """Latent pixels per token side: image sizes must be multiples of the VAE factor times this."""
        return self.latent_patch

    def default_size(self, engine: Engine) -> tuple[int, int]:
        s = engine.pipe.default_sample_size * engine.vae_scale_factor
        return s, s

    def facts_from_configs(self, folder, vae_factor: int) -> dict:
        """``family``, native ``size`` and ``size_multiple`` from a folder's config files (no weights loaded)."""
        return {"family": self.family, "size": None, "size_multiple": vae_factor * self.latent_patch}

    def default_sampling(self, pipe: Any) -> Sampling:
        raise NotImplementedError

    def check_scheduler(self, name: str) -> None:
        raise NotImplementedError

    def guidance_mode(self, pipe: Any) -> str:
        """How ``guidance_scale`` acts: "cfg" (classifier-free guidance, two branches when > 1), "embedded"
        (a guidance-distilled model takes it as an input: Flux dev), or "true_cfg" (a guidance-free model run
        with two branches when > 1: Flux schnell)."""
        return "cfg"

    def schedule(self, engine: Engine, *, height: int, width: int, sampling: Sampling) -> dict:
        """What of the noise schedule depends on the request (JSON-safe)."""
        return {}

    # --- prompts ----------------------------------------------------------------------------------------------

    def token_limit(self, pipe: Any) -> tuple[Any, int]:
        """(tokenizer, token limit) of the text encoder whose limit truncates the prompt."""
        return pipe.tokenizer, pipe.tokenizer.model_max_length

    def display_tokenizer(self, pipe: Any) -> tuple[Any, int]:
        """(tokenizer, token limit) whose tokens are the first rows of ``prompt_embeds`` (the tokens view)."""
        return pipe.tokenizer, pipe.tokenizer.model_max_length

    def encode_prompt(self, pipe: Any, prompt: str, device: torch.device) -> Conditioning:
        raise NotImplementedError

    def negative(self, pipe: Any, encoded: Conditioning, negative_prompt: str) -> Conditioning:
        """The unconditional branch from the encoded ``negative_prompt`` (the pipeline's own rule)."""
        return encoded

    def check_conditioning(self, pipe: Any, conditioning: Conditioning) -> None:
        """``conditioning`` carries the fields this family needs (its ranks and the mask's shape are checked when the
        record is built: :class:`~latentlab.backend.records.Conditioning`)."""
        if self.needs_mask and conditioning.attention_mask is None:
            raise ValueError(f"`conditioning` must carry the attention_mask of its text tokens for {self.display_name} "
                             "model (use lab.encode_prompt of this model)")
        if self.needs_pooled and conditioning.pooled_prompt_embeds is None:
            raise ValueError(f"`conditioning` must carry pooled_prompt_embeds for {self.display_name} model (use "
                             "lab.encode_prompt of this model)")

    # --- latents and the VAE ------------------------------------------------------------------------------------

    def noise(self, seed, shape: tuple[int, int, int]) -> torch.Tensor:
        """The pipeline's own initial noise for ``seed`` (an int, or one per item) in the VAE layout ``shape``
        (C, h, w), float32 on the CPU (one CPU generator per item)."""
        from latentlab.seeds import noise

        n = len(seed) if isinstance(seed, (list, tuple)) else 1
        return noise(seed, (n, *shape))

    @staticmethod
    def vae_factor_from_config(config: dict) -> int:
        """Image pixels per latent pixel from a VAE config (a dict): ``len(block_out_channels) - 1`` downsamplings
        (KL autoencoders), or one per ``temperal_downsample`` entry (the Wan/Qwen-Image video VAE)."""
        if "block_out_channels" in config:
            return 2 ** (len(config["block_out_channels"]) - 1)
        return 2 ** len(config.get("temperal_downsample", ()))

    def vae_decode(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the denoiser sees them -> images in [-1, 1] (b, 3, H, W)."""
        return vae.decode(self.unscale(vae, latents), return_dict=False)[0]

    def vae_encode(self, vae: Any, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents as the denoiser sees them (the posterior mean, scaled)."""
        from latentlab.backend.engine import posterior_mean

        return self.scale(vae, posterior_mean(vae, images))

    def vae_factors(self, vae: Any) -> tuple[float, float]:
        """The VAE's (``scaling_factor``, ``shift_factor``): latents as the denoiser sees them =
        ``(VAE latents - shift) * scale`` (what manifests and exports record)."""
        return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)

    def comfyui_layout(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-layout latents in the layout ComfyUI's latent format for this family has."""
        return latents

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-layout latents -> what the pipeline's ``latents=`` takes."""
        return latents

    def unpack(self, latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The pipeline's latent layout -> the VAE's ``(batch, C, h, w)`` (``h``, ``w``: the latent's size)."""
        return latents

    def scale(self, vae: Any, z: torch.Tensor) -> torch.Tensor:
        """VAE posterior latents -> latents as the denoiser sees them (the pipelines' arithmetic)."""
        return z * vae.config.scaling_factor

    def unscale(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`scale`."""
        return latents / vae.config.scaling_factor

    # --- denoising --------------------------------------------------------------------------------------------

    def pipeline_class(self, pipe: Any, kind: str):
        """The diffusers pipeline class for ``kind`` ("text2image" or "img2img") over this model's components."""
        from latentlab.backend.engine import import_diffusers

        return getattr(import_diffusers(), self.pipelines[1 if kind == "img2img" else 0])

    def denoising(self, engine: Engine) -> contextlib.AbstractContextManager:
        """Exact speed-ups around one request's denoising loop (the UNet family caches cross-attention keys and
        values); nothing by default."""
        return contextlib.nullcontext()

    def call_kwargs(self, engine: Engine, cond: Conditioning, negative: Conditioning, sampling: Sampling) -> dict:
        """The embeddings and guidance keyword arguments of a pipeline call."""
        raise NotImplementedError

    def generate(self, engine: Engine, z: torch.Tensor, cond: Conditioning, negative: Conditioning,
                 sampling: Sampling) -> torch.Tensor:
        """One compute batch through the pipeline: VAE-layout initial latents -> final latents (VAE layout)."""
        from latentlab.backend.engine import cpu_generators, step_seeds

        f = engine.vae_scale_factor
        h, w = z.shape[2] * f, z.shape[3] * f
        pipe = engine.pipeline("text2image", sampling.scheduler)
        out = pipe(latents=self.pack(z), height=h, width=w, num_inference_steps=sampling.num_inference_steps,
                   generator=cpu_generators(step_seeds(z)), output_type="latent",
                   **self.call_kwargs(engine, cond, negative, sampling)).images
        return self.unpack(out, z.shape[2], z.shape[3])

    def onnx_unsupported(self, pipe: Any) -> str | None:
        """Why this model's denoiser cannot run on ONNX Runtime (:mod:`~latentlab.backend.families.onnx_unet`), or
        None when it can: only the SD 1.x/2.x UNet family is exported."""
        return f"runs SD 1.x/2.x-style UNets; this is a {self.family} model"

    def attention_mix_unsupported(self, pipe: Any) -> str | None:
        """Why this model cannot denoise an :class:`~latentlab.backend.AttentionMix` (a phrase: "it ..."), or
        None. By default no family can: only adapters that know where the text attention is implement it."""
        return f"is not implemented for {self.display_name or 'a ' + self.family} model"

    def live_attention_mix(self, engine: Engine) -> contextlib.AbstractContextManager:
        """For :meth:`live_denoise` of an AttentionMix: a context whose value has a ``current`` attribute, the text-key
        bias ``(rows, 1, 1, keys)`` of the next denoiser call (only families with a live loop implement it)."""
        raise NotImplementedError

    def generate_attention_mix(self, engine: Engine, z: torch.Tensor, mix, negative: Conditioning,
                               sampling: Sampling) -> torch.Tensor:
        """:meth:`generate` for an :class:`~latentlab.backend.AttentionMix` (one compute batch)."""
        raise NotImplementedError

    def live_loop(self, engine: Engine, sampling: Sampling) -> bool:
        """Whether :meth:`live_denoise` can run a request with these settings (live single images,
        :mod:`latentlab.backend.live`); by default no: such requests go through :meth:`generate`."""
        return False

    def live_denoise(self, engine: Engine, z: torch.Tensor, cond: Conditioning, negative: Conditioning,
                     sampling: Sampling, scheduler: Any, call) -> torch.Tensor:
        """The pipeline's denoising loop for VAE-layout latents ``z``, bit for bit, with ``scheduler`` (a private
        one of the pipeline's type and config) and ``call(sample, timestep, encoder_hidden_states, added_cond)``
        in place of the denoiser; returns the final latents (VAE layout)."""
        raise NotImplementedError

    def img2img(self, engine: Engine, z0: torch.Tensor, noise: torch.Tensor, cond: Conditioning,
                negative: Conditioning, sampling: Sampling, strength: float, keep: torch.Tensor | None
                ) -> torch.Tensor:
        """img2img (and inpainting where ``keep`` is given) with the adapter's own loop (``own_img2img``)."""
        raise NotImplementedError

    def renoise(self, scheduler: Any, z0: torch.Tensor, noise: torch.Tensor, step: int, timesteps: torch.Tensor
                ) -> torch.Tensor:
        """The clean latents ``z0`` noised with ``noise`` to the level of ``timesteps[step]`` (inpainting's blend)."""
        raise NotImplementedError

    def trajectory(self, engine: Engine, z: torch.Tensor, cond: Conditioning, negative: Conditioning,
                   sampling: Sampling, on_step=None):
        """(timesteps, latents after each step, predicted x0 at each step, final latents) for one compute batch;
        the stacked tensors are ``(batch, steps, C, h, w)`` float32 on the CPU. ``on_step(i, latents, x0)``, if
        given, is called as step ``i`` ends with that step's two ``(batch, C, h, w)`` tensors."""
        raise NotImplementedError

    def invert(self, engine: Engine, z0: torch.Tensor, cond: Conditioning, negative: Conditioning,
               sampling: Sampling, solver: str) -> torch.Tensor:
        """Clean latents -> the noise that regenerates them (one compute batch)."""
        raise NotImplementedError

    def reconstruct(self, engine: Engine, noise: torch.Tensor, cond: Conditioning, negative: Conditioning,
                    sampling: Sampling, solver: str) -> torch.Tensor:
        """The inverse of :meth:`invert`: denoise ``noise`` with the sampler that matches ``solver``."""
        return self.generate(engine, noise, cond, negative, sampling)

    def solvers(self) -> tuple[str, ...]:
        """Inversion solvers this family offers (the first is the default)."""
        return ("ddim",)
