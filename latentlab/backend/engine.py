"""The engine: one loaded diffusers pipeline and the mechanics of every request made to it.

One responsibility: what is the same for every model family -- batching (compute batch, padding for batch
invariance, out-of-memory halving), seeded CPU generators, device and dtype, the prompt cache, settings resolution
(:class:`~latentlab.Sampling`), provenance and the model fingerprint, pipelines composed ``from_pipe`` with another
scheduler, and the generic requests built on the family adapter (noise, generate, encode/decode). What differs
between families (how prompts become :class:`Conditioning`, how latents are packed, scaled and timed, how the
denoiser is called) is asked of :attr:`Engine.adapter` (:mod:`latentlab.backend.families`); nothing here checks
which family it is.

Edits (:mod:`latentlab.backend.edits`) and trajectories (:mod:`latentlab.backend.trajectory`) are functions over
an engine; :class:`latentlab.backend.Lab` is the thin facade users hold.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import threading
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from latentlab import _checks
from latentlab._quiet import quiet_transformers_image_processor_warning
from latentlab.backend.records import AttentionMix, Conditioning, PredictionMix, Tokens, _PairMix
from latentlab.sampling import Sampling, check_prompt

__all__ = ["CPU_BATCH_SIZE", "PROMPT_CACHE_SIZE", "Engine", "cpu_generators", "import_diffusers", "mixed_predictions",
           "step_seeds"]

log = logging.getLogger(__name__)

#: Items per denoiser/VAE call on CPU when nothing else is said. Measured on the embedded model, 2 threads, 192-frame
#: morph (``python -m latentlab.benchmarks.morph --frames 192 --batches 8 16 24``): 9.6 frames/s at 8, 12.6 at 16,
#: 11.5 at 24 (the per-frame diffusers loop: 3.7).
CPU_BATCH_SIZE = 16
#: Prompt encodings kept per engine (a widget typing prompts should not grow memory without bound).
PROMPT_CACHE_SIZE = 4096
#: CLIP's token limit: the shortest text encoder of any supported family.
_SHORTEST_TEXT_ENCODER = 77


def import_diffusers():
    """diffusers, imported on first use (``import latentlab`` stays light)."""
    quiet_transformers_image_processor_warning()
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - diffusers is a hard dependency
        raise ImportError("latentlab's backend needs diffusers: pip install 'diffusers>=0.35'") from e
    return diffusers


def _pad_batch(x, pad: int):
    """Repeat the last batch item ``pad`` times (tensors, Conditioning, PredictionMix and AttentionMix)."""
    if isinstance(x, (Conditioning, _PairMix)):
        return x.map(lambda t: _pad_batch(t, pad))
    return torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def step_seeds(latents: torch.Tensor) -> list[int]:
    """One seed per item for the noise a stochastic scheduler draws while stepping, derived from the item's initial
    latent bytes: the same latent gives the same image with any scheduler, alone or in any batch, on any device
    (the generators are CPU generators)."""
    flat = latents.detach().float().cpu().contiguous().reshape(len(latents), -1)
    return [int.from_bytes(hashlib.sha256(row.numpy().tobytes()).digest()[:8], "little") >> 1 for row in flat]


@contextmanager
def mixed_predictions(denoiser: torch.nn.Module, weight: torch.Tensor):
    """While active, every output of ``denoiser`` is mixed pairwise: its rows are taken as (any number of) blocks of
    ``[a items, b items]`` with ``len(weight)`` items each -- how the pipelines batch a doubled request, with or
    without classifier-free guidance's [negative, positive] and whether guidance runs in one call or two -- and
    row ``i`` of both halves becomes ``(1 - weight[i]) * a_i + weight[i] * b_i`` (in float32, cast back). Nothing
    is patched: a forward hook, removed on exit. See :class:`latentlab.backend.PredictionMix`."""
    m = len(weight)
    w32 = weight.detach().to(torch.float32)

    def hook(module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output if isinstance(output, torch.Tensor) else output.sample
        rows = out.shape[0]
        if rows % (2 * m):
            raise RuntimeError(f"prediction mixing: the denoiser was called with {rows} rows, not a multiple of "
                               f"2 x {m} items; this pipeline batches in a way prediction mixing does not support")
        v = out.reshape(rows // (2 * m), 2, m, *out.shape[1:])
        w = w32.to(out.device).view(1, m, *[1] * (out.ndim - 1))
        mixed = (v[:, 0].float() * (1 - w) + v[:, 1].float() * w).to(out.dtype)
        new = torch.stack([mixed, mixed], 1).reshape(out.shape)
        if isinstance(output, tuple):
            return (new, *output[1:])
        if isinstance(output, torch.Tensor):
            return new
        output.sample = new
        return output

    handle = denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def module_facts(module: torch.nn.Module) -> dict:
    """``{"device": module.device, "dtype": module.dtype}`` of a diffusers model, as diffusers answers them, without
    its walks where they cannot change the answer.

    diffusers answers each by first walking every submodule for a hook of its own (group offloading for the device,
    layerwise casting for the dtype; ~0.65 ms each on the embedded UNet), then reading the first parameter. Here one
    cheaper walk looks for any diffusers hook at all (~0.25 ms for both facts); without one, the first parameters
    give diffusers' own answers; with one (or for a model class that answers its own way), diffusers answers.
    """
    from diffusers import ModelMixin  # only called with a loaded pipeline: diffusers is imported already

    cls = type(module)
    if (not isinstance(module, ModelMixin) or cls.device is not ModelMixin.device or cls.dtype is not ModelMixin.dtype
            or any("_diffusers_hook" in m.__dict__ for m in module.modules())):
        return {"device": module.device, "dtype": module.dtype}
    device = dtype = None
    for p in module.parameters():
        device = p.device
        break
    keep = getattr(module, "_keep_in_fp32_modules", None)
    for name, p in module.named_parameters():  # diffusers' rule: the first floating parameter outside keep-in-fp32
        if keep and any(m in name for m in keep):
            continue
        if p.is_floating_point():
            dtype = p.dtype
            break
    # No parameter (or no floating one): diffusers' own fallbacks (buffers, the last dtype seen).
    return {"device": module.device if device is None else device, "dtype": module.dtype if dtype is None else dtype}


def cpu_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One seeded CPU generator per item (diffusers draws item ``i``'s noise from ``generator[i]``)."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def _pinning(method):
    """Run an Engine method inside :meth:`Engine.pinned` (at most one device/dtype lookup per request)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.pinned():
            return method(self, *args, **kwargs)

    return wrapper


_PINNED_PIPELINE_CLASSES: dict[type, type] = {}


def _pin_execution_device(pipe: Any, pin: threading.local) -> Any:
    """Let ``pipe`` answer ``_execution_device`` from the engine's pinned facts during a request (see
    :meth:`Engine.pinned`), and exactly as diffusers does outside one.

    A diffusers pipeline asks ``self._execution_device`` at the start of every call, and answers it by walking every
    component's submodules for offloading hooks and then each component's ``device`` (its own walk): 3.9 ms on the
    embedded model, a sixteenth of a 2-step preview. It cannot change during one request, so within a pinned block
    the first answer is kept. A property cannot be overridden on an instance, so the pipeline's class becomes a
    subclass with that one property, under the same name, module and qualified name (``save_pretrained`` and
    ``AutoPipeline`` read the class name); nothing else changes.
    """
    cls = type(pipe)
    sub = cls if "_latentlab_pinned" in cls.__dict__ else _PINNED_PIPELINE_CLASSES.get(cls)
    if sub is None:
        original = cls._execution_device

        def _execution_device(self):
            facts = getattr(self.__dict__.get("_latentlab_pin"), "facts", None)
            if facts is None:
                return original.fget(self)
            if "execution_device" not in facts:
                facts["execution_device"] = original.fget(self)
            return facts["execution_device"]

        sub = type(cls.__name__, (cls,), {"_execution_device": property(_execution_device), "_latentlab_pinned": True,
                                          "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                          "__doc__": cls.__doc__})
        _PINNED_PIPELINE_CLASSES[cls] = sub
    pipe.__class__ = sub
    object.__setattr__(pipe, "_latentlab_pin", pin)
    return pipe


@dataclass
class Engine:
    """A loaded pipeline, its family :attr:`adapter`, and the request mechanics (see the module notes).

    Batching: ``batch_size`` is the number of items the denoiser (and the VAE) sees per call -- one meaning
    everywhere (``None``: 16 on CPU; on a GPU everything at once, halved on out-of-memory and remembered). CPU
    kernels pick different blockings for different batch sizes, so an item's float result depends on how many items
    shared its call (measured: up to ~1e-6). With ``batch_invariant`` (default on CPU) the last call of a request is
    padded to exactly ``batch_size`` items, so a seed's image is bit-identical whether it is generated alone or
    among 1,000 others *at that compute batch* (manifests and cache keys record it: :meth:`provenance`).
    """

    pipe: Any
    model_id: str
    adapter: Any = None
    defaults: Sampling = field(default_factory=Sampling)
    batch_size: int | None = None
    batch_invariant: bool | None = None
    _prompt_cache: dict[str, Conditioning] = field(default_factory=dict, repr=False)
    _pipelines: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)
    _auto_batch: int | None = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)
    _optimizations: tuple[str, ...] = field(default=(), repr=False)
    _live: dict[bool, Any] = field(default_factory=dict, repr=False)
    _preview_decoder: Any = field(default=None, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _pin: threading.local = field(default_factory=threading.local, repr=False)

    def __post_init__(self):
        if self.adapter is None:
            raise TypeError("`adapter` must be the family adapter of `pipe` (latentlab.backend.families.adapter_for)")
        # The model's own defaults: its scheduler, its family's usual steps and guidance.
        self.defaults = self.defaults.over(self.adapter.default_sampling(self.pipe))

    # --- facts from the configs --------------------------------------------------------------------------------

    @property
    def family(self) -> str:
        """The model family: ``"sd"``, ``"sdxl"``, ``"sd3"``, ``"flux"``, ``"chroma"``, ``"lumina2"``,
        ``"qwenimage"`` or ``"flux2"``."""
        return self.adapter.family

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network that runs every step (a UNet or a transformer)."""
        return getattr(self.pipe, self.adapter.denoiser_name)

    @property
    def device(self) -> torch.device:
        return self._pinned_fact("device")

    @property
    def dtype(self) -> torch.dtype:
        return self._pinned_fact("dtype")

    @property
    def vae_dtype(self) -> torch.dtype:
        """The VAE's dtype (pinned like :attr:`dtype` within a request)."""
        return self._pinned_fact("dtype", "vae")

    def _pinned_fact(self, name: str, module: str = "denoiser"):
        facts = getattr(self._pin, "facts", None)
        owner = self.denoiser if module == "denoiser" else getattr(self.pipe, module)
        if facts is None:
            return getattr(owner, name)
        if module not in facts:  # both facts of the module from one walk (see module_facts)
            facts[module] = module_facts(owner)
        return facts[module][name]

    @contextmanager
    def pinned(self):
        """Within this block (on this thread), :attr:`device`, :attr:`dtype`, :attr:`vae_dtype` and the pipelines'
        ``_execution_device`` are looked up at most once.

        diffusers answers ``model.device``/``model.dtype`` by walking every submodule for offloading and casting
        hooks (about 1 ms each on the embedded UNet, and a request asked up to a dozen times), and a pipeline's
        ``_execution_device`` by walking every component (3.9 ms). None of them can change during one request, so
        each request looks them up once, when first needed; nested blocks reuse the outer lookup. Every public
        request of the engine runs inside one. Measured on the few-step model's 2-step preview (one thread, 90
        previews each, interleaved): denoiser device and dtype 59.8 -> 57.8 ms, 1.04x; images bit-identical.
        """
        if getattr(self._pin, "facts", None) is not None:
            yield
            return
        self._pin.facts = {}
        try:
            yield
        finally:
            self._pin.facts = None

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for the SD and Flux VAEs)."""
        return self.adapter.vae_factor_from_config(self.pipe.vae.config)

    @property
    def vae_scaling_factor(self) -> float:
        return self.adapter.vae_factors(self.pipe.vae)[0]

    @property
    def vae_shift_factor(self) -> float:
        return self.adapter.vae_factors(self.pipe.vae)[1]

    def comfyui_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-layout latents in the layout of ComfyUI's latent format for this model's family (Flux.2: its 128
        patchified channels); :func:`latentlab.exports.write_comfyui_latent` then applies scale and shift."""
        _checks.tensor(latents, "latents", min_ndim=4)
        c = self.adapter.latent_channels(self.pipe)
        if latents.ndim != 4 or latents.shape[1] != c:
            raise ValueError(f"`latents` must have shape (batch, {c}, h, w), got {tuple(latents.shape)}")
        m = self.size_multiple // self.vae_scale_factor
        if latents.shape[2] % m or latents.shape[3] % m:
            raise ValueError(f"`latents` height and width must be multiples of {m}, got {tuple(latents.shape)}")
        return self.adapter.comfyui_layout(latents)

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this: the VAE factor, times 2 where latents are patched/packed 2x2."""
        return self.vae_scale_factor * self.adapter.size_patch(self.pipe)

    @property
    def size_factor_text(self) -> str:
        """The size factor in words, for error messages ("the VAE factor 8", "16 (the VAE factor 8 x 2 ...)")."""
        f, m = self.vae_scale_factor, self.size_multiple
        return f"the VAE factor {f}" if m == f else f"{m} (the VAE factor {f} x {m // f}x{m // f} latent patches)"

    def default_size(self) -> tuple[int, int]:
        return self.adapter.default_size(self)

    def latent_shape(self, *, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(channels, height // f, width // f) for an image size (default: the model's native size)."""
        dh, dw = self.default_size()
        height, width = dh if height is None else height, dw if width is None else width
        check_size(height, width, self.size_multiple, self.size_factor_text)
        f = self.vae_scale_factor
        return (self.adapter.latent_channels(self.pipe), height // f, width // f)

    @_pinning
    def noise(self, seed: int | Sequence[int], *, height: int | None = None, width: int | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
        """Initial latents for ``seed`` (one item per seed), drawn on the CPU: the same on every device, and equal to
        the pipeline's own initial noise for those seeds (one CPU generator per item), in the VAE's layout."""
        shape = self.latent_shape(height=height, width=width)
        return self.adapter.noise(seed, shape).to(device=self.device, dtype=dtype or self.dtype)

    # --- settings and provenance -------------------------------------------------------------------------------

    def sampling(self, sampling: Sampling | None = None, **overrides: Any) -> Sampling:
        """The complete settings of a request: ``overrides`` (diffusers' names: ``num_inference_steps``,
        ``guidance_scale``, ``negative_prompt``, ``scheduler``; ``None`` values ignored) over ``sampling`` over
        :attr:`defaults`. The one place where defaults are filled in; validated (the scheduler against the model's
        family too) before any model work."""
        if sampling is not None and not isinstance(sampling, Sampling):
            raise TypeError(f"`sampling` must be a latentlab.Sampling, got {type(sampling).__name__}")
        given = {k: v for k, v in overrides.items() if v is not None}
        s = Sampling(**given).over(sampling or Sampling()).over(self.defaults)
        self.adapter.check_scheduler(s.scheduler)
        return s

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
        """What determines the pixels besides a request's inputs and :class:`Sampling` (JSON-safe): the model, its
        family and guidance mode, the scheduler config (shift and dynamic shifting for flow models), compute batch,
        device, dtype."""
        sched = self.pipe.scheduler
        return {
            "model": self.model_id, "model_fingerprint": self.fingerprint(),
            "family": self.family, "guidance_mode": self.adapter.guidance_mode(self.pipe),
            "scheduler_config": {k: v for k, v in dict(sched.config).items()
                                 if isinstance(v, (int, float, str, bool, type(None), list))},
            "compute_batch": self.compute_batch(batch_size), "batch_invariant": self.invariant,
            "device": str(self.device), "dtype": str(self.dtype),
        } | ({"optimizations": list(self._optimizations)} if self._optimizations else {})

    def schedule(self, *, height: int, width: int, sampling: Sampling | None = None) -> dict:
        """The noise schedule a request at this image size runs (JSON-safe; flow models: ``mu`` of the dynamic
        shift, which depends on the image's token count, and the sigmas). Manifests record it."""
        s = self.sampling(sampling)
        return self.adapter.schedule(self, height=height, width=width, sampling=s)

    def optimize(self, *, channels_last: bool = False, compile: bool = False, compile_mode: str | None = None):
        """Opt-in speed-ups of the denoiser (the part that runs every step): ``channels_last`` memory format, and
        ``torch.compile`` (inductor; ``compile_mode`` e.g. ``"max-autotune"`` on a GPU). Both can change results
        in the last bits, so they are recorded in :meth:`provenance` (manifests, cache keys). PyTorch's fused SDPA
        attention is diffusers' default with torch 2 and needs nothing here. Returns ``self``. (The facade,
        :meth:`latentlab.backend.Lab.optimize`, adds ``onnx``.)

        Examples
        --------
        >>> from latentlab import Lab
        >>> lab = Lab.default().optimize(channels_last=True)
        >>> lab.provenance()["optimizations"]
        ['channels_last']
        """
        done = list(self._optimizations)
        name = self.adapter.denoiser_name
        if compile and self.onnx:
            raise ValueError("`compile=True`: this model's UNet already runs on ONNX Runtime (optimize(onnx=True))")
        with self._lock:
            if channels_last and "channels_last" not in done:
                self.denoiser.to(memory_format=torch.channels_last)
                done.append("channels_last")
            if compile and not self.compiled:
                setattr(self.pipe, name, torch.compile(self.denoiser, mode=compile_mode))
                done.append(f"compile:{compile_mode or 'default'}")
            self._optimizations = tuple(done)
            self._pipelines.clear()  # pipelines built from the old components are rebuilt on next use
            self._live.clear()  # so are live generators (a compiled denoiser is not traced)
        return self

    @property
    def onnx(self) -> bool:
        """Whether :meth:`optimize` put the UNet's steps on ONNX Runtime."""
        return any(o.startswith("onnxruntime") for o in self._optimizations)

    @property
    def compiled(self) -> bool:
        """Whether :meth:`optimize` compiled the denoiser (``torch.compile``)."""
        return any(o.startswith("compile") for o in self._optimizations)

    def fingerprint(self) -> str:
        """A short hash that changes when the model changes: model id, component configs, and a sample of every
        weight tensor of the denoiser, VAE and text encoder(s) (first and last values; cheap, and any retraining
        changes them). Cache keys of rendered frames include it."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.model_id.encode())
            for name in self.adapter.weight_components:
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

    @_pinning
    def encode_prompt(self, prompt: str | Sequence[str]) -> Conditioning:
        """Text conditioning for each prompt (cached by prompt text), with every field the family needs.

        A prompt longer than the text encoder's token limit (77 for CLIP; the T5 length for SD3/Flux) is truncated,
        as diffusers does, with one warning that names the limit.
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
                with self._long_prompt_logs_quiet(self._truncation_warning(p)), torch.no_grad():
                    cond = self.adapter.encode_prompt(self.pipe, p, self.device)
                if len(self._prompt_cache) >= PROMPT_CACHE_SIZE:
                    self._prompt_cache.pop(next(iter(self._prompt_cache)))
                self._prompt_cache[p] = cond
            return Conditioning.cat([self._prompt_cache[p] for p in prompts])

    def tokens(self, prompt: str) -> Tokens:
        """How ``prompt`` reaches the model: its tokens, the encoder's limit, which tokens are kept, and their rows
        of the conditioning (see :class:`~latentlab.backend.records.Tokens`).

        Examples
        --------
        >>> import latentlab as ll
        >>> t = ll.Lab.default().tokens("a red star")
        >>> t.tokens, t.limit
        (('<|startoftext|>', 'a</w>', 'red</w>', 'star</w>', '<|endoftext|>'), 77)
        """
        check_prompt(prompt, "prompt")
        tok, limit = self.adapter.display_tokenizer(self.pipe)
        ids = tok(prompt, truncation=False, add_special_tokens=True, verbose=False).input_ids
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the view shows the cut itself
            embeds = self.encode_prompt(prompt).prompt_embeds[0]
        kept = min(len(ids), limit, embeds.shape[0])
        # A left-padding tokenizer puts the prompt's rows last (when it fits: a cut prompt fills every row).
        first = embeds.shape[0] - kept if getattr(tok, "padding_side", "right") == "left" else 0
        return Tokens(tuple(tok.convert_ids_to_tokens(ids)), tuple(int(i) for i in ids), int(limit), kept,
                      embeds[first:first + kept].float().cpu(), type(getattr(tok, "tokenizer", tok)).__name__)

    def _truncation_warning(self, prompt: str) -> bool:
        """Warn once if ``prompt`` is cut to the text encoder's limit; whether it is long enough that some text
        encoder of the pipeline might cut it (and log about it)."""
        tok, limit = self.adapter.token_limit(self.pipe)
        n = len(tok(prompt, truncation=False, add_special_tokens=True, verbose=False).input_ids)
        if n > limit:
            warnings.warn(f"a prompt of {n} tokens was cut to the text encoder's limit of {limit} "
                          f"tokens (start and end tokens included): the rest is ignored; prompt starts "
                          f"{prompt[:40]!r}", UserWarning, stacklevel=4)
        # The shortest encoder of any family is CLIP (77 tokens), and other tokenizers count the same text within
        # far less than 2x of this one: below half of that, no encoder truncates and nothing logs.
        return n > min(limit, _SHORTEST_TEXT_ENCODER) // 2

    @contextmanager
    def _long_prompt_logs_quiet(self, long: bool):
        """For a long prompt, silence what the pipeline and transformers log about truncation (the whole dropped
        text; our warning said it once). Only then: setting a logger's level clears the cache of every logger in the
        process (~1.3 ms a prompt, measured), a quarter of a short prompt's encoding."""
        if not long:
            yield
            return
        pipe_log = logging.getLogger(type(self.pipe).__module__)
        level = pipe_log.level
        pipe_log.setLevel(logging.ERROR)
        from transformers.utils import logging as transformers_logging

        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # its tokenizers' length notice repeats ours
        try:
            yield
        finally:
            pipe_log.setLevel(level)
            transformers_logging.set_verbosity(verbosity)

    def negative_conditioning(self, negative_prompt: str = "") -> Conditioning:
        """The unconditional side of classifier-free guidance, as the pipeline itself builds it (e.g. SDXL pipelines
        with ``force_zeros_for_empty_prompt`` use zeros for an empty negative prompt, others encode the text)."""
        return self.adapter.negative(self.pipe, self.encode_prompt(negative_prompt), negative_prompt)

    # --- requests ------------------------------------------------------------------------------------------------

    def pipeline(self, kind: str = "text2image", scheduler: str | None = None):
        """The diffusers pipeline for ``kind`` ("text2image" or "img2img") with ``scheduler`` (a class name; None:
        the model's), composed on the same components (no weights are copied) and cached."""
        _checks.choice(kind, "kind", ("text2image", "img2img"))
        name = scheduler or type(self.pipe.scheduler).__name__
        key = (kind, name)
        if key not in self._pipelines:
            diffusers = import_diffusers()
            if kind == "text2image" and name == type(self.pipe.scheduler).__name__:
                self._pipelines[key] = _pin_execution_device(self.pipe, self._pin)
            else:
                cls = getattr(diffusers, name, None)
                if cls is None or not name.endswith("Scheduler"):
                    raise ValueError(f"`scheduler` must name a diffusers scheduler class, got {name!r}")
                pipe_cls = self.adapter.pipeline_class(self.pipe, kind)
                # The same component objects (no weights copied or loaded), a fresh scheduler from the model's config.
                wanted = inspect.signature(pipe_cls.__init__).parameters
                parts = {k: v for k, v in self.pipe.components.items() if k in wanted}
                parts["scheduler"] = cls.from_config(self.pipe.scheduler.config)
                if "requires_safety_checker" in wanted:
                    parts["requires_safety_checker"] = False
                pipe = pipe_cls(**parts)
                pipe.set_progress_bar_config(disable=True)
                self._pipelines[key] = _pin_execution_device(pipe, self._pin)
        return self._pipelines[key]

    def check_request(self, latents: torch.Tensor, conditioning: Conditioning) -> Conditioning:
        """Validate (latents, conditioning) before any model work; one conditioning item per latent."""
        _checks.tensor(latents, "latents", min_ndim=4)
        if latents.ndim != 4:
            raise ValueError(f"`latents` must have shape (batch, C, h, w), got {tuple(latents.shape)}")
        f = self.vae_scale_factor
        channels = self.adapter.latent_channels(self.pipe)
        if latents.shape[1] != channels:
            raise ValueError(f"`latents` must have shape (batch, {channels}, h, w), got {tuple(latents.shape)} "
                             f"(this {self.family} model's latents have {channels} channels)")
        if latents.shape[2] * f % self.size_multiple or latents.shape[3] * f % self.size_multiple:
            m = self.size_multiple // f
            raise ValueError(f"`latents` height and width must be multiples of {m} for this {self.family} model "
                             f"(images: multiples of {self.size_factor_text}), got {tuple(latents.shape)}")
        _checks.finite(latents, "latents")
        if isinstance(conditioning, _PairMix):
            raise TypeError(f"`conditioning` must be a Conditioning (from encode_prompt), got a "
                            f"{type(conditioning).__name__}: mixing two prompts is for generate (and morphs), not for "
                            "this request")
        if not isinstance(conditioning, Conditioning):
            raise TypeError(f"`conditioning` must be a Conditioning (from encode_prompt), got {type(conditioning).__name__}")
        self.adapter.check_conditioning(self.pipe, conditioning)
        _checks.finite(conditioning.prompt_embeds, "conditioning.prompt_embeds")
        self._check_widths(conditioning)
        n = latents.shape[0]
        if len(conditioning) == 1 and n > 1:
            conditioning = conditioning.map(lambda t: t.expand(n, *t.shape[1:]))
        if len(conditioning) != n:
            raise ValueError(f"`conditioning` must have 1 or {n} items (one per latent), got {len(conditioning)}")
        return conditioning

    def check_mix(self, latents: torch.Tensor, mix: _PairMix) -> _PairMix:
        """Validate a PredictionMix/AttentionMix request before any model work (an AttentionMix only where this
        model supports it); one item per latent, weights broadcast."""
        if isinstance(mix, AttentionMix):
            why = self.attention_mix_unsupported()
            if why is not None:
                raise ValueError(f"`conditioning` is an AttentionMix, which {why}: use a PredictionMix (prompt "
                                 "interpolation 'mix') or interpolate the encodings (lerp)")
        a, b = self.check_request(latents, mix.a), self.check_request(latents, mix.b)
        w = mix.weight
        return type(mix)(a, b, w.expand(len(a)) if len(w) == 1 else w)

    def _check_widths(self, conditioning: Conditioning) -> None:
        """The conditioning's feature widths are this model's (compared with its encoding of the empty prompt)."""
        ref = self.encode_prompt("")
        for name in ("prompt_embeds", "pooled_prompt_embeds"):
            mine, theirs = getattr(conditioning, name), getattr(ref, name)
            if mine is not None and theirs is not None and mine.shape[-1] != theirs.shape[-1]:
                raise ValueError(f"`conditioning.{name}` must have width {theirs.shape[-1]} (this model's text "
                                 f"encoder), got shape {tuple(mine.shape)}: use lab.encode_prompt of this model")

    def attention_mix_unsupported(self) -> str | None:
        """Why this model cannot denoise an :class:`~latentlab.backend.AttentionMix` (a phrase after "it", e.g.
        "is not implemented for a Chroma model"), or None when it can."""
        return self.adapter.attention_mix_unsupported(self.pipe)

    def default_prompt_interpolation(self) -> str:
        """The morph's prompt path under ``"auto"`` for this model: ``"attention"`` for the UNet family (measured
        cleaner than lerp at its cost), ``"lerp"`` elsewhere (on the SD3-layout flow twin attention measured no
        cleaner at 1.6x the time; its text tokens run through every transformer block) and wherever an
        AttentionMix is not supported."""
        if self.attention_mix_unsupported() is not None:
            return "lerp"
        return self.adapter.default_prompt_path

    @_pinning
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

        ``latents`` are the initial noise in the VAE's layout (e.g. from :meth:`noise` or a path); ``conditioning``
        has one item per latent (or one item, used for all). Settings: ``sampling`` and/or overrides such as
        ``num_inference_steps=``, ``guidance_scale=``, ``negative_prompt=``, ``scheduler=`` (see :meth:`sampling`).
        Runs ``batch_size`` items per call (see the class notes). Stochastic schedulers get one CPU generator per
        item, seeded from the item's latent (:func:`step_seeds`), so a seed means one image with any scheduler.
        ``output_type="latent"`` returns the final latents (VAE layout, scaled as the denoiser sees them).
        ``conditioning`` may be a :class:`~latentlab.backend.PredictionMix` (two conditionings per item whose
        predictions are mixed at every step; twice the denoiser's work) or an
        :class:`~latentlab.backend.AttentionMix` (both prompts' tokens in one attention, shared by weight).
        """
        s = self.sampling(sampling, **overrides)
        if isinstance(conditioning, _PairMix):
            conditioning = self.check_mix(latents, conditioning)
        else:
            conditioning = self.check_request(latents, conditioning)
        _checks.choice(output_type, "output_type", ("pt", "latent"))
        self.compute_batch(batch_size)  # validates
        negative = self.negative_conditioning(s.negative_prompt)

        @torch.no_grad()
        def run(z, cond):
            z = z.to(self.device, self.dtype)
            with self.adapter.denoising(self):
                if isinstance(cond, AttentionMix):
                    return self.adapter.generate_attention_mix(self, z, cond, negative, s)
                if not isinstance(cond, PredictionMix):
                    return self.adapter.generate(self, z, cond, negative, s)
                with mixed_predictions(self.denoiser, cond.weight):
                    both = self.adapter.generate(self, torch.cat([z, z]), Conditioning.cat([cond.a, cond.b]), negative, s)
                return both[: len(z)]

        out = self.run_batched(run, latents, conditioning, batch_size=batch_size)
        if output_type == "latent":
            return out.float().cpu()
        return self.decode(out, batch_size=batch_size)

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

    # --- VAE -----------------------------------------------------------------------------------------------------

    @_pinning
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """Final latents (scaled as the denoiser sees them, VAE layout) -> images in [0, 1] (float32, CPU), with
        the VAE's ``scaling_factor``/``shift_factor``/``latents_mean``/``latents_std`` applied as the pipeline does.

        Batched like :meth:`generate`. Items that decode to non-finite values in a low-precision VAE are decoded
        again in float32.
        """
        _checks.tensor(latents, "latents", min_ndim=4)
        c = self.adapter.latent_channels(self.pipe)
        if latents.ndim != 4 or latents.shape[1] != c:
            raise ValueError(f"`latents` must have shape (batch, {c}, h, w), "
                             f"got {tuple(latents.shape)}")
        _checks.finite(latents, "latents")
        return self.run_batched(self._decode_batch, latents, batch_size=batch_size)

    def _decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        img = self.adapter.vae_decode(vae, latents.to(self.device, self.vae_dtype))
        bad = ~torch.isfinite(img).flatten(1).all(1)
        if bool(bad.any()) and self.vae_dtype != torch.float32:
            log.info("re-decoding %d non-finite item(s) in float32", int(bad.sum()))
            dtype = self.vae_dtype
            vae.to(torch.float32)
            try:
                img = img.float()
                img[bad] = self.adapter.vae_decode(vae, latents[bad].to(self.device, torch.float32))
            finally:
                vae.to(dtype)
        return (img.float() / 2 + 0.5).clamp(0, 1).cpu()

    @_pinning
    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """Images in [0, 1] (batch, 3, H, W) -> latents as the denoiser sees them (posterior mean, scaled).

        Examples
        --------
        >>> from latentlab import Lab
        >>> lab = Lab.default()
        >>> z = lab.encode(torch.rand(2, 3, 64, 64))
        >>> z.shape
        torch.Size([2, 4, 8, 8])
        """
        _checks.tensor(images, "images", min_ndim=4)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"`images` must have 3 channels (batch, 3, H, W), got shape {tuple(images.shape)}")
        m = self.size_multiple
        if images.shape[2] % m or images.shape[3] % m:
            raise ValueError(f"`images` height and width must be multiples of {self.size_factor_text}, "
                             f"got {tuple(images.shape[2:])}")
        _checks.within(images, "images", 0.0, 1.0, hint="divide 8-bit images by 255")
        return self.run_batched(self._encode_batch, images, batch_size=batch_size)

    def _encode_batch(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return self.adapter.vae_encode(vae, images.to(self.device, self.vae_dtype) * 2 - 1).to(self.dtype)


def posterior_mean(vae: Any, x: torch.Tensor) -> torch.Tensor:
    """The unscaled latents of images ``x`` in [-1, 1]: the posterior mean of a KL autoencoder, or what a
    deterministic one (``AutoencoderTiny``) returns."""
    out = vae.encode(x)
    return out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents


def check_size(height: object, width: object, multiple: int, factor: str | None = None) -> None:
    """``height``/``width`` are positive ints, multiples of ``multiple`` (the model's size factor: its VAE factor,
    times 2 where latents are packed 2x2); the error names the factor (``factor``: it in words)."""
    for name, v in (("height", height), ("width", width)):
        _checks.positive_int(v, name)
        if v % multiple:
            raise ValueError(f"`{name}` must be a multiple of {factor or multiple}, got {v}")
