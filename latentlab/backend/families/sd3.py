"""The SD3 family: Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``), with or without its T5 encoder.

One responsibility: SD3's side of the adapter interface -- prompts through two CLIP encoders (+ T5 when loaded)
into joint ``prompt_embeds`` (CLIP tokens padded to the T5 width, then the T5 tokens, or zeros without T5) and
``pooled_prompt_embeds`` (both CLIPs' pooled outputs), classifier-free guidance in one batch of [negative, positive],
and the transformer's velocity at timestep ``sigma * num_train_timesteps``. Latents are the 16-channel VAE layout
the pipeline itself uses (the transformer patches them internally), with ``(z - shift_factor) * scaling_factor``.

An exact speed-up: without T5 (or with a T5 that outputs zeros) the pipeline appends 256 all-zero context tokens.
Identical tokens stay identical through every joint block (no positions, per-token layers), so in attention they
act exactly like one token whose logit is raised by ``log 256``. Requests whose conditioning ends in such tokens
run with one of them and that bias (:class:`RepeatedTokenProcessor`, set through diffusers' public
``set_attn_processor`` for the call and restored after, only over diffusers' default processors): the same images
to float rounding (tests: within 2e-3 of the plain pipeline), far fewer tokens when the image is small.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from latentlab.backend.families.flow import FlowFamily, integrate, swapped_attn_processors
from latentlab.backend.records import Conditioning

if TYPE_CHECKING:
    from latentlab.backend.engine import Engine
    from latentlab.sampling import Sampling

__all__ = ["SD3Family"]

#: The T5 length StableDiffusion3Pipeline uses when called without ``max_sequence_length``.
SD3_MAX_SEQUENCE_LENGTH = 256


class ContextBiasProcessor:
    """SD3 joint attention with an additive logit bias on the context (text) keys, the image keys unbiased:
    ``context_bias(rows, tokens)`` gives it, ``(1 or rows, tokens)``. Image-only attention (SD3.5's second
    attention) is computed as usual. Subclasses say what the bias is; the whole mask is built once per shape."""

    def __init__(self):
        self._masks: dict[tuple, torch.Tensor] = {}

    def context_bias(self, rows: int, tokens: int) -> torch.Tensor:
        raise NotImplementedError

    def mask(self, rows: int, n_img: int, tokens: int, like: torch.Tensor) -> torch.Tensor:
        """The SDPA mask ``(1 or rows, 1, 1, n_img + tokens)``: zeros on the image keys, then the context bias."""
        key = (rows, n_img, tokens, like.dtype, like.device)
        if key not in self._masks:
            ctx = self.context_bias(rows, tokens).to(like.device, like.dtype)
            bias = torch.cat([torch.zeros(len(ctx), n_img, dtype=like.dtype, device=like.device), ctx], 1)
            self._masks[key] = bias.view(len(ctx), 1, 1, n_img + tokens)
        return self._masks[key]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_img = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        bias = None
        if encoder_hidden_states is not None:
            cq = heads(attn.add_q_proj(encoder_hidden_states))
            ck = heads(attn.add_k_proj(encoder_hidden_states))
            cv = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
            bias = self.mask(b, n_img, ck.shape[2], q)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        img, ctx_out = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx_out = attn.to_add_out(ctx_out)
        return attn.to_out[1](attn.to_out[0](img)), ctx_out


class RepeatedTokenProcessor(ContextBiasProcessor):
    """SD3 joint attention where the last context token stands for ``repeats`` identical tokens: its attention
    logit is raised by ``log(repeats)``, exactly what ``repeats`` copies contribute to each softmax."""

    def __init__(self, repeats: int):
        super().__init__()
        self.repeats = int(repeats)

    def context_bias(self, rows: int, tokens: int) -> torch.Tensor:
        bias = torch.zeros(1, tokens, dtype=torch.float64)
        bias[:, -1] = math.log(self.repeats)
        return bias


class MixedTextProcessor(ContextBiasProcessor):
    """SD3 joint attention over two prompts' tokens side by side (:class:`~latentlab.backend.AttentionMix`): the
    bias of :func:`~latentlab.backend.families.textmix.text_key_bias`, plus ``log(repeats)`` on each half's last
    token where trailing zero tokens were collapsed (as :class:`RepeatedTokenProcessor`)."""

    def __init__(self, weight: torch.Tensor, repeats: int = 1):
        super().__init__()
        self.weight, self.repeats = weight, int(repeats)

    def context_bias(self, rows: int, tokens: int) -> torch.Tensor:
        from latentlab.backend.families.textmix import text_key_bias

        half = tokens // 2
        bias = text_key_bias(self.weight, half, tokens - half, rows=rows)
        if self.repeats > 1:
            bias[:, [half - 1, tokens - 1]] += math.log(self.repeats)
        return bias


def trailing_zero_tokens(*conds: Conditioning) -> int:
    """How many context tokens at the end are exactly zero in every item of every conditioning."""
    n = min(c.prompt_embeds.shape[1] for c in conds)
    for c in conds:
        nonzero = c.prompt_embeds.detach().abs().amax(dim=(0, 2)) != 0  # (tokens,)
        idx = torch.nonzero(nonzero).flatten()
        n = min(n, c.prompt_embeds.shape[1] - (int(idx[-1]) + 1 if len(idx) else 0))
    return n


def repeated_last_token(transformer, repeats: int):
    """Run ``transformer`` with :class:`RepeatedTokenProcessor` (restoring its processors after)."""
    return swapped_attn_processors(transformer, RepeatedTokenProcessor(repeats))


class SD3Family(FlowFamily):
    family = "sd3"
    pipelines = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
    needs_pooled, display_name = True, "an SD3"
    default_steps, default_guidance = 28, 7.0
    transformer_patches = True

    def token_limit(self, pipe: Any):
        if getattr(pipe, "text_encoder_3", None) is not None:
            return pipe.tokenizer_3, SD3_MAX_SEQUENCE_LENGTH
        return pipe.tokenizer, pipe.tokenizer.model_max_length

    def encode_prompt(self, pipe: Any, prompt: str, device: torch.device) -> Conditioning:
        emb, _, pooled, _ = pipe.encode_prompt(prompt=[prompt], prompt_2=None, prompt_3=None, device=device,
                                               num_images_per_prompt=1, do_classifier_free_guidance=False)
        return Conditioning(emb, pooled)

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

    def _collapsible(self, pipe, cond: Conditioning, negative: Conditioning, sampling) -> int:
        """Trailing all-zero tokens to collapse into one (0: none, or the transformer runs non-default processors)."""
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        if not all(type(p) is JointAttnProcessor2_0 for p in pipe.transformer.attn_processors.values()):
            return 0
        n = trailing_zero_tokens(cond, negative) if sampling.guidance_scale > 1.0 else trailing_zero_tokens(cond)
        return n if n >= 2 else 0

    @staticmethod
    def _drop(c: Conditioning, n: int) -> Conditioning:
        return Conditioning(c.prompt_embeds[:, : c.prompt_embeds.shape[1] - n + 1], c.pooled_prompt_embeds)

    @contextlib.contextmanager
    def _collapsed(self, pipe, cond: Conditioning, negative: Conditioning, sampling):
        """``(cond, negative)`` with their trailing zero tokens collapsed into one, the transformer running the
        repeated-token bias meanwhile; unchanged where there is nothing to collapse."""
        n = self._collapsible(pipe, cond, negative, sampling)
        if not n:
            yield cond, negative
            return
        with repeated_last_token(pipe.transformer, n):
            yield self._drop(cond, n), self._drop(negative, n)

    def attention_mix_unsupported(self, pipe: Any) -> str | None:
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        procs = pipe.transformer.attn_processors.values()
        if not all(type(p) is JointAttnProcessor2_0 for p in procs):
            other = next(type(p).__name__ for p in procs if type(p) is not JointAttnProcessor2_0)
            return f"needs diffusers' default attention processors, but this model runs {other}"
        return None

    def generate_attention_mix(self, engine, z, mix, negative, sampling):
        """Both prompts' tokens in one joint attention (:class:`MixedTextProcessor`), each half's trailing zero
        tokens collapsed into one as :meth:`generate` does for one prompt."""
        from latentlab.backend.families.textmix import join

        guided = sampling.guidance_scale > 1.0
        n = trailing_zero_tokens(mix.a, mix.b, *([negative] if guided else []))
        n = n if n >= 2 else 1
        if n > 1:
            mix = type(mix)(self._drop(mix.a, n), self._drop(mix.b, n), mix.weight)
            negative = self._drop(negative, n)
        cond, neg = join(mix, negative)
        # non-default processors: generate collapses nothing more
        with swapped_attn_processors(engine.pipe.transformer, MixedTextProcessor(mix.weight, n)):
            return self.generate(engine, z, cond, neg, sampling)

    def generate(self, engine, z, cond, negative, sampling):
        if sampling.scheduler != "FlowMatchEulerDiscreteScheduler":
            return super().generate(engine, z, cond, negative, sampling)  # our own solve: collapses in _solve
        with self._collapsed(engine.pipe, cond, negative, sampling) as (c, neg):
            return super().generate(engine, z, c, neg, sampling)

    def _solve(self, engine, z, cond, negative, sampling, solver, sigmas, on_step=None):
        """The flow solve with the trailing zero tokens collapsed once for the whole solve (swapping the attention
        processors at every step cost about a sixth of a 20-step trajectory on the embedded flow twin)."""
        with self._collapsed(engine.pipe, cond, negative, sampling) as (c, neg):
            return integrate(lambda x, s: self._velocity(engine, x, s, c, neg, sampling), z, sigmas, solver=solver,
                             on_step=on_step)

    def velocity(self, engine, x, sigma, cond, negative, sampling):
        with self._collapsed(engine.pipe, cond, negative, sampling) as (c, neg):
            return self._velocity(engine, x, sigma, c, neg, sampling)

    def _velocity(self, engine, x, sigma, cond, negative, sampling):
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
