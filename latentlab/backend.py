"""Generation backend: one :class:`Lab` over any Stable-Diffusion-family diffusers pipeline.

One responsibility: turn (latent, prompt embedding) pairs into images, and images into latents, with public
pipeline features only (``latents=``, ``prompt_embeds=``, ``negative_prompt_embeds=``, pooled embeds for SDXL,
``output_type``). This is the only module that imports diffusers and transformers; higher layers talk to it
through the :class:`Generator` protocol so tests can pass a fake.

Shapes come from the model configs (never SD 1.5 constants): latent channels from ``unet.config.in_channels``,
the VAE factor from ``len(vae.config.block_out_channels) - 1`` downsamplings, the default image size from
``unet.config.sample_size`` times that factor.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from latentlab import _checks
from latentlab.seeds import noise as _noise

__all__ = ["Lab", "Conditioning", "Generator", "Trajectory"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conditioning:
    """What conditions the UNet for a batch: ``prompt_embeds`` (batch, tokens, dim) and, for SDXL,
    ``pooled_prompt_embeds`` (batch, dim). Interpolate the fields with :mod:`latentlab.ops` like any latent."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def __getitem__(self, idx) -> Conditioning:
        idx = slice(idx, idx + 1) if isinstance(idx, int) else idx
        pooled = None if self.pooled_prompt_embeds is None else self.pooled_prompt_embeds[idx]
        return Conditioning(self.prompt_embeds[idx], pooled)

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        pooled = None if items[0].pooled_prompt_embeds is None else torch.cat([c.pooled_prompt_embeds for c in items])
        return Conditioning(torch.cat([c.prompt_embeds for c in items]), pooled)

    def map(self, fn) -> Conditioning:
        """Apply ``fn`` to every tensor field (e.g. an interpolation)."""
        pooled = None if self.pooled_prompt_embeds is None else fn(self.pooled_prompt_embeds)
        return Conditioning(fn(self.prompt_embeds), pooled)


@dataclass(frozen=True)
class Trajectory:
    """One denoising run step by step: ``latents[i]`` after step ``i``, ``x0[i]`` the clean latent the model
    predicted at step ``i`` (both ``(steps, batch, C, h, w)``, float32, CPU), and the final ``images``."""

    timesteps: tuple[float, ...]
    latents: torch.Tensor
    x0: torch.Tensor
    images: torch.Tensor


class Generator(Protocol):
    """What the render layers need from a backend (a fake implements this in tests)."""

    model_id: str

    def latent_shape(self, *, height: int | None = None, width: int | None = None) -> tuple[int, int, int]: ...

    def encode_prompt(self, prompt: str | Sequence[str]) -> Conditioning: ...

    def generate(self, latents: torch.Tensor, conditioning: Conditioning, **kwargs: Any) -> torch.Tensor: ...


class _NoTorchvisionFallbackNotice(logging.Filter):
    """transformers 5 warns on import that image processors fall back to PIL without torchvision; latentlab never
    uses those processors (torchvision is deliberately absent, FIELD_NOTES), so the line is noise for our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def _quiet_transformers_image_processor_warning() -> None:
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _NoTorchvisionFallbackNotice) for f in logger.filters):
        logger.addFilter(_NoTorchvisionFallbackNotice())


def _import_diffusers():
    _quiet_transformers_image_processor_warning()
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - diffusers is a hard dependency
        raise ImportError("latentlab's backend needs diffusers: pip install 'diffusers>=0.35'") from e
    return diffusers


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _latents_mean_std(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel latent mean/std from the VAE config (some SDXL-family VAEs), shaped (1, C, 1, 1) like ``like``."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    return torch.tensor(mean).view(1, -1, 1, 1).to(like), torch.tensor(std).view(1, -1, 1, 1).to(like)


@dataclass
class Lab:
    """A diffusers pipeline plus what latentlab needs to know about it.

    Build one with :meth:`default` (the embedded model, CPU) or :meth:`from_pretrained` (any SD 1.x/2.x, SDXL or
    Turbo checkpoint, safetensors only).

    Examples
    --------
    >>> lab = Lab.default()
    >>> z = lab.noise([1, 2])
    >>> z.shape
    torch.Size([2, 4, 8, 8])
    >>> images = lab.generate(z, lab.encode_prompt(["a red star", "a blue ring"]))
    >>> images.shape, images.dtype
    (torch.Size([2, 3, 64, 64]), torch.float32)
    """

    pipe: Any
    model_id: str
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    _prompt_cache: dict[tuple[str, ...], Conditioning] = field(default_factory=dict, repr=False)

    # --- construction ------------------------------------------------------------------------------------------

    @classmethod
    def default(cls, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Lab:
        """The embedded shapes model (see ``latentlab/embedded/MODEL_CARD.md``): 64x64 images, 4x8x8 latents."""
        from latentlab import embedded

        path = embedded.model_path()
        lab = cls.from_pretrained(path, device=device, dtype=dtype)
        lab.model_id = "latentlab/embedded-shapes"
        lab.num_inference_steps, lab.guidance_scale = 20, 4.0
        return lab

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> Lab:
        """Load a Stable-Diffusion-family pipeline with diffusers (``use_safetensors=True``: never pickles).

        ``device`` defaults to CUDA when available, else CPU; ``dtype`` to float16 on CUDA, else float32.
        Extra keyword arguments go to ``DiffusionPipeline.from_pretrained`` (e.g. ``variant="fp16"``).
        """
        diffusers = _import_diffusers()
        if isinstance(model_id_or_path, Path) and not model_id_or_path.exists():
            raise FileNotFoundError(f"`model_id_or_path` does not exist: {model_id_or_path}")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        kwargs.setdefault("use_safetensors", True)
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(model_id_or_path), dtype=dtype, **kwargs)
        supported = (diffusers.StableDiffusionPipeline, diffusers.StableDiffusionXLPipeline)
        if not isinstance(pipe, supported):
            raise TypeError(
                f"`model_id_or_path` must be a Stable Diffusion 1.x/2.x or SDXL pipeline, got {type(pipe).__name__}"
            )
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        lab = cls(pipe=pipe, model_id=str(model_id_or_path))
        if "turbo" in str(model_id_or_path).lower():
            lab.num_inference_steps, lab.guidance_scale = 4, 0.0
        return lab

    # --- facts from the configs --------------------------------------------------------------------------------

    @property
    def is_sdxl(self) -> bool:
        return hasattr(self.pipe, "text_encoder_2")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    def default_size(self) -> tuple[int, int]:
        s = self.pipe.unet.config.sample_size
        s = s if isinstance(s, (tuple, list)) else (s, s)
        return s[0] * self.vae_scale_factor, s[1] * self.vae_scale_factor

    def latent_shape(self, *, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(channels, height // f, width // f) for an image size (default: the model's native size)."""
        dh, dw = self.default_size()
        height, width = height or dh, width or dw
        f = self.vae_scale_factor
        for name, v in (("height", height), ("width", width)):
            _checks.positive_int(v, name)
            if v % f:
                raise ValueError(f"`{name}` must be a multiple of the VAE factor {f}, got {v}")
        return (self.pipe.unet.config.in_channels, height // f, width // f)

    def noise(self, seed: int | Sequence[int], *, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Initial latents for ``seed`` (one item per seed), drawn on the CPU: the same on every device."""
        n = len(seed) if isinstance(seed, (list, tuple)) else 1
        return _noise(seed, (n, *self.latent_shape(height=height, width=width)), device=self.device, dtype=self.dtype)

    # --- prompts -----------------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[str]) -> Conditioning:
        """Text conditioning for each prompt (cached by prompt text)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("`prompt` must be a string or a non-empty list of strings")
        missing = [p for p in dict.fromkeys(prompts) if (p,) not in self._prompt_cache]
        if missing:
            with torch.no_grad():
                if self.is_sdxl:
                    emb, _, pooled, _ = self.pipe.encode_prompt(
                        missing, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
                    )
                else:
                    emb, _ = self.pipe.encode_prompt(missing, self.device, 1, False)
                    pooled = None
            for i, p in enumerate(missing):
                self._prompt_cache[(p,)] = Conditioning(emb[i : i + 1], None if pooled is None else pooled[i : i + 1])
        return Conditioning.cat([self._prompt_cache[(p,)] for p in prompts])

    def negative_conditioning(self, negative_prompt: str = "") -> Conditioning:
        """The unconditional side of classifier-free guidance, as the pipeline itself builds it: SDXL pipelines
        with ``force_zeros_for_empty_prompt`` use zeros for an empty negative prompt, others encode the text."""
        cond = self.encode_prompt(negative_prompt)
        if self.is_sdxl and negative_prompt == "" and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            return cond.map(torch.zeros_like)
        return cond

    # --- generation --------------------------------------------------------------------------------------------

    def _call_kwargs(self, cond: Conditioning, negative: Conditioning | None, guidance_scale: float) -> dict:
        kw: dict[str, Any] = {"prompt_embeds": cond.prompt_embeds}
        if self.is_sdxl:
            kw["pooled_prompt_embeds"] = cond.pooled_prompt_embeds
        if guidance_scale > 1.0 and negative is not None:
            kw["negative_prompt_embeds"] = negative.prompt_embeds
            if self.is_sdxl:
                kw["negative_pooled_prompt_embeds"] = negative.pooled_prompt_embeds
        return kw

    def _prepare(self, latents, conditioning, negative_prompt, num_inference_steps, guidance_scale):
        """Validate a generation request before any model work; resolve defaults; one conditioning per latent."""
        _checks.tensor(latents, "latents", min_ndim=4)
        expected = self.latent_shape(height=latents.shape[2] * self.vae_scale_factor,
                                     width=latents.shape[3] * self.vae_scale_factor)
        if tuple(latents.shape[1:]) != expected:
            raise ValueError(f"`latents` must have shape (batch, {expected[0]}, h, w), got {tuple(latents.shape)}")
        if not isinstance(conditioning, Conditioning):
            raise TypeError(f"`conditioning` must be a Conditioning (from encode_prompt), got {type(conditioning).__name__}")
        n = latents.shape[0]
        if len(conditioning) == 1 and n > 1:
            conditioning = conditioning.map(lambda t: t.expand(n, *t.shape[1:]))
        if len(conditioning) != n:
            raise ValueError(f"`conditioning` must have 1 or {n} items (one per latent), got {len(conditioning)}")
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        _checks.positive_int(steps, "num_inference_steps")
        cfg = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        negative = self.negative_conditioning(self.negative_prompt if negative_prompt is None else negative_prompt)
        return conditioning, negative, steps, cfg

    def generate(
        self,
        latents: torch.Tensor,
        conditioning: Conditioning,
        *,
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        batch_size: int | None = None,
        output_type: str = "pt",
    ) -> torch.Tensor:
        """Denoise each (latent, conditioning) pair; images (batch, 3, H, W) in [0, 1], float32, on the CPU.

        ``latents`` are the initial noise (e.g. from :meth:`noise` or a path); ``conditioning`` has one item per
        latent (or one item, used for all). Runs in batches of ``batch_size`` (default: all at once), halving on
        out-of-memory. ``output_type="latent"`` returns the final latents instead of images.
        """
        conditioning, negative, steps, cfg = self._prepare(latents, conditioning, negative_prompt,
                                                           num_inference_steps, guidance_scale)
        _checks.choice(output_type, "output_type", ("pt", "latent"))
        n = latents.shape[0]
        size = batch_size or n
        _checks.positive_int(size, "batch_size")
        outs, start = [], 0
        while start < n:
            stop = min(n, start + size)
            try:
                outs.append(self._generate_batch(latents[start:stop], conditioning[start:stop], negative, steps, cfg,
                                                 output_type))
                start = stop
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not _is_oom(e) or size == 1:
                    raise
                size = max(1, size // 2)
                warnings.warn(f"out of memory: retrying with batch_size={size}", RuntimeWarning, stacklevel=2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return torch.cat(outs)

    @torch.no_grad()
    def _generate_batch(self, latents, cond, negative, steps, cfg, output_type):
        b = latents.shape[0]
        neg = negative.map(lambda t: t.expand(b, *t.shape[1:]))
        kw = self._call_kwargs(cond, neg, cfg)
        f = self.vae_scale_factor
        out = self.pipe(
            latents=latents.to(self.device, self.dtype),
            height=latents.shape[2] * f,
            width=latents.shape[3] * f,
            num_inference_steps=steps,
            guidance_scale=cfg,
            output_type="latent",
            **kw,
        ).images
        if output_type == "latent":
            return out.float().cpu()
        return self.decode(out)

    def _alphas_cumprod_at(self, t: torch.Tensor) -> torch.Tensor:
        """Cumulative alpha at (possibly fractional) timestep t, interpolating sigma linearly as Euler schedulers do."""
        ac = self.pipe.scheduler.alphas_cumprod.double()
        sigmas = ((1 - ac) / ac).sqrt()
        tt = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        lo = int(min(max(0, int(tt)), len(ac) - 1))
        hi = min(lo + 1, len(ac) - 1)
        sigma = sigmas[lo] + (sigmas[hi] - sigmas[lo]) * (tt - lo)
        return 1 / (1 + sigma**2)

    @torch.no_grad()
    def trajectory(
        self,
        latents: torch.Tensor,
        conditioning: Conditioning,
        *,
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> Trajectory:
        """Denoise like :meth:`generate` and record every step's latents and predicted clean latent (x0).

        x0 comes from the UNet's own output (read with a forward hook; nothing is patched), combined for
        classifier-free guidance as the pipeline combines it, and converted with the scheduler's cumulative alphas:
        ``x0 = (x_t - sqrt(1 - ᾱ) ε) / sqrt(ᾱ)`` for epsilon prediction, ``sqrt(ᾱ) x_t - sqrt(1 - ᾱ) v`` for
        v-prediction. Decode any of them with :meth:`decode` to watch the image form.
        """
        conditioning, negative, steps, cfg = self._prepare(latents, conditioning, negative_prompt,
                                                           num_inference_steps, guidance_scale)
        b = latents.shape[0]
        pred_type = self.pipe.scheduler.config.get("prediction_type", "epsilon")
        guided = cfg > 1.0 and self.pipe.unet.config.time_cond_proj_dim is None
        x0s, lats, ts = [], [], []

        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            out = output[0] if isinstance(output, tuple) else output.sample
            if guided:  # the pipeline batches [unconditional, conditional]
                x = x.chunk(2)[1]
                uncond, cond = out.chunk(2)
                out = uncond + cfg * (cond - uncond)
            a = self._alphas_cumprod_at(t).to(x.device)
            x, out = x.double(), out.double()
            if pred_type == "epsilon":
                x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
            elif pred_type == "v_prediction":
                x0 = a.sqrt() * x - (1 - a).sqrt() * out
            else:
                x0 = out
            x0s.append(x0.float().cpu())
            ts.append(float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t))

        def on_step_end(pipe, i, t, callback_kwargs):
            lats.append(callback_kwargs["latents"].float().cpu())
            return {}

        handle = self.pipe.unet.register_forward_hook(hook, with_kwargs=True)
        try:
            neg = negative.map(lambda t: t.expand(b, *t.shape[1:]))
            f = self.vae_scale_factor
            final = self.pipe(
                latents=latents.to(self.device, self.dtype), height=latents.shape[2] * f, width=latents.shape[3] * f,
                num_inference_steps=steps, guidance_scale=cfg, output_type="latent",
                callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"],
                **self._call_kwargs(conditioning, neg, cfg),
            ).images
        finally:
            handle.remove()
        return Trajectory(tuple(ts), torch.stack(lats), torch.stack(x0s), self.decode(final))

    # --- VAE -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents (scaled as the UNet sees them) -> images in [0, 1] (float32, CPU), as the pipeline does.

        Items that decode to non-finite values in a low-precision VAE are decoded again in float32.
        """
        vae = self.pipe.vae
        z = latents.to(self.device, vae.dtype)
        stats = _latents_mean_std(vae, z)
        if stats is not None:
            z = z * stats[1] / vae.config.scaling_factor + stats[0]
        else:
            z = z / vae.config.scaling_factor
        img = vae.decode(z, return_dict=False)[0]
        bad = ~torch.isfinite(img).flatten(1).all(1)
        if bool(bad.any()) and vae.dtype != torch.float32:
            log.info("re-decoding %d non-finite item(s) in float32", int(bad.sum()))
            vae.to(torch.float32)
            try:
                img = img.float()
                img[bad] = vae.decode(z[bad].float(), return_dict=False)[0]
            finally:
                vae.to(latents.dtype if latents.is_floating_point() else self.dtype)
        return (img.float() / 2 + 0.5).clamp(0, 1).cpu()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (batch, 3, H, W) -> latents as the UNet sees them (posterior mean, scaled)."""
        _checks.tensor(images, "images", min_ndim=4)
        if images.shape[1] != 3:
            raise ValueError(f"`images` must have 3 channels (batch, 3, H, W), got shape {tuple(images.shape)}")
        vae = self.pipe.vae
        x = (images.to(self.device, vae.dtype) * 2 - 1)
        z = vae.encode(x).latent_dist.mean
        stats = _latents_mean_std(vae, z)
        if stats is not None:
            return ((z - stats[0]) * vae.config.scaling_factor / stats[1]).to(self.dtype)
        return (z * vae.config.scaling_factor).to(self.dtype)
