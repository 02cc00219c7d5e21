"""One image as fast as the model allows: the live widgets' previews and final images.

One responsibility: a request of a single item, latency-bound (a slider is moving), without what a batched request
needs. :class:`LiveGenerator` runs the pipeline's denoising loop itself where the family adapter offers one
(``live_denoise``: the UNet family's -- the same scheduler type and config, the same ``scale_model_input``/UNet/
guidance/``step`` calls in the same order, the pipeline's generators, so the latents are the pipeline's bit for bit,
tested) instead of calling the pipeline (that alone measured within noise, 1.00-1.03x: what makes the loop fast is
that it can run a traced UNet). Optional, each named by :meth:`LiveGenerator.speedups`:

- ``trace=True``: the UNet traced once per input shape with ``torch.jit.trace`` (the graph of its operators
  without diffusers' per-module Python; 15.5 -> 10.5 ms a call on one CPU thread, outputs bit-identical, measured).
  A trace is a snapshot of the module's structure, so before every request one walk (~0.5 ms) compares the UNet's
  submodules and attention processors with the traced ones and drops the traces if anything changed; a UNet with
  hooks or layers from outside torch and diffusers (peft's LoRA layers read Python state a trace would freeze)
  runs eagerly.
- ``decode_dtype=torch.bfloat16``: the VAE decoder in a bfloat16 copy made on first use (the decode is compute-bound:
  21 -> 15 ms on one thread with native bfloat16, pixels within ~1e-2), traced too with ``trace=True``. For previews
  only; the final image keeps the VAE's dtype.
- ``decoder=``: a small distilled decoder for previews instead of the VAE's (diffusers' ``AutoencoderTiny``: TAESD
  for Stable Diffusion, the embedded models' own preview decoder), copied, cast to ``decode_dtype`` and traced like
  the VAE copy. Previews only; see :meth:`latentlab.Lab.set_preview_decoder`.

An :class:`~latentlab.backend.AttentionMix` runs the same loop with the family's live attention processor
(``live_attention_mix``: the UNet family's cross attention takes its text-key bias as an input), so one trace per
shape serves every weight.

Everything else (other families, LCM-style guidance-embedding UNets, prediction mixes) goes through
:meth:`Engine.generate` with ``batch_size=1``, so a LiveGenerator works for every model and is only faster where it
can be exact. ``torch.jit.trace`` is deprecated since torch 2.9 in favour of ``torch.compile``/``torch.export``
(which cost 18-125 s per process here, against ~0.5 s for a trace); if a torch release drops it, tracing turns
itself off and the loop runs eagerly.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import TYPE_CHECKING, Any

import torch

from latentlab import _checks, _tensors
from latentlab.backend.records import AttentionMix, Conditioning
from latentlab.sampling import Sampling

if TYPE_CHECKING:
    from latentlab.backend.engine import Engine

__all__ = ["LiveGenerator"]

#: Module namespaces a traced UNet may consist of (anything else -- peft's LoRA layers, user wrappers -- may read
#: Python state in its forward that a trace would freeze, so such a UNet runs eagerly).
_TRACEABLE = ("torch.", "diffusers.")


def _structure(module: torch.nn.Module) -> tuple | None:
    """What a trace of ``module`` depends on besides its tensors: every submodule and attention processor (by
    identity), or ``None`` when it must run eagerly (a hook, or a layer from outside torch and diffusers). One walk,
    ~0.4 ms on the embedded UNet: cheap enough to check before every request."""
    out = []
    for m in module.modules():
        if m._forward_hooks or m._forward_pre_hooks or not type(m).__module__.startswith(_TRACEABLE):
            return None
        # ``getattr(m, "processor", None)`` without nn.Module's __getattr__ (which raises and catches for every
        # module that has none: 1.1 -> 0.4 ms a walk); a processor that is a module lives in ``_modules``.
        processor = m.__dict__.get("processor")
        if processor is None:
            processor = m._modules.get("processor")
        out.append((id(m), id(processor)))
    return tuple(out)


def preview_decode_dtype(engine: Engine, decoder: torch.nn.Module | None) -> torch.dtype | None:
    """The ``decode_dtype`` of previews decoded by ``decoder`` (``None``: the VAE): bfloat16 on a CPU with native
    bfloat16 when the decoder is float32 (the decode is compute-bound there), else the decoder's own dtype."""
    source = engine.vae_dtype if decoder is None else next(decoder.parameters()).dtype
    native = engine.device.type == "cpu" and _tensors.native_bfloat16()
    return torch.bfloat16 if native and source == torch.float32 else None


class _Call(torch.nn.Module):
    """The UNet call of the pipeline's loop as a module of tensors only (what ``torch.jit.trace`` records)."""

    def __init__(self, unet: torch.nn.Module, added_keys: tuple[str, ...], bias_slot: Any = None):
        super().__init__()
        self.unet, self.added_keys, self.bias_slot = unet, added_keys, bias_slot

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        if self.bias_slot is not None:  # an AttentionMix: the text-key bias is the first extra input
            self.bias_slot.current, extra = extra[0], extra[1:]
        added_cond = dict(zip(self.added_keys, extra)) or None
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs=added_cond, return_dict=False)[0]


class _Decode(torch.nn.Module):
    """The adapter's decode of the private decoder copy, as a module of tensors only."""

    def __init__(self, adapter: Any, vae: torch.nn.Module):
        super().__init__()
        self.adapter, self.vae = adapter, vae

    def forward(self, latents):
        return self.adapter.vae_decode(self.vae, latents)


class LiveGenerator:
    """Single images for live controls: the pipeline's loop, run without its per-call overhead.

    Parameters
    ----------
    engine
        A :class:`~latentlab.Lab` (any family; the fast path is the UNet family's: ``adapter.live_loop``).
    trace
        Run the UNet traced with ``torch.jit.trace`` (see the module notes: checked against the UNet's structure
        before every request, eager whenever a trace could be stale).
    decode_dtype
        ``None`` (the decoder's own) or a dtype for a decoder copy (``torch.bfloat16``: previews only).
    decoder
        ``None`` (the VAE's decoder) or a preview decoder (an ``AutoencoderTiny``-like module: ``decode`` and a
        ``config`` with the latent scaling, as a pipeline's ``vae``). Previews only.

    Examples
    --------
    >>> from latentlab import Lab
    >>> fast = Lab.default("embedded-shapes-fast")
    >>> live = LiveGenerator(fast, trace=True)
    >>> s = fast.sampling(num_inference_steps=2)
    >>> cond = fast.encode_prompt("a small red star on a blue background")
    >>> image = live(fast.noise(3), cond, sampling=s)
    >>> image.shape
    torch.Size([1, 3, 64, 64])
    >>> torch.equal(image, fast.generate(fast.noise(3), cond, sampling=s, batch_size=1))
    True
    >>> live.speedups(s)
    ('own-loop', 'jit-trace')
    """

    def __init__(self, engine: Engine, *, trace: bool = False, decode_dtype: torch.dtype | None = None,
                 decoder: torch.nn.Module | None = None):
        if not isinstance(trace, bool):
            raise TypeError(f"`trace` must be a bool, got {type(trace).__name__}")
        if decode_dtype is not None and not (isinstance(decode_dtype, torch.dtype) and decode_dtype.is_floating_point):
            raise TypeError(f"`decode_dtype` must be None or a floating torch.dtype, got {decode_dtype!r}")
        if decoder is not None and not (isinstance(decoder, torch.nn.Module) and hasattr(decoder, "decode")):
            raise TypeError(f"`decoder` must be None or a VAE-like module with `decode`, got {type(decoder).__name__}")
        self.engine = engine
        self.trace = trace
        self.decode_dtype = decode_dtype
        self.decoder = decoder
        self._traces: dict[tuple, Any] = {}
        self._traced_structure: tuple | None = None
        self._schedulers: dict[int, Any] = {}
        self._decoder = None
        self._decoder_traces: dict[tuple, Any] = {}

    # --- what runs --------------------------------------------------------------------------------------------

    def own_loop(self, sampling: Sampling) -> bool:
        """Whether requests with these (resolved) settings run the family's own loop here (else
        ``engine.generate``)."""
        return self.engine.adapter.live_loop(self.engine, sampling)

    def speedups(self, sampling: Sampling | None = None) -> tuple[str, ...]:
        """What a request with ``sampling`` runs beyond ``engine.generate(..., batch_size=1)`` (for display)."""
        own = self.own_loop(self.engine.sampling(sampling))
        out = ("own-loop",) if own else ()
        if own and self.trace:
            out += ("jit-trace",)
        if self.decoder is not None:
            out += (f"decode:{type(self.decoder).__name__}",)
        if self.decode_dtype is not None and self.decode_dtype != self._source_dtype():
            out += (f"decode:{str(self.decode_dtype).removeprefix('torch.')}",)
        return out

    def _source_dtype(self) -> torch.dtype:
        """The dtype of the decoder previews start from (the preview decoder's, else the VAE's)."""
        if self.decoder is None:
            return self.engine.vae_dtype
        return next(self.decoder.parameters()).dtype

    def __call__(self, latents: torch.Tensor, conditioning: Conditioning | AttentionMix, *,
                 sampling: Sampling | None = None) -> torch.Tensor:
        """Images (batch, 3, H, W) in [0, 1], float32, on the CPU: each item denoised and decoded alone, with
        ``sampling`` (resolved by the engine, as :meth:`Engine.generate` resolves it)."""
        e = self.engine
        s = e.sampling(sampling)
        mix = isinstance(conditioning, AttentionMix)
        if not (isinstance(conditioning, Conditioning) or mix) or not self.own_loop(s):  # e.g. a PredictionMix
            z = e.generate(latents, conditioning, sampling=s, batch_size=1, output_type="latent")
        else:
            cond = e.check_mix(latents, conditioning) if mix else e.check_request(latents, conditioning)
            with e._lock, e.pinned(), torch.no_grad():
                z = self._denoise(latents, cond, s)
        with e.pinned():  # the decode's device and dtype from the same lookups (diffusers walks the modules)
            return self._decode(z)

    # --- the loop ---------------------------------------------------------------------------------------------

    def _denoise(self, latents: torch.Tensor, cond: Conditioning | AttentionMix, s: Sampling) -> torch.Tensor:
        """The family's denoising loop for each item alone, with a private scheduler and the (traced) denoiser call;
        what is the same for every item (pipeline, scheduler, negative, the trace check) is looked up once."""
        e = self.engine
        scheduler = self._scheduler(e.pipeline("text2image", s.scheduler).scheduler)
        traced = self.trace and self._check_traces()
        negative = e.negative_conditioning(s.negative_prompt)
        if isinstance(cond, AttentionMix):
            return self._denoise_mix(latents, cond, negative, s, scheduler, traced)
        # The cross-attention cache swaps processors per request: a traced graph would not see them (and is exact
        # without them).
        with contextlib.nullcontext() if traced else e.adapter.denoising(e):
            out = [e.adapter.live_denoise(e, latents[i : i + 1], cond[i : i + 1], negative, s, scheduler,
                                          lambda *args: self._unet(*args, traced)) for i in range(len(latents))]
        return torch.cat(out).float().cpu()

    def _denoise_mix(self, latents, mix: AttentionMix, negative, s, scheduler, traced: bool) -> torch.Tensor:
        """An AttentionMix item by item: both prompts' tokens in one conditioning (as ``generate`` joins them), the
        family's live attention processor taking each call's text-key bias (rows: the call's batch)."""
        from latentlab.backend.families.textmix import attention_bias, join

        e = self.engine
        tokens = mix.a.prompt_embeds.shape[1]
        out = []
        with e.adapter.live_attention_mix(e) as slot:
            for i in range(len(latents)):
                item = mix[i : i + 1]
                cond, neg = join(item, negative)
                biases: dict[int, torch.Tensor] = {}

                def call(sample, t, emb, added, item=item, biases=biases):
                    rows = sample.shape[0]
                    if rows not in biases:
                        biases[rows] = attention_bias(item.weight, tokens, 2 * tokens, rows=rows, like=sample)
                    return self._unet(sample, t, emb, added, traced, bias=biases[rows], slot=slot)

                out.append(e.adapter.live_denoise(e, latents[i : i + 1], cond, neg, s, scheduler, call))
        return torch.cat(out).float().cpu()

    def _scheduler(self, like: Any) -> Any:
        """A private scheduler of the pipeline's type and config (schedulers keep per-request state)."""
        held = self._schedulers.get(id(like))
        if held is None or held[0] is not like:  # keyed by identity (an id can be reused once its object is gone)
            held = self._schedulers[id(like)] = (like, type(like).from_config(like.config))
        return held[1]

    def _check_traces(self) -> bool:
        """Whether the UNet may run traced now: its structure is the one traced (else the traces are dropped)."""
        now = _structure(self.engine.denoiser)
        if now != self._traced_structure:
            self._traces.clear()
            self._traced_structure = now
        return now is not None

    def _unet(self, sample, t, emb, added: dict | None, traced: bool, *, bias=None, slot=None):
        """One denoiser call, traced or eager; with ``bias`` (an AttentionMix), ``slot`` is the live attention
        processor that reads it."""
        unet = self.engine.denoiser
        keys = tuple(added) if added else ()
        extra = tuple(added[k] for k in keys) if added else ()
        if not traced or not hasattr(torch.jit, "trace"):  # eager (see the module notes on torch versions)
            if slot is not None:
                slot.current = bias
            return unet(sample, t, encoder_hidden_states=emb, added_cond_kwargs=added or None, return_dict=False)[0]
        if bias is not None:
            extra = (bias, *extra)
        key = (tuple(sample.shape), sample.dtype, tuple(t.shape), t.dtype, tuple(emb.shape), keys,
               tuple(tuple(a.shape) for a in extra), id(unet), slot is not None)
        fn = self._traces.get(key)
        if fn is None:
            with warnings.catch_warnings():  # diffusers' shape checks warn that they are frozen: they are, per key
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.9+: see the module notes
                fn = torch.jit.trace(_Call(unet, keys, slot).eval(), (sample, t, emb, *extra), check_trace=False)
            self._traces[key] = fn
        return fn(sample, t, emb, *extra)

    # --- decode -----------------------------------------------------------------------------------------------

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        e = self.engine
        dtype = self.decode_dtype or self._source_dtype()
        if self.decoder is None and dtype == e.vae_dtype:
            return e.decode(z, batch_size=1)
        _checks.tensor(z, "latents", min_ndim=4)
        z = z.to(e.device, dtype)
        with e._lock, torch.no_grad():
            if self._decoder is None:
                # A private copy (of the preview decoder, else the VAE) in ``dtype``. torch's own ``to``: diffusers'
                # override warns about modules to keep in float32, which these decoders (no such modules) do not
                # have; a preview decoder is allowed to lose the last bits anyway.
                source = self.decoder if self.decoder is not None else e.pipe.vae
                self._decoder = torch.nn.Module.to(copy.deepcopy(source), dtype)
            if not self.trace or not hasattr(torch.jit, "trace"):
                img = e.adapter.vae_decode(self._decoder, z)
            else:  # the private copy never changes: one trace per latent shape (measured 0.75 ms of 20, bit-identical)
                key = ("decode", tuple(z.shape))
                if key not in self._decoder_traces:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", torch.jit.TracerWarning)
                        warnings.simplefilter("ignore", DeprecationWarning)
                        self._decoder_traces[key] = torch.jit.trace(_Decode(e.adapter, self._decoder).eval(), (z,),
                                                                    check_trace=False)
                img = self._decoder_traces[key](z)
        return (img.float() / 2 + 0.5).clamp(0, 1).cpu()

