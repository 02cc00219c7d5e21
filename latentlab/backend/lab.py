"""Generation backend: one :class:`Lab` over any Stable-Diffusion-family diffusers pipeline.

One responsibility: turn (latent, prompt embedding) pairs into images, and images into latents, by calling
diffusers pipelines with their public arguments (``latents=``, ``prompt_embeds=``, ``negative_prompt_embeds=``,
pooled embeds for SDXL, ``generator=``, ``output_type``). Together with :mod:`latentlab.backend.edits` this is the
only place that imports diffusers and transformers' text encoders; higher layers talk to it through
:class:`latentlab.backend.Backend` so tests can pass a fake.

Shapes come from the model configs (never SD 1.5 constants): latent channels from ``unet.config.in_channels``,
the VAE factor from ``len(vae.config.block_out_channels) - 1`` downsamplings, the default image size from
``unet.config.sample_size`` times that factor.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentlab import _checks
from latentlab._quiet import quiet_transformers_image_processor_warning
from latentlab.backend.records import Conditioning, Inversion, Trajectory
from latentlab.sampling import Sampling, check_prompt
from latentlab.seeds import noise as _noise

__all__ = ["CPU_BATCH_SIZE", "Lab"]

log = logging.getLogger(__name__)

#: Items per UNet/VAE call on CPU when nothing else is said. Measured on the embedded model, 2 threads, 192-frame
#: morph (``python -m latentlab.benchmarks.morph --frames 192 --batches 8 16 24``): 9.6 frames/s at 8, 12.6 at 16,
#: 11.5 at 24 (the per-frame diffusers loop: 3.7).
CPU_BATCH_SIZE = 16
#: Prompt encodings kept per Lab (a widget typing prompts should not grow memory without bound).
PROMPT_CACHE_SIZE = 4096


def import_diffusers():
    """diffusers, imported on first use (``import latentlab`` stays light)."""
    quiet_transformers_image_processor_warning()
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - diffusers is a hard dependency
        raise ImportError("latentlab's backend needs diffusers: pip install 'diffusers>=0.35'") from e
    return diffusers


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


def step_seeds(latents: torch.Tensor) -> list[int]:
    """One seed per item for the noise a stochastic scheduler draws while stepping, derived from the item's initial
    latent bytes: the same latent gives the same image with any scheduler, alone or in any batch, on any device
    (the generators are CPU generators)."""
    flat = latents.detach().float().cpu().contiguous().reshape(len(latents), -1)
    return [int.from_bytes(hashlib.sha256(row.numpy().tobytes()).digest()[:8], "little") >> 1 for row in flat]


def cpu_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One seeded CPU generator per item (diffusers draws item ``i``'s noise from ``generator[i]``)."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def _is_safetensors_folder(path: Path) -> bool:
    return any(path.rglob("*.safetensors"))


@dataclass
class Lab:
    """A diffusers pipeline plus what latentlab needs to know about it.

    Build one with :meth:`default` (the embedded model, CPU) or :meth:`from_pretrained` (any SD 1.x/2.x, SDXL or
    Turbo checkpoint, safetensors only). ``defaults`` is the model's complete :class:`~latentlab.Sampling`; every
    method takes ``sampling=`` and/or the diffusers-named overrides and resolves them with :meth:`sampling`.

    Batching: ``batch_size`` is the number of items the denoiser (and the VAE) sees per call -- one meaning
    everywhere (``None``: 16 on CPU; on a GPU everything at once, halved on out-of-memory and remembered). CPU
    kernels pick different blockings for different batch sizes, so an item's float result depends on how many items
    shared its call (measured: up to ~1e-6). With ``batch_invariant`` (default on CPU) the last call of a request is
    padded to exactly ``batch_size`` items, so a seed's image is bit-identical whether it is generated alone or
    among 1,000 others *at that compute batch* (manifests and cache keys record it: :meth:`provenance`). An
    interactive single image passes ``batch_size=1`` and pays for one item, not sixteen.

    Examples
    --------
    >>> lab = Lab.default()
    >>> z = lab.noise([1, 2])
    >>> z.shape
    torch.Size([2, 4, 8, 8])
    >>> images = lab.generate(z, lab.encode_prompt(["a red star", "a blue ring"]))
    >>> images.shape, images.dtype
    (torch.Size([2, 3, 64, 64]), torch.float32)
    >>> lab.sampling(guidance_scale=2.0)
    Sampling(num_inference_steps=20, guidance_scale=2.0, negative_prompt='', scheduler='DDIMScheduler')
    """

    pipe: Any
    model_id: str
    defaults: Sampling = field(default_factory=Sampling)
    batch_size: int | None = None
    batch_invariant: bool | None = None
    _prompt_cache: dict[str, Conditioning] = field(default_factory=dict, repr=False)
    _pipelines: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)
    _auto_batch: int | None = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)
    _optimizations: tuple[str, ...] = field(default=(), repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def __post_init__(self):
        # The model's own defaults: the pipeline's scheduler, the diffusers pipelines' own steps and guidance.
        base = Sampling(50, 7.5, "", type(self.pipe.scheduler).__name__)
        self.defaults = self.defaults.over(base)

    # --- construction ------------------------------------------------------------------------------------------

    @classmethod
    def default(cls, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Lab:
        """The embedded shapes model (see ``latentlab/embedded/MODEL_CARD.md``): 64x64 images, 4x8x8 latents,
        20 DDIM steps at guidance 4 by default."""
        from latentlab import embedded

        path = embedded.model_path()
        lab = cls.from_pretrained(path, device=device, dtype=dtype)
        lab.model_id = "latentlab/embedded-shapes"
        lab.defaults = lab.defaults.replace(num_inference_steps=20, guidance_scale=4.0)
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
        A local folder is checked first (exists, holds a ``model_index.json`` and safetensors weights);
        ``FileNotFoundError`` says what is missing.
        """
        local = Path(model_id_or_path)
        looks_local = isinstance(model_id_or_path, Path) or local.exists() or str(model_id_or_path).startswith(
            (".", "/", "~"))
        if looks_local:
            local = local.expanduser()
            if not local.is_dir():
                raise FileNotFoundError(f"`model_id_or_path` is not a folder: {local}")
            if not (local / "model_index.json").is_file():
                raise FileNotFoundError(f"`model_id_or_path` has no model_index.json (not a diffusers folder): {local}")
            if not _is_safetensors_folder(local):
                raise FileNotFoundError(f"`model_id_or_path` has no .safetensors weights: {local} (latentlab loads "
                                        "only safetensors, never pickled .bin/.ckpt files; convert them first)")
        diffusers = import_diffusers()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        kwargs.setdefault("use_safetensors", True)
        verbosity = diffusers.utils.logging.get_verbosity()
        diffusers.utils.logging.set_verbosity_error()  # failures are reported once, below, not as log lines too
        bars = diffusers.utils.logging.is_progress_bar_enabled()
        diffusers.utils.logging.disable_progress_bar()  # loading a small model is quick: no "Loading ..." bars
        import transformers

        transformers.utils.logging.disable_progress_bar()
        try:
            pipe = diffusers.DiffusionPipeline.from_pretrained(str(local if looks_local else model_id_or_path),
                                                               dtype=dtype, **kwargs)
        except (OSError, ValueError) as e:
            text = " ".join(str(e).split())
            if "cached" in text or "offline" in text.lower() or "connect" in text.lower():
                why = ("it is not in the local Hugging Face cache and the hub cannot be reached (offline?): download "
                       "it where there is network access, or pass a local folder")
            else:
                why = text[:300]
            raise FileNotFoundError(f"could not load `model_id_or_path` {str(model_id_or_path)!r}: {why}") from e
        finally:
            diffusers.utils.logging.set_verbosity(verbosity)
            if bars:
                diffusers.utils.logging.enable_progress_bar()
                transformers.utils.logging.enable_progress_bar()
        supported = (diffusers.StableDiffusionPipeline, diffusers.StableDiffusionXLPipeline)
        if not isinstance(pipe, supported):
            raise TypeError(
                f"`model_id_or_path` must be a Stable Diffusion 1.x/2.x or SDXL pipeline, got {type(pipe).__name__}"
            )
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        lab = cls(pipe=pipe, model_id=str(model_id_or_path))
        if "turbo" in str(model_id_or_path).lower():
            lab.defaults = lab.defaults.replace(num_inference_steps=4, guidance_scale=0.0)
        return lab

    # --- facts from the configs --------------------------------------------------------------------------------

    @property
    def is_sdxl(self) -> bool:
        return hasattr(self.pipe, "text_encoder_2")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.pipe.vae.config.scaling_factor)

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

    # --- settings and provenance -------------------------------------------------------------------------------

    def sampling(self, sampling: Sampling | None = None, **overrides: Any) -> Sampling:
        """The complete settings of a request: ``overrides`` (diffusers' names: ``num_inference_steps``,
        ``guidance_scale``, ``negative_prompt``, ``scheduler``; ``None`` values ignored) over ``sampling`` over
        :attr:`defaults`. The one place where defaults are filled in; validated before any model work.

        >>> Lab.default().sampling(Sampling(num_inference_steps=8), guidance_scale=1.0).num_inference_steps
        8
        """
        if sampling is not None and not isinstance(sampling, Sampling):
            raise TypeError(f"`sampling` must be a latentlab.Sampling, got {type(sampling).__name__}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return Sampling(**given).over(sampling or Sampling()).over(self.defaults)

    def compute_batch(self, batch_size: int | None = None) -> int:
        """Items per denoiser call for a request with ``batch_size`` (``None``: :attr:`batch_size`, else automatic:
        16 on CPU, everything at once on a GPU -- reported as 0 there -- halved after an out-of-memory)."""
        if batch_size is not None:
            _checks.positive_int(batch_size, "batch_size")
        size = batch_size or self.batch_size or self._auto_batch
        if size is None:
            size = CPU_BATCH_SIZE if self.device.type == "cpu" else 0
        return size

    @property
    def invariant(self) -> bool:
        """Whether calls are padded to the compute batch (default: on CPU)."""
        return self.device.type == "cpu" if self.batch_invariant is None else bool(self.batch_invariant)

    def provenance(self, batch_size: int | None = None) -> dict:
        """What determines the pixels besides a request's inputs and :class:`Sampling` (JSON-safe)."""
        sched = self.pipe.scheduler
        return {
            "model": self.model_id, "model_fingerprint": self.fingerprint(),
            "scheduler_config": {k: v for k, v in dict(sched.config).items()
                                 if isinstance(v, (int, float, str, bool, type(None), list))},
            "compute_batch": self.compute_batch(batch_size), "batch_invariant": self.invariant,
            "device": str(self.device), "dtype": str(self.dtype),
        } | ({"optimizations": list(self._optimizations)} if self._optimizations else {})

    def optimize(self, *, channels_last: bool = False, compile: bool = False, compile_mode: str | None = None) -> Lab:
        """Opt-in speed-ups of the UNet (the part that runs every step): ``channels_last`` memory format, and
        ``torch.compile`` (inductor; ``compile_mode`` e.g. ``"max-autotune"`` on a GPU). Both can change results
        in the last bits, so they are recorded in :meth:`provenance` (manifests, cache keys). PyTorch's fused SDPA
        attention is diffusers' default with torch 2 and needs nothing here. Returns ``self``.

        Examples
        --------
        >>> lab = Lab.default().optimize(channels_last=True)
        >>> lab.provenance()["optimizations"]
        ['channels_last']
        """
        done = list(self._optimizations)
        with self._lock:
            if channels_last and "channels_last" not in done:
                self.pipe.unet.to(memory_format=torch.channels_last)
                done.append("channels_last")
            if compile and not any(o.startswith("compile") for o in done):
                self.pipe.unet = torch.compile(self.pipe.unet, mode=compile_mode)
                done.append(f"compile:{compile_mode or 'default'}")
            self._optimizations = tuple(done)
            self._pipelines.clear()  # pipelines built from the old components are rebuilt on next use
        return self

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

    def _truncation_warning(self, prompt: str) -> None:
        tok = self.pipe.tokenizer
        n = len(tok(prompt, truncation=False, add_special_tokens=True).input_ids)
        if n > tok.model_max_length:
            warnings.warn(f"a prompt of {n} tokens was cut to the text encoder's limit of {tok.model_max_length} "
                          f"tokens (start and end tokens included): the rest is ignored; prompt starts "
                          f"{prompt[:40]!r}", UserWarning, stacklevel=3)

    def encode_prompt(self, prompt: str | Sequence[str]) -> Conditioning:
        """Text conditioning for each prompt (cached by prompt text).

        A prompt longer than the text encoder's token limit (77 for CLIP) is truncated, as diffusers does, with
        one warning that names the limit.
        """
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError(f"`prompt` must be a string or a non-empty list of strings, got {type(prompt).__name__}")
        for i, p in enumerate(prompts):
            check_prompt(p, "prompt" if isinstance(prompt, str) else f"prompt[{i}]")
        # One prompt per text-encoder call: an encoding never depends on which other prompts were new at the time.
        with self._lock:
            for p in dict.fromkeys(prompts):
                if p in self._prompt_cache:
                    continue
                self._truncation_warning(p)
                pipe_log = logging.getLogger(type(self.pipe).__module__)
                level = pipe_log.level
                pipe_log.setLevel(logging.ERROR)  # diffusers logs the whole dropped text; we warned above
                try:
                    with torch.no_grad():
                        if self.is_sdxl:
                            emb, _, pooled, _ = self.pipe.encode_prompt(
                                [p], device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
                            )
                        else:
                            emb, _ = self.pipe.encode_prompt([p], self.device, 1, False)
                            pooled = None
                finally:
                    pipe_log.setLevel(level)
                if len(self._prompt_cache) >= PROMPT_CACHE_SIZE:
                    self._prompt_cache.pop(next(iter(self._prompt_cache)))
                self._prompt_cache[p] = Conditioning(emb, pooled)
            return Conditioning.cat([self._prompt_cache[p] for p in prompts])

    def negative_conditioning(self, negative_prompt: str = "") -> Conditioning:
        """The unconditional side of classifier-free guidance, as the pipeline itself builds it: SDXL pipelines
        with ``force_zeros_for_empty_prompt`` use zeros for an empty negative prompt, others encode the text."""
        cond = self.encode_prompt(negative_prompt)
        if self.is_sdxl and negative_prompt == "" and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            return cond.map(torch.zeros_like)
        return cond

    # --- generation --------------------------------------------------------------------------------------------

    def pipeline(self, kind: str = "text2image", scheduler: str | None = None):
        """The diffusers pipeline for ``kind`` ("text2image" or "img2img") with ``scheduler`` (a class name; None:
        the model's), composed ``from_pipe`` on the same components (no weights are copied) and cached."""
        _checks.choice(kind, "kind", ("text2image", "img2img"))
        name = scheduler or type(self.pipe.scheduler).__name__
        key = (kind, name)
        if key not in self._pipelines:
            diffusers = import_diffusers()
            if kind == "text2image" and name == type(self.pipe.scheduler).__name__:
                self._pipelines[key] = self.pipe
            else:
                cls = getattr(diffusers, name, None)
                if cls is None or not name.endswith("Scheduler"):
                    raise ValueError(f"`scheduler` must name a diffusers scheduler class, got {name!r}")
                pipe_cls = self.pipe.__class__
                if kind == "img2img":
                    pipe_cls = (diffusers.StableDiffusionXLImg2ImgPipeline if self.is_sdxl
                                else diffusers.StableDiffusionImg2ImgPipeline)
                # The same component objects (no weights copied or loaded), a fresh scheduler from the model's config.
                wanted = inspect.signature(pipe_cls.__init__).parameters
                parts = {k: v for k, v in self.pipe.components.items() if k in wanted}
                parts["scheduler"] = cls.from_config(self.pipe.scheduler.config)
                if "requires_safety_checker" in wanted:
                    parts["requires_safety_checker"] = False
                pipe = pipe_cls(**parts)
                pipe.set_progress_bar_config(disable=True)
                self._pipelines[key] = pipe
        return self._pipelines[key]

    def pipeline_kwargs(self, cond: Conditioning, negative: Conditioning, sampling: Sampling) -> dict:
        """The embeddings keyword arguments of a pipeline call (negative ones only when guidance runs)."""
        b = len(cond)
        kw: dict[str, Any] = {"prompt_embeds": cond.prompt_embeds.to(self.device)}
        if self.is_sdxl:
            kw["pooled_prompt_embeds"] = cond.pooled_prompt_embeds.to(self.device)
        if sampling.guidance_scale > 1.0:
            neg = negative.map(lambda t: t.expand(b, *t.shape[1:]).to(self.device))
            kw["negative_prompt_embeds"] = neg.prompt_embeds
            if self.is_sdxl:
                kw["negative_pooled_prompt_embeds"] = neg.pooled_prompt_embeds
        return kw

    def check_request(self, latents: torch.Tensor, conditioning: Conditioning) -> Conditioning:
        """Validate (latents, conditioning) before any model work; one conditioning item per latent."""
        _checks.tensor(latents, "latents", min_ndim=4)
        if latents.ndim != 4:
            raise ValueError(f"`latents` must have shape (batch, C, h, w), got {tuple(latents.shape)}")
        expected = self.latent_shape(height=latents.shape[2] * self.vae_scale_factor,
                                     width=latents.shape[3] * self.vae_scale_factor)
        if tuple(latents.shape[1:]) != expected:
            raise ValueError(f"`latents` must have shape (batch, {expected[0]}, h, w), got {tuple(latents.shape)}")
        _checks.finite(latents, "latents")
        if not isinstance(conditioning, Conditioning):
            raise TypeError(f"`conditioning` must be a Conditioning (from encode_prompt), got {type(conditioning).__name__}")
        _checks.finite(conditioning.prompt_embeds, "conditioning.prompt_embeds")
        n = latents.shape[0]
        if len(conditioning) == 1 and n > 1:
            conditioning = conditioning.map(lambda t: t.expand(n, *t.shape[1:]))
        if len(conditioning) != n:
            raise ValueError(f"`conditioning` must have 1 or {n} items (one per latent), got {len(conditioning)}")
        return conditioning

    def generate(
        self,
        latents: torch.Tensor,
        conditioning: Conditioning,
        *,
        sampling: Sampling | None = None,
        batch_size: int | None = None,
        output_type: str = "pt",
        **overrides: Any,
    ) -> torch.Tensor:
        """Denoise each (latent, conditioning) pair; images (batch, 3, H, W) in [0, 1], float32, on the CPU.

        ``latents`` are the initial noise (e.g. from :meth:`noise` or a path); ``conditioning`` has one item per
        latent (or one item, used for all). Settings: ``sampling`` and/or overrides such as
        ``num_inference_steps=``, ``guidance_scale=``, ``negative_prompt=``, ``scheduler=`` (see :meth:`sampling`).
        Runs ``batch_size`` items per call (see the class notes). Stochastic schedulers get one CPU generator per
        item, seeded from the item's latent (:func:`step_seeds`), so a seed means one image with any scheduler.
        ``output_type="latent"`` returns the final latents instead of images.
        """
        s = self.sampling(sampling, **overrides)
        conditioning = self.check_request(latents, conditioning)
        _checks.choice(output_type, "output_type", ("pt", "latent"))
        self.compute_batch(batch_size)  # validates
        pipe = self.pipeline("text2image", s.scheduler)
        negative = self.negative_conditioning(s.negative_prompt)
        f = self.vae_scale_factor

        @torch.no_grad()
        def run(z, cond):
            return pipe(latents=z.to(self.device, self.dtype), height=z.shape[2] * f, width=z.shape[3] * f,
                        num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                        generator=cpu_generators(step_seeds(z)), output_type="latent",
                        **self.pipeline_kwargs(cond, negative, s)).images

        out = self.run_batched(run, latents, conditioning, batch_size=batch_size)
        if output_type == "latent":
            return out.float().cpu()
        return self.decode(out, batch_size=batch_size)

    # --- batching ----------------------------------------------------------------------------------------------

    def run_batched(self, fn, *args, batch_size: int | None = None) -> torch.Tensor:
        """``fn(*chunks)`` over batch chunks of the tensor/Conditioning ``args``, concatenated on the CPU.

        Chunks have :meth:`compute_batch` items; with batch invariance the last one is padded (repeating its last
        item) to exactly that size and the padding dropped from the output. On out-of-memory the size is halved,
        remembered for later calls when it was chosen automatically, and the chunk retried. Calls from several
        threads (widgets) run one at a time.
        """
        n = len(args[0])
        size = self.compute_batch(batch_size) or n
        invariant = self.invariant
        size = size if invariant else min(size, n)
        outs, start = [], 0
        with self._lock:
            while start < n:
                stop = min(n, start + size)
                chunk = [x[start:stop] for x in args]
                pad = size - (stop - start) if invariant else 0
                if pad:
                    chunk = [_pad_batch(x, pad) for x in chunk]
                try:
                    outs.append(fn(*chunk)[: stop - start].cpu())
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

    def trajectory(self, latents: torch.Tensor, conditioning: Conditioning, *, sampling: Sampling | None = None,
                   batch_size: int | None = None, **overrides: Any) -> Trajectory:
        """Denoise like :meth:`generate` and record every step's latents and predicted clean latent (x0); see
        :func:`latentlab.backend.trajectory.trajectory`."""
        from latentlab.backend import trajectory

        return trajectory.trajectory(self, latents, conditioning, sampling=sampling, batch_size=batch_size,
                                     **overrides)

    # --- latent edits (composed from diffusers in latentlab.backend.edits) -------------------------------------

    def img2img(self, latents: torch.Tensor, conditioning: Conditioning, *, strength: float = 0.6,
                seed: int | Sequence[int] = 0, sampling: Sampling | None = None, batch_size: int | None = None,
                output_type: str = "pt", **overrides: Any) -> torch.Tensor:
        """Image-to-image as a latent edit; see :func:`latentlab.backend.edits.img2img`.

        Examples
        --------
        >>> lab = Lab.default()
        >>> z = lab.encode(lab.generate(lab.noise(3), lab.encode_prompt("a large red circle on a blue background")))
        >>> out = lab.img2img(z, lab.encode_prompt("a large red square on a blue background"), strength=0.7, seed=1)
        >>> out.shape
        torch.Size([1, 3, 64, 64])
        """
        from latentlab.backend import edits

        return edits.img2img(self, latents, conditioning, strength=strength, seed=seed, sampling=sampling,
                             batch_size=batch_size, output_type=output_type, **overrides)

    def inpaint(self, latents: torch.Tensor, conditioning: Conditioning, mask: torch.Tensor, *,
                strength: float = 1.0, seed: int | Sequence[int] = 0, image: torch.Tensor | None = None,
                feather: float = 2.0, sampling: Sampling | None = None, batch_size: int | None = None,
                output_type: str = "pt", **overrides: Any) -> torch.Tensor:
        """Latent inpainting: regenerate where ``mask`` is 1; see :func:`latentlab.backend.edits.inpaint`.

        Examples
        --------
        >>> lab = Lab.default()
        >>> z = lab.encode(lab.generate(lab.noise(3), lab.encode_prompt("a large red circle on a blue background")))
        >>> mask = torch.zeros(1, 1, 64, 64); mask[..., :, 32:] = 1      # regenerate the right half
        >>> lab.inpaint(z, lab.encode_prompt("a large red circle on a blue background"), mask, seed=2).shape
        torch.Size([1, 3, 64, 64])
        """
        from latentlab.backend import edits

        return edits.inpaint(self, latents, conditioning, mask, strength=strength, seed=seed, image=image,
                             feather=feather, sampling=sampling, batch_size=batch_size, output_type=output_type,
                             **overrides)

    def invert(self, latents: torch.Tensor, conditioning: Conditioning, *, sampling: Sampling | None = None,
               batch_size: int | None = None, **overrides: Any) -> Inversion:
        """DDIM inversion (guidance 1 unless told); see :func:`latentlab.backend.edits.invert`.

        Examples
        --------
        >>> lab = Lab.default()
        >>> cond = lab.encode_prompt("a large red circle on a blue background")
        >>> inv = lab.invert(lab.encode(lab.generate(lab.noise(3), cond)), cond)
        >>> inv.noise.shape, inv.psnr.shape
        (torch.Size([1, 4, 8, 8]), torch.Size([1]))
        """
        from latentlab.backend import edits

        return edits.invert(self, latents, conditioning, sampling=sampling, batch_size=batch_size, **overrides)

    # --- VAE -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """Final latents (scaled as the UNet sees them) -> images in [0, 1] (float32, CPU), as the pipeline does.

        Batched like :meth:`generate`. Items that decode to non-finite values in a low-precision VAE are decoded
        again in float32.
        """
        _checks.tensor(latents, "latents", min_ndim=4)
        _checks.finite(latents, "latents")
        return self.run_batched(self._decode_batch, latents, batch_size=batch_size)

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
        _checks.within(images, "images", 0.0, 1.0, hint="divide 8-bit images by 255")
        return self.run_batched(self._encode_batch, images, batch_size=batch_size)

    def _encode_batch(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        x = images.to(self.device, vae.dtype) * 2 - 1
        z = vae.encode(x).latent_dist.mean
        stats = _latents_mean_std(vae, z)
        if stats is not None:
            return ((z - stats[0]) * vae.config.scaling_factor / stats[1]).to(self.dtype)
        return (z * vae.config.scaling_factor).to(self.dtype)
