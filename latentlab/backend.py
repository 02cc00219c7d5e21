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

__all__ = ["Conditioning", "Generator", "Inversion", "Lab", "Trajectory"]

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


@dataclass(frozen=True)
class Inversion:
    """DDIM inversion of clean latents: ``noise`` (the latents at the last timestep), the ``reconstruction``
    denoised from it again, its decoded ``images``, and per item the ``latent_rmse`` and the ``psnr`` (dB) of those
    images against the decoded original latents."""

    noise: torch.Tensor
    reconstruction: torch.Tensor
    images: torch.Tensor
    latent_rmse: torch.Tensor
    psnr: torch.Tensor


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


#: Items per UNet/VAE call on CPU when nothing else is said. Measured on the embedded model, 2 threads, 192-frame
#: morph (``python -m latentlab.benchmarks.morph --frames 192 --batches 8 16 24``): 9.6 frames/s at 8, 12.6 at 16,
#: 11.5 at 24 (the per-frame diffusers loop: 3.7). Every CPU call is padded to this size (see ``Lab``).
CPU_BATCH_SIZE = 16


def _pad_batch(x, pad: int):
    """Repeat the last batch item ``pad`` times (tensors and Conditioning)."""
    if isinstance(x, Conditioning):
        return x.map(lambda t: _pad_batch(t, pad))
    return torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])


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

    Batching: ``batch_size`` is how many items go through the UNet/VAE per call (``None``: 16 on CPU; on a GPU
    everything at once, halved on out-of-memory and remembered). CPU kernels pick different blockings for
    different batch sizes, so an item's float result depends on how many items shared its call (measured: up to
    ~1e-6). With ``batch_invariant`` (default on CPU) every call is padded to exactly ``batch_size`` items, which
    makes a seed's image bit-identical whether it is generated alone or among 1,000 others; padding costs up to
    ``batch_size`` x the work for a single image.

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
    batch_size: int | None = None
    batch_invariant: bool | None = None
    _prompt_cache: dict[tuple[str, ...], Conditioning] = field(default_factory=dict, repr=False)
    _auto_batch: int | None = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)

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

    def fingerprint(self) -> str:
        """A short hash that changes when the model changes: model id, component configs, and a sample of every
        weight tensor of the UNet, VAE and text encoder(s) (first and last values; cheap, and any retraining
        changes them). Cache keys of rendered frames include it."""
        import hashlib
        import json

        if self._fingerprint is None:
            h = hashlib.sha256(self.model_id.encode())
            for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
                module = getattr(self.pipe, name, None)
                if module is None:
                    continue
                h.update(name.encode())
                cfg = getattr(module, "config", None)
                cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})  # transformers / diffusers
                cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and not k.endswith("_version")}
                h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
                for k, v in module.state_dict().items():
                    flat = v.detach().flatten()
                    h.update(k.encode())
                    h.update(torch.cat([flat[:8], flat[-8:]]).float().cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    # --- prompts -----------------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[str]) -> Conditioning:
        """Text conditioning for each prompt (cached by prompt text)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("`prompt` must be a string or a non-empty list of strings")
        # One prompt per text-encoder call: an encoding never depends on which other prompts were new at the time.
        for p in dict.fromkeys(prompts):
            if (p,) in self._prompt_cache:
                continue
            with torch.no_grad():
                if self.is_sdxl:
                    emb, _, pooled, _ = self.pipe.encode_prompt(
                        [p], device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
                    )
                else:
                    emb, _ = self.pipe.encode_prompt([p], self.device, 1, False)
                    pooled = None
            self._prompt_cache[(p,)] = Conditioning(emb, pooled)
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
        latent (or one item, used for all). Runs in batches of ``batch_size`` (default: :attr:`batch_size`, see the
        class notes), halving on out-of-memory. ``output_type="latent"`` returns the final latents instead of images.
        """
        conditioning, negative, steps, cfg = self._prepare(latents, conditioning, negative_prompt,
                                                           num_inference_steps, guidance_scale)
        _checks.choice(output_type, "output_type", ("pt", "latent"))
        if batch_size is not None:
            _checks.positive_int(batch_size, "batch_size")
        f = self.vae_scale_factor

        @torch.no_grad()
        def run(z, cond):
            b = z.shape[0]
            kw = self._call_kwargs(cond, negative.map(lambda t: t.expand(b, *t.shape[1:])), cfg)
            return self.pipe(latents=z.to(self.device, self.dtype), height=z.shape[2] * f, width=z.shape[3] * f,
                             num_inference_steps=steps, guidance_scale=cfg, output_type="latent", **kw).images

        out = self._batched(run, latents, conditioning, batch_size=batch_size)
        if output_type == "latent":
            return out.float().cpu()
        return self.decode(out, batch_size=batch_size)

    # --- batching ----------------------------------------------------------------------------------------------

    def _resolve_batch(self, n: int, batch_size: int | None) -> tuple[int, bool]:
        invariant = self.device.type == "cpu" if self.batch_invariant is None else bool(self.batch_invariant)
        size = batch_size or self.batch_size or self._auto_batch
        if size is None:
            size = CPU_BATCH_SIZE if self.device.type == "cpu" else n
        return max(1, size if invariant else min(size, n)), invariant

    def _batched(self, fn, *args, batch_size: int | None = None) -> torch.Tensor:
        """``fn(*chunks)`` over batch chunks of the tensor/Conditioning ``args``, concatenated.

        Chunks have ``batch_size`` items; with batch invariance the last one is padded (repeating its last item) to
        exactly that size and the padding dropped from the output. On out-of-memory the size is halved, remembered
        for later calls when it was chosen automatically, and the chunk retried.
        """
        n = len(args[0])
        size, invariant = self._resolve_batch(n, batch_size)
        outs, start = [], 0
        while start < n:
            stop = min(n, start + size)
            chunk = [x[start:stop] for x in args]
            pad = size - (stop - start) if invariant else 0
            if pad:
                chunk = [_pad_batch(x, pad) for x in chunk]
            try:
                outs.append(fn(*chunk)[: stop - start])
                start = stop
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not _is_oom(e) or size == 1:
                    raise
                size = max(1, size // 2)
                if batch_size is None and self.batch_size is None:
                    self._auto_batch = size
                warnings.warn(f"out of memory: retrying with batch_size={size}", RuntimeWarning, stacklevel=3)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return torch.cat(outs)

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

        f = self.vae_scale_factor

        def run(z, cond):
            for record in (lats, x0s, ts):
                record.clear()
            b = z.shape[0]
            handle = self.pipe.unet.register_forward_hook(hook, with_kwargs=True)
            try:
                neg = negative.map(lambda t: t.expand(b, *t.shape[1:]))
                final = self.pipe(
                    latents=z.to(self.device, self.dtype), height=z.shape[2] * f, width=z.shape[3] * f,
                    num_inference_steps=steps, guidance_scale=cfg, output_type="latent",
                    callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"],
                    **self._call_kwargs(cond, neg, cfg),
                ).images
            finally:
                handle.remove()
            # batch-first (b, 2 * steps + 1, C, h, w) so chunks concatenate
            return torch.stack([*lats, *x0s, final.float().cpu()], dim=1)

        packed = self._batched(run, latents, conditioning)
        s = len(ts)
        return Trajectory(tuple(ts), packed[:, :s].transpose(0, 1).contiguous(),
                          packed[:, s : 2 * s].transpose(0, 1).contiguous(), self.decode(packed[:, -1]))

    # --- latent edits: img2img, inpainting, DDIM inversion ---------------------------------------------------

    def _scheduler(self, cls=None):
        """A fresh scheduler (they keep per-run state) of the pipeline's type, or of ``cls``, with its config."""
        cls = cls or type(self.pipe.scheduler)
        return cls.from_config(self.pipe.scheduler.config)

    def _unet_inputs(self, cond: Conditioning, negative: Conditioning, cfg: float, latents: torch.Tensor):
        """What the pipelines pass the UNet: text embeddings ([negative, positive] under classifier-free guidance)
        and, for SDXL, the pooled embeddings and micro-conditioning time ids (original size, crop (0, 0), target
        size; the pipeline's defaults)."""
        b = latents.shape[0]
        guided = cfg > 1.0 and self.pipe.unet.config.time_cond_proj_dim is None
        neg = negative.map(lambda t: t.expand(b, *t.shape[1:]))
        both = Conditioning.cat([neg, cond]) if guided else cond
        emb = both.prompt_embeds.to(self.device, self.dtype)
        added = None
        if self.is_sdxl:
            h, w = latents.shape[2] * self.vae_scale_factor, latents.shape[3] * self.vae_scale_factor
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=emb.dtype, device=self.device).repeat(len(emb), 1)
            added = {"text_embeds": both.pooled_prompt_embeds.to(self.device, emb.dtype), "time_ids": time_ids}
        return guided, emb, added

    def _eps(self, x, t, scheduler, guided, emb, added, cfg):
        """The guided model output at (x, t), as the pipelines combine it."""
        model_in = torch.cat([x] * 2) if guided else x
        model_in = scheduler.scale_model_input(model_in, t)
        out = self.pipe.unet(model_in, t, encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False)[0]
        if guided:
            uncond, text = out.chunk(2)
            out = uncond + cfg * (text - uncond)
        return out

    def _denoise(self, latents, cond, negative, cfg, scheduler, timesteps, *, known=None, noise=None, mask=None):
        """The sampling loop of the Stable Diffusion pipelines, written out so edits can act between steps.

        With ``mask`` (1 = regenerate), after every step the latent outside the mask is replaced by the known
        latent noised to the next step's level (the last step: the known latent itself) — latent inpainting.
        """
        guided, emb, added = self._unet_inputs(cond, negative, cfg, latents)
        for i, t in enumerate(timesteps):
            eps = self._eps(latents, t, scheduler, guided, emb, added, cfg)
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
            if mask is not None:
                keep = known if i == len(timesteps) - 1 else scheduler.add_noise(known, noise, timesteps[i + 1 : i + 2])
                latents = (1 - mask) * keep + mask * latents
        return latents

    def _edit_mask(self, mask, latents):
        _checks.tensor(mask, "mask", min_ndim=4)
        n, _, h, w = latents.shape
        f = self.vae_scale_factor
        if mask.shape[1] != 1 or mask.shape[0] not in (1, n):
            raise ValueError(f"`mask` must have shape (1 or {n}, 1, H, W), got {tuple(mask.shape)}")
        if tuple(mask.shape[2:]) == (h * f, w * f):  # image-space mask -> latent grid (area average: soft edges)
            mask = torch.nn.functional.interpolate(mask.float(), size=(h, w), mode="area")
        elif tuple(mask.shape[2:]) != (h, w):
            raise ValueError(f"`mask` must be image-sized {(h * f, w * f)} or latent-sized {(h, w)}, "
                             f"got {tuple(mask.shape[2:])}")
        if bool(((mask < 0) | (mask > 1)).any()):
            raise ValueError("`mask` values must be in [0, 1] (1 = regenerate)")
        return mask.expand(n, 1, h, w).to(self.dtype)

    def _edit_noise(self, seed, latents):
        n = latents.shape[0]
        if isinstance(seed, int) and not isinstance(seed, bool):
            return self.noise(seed, height=latents.shape[2] * self.vae_scale_factor,
                              width=latents.shape[3] * self.vae_scale_factor).expand(n, -1, -1, -1)
        if not isinstance(seed, (list, tuple)) or len(seed) != n:
            raise ValueError(f"`seed` must be an int (the same noise for every item) or {n} ints, got {seed!r}")
        return self.noise(list(seed), height=latents.shape[2] * self.vae_scale_factor,
                          width=latents.shape[3] * self.vae_scale_factor)

    def img2img(
        self,
        latents: torch.Tensor,
        conditioning: Conditioning,
        *,
        strength: float = 0.6,
        seed: int | Sequence[int] = 0,
        mask: torch.Tensor | None = None,
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        batch_size: int | None = None,
        output_type: str = "pt",
    ) -> torch.Tensor:
        """Image-to-image as a latent edit: noise an encoded latent part of the way, then denoise from there.

        1. The scheduler's ``num_inference_steps`` timesteps are computed; only the last
           ``int(num_inference_steps * strength)`` are run (as diffusers' img2img pipeline does).
        2. ``latents`` (clean, e.g. from :meth:`encode`) are noised to the first of those timesteps with the
           seeded noise: ``sqrt(ᾱ_t) z + sqrt(1 - ᾱ_t) ε``. ``strength=1`` keeps almost nothing of the image.
        3. They are denoised with ``conditioning``; with ``mask`` (1 = regenerate; image- or latent-sized), the
           region outside the mask is reset to the (noised) original after every step — see :meth:`inpaint`.

        Equals diffusers' ``StableDiffusionImg2ImgPipeline`` given the same latents and seeds (tested).

        Examples
        --------
        >>> lab = Lab.default()
        >>> z = lab.encode(lab.generate(lab.noise(3), lab.encode_prompt("a large red circle on a blue background")))
        >>> out = lab.img2img(z, lab.encode_prompt("a large red square on a blue background"), strength=0.7, seed=1)
        >>> out.shape
        torch.Size([1, 3, 64, 64])
        """
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(f"`strength` must be in (0, 1], got {strength!r}")
        conditioning, negative, steps, cfg = self._prepare(latents, conditioning, negative_prompt,
                                                           num_inference_steps, guidance_scale)
        _checks.choice(output_type, "output_type", ("pt", "latent"))
        noise = self._edit_noise(seed, latents)
        m = None if mask is None else self._edit_mask(mask, latents)
        n_run = min(int(steps * strength), steps)
        if n_run == 0:
            raise ValueError(f"`strength` {strength} x `num_inference_steps` {steps} runs no step; raise either")

        @torch.no_grad()
        def run(z0, cond, eps, *rest):
            sched = self._scheduler()
            sched.set_timesteps(steps, device=self.device)
            start = (steps - n_run) * sched.order
            timesteps = sched.timesteps[start:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(start)
            z0, eps = z0.to(self.device, self.dtype), eps.to(self.device, self.dtype)
            x = sched.add_noise(z0, eps, timesteps[:1].repeat(len(z0)))
            mk = rest[0].to(self.device) if rest else None
            return self._denoise(x, cond, negative, cfg, sched, timesteps, known=z0, noise=eps, mask=mk)

        args = (latents, conditioning, noise) + (() if m is None else (m,))
        out = self._batched(run, *args, batch_size=batch_size)
        return out.float().cpu() if output_type == "latent" else self.decode(out, batch_size=batch_size)

    def inpaint(
        self,
        latents: torch.Tensor,
        conditioning: Conditioning,
        mask: torch.Tensor,
        *,
        strength: float = 1.0,
        seed: int | Sequence[int] = 0,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Latent inpainting: regenerate where ``mask`` is 1 and keep the rest of ``latents``.

        Every step denoises the whole latent, then puts the known latent, noised to the next step's noise level,
        back outside the mask (the blend of diffusers' inpainting pipelines for ordinary 4-channel UNets; the seam
        stays coherent because the model sees the known region at every step). ``mask`` is image-sized (area-
        averaged onto the latent grid, so edges are soft) or latent-sized. Other options as :meth:`img2img`.

        Examples
        --------
        >>> lab = Lab.default()
        >>> z = lab.encode(lab.generate(lab.noise(3), lab.encode_prompt("a large red circle on a blue background")))
        >>> mask = torch.zeros(1, 1, 64, 64); mask[..., :, 32:] = 1      # regenerate the right half
        >>> lab.inpaint(z, lab.encode_prompt("a large red circle on a blue background"), mask, seed=2).shape
        torch.Size([1, 3, 64, 64])
        """
        if mask is None:
            raise TypeError("`mask` must be a tensor (1 = regenerate), got None")
        return self.img2img(latents, conditioning, strength=strength, seed=seed, mask=mask, **kwargs)

    @torch.no_grad()
    def invert(
        self,
        latents: torch.Tensor,
        conditioning: Conditioning,
        *,
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 1.0,
        batch_size: int | None = None,
    ) -> Inversion:
        """DDIM inversion: run deterministic DDIM backwards from clean ``latents`` to the noise that regenerates them.

        Each step is the DDIM update solved for the noisier latent, with the model evaluated at the current
        (less noisy) latent and the target timestep (the usual approximation, as diffusers' ``DDIMInverseScheduler``):
        ``x0 = (x - sqrt(1 - ᾱ_s) ε) / sqrt(ᾱ_s)``, ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε``. The result is then
        denoised again with DDIM to report how well it reconstructs (latent RMSE and image PSNR): the approximation
        error grows with guidance, so the default is ``guidance_scale=1`` (no guidance).

        Examples
        --------
        >>> lab = Lab.default()
        >>> cond = lab.encode_prompt("a large red circle on a blue background")
        >>> inv = lab.invert(lab.encode(lab.generate(lab.noise(3), cond)), cond)
        >>> inv.noise.shape, inv.psnr.shape
        (torch.Size([1, 4, 8, 8]), torch.Size([1]))
        """
        diffusers = _import_diffusers()
        conditioning, negative, steps, cfg = self._prepare(latents, conditioning, negative_prompt,
                                                           num_inference_steps, guidance_scale)

        def run(z0, cond):
            sched = self._scheduler(diffusers.DDIMScheduler)
            sched.set_timesteps(steps, device=self.device)
            guided, emb, added = self._unet_inputs(cond, negative, cfg, z0)
            ac = sched.alphas_cumprod.to(self.device)
            x = z0.to(self.device, self.dtype)
            a_s = sched.final_alpha_cumprod.to(self.device)
            for t in sched.timesteps.flip(0):
                eps = self._eps(x, t, sched, guided, emb, added, cfg)
                a_t = ac[t]
                x0 = (x - (1 - a_s).sqrt() * eps) / a_s.sqrt()
                x = (a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps).to(self.dtype)
                a_s = a_t
            sched = self._scheduler(diffusers.DDIMScheduler)
            sched.set_timesteps(steps, device=self.device)
            rec = self._denoise(x, cond, negative, cfg, sched, sched.timesteps)
            return torch.stack([x.float().cpu(), rec.float().cpu()], dim=1)

        packed = self._batched(run, latents, conditioning, batch_size=batch_size)
        noise, rec = packed[:, 0], packed[:, 1]
        original = self.decode(latents, batch_size=batch_size)
        images = self.decode(rec, batch_size=batch_size)
        rmse = (rec - latents.float().cpu()).pow(2).flatten(1).mean(1).sqrt()
        mse = (images - original).pow(2).flatten(1).mean(1).clamp(min=1e-12)
        return Inversion(noise=noise, reconstruction=rec, images=images, latent_rmse=rmse, psnr=10 * torch.log10(1 / mse))

    # --- VAE -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """Final latents (scaled as the UNet sees them) -> images in [0, 1] (float32, CPU), as the pipeline does.

        Batched like :meth:`generate`. Items that decode to non-finite values in a low-precision VAE are decoded
        again in float32.
        """
        _checks.tensor(latents, "latents", min_ndim=4)
        return self._batched(self._decode_batch, latents, batch_size=batch_size)

    def _unscale(self, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Latents as the UNet sees them -> as the VAE decoder takes them (the pipelines' arithmetic)."""
        vae = self.pipe.vae
        z = latents.to(self.device, dtype)
        stats = _latents_mean_std(vae, z)
        if stats is not None:
            return z * stats[1] / vae.config.scaling_factor + stats[0]
        return z / vae.config.scaling_factor

    def _decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        img = vae.decode(self._unscale(latents, vae.dtype), return_dict=False)[0]
        bad = ~torch.isfinite(img).flatten(1).all(1)
        if bool(bad.any()) and vae.dtype != torch.float32:
            log.info("re-decoding %d non-finite item(s) in float32", int(bad.sum()))
            dtype = vae.dtype
            vae.to(torch.float32)
            try:
                img = img.float()
                img[bad] = vae.decode(self._unscale(latents[bad], torch.float32), return_dict=False)[0]
            finally:
                vae.to(dtype)
        return (img.float() / 2 + 0.5).clamp(0, 1).cpu()

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """Images in [0, 1] (batch, 3, H, W) -> latents as the UNet sees them (posterior mean, scaled).

        Examples
        --------
        >>> lab = Lab.default()
        >>> z = lab.encode(torch.rand(2, 3, 64, 64))
        >>> z.shape
        torch.Size([2, 4, 8, 8])
        """
        _checks.tensor(images, "images", min_ndim=4)
        if images.shape[1] != 3:
            raise ValueError(f"`images` must have 3 channels (batch, 3, H, W), got shape {tuple(images.shape)}")
        f = self.vae_scale_factor
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"`images` height and width must be multiples of the VAE factor {f}, "
                             f"got {tuple(images.shape[2:])}")
        return self._batched(self._encode_batch, images, batch_size=batch_size)

    def _encode_batch(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        x = images.to(self.device, vae.dtype) * 2 - 1
        z = vae.encode(x).latent_dist.mean
        stats = _latents_mean_std(vae, z)
        if stats is not None:
            return ((z - stats[0]) * vae.config.scaling_factor / stats[1]).to(self.dtype)
        return (z * vae.config.scaling_factor).to(self.dtype)
