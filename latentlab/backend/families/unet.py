"""The UNet family: Stable Diffusion 1.x/2.x, SDXL and their Turbo/LCM variants (4-channel latents, epsilon or
v prediction on a discrete noise schedule).

One responsibility: what those pipelines do differently from the engine's generic request -- CLIP prompt encoding
(plus pooled embeddings and micro-conditioning time ids for SDXL), SDXL's zero negative for an empty prompt, the
VAE's ``scaling_factor`` (and ``latents_mean/std`` where a VAE has them), per-step x0 read from the UNet's own
output with a forward hook, and DDIM inversion with diffusers' ``DDIMInverseScheduler`` (which handles epsilon, v and
sample prediction). References: Song et al., "Denoising Diffusion Implicit Models" (2021); Mokady et al.,
"Null-text Inversion" (2023) on why inversion drifts under guidance.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from typing import TYPE_CHECKING, Any

import torch

from latentlab.backend.engine import cpu_generators, import_diffusers, step_seeds
from latentlab.backend.families.base import Family
from latentlab.backend.records import Conditioning
from latentlab.sampling import Sampling

if TYPE_CHECKING:
    from latentlab.backend.engine import Engine

__all__ = ["CachedCrossAttention", "FusedCrossAttention", "InputBiasCrossAttention", "SDXLFamily", "UNetFamily",
           "alphas_cumprod_at",
           "cached_cross_attention", "fused_cross_attention"]


def _processor_base():
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0


class CachedCrossAttention:
    """diffusers' ``AttnProcessor2_0`` with the cross-attention keys and values computed once per request.

    A pipeline concatenates the text embeddings once, before its denoising loop, and hands the same tensor to the
    UNet at every step; each cross-attention layer then projects it to keys and values again, every step. This
    processor keeps, per attention layer, the keys and values of the last embeddings tensor it saw (held by a weak
    reference and its in-place version counter, so a new or modified tensor is never mistaken for it) and reuses
    them. Everything else is ``AttnProcessor2_0``'s code path, operator for operator, so the outputs are bit for bit
    the same (tested). Only without autograd (training needs the projections' gradients) and only for cross
    attention; self attention and the query always run.
    """

    def __init__(self):
        self._base = _processor_base()()
        self._cache: dict[int, tuple] = {}
        self.hits = 0

    def _kv(self, attn, ehs: torch.Tensor, batch_size: int):
        entry = self._cache.get(id(attn))
        if entry is not None and entry[0]() is ehs and entry[1] == ehs._version:
            self.hits += 1
            return entry[2], entry[3]
        x = attn.norm_encoder_hidden_states(ehs) if attn.norm_cross else ehs
        key, value = attn.to_k(x), attn.to_v(x)
        head_dim = key.shape[-1] // attn.heads
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        self._cache[id(attn)] = (weakref.ref(ehs), ehs._version, key, value)
        return key, value

    def bias(self, batch_size: int, keys: int, like: torch.Tensor) -> torch.Tensor | None:
        """An additive bias of the attention logits (None here; see :class:`FusedCrossAttention`)."""
        return None

    def declines(self, attention_mask, args, kwargs) -> bool:
        """Whether a cross-attention call goes to diffusers' processor as it is (training, masks, LoRA scale)."""
        return torch.is_grad_enabled() or attention_mask is not None or bool(args) or kwargs.get("scale") is not None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if encoder_hidden_states is None or self.declines(attention_mask, args, kwargs):
            return self._base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        import torch.nn.functional as F

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = encoder_hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        key, value = self._kv(attn, encoder_hidden_states, batch_size)
        head_dim = key.shape[-1]
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        hidden_states = F.scaled_dot_product_attention(query, key, value,
                                                       attn_mask=self.bias(batch_size, key.shape[2], query),
                                                       dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# diffusers' Attention.forward reads the processor's signature on every call (to drop keyword arguments it does not
# take); a function carrying ``__signature__`` answers at once instead of being parsed again (18 -> 9 us, 28 calls a
# UNet call). The signature is the function's own: nothing is filtered differently.
CachedCrossAttention.__call__.__signature__ = inspect.signature(CachedCrossAttention.__call__)


class FusedCrossAttention(CachedCrossAttention):
    """Cross attention over two prompts' tokens side by side (:class:`~latentlab.backend.AttentionMix`, AID's fused
    interpolation), their logits biased by :func:`~latentlab.backend.families.textmix.attention_bias`: ``a``'s
    ``tokens`` keys (the first) by ``log(1 - w)``, ``b``'s by ``log(w)``. Otherwise :class:`CachedCrossAttention`
    (keys and values once per request); self attention runs unchanged."""

    def __init__(self, weight: torch.Tensor, tokens: int):
        super().__init__()
        self.weight, self.tokens = weight, int(tokens)
        self._bias: dict[tuple, torch.Tensor] = {}

    def bias(self, batch_size: int, keys: int, like: torch.Tensor) -> torch.Tensor:
        from latentlab.backend.families.textmix import attention_bias

        key = (batch_size, keys, like.dtype, like.device)
        if key not in self._bias:
            self._bias[key] = attention_bias(self.weight, self.tokens, keys, rows=batch_size, like=like)
        return self._bias[key]

    def declines(self, attention_mask, args, kwargs) -> bool:
        if attention_mask is not None or args or kwargs.get("scale") is not None:
            raise RuntimeError("attention interpolation: this UNet's cross attention is called with a mask or a "
                               "LoRA scale, which attention interpolation does not support; use prediction mixing "
                               "(PredictionMix)")
        return False

    def _kv(self, attn, ehs: torch.Tensor, batch_size: int):
        if torch.is_grad_enabled() or torch.jit.is_tracing():  # autograd needs the projections' gradients; a trace
            self._cache.pop(id(attn), None)  # must record them, not a cached tensor as a constant
        return super()._kv(attn, ehs, batch_size)


class InputBiasCrossAttention(FusedCrossAttention):
    """:class:`FusedCrossAttention` whose bias is whatever tensor ``current`` holds when the layer runs, ``(rows, 1,
    1, keys)``: set before each UNet call, so a ``torch.jit.trace`` of that call records the bias as an input
    rather than a constant (the live loop's traced UNet serves every weight)."""

    def __init__(self):
        super().__init__(torch.zeros(1), 0)
        self.current: torch.Tensor | None = None

    def bias(self, batch_size: int, keys: int, like: torch.Tensor) -> torch.Tensor:
        if self.current is None or self.current.shape != (batch_size, 1, 1, keys):
            raise RuntimeError(f"attention interpolation: the live bias is "
                               f"{None if self.current is None else tuple(self.current.shape)}, the layer needs "
                               f"{(batch_size, 1, 1, keys)}")
        return self.current


@contextlib.contextmanager
def _swapped(modules: list, proc):
    """``modules`` (attention modules) run ``proc`` for the block (their own processors restored after)."""
    old = [m.processor for m in modules]
    for m in modules:
        m.set_processor(proc)
    try:
        yield proc
    finally:
        for m, p in zip(modules, old):
            m.set_processor(p)


def _cross_processor(unet, proc):
    """``unet``'s cross-attention layers run ``proc`` for the block."""
    return _swapped([m for m in _attention_modules(unet) if getattr(m, "is_cross_attention", False)], proc)


def fused_cross_attention(unet, weight: torch.Tensor, tokens: int):
    """Run ``unet``'s cross-attention layers with :class:`FusedCrossAttention` for the block (processors restored
    after; one processor for all layers, so one bias per request)."""
    return _cross_processor(unet, FusedCrossAttention(weight, tokens))


_ATTENTION_MODULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _attention_modules(unet) -> list:
    """The UNet's attention modules (those with a processor), found once per UNet: diffusers' ``attn_processors``
    and ``set_attn_processor`` walk every submodule on each call (~3 ms a request on the embedded UNet)."""
    mods = _ATTENTION_MODULES.get(unet)
    if mods is None:
        mods = [m for m in unet.modules() if hasattr(m, "get_processor") and hasattr(m, "set_processor")]
        _ATTENTION_MODULES[unet] = mods
    return mods


@contextlib.contextmanager
def cached_cross_attention(unet):
    """Run ``unet`` with :class:`CachedCrossAttention` for the block, restoring its processors after. Does nothing
    when the UNet runs processors other than diffusers' default (a user's LoRA/IP-Adapter/custom processor is left
    alone)."""
    mods = _attention_modules(unet)
    old = [m.processor for m in mods]
    base = _processor_base()
    if not old or not all(type(p) is base for p in old):
        yield None
        return
    with _swapped(mods, CachedCrossAttention()) as proc:
        yield proc


def beyond_text(config) -> str | None:
    """What a UNet is conditioned on besides the text (SDXL's ``text_time``, class labels, an LCM guidance
    embedding), or None for a UNet conditioned by text alone."""
    if config.addition_embed_type or config.class_embed_type:
        return config.addition_embed_type or config.class_embed_type
    return "a guidance embedding" if config.time_cond_proj_dim else None


def _latents_mean_std(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel latent mean/std from the VAE config (some SDXL-family VAEs), shaped (1, C, 1, 1) like ``like``."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    return torch.tensor(mean).view(1, -1, 1, 1).to(like), torch.tensor(std).view(1, -1, 1, 1).to(like)


def alphas_cumprod_at(scheduler, t: torch.Tensor) -> torch.Tensor:
    """Cumulative alpha at (possibly fractional) timestep t, interpolating sigma linearly as Euler schedulers do."""
    ac = scheduler.alphas_cumprod.double()
    sigmas = ((1 - ac) / ac).sqrt()
    tt = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
    lo = int(min(max(0, int(tt)), len(ac) - 1))
    hi = min(lo + 1, len(ac) - 1)
    sigma = sigmas[lo] + (sigmas[hi] - sigmas[lo]) * (tt - lo)
    return 1 / (1 + sigma**2)


class UNetFamily(Family):
    """Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``)."""

    family = "sd"
    display_name = "a Stable Diffusion"
    # measured on the embedded model: 72.2 -> 83.5 % clean in-betweens at lerp's cost
    default_prompt_path = "attention"
    denoiser_name = "unet"
    pipelines = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")

    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.unet.config.in_channels)

    def default_size(self, engine: Engine) -> tuple[int, int]:
        s = engine.pipe.unet.config.sample_size
        s = s if isinstance(s, (tuple, list)) else (s, s)
        return s[0] * engine.vae_scale_factor, s[1] * engine.vae_scale_factor

    def facts_from_configs(self, folder, vae_factor: int) -> dict:
        import json
        from pathlib import Path

        facts = super().facts_from_configs(folder, vae_factor)
        try:
            s = json.loads((Path(folder) / "unet" / "config.json").read_text()).get("sample_size")
        except (OSError, ValueError):
            return facts
        if isinstance(s, int):
            facts["size"] = (s * vae_factor, s * vae_factor)
        elif isinstance(s, (list, tuple)) and len(s) == 2:
            facts["size"] = (s[0] * vae_factor, s[1] * vae_factor)
        return facts

    def default_sampling(self, pipe: Any) -> Sampling:
        return Sampling(50, 7.5, "", type(pipe.scheduler).__name__)

    def check_scheduler(self, name: str) -> None:
        if name.startswith("FlowMatch"):
            raise ValueError(f"`scheduler` {name!r} is a flow-matching scheduler; this {self.family} model is a "
                             "diffusion (noise-prediction) model: use e.g. 'DDIMScheduler' or 'EulerDiscreteScheduler'")

    def denoising(self, engine: Engine):
        """Cross-attention keys and values computed once per request (:class:`CachedCrossAttention`; bit-identical).
        Not for a compiled UNet: swapping its processors every request makes dynamo recompile it (measured: a compiled
        2-step preview 0.92x the eager one with the swap), and the cache's own gain on small UNets is within noise."""
        if engine.compiled:
            return contextlib.nullcontext()
        return cached_cross_attention(engine.pipe.unet)

    def onnx_unsupported(self, pipe: Any) -> str | None:
        why = beyond_text(pipe.unet.config)
        return None if why is None else f"runs UNets conditioned by text alone; this one also takes {why}"

    def attention_mix_unsupported(self, pipe: Any) -> str | None:
        """Only over diffusers' default processors (a user's IP-Adapter or custom processor would silently be
        replaced by :class:`FusedCrossAttention`)."""
        base = _processor_base()
        for m in _attention_modules(pipe.unet):
            if getattr(m, "is_cross_attention", False) and not isinstance(m.processor, (base, CachedCrossAttention)):
                return f"needs diffusers' default attention processors, but this model runs {type(m.processor).__name__}"
        return None

    def generate_attention_mix(self, engine, z, mix, negative, sampling):
        """Both prompts' tokens in one request, every cross-attention layer running :class:`~latentlab.backend.
        families.unet.FusedCrossAttention` (AID's fused interpolation)."""
        from latentlab.backend.families.textmix import join

        cond, neg = join(mix, negative)
        with fused_cross_attention(engine.pipe.unet, mix.weight, mix.a.prompt_embeds.shape[1]):
            return self.generate(engine, z, cond, neg, sampling)

    def live_attention_mix(self, engine: Engine):
        """For the live loop: the cross-attention layers run :class:`InputBiasCrossAttention` for the block; yields
        it (set its ``current`` bias before each UNet call)."""
        return _cross_processor(engine.pipe.unet, InputBiasCrossAttention())

    def guided(self, pipe: Any, sampling: Sampling) -> bool:
        """Whether the pipeline runs the unconditional branch (LCM-style guidance-embedded UNets never do)."""
        return sampling.guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None

    # --- prompts ----------------------------------------------------------------------------------------------

    def encode_prompt(self, pipe: Any, prompt: str, device: torch.device) -> Conditioning:
        emb, _ = pipe.encode_prompt([prompt], device, 1, False)
        return Conditioning(emb)

    # --- VAE --------------------------------------------------------------------------------------------------

    def scale(self, vae: Any, z: torch.Tensor) -> torch.Tensor:
        stats = _latents_mean_std(vae, z)
        if stats is not None:
            return (z - stats[0]) * vae.config.scaling_factor / stats[1]
        return z * vae.config.scaling_factor

    def unscale(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        stats = _latents_mean_std(vae, latents)
        if stats is not None:
            return latents * stats[1] / vae.config.scaling_factor + stats[0]
        return latents / vae.config.scaling_factor

    # --- denoising --------------------------------------------------------------------------------------------


    def call_kwargs(self, engine: Engine, cond: Conditioning, negative: Conditioning, sampling: Sampling) -> dict:
        b, dev = len(cond), engine.device
        kw: dict[str, Any] = {"prompt_embeds": cond.prompt_embeds.to(dev), "guidance_scale": sampling.guidance_scale}
        if cond.pooled_prompt_embeds is not None:
            kw["pooled_prompt_embeds"] = cond.pooled_prompt_embeds.to(dev)
        if sampling.guidance_scale > 1.0:
            neg = negative.map(lambda t: t.expand(b, *t.shape[1:]).to(dev))
            kw["negative_prompt_embeds"] = neg.prompt_embeds
            if neg.pooled_prompt_embeds is not None:
                kw["negative_pooled_prompt_embeds"] = neg.pooled_prompt_embeds
        return kw

    def live_loop(self, engine: Engine, sampling: Sampling) -> bool:
        # LCM-style guidance embedding (``timestep_cond``) is the pipeline's own business.
        return engine.pipe.unet.config.time_cond_proj_dim is None

    def live_denoise(self, engine, z, cond, negative, sampling, scheduler, call):
        """StableDiffusion(XL)Pipeline's loop with given ``latents``: ``latents * init_noise_sigma``, then per
        timestep ``scale_model_input`` (of the doubled batch under guidance), the UNet, ``uncond + guidance_scale *
        (text - uncond)`` and ``scheduler.step`` with what ``prepare_extra_step_kwargs`` passes (the item's seeded
        CPU generator, eta 0)."""
        s = sampling
        guided, emb, added = self.unet_inputs(engine, cond, negative, s.guidance_scale, z)
        scheduler.set_timesteps(s.num_inference_steps, device=engine.device)
        params = inspect.signature(scheduler.step).parameters
        step_kwargs = {"generator": cpu_generators(step_seeds(z))} if "generator" in params else {}
        if "eta" in params:
            step_kwargs["eta"] = 0.0
        x = z.to(engine.device, engine.dtype) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([x] * 2) if guided else x, t)
            out = call(model_in, t, emb, added)
            if guided:
                uncond, text = out.chunk(2)
                out = uncond + s.guidance_scale * (text - uncond)
            x = scheduler.step(out, t, x, **step_kwargs, return_dict=False)[0]
        return x

    def renoise(self, scheduler, z0, noise, step, timesteps):
        return scheduler.add_noise(z0, noise, timesteps[step : step + 1].repeat(len(z0)))

    def unet_inputs(self, engine: Engine, cond: Conditioning, negative: Conditioning, cfg: float, latents):
        """What the pipelines pass the UNet: text embeddings ([negative, positive] under classifier-free guidance)
        and, for SDXL, the pooled embeddings and micro-conditioning time ids (original size, crop (0, 0), target
        size; the pipeline's defaults)."""
        b = latents.shape[0]
        guided = cfg > 1.0 and engine.pipe.unet.config.time_cond_proj_dim is None
        neg = negative.map(lambda t: t.expand(b, *t.shape[1:]))
        both = Conditioning.cat([neg, cond]) if guided else cond
        emb = both.prompt_embeds.to(engine.device, engine.dtype)
        return guided, emb, None

    def trajectory(self, engine, z, cond, negative, sampling, on_step=None):
        """x0 from the UNet's own output (read with a forward hook; nothing is patched), combined for classifier-free
        guidance as the pipeline combines it, and converted with the scheduler's cumulative alphas:
        ``x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)`` for epsilon prediction, ``sqrt(a) x_t - sqrt(1 - a) v`` for v."""
        pipe = engine.pipeline("text2image", sampling.scheduler)
        pred_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        cfg = sampling.guidance_scale
        guided = self.guided(engine.pipe, sampling)
        x0s, lats, ts = [], [], []

        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            out = output[0] if isinstance(output, tuple) else output.sample
            if guided:  # the pipeline batches [unconditional, conditional]
                x = x.chunk(2)[1]
                uncond, c = out.chunk(2)
                out = uncond + cfg * (c - uncond)
            a = alphas_cumprod_at(pipe.scheduler, t).to(x.device)
            x, out = x.double(), out.double()
            if pred_type == "epsilon":
                x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
            elif pred_type == "v_prediction":
                x0 = a.sqrt() * x - (1 - a).sqrt() * out
            else:
                x0 = out
            x0s.append(x0.float().cpu())
            ts.append(float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t))

        def on_step_end(p, i, t, callback_kwargs):
            lats.append(callback_kwargs["latents"].float().cpu())
            if on_step is not None:
                on_step(i, lats[-1], x0s[-1])
            return {}

        f = engine.vae_scale_factor
        handle = engine.pipe.unet.register_forward_hook(hook, with_kwargs=True)
        try:
            final = pipe(latents=z, height=z.shape[2] * f, width=z.shape[3] * f,
                         num_inference_steps=sampling.num_inference_steps, output_type="latent",
                         generator=cpu_generators(step_seeds(z)), callback_on_step_end=on_step_end,
                         callback_on_step_end_tensor_inputs=["latents"],
                         **self.call_kwargs(engine, cond, negative, sampling)).images
        finally:
            handle.remove()
        return tuple(ts), torch.stack(lats, 1), torch.stack(x0s, 1), final.float().cpu()

    def invert(self, engine, z0, cond, negative, sampling, solver):
        """DDIM inversion: each step is diffusers' ``DDIMInverseScheduler.step`` on the (guided) UNet output."""
        diffusers = import_diffusers()
        sched = diffusers.DDIMInverseScheduler.from_config(engine.pipe.scheduler.config)
        sched.set_timesteps(sampling.num_inference_steps, device=engine.device)
        cfg = sampling.guidance_scale
        guided, emb, added = self.unet_inputs(engine, cond, negative, cfg, z0)
        x = z0
        for t in sched.timesteps:
            model_in = sched.scale_model_input(torch.cat([x] * 2) if guided else x, t)
            out = engine.pipe.unet(model_in, t, encoder_hidden_states=emb, added_cond_kwargs=added,
                                   return_dict=False)[0]
            if guided:
                uncond, text = out.chunk(2)
                out = uncond + cfg * (text - uncond)
            x = sched.step(out, t, x, return_dict=False)[0]
        return x

    def reconstruct(self, engine, noise, cond, negative, sampling, solver):
        return self.generate(engine, noise, cond, negative, sampling.replace(scheduler="DDIMScheduler"))


class SDXLFamily(UNetFamily):
    """SDXL and SDXL Turbo (``StableDiffusionXLPipeline``): two text encoders, pooled embeddings, time ids."""

    family = "sdxl"
    pipelines = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    needs_pooled, display_name = True, "an SDXL"

    def encode_prompt(self, pipe: Any, prompt: str, device: torch.device) -> Conditioning:
        emb, _, pooled, _ = pipe.encode_prompt([prompt], device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
        return Conditioning(emb, pooled)

    def negative(self, pipe: Any, encoded: Conditioning, negative_prompt: str) -> Conditioning:
        if negative_prompt == "" and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            return encoded.map(torch.zeros_like)
        return encoded



    def unet_inputs(self, engine, cond, negative, cfg, latents):
        guided, emb, _ = super().unet_inputs(engine, cond, negative, cfg, latents)
        b = latents.shape[0]
        neg = negative.map(lambda t: t.expand(b, *t.shape[1:]))
        both = Conditioning.cat([neg, cond]) if guided else cond
        h, w = latents.shape[2] * engine.vae_scale_factor, latents.shape[3] * engine.vae_scale_factor
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=emb.dtype, device=engine.device).repeat(len(emb), 1)
        added = {"text_embeds": both.pooled_prompt_embeds.to(engine.device, emb.dtype), "time_ids": time_ids}
        return guided, emb, added
