"""Latent edits over an :class:`~latentlab.backend.engine.Engine`: img2img, inpainting and inversion.

One responsibility: edits of clean latents, each built from a diffusers piece rather than a copy of its loop, the
same code for every model family (the family adapter supplies the pipeline class, the noising rule and the packing):

- **img2img**: the family's own img2img pipeline (SD, SDXL, SD3 and Flux each have one in diffusers), composed
  on the same components (no weights copied), given the clean latents as its ``image`` (input with the
  VAE's latent channels is used as latents as it is). Flow families without a usable diffusers img2img pipeline
  (Chroma, Lumina 2, Qwen-Image, Flux.2: ``own_img2img``) run the same recipe in the adapter (tested equal to diffusers' SD3 and
  Flux img2img pipelines on those families).
- **inpainting**: the same pipeline plus a ``callback_on_step_end`` that, after every step, puts the known latent,
  noised to the next step's level (``add_noise`` for diffusion models, ``(1 - sigma) z0 + sigma noise`` for flow
  models), back outside the mask (the blend of diffusers' inpainting pipelines for ordinary latent models), and
  optionally a pixel-space composite that keeps the original pixels outside a feathered mask exactly.
- **inversion**: DDIM inversion (diffusers' ``DDIMInverseScheduler``) for diffusion models, the flow ODE integrated
  backwards (Euler, Heun or FireFlow) for flow models; the reconstruction denoises the result again.

References: Meng et al., "SDEdit" (2022) for img2img; Lugmayr et al., "RePaint" (2022) for the inpainting blend;
Song et al., "Denoising Diffusion Implicit Models" (2021) and Mokady et al., "Null-text Inversion" (2023) on why
inversion drifts under guidance.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from latentlab import _checks
from latentlab.backend.engine import cpu_generators
from latentlab.backend.records import Conditioning, Inversion
from latentlab.sampling import Sampling

if TYPE_CHECKING:
    from latentlab.backend.engine import Engine as Lab

__all__ = ["img2img", "inpaint", "invert"]


def _seeds(seed: object, n: int) -> list[int]:
    if isinstance(seed, int) and not isinstance(seed, bool):
        seeds = [seed] * n
    elif isinstance(seed, (list, tuple)) and len(seed) == n and all(
            isinstance(s, int) and not isinstance(s, bool) for s in seed):
        seeds = list(seed)
    else:
        raise ValueError(f"`seed` must be an int (the same noise for every item) or {n} ints, got {seed!r}")
    for s in seeds:
        _checks.seed(s, "seed")
    return seeds


def _strength(strength: object, steps: int) -> int:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"`strength` must be in (0, 1], got {strength!r}")
    n_run = min(int(steps * strength), steps)
    if n_run == 0:
        raise ValueError(f"`strength` {strength} x `num_inference_steps` {steps} runs no step; raise either")
    return n_run


def _latent_mask(lab: Lab, mask: object, latents: torch.Tensor) -> torch.Tensor:
    """An image- or latent-sized mask in [0, 1] as (n, 1, h, w) on the latent grid (area average: soft edges)."""
    _checks.tensor(mask, "mask", min_ndim=4)
    n, _, h, w = latents.shape
    f = lab.vae_scale_factor
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, n):
        raise ValueError(f"`mask` must have shape (1 or {n}, 1, H, W), got {tuple(mask.shape)}")
    _checks.finite(mask, "mask")
    if tuple(mask.shape[2:]) == (h * f, w * f):
        mask = torch.nn.functional.interpolate(mask.float(), size=(h, w), mode="area")
    elif tuple(mask.shape[2:]) != (h, w):
        raise ValueError(f"`mask` must be image-sized {(h * f, w * f)} or latent-sized {(h, w)}, "
                         f"got {tuple(mask.shape[2:])}")
    if bool(((mask < 0) | (mask > 1)).any()):
        raise ValueError("`mask` values must be in [0, 1] (1 = regenerate)")
    return mask.expand(n, 1, h, w)


def _run_img2img(lab: Lab, latents, conditioning, *, strength, seed, mask, sampling, batch_size, **overrides):
    s = lab.sampling(sampling, **overrides)
    conditioning = lab.check_request(latents, conditioning)
    _strength(strength, s.num_inference_steps)
    seeds = _seeds(seed, len(latents))
    m = None if mask is None else _latent_mask(lab, mask, latents)
    negative = lab.negative_conditioning(s.negative_prompt)
    adapter = lab.adapter
    if adapter.own_img2img:
        return _own_img2img(lab, latents, conditioning, negative, s, strength, seeds, m, batch_size)
    pipe = lab.pipeline("img2img", s.scheduler)
    shape = tuple(latents.shape[1:])
    f = lab.vae_scale_factor
    # SD3/Flux img2img pipelines take the image size (their default is the model's native size); SD's do not.
    sized = {"height", "width"} <= set(inspect.signature(pipe.__call__).parameters)

    @torch.no_grad()
    def run(z0, cond, index, *rest):
        z0 = z0.to(lab.device, lab.dtype)
        item_seeds = [seeds[i] for i in index.tolist()]
        gens = cpu_generators(item_seeds)
        h, w = z0.shape[2], z0.shape[3]
        kw: dict[str, Any] = {}
        if rest:
            keep = rest[0].to(lab.device, lab.dtype)
            # The pipeline's first draw from each generator is its item's noise: the same as seeds.noise(seed).
            noise = torch.cat([torch.randn((1, *shape), generator=g) for g in cpu_generators(item_seeds)])
            noise = noise.to(lab.device, lab.dtype)

            def blend(p, i, t, callback_kwargs):
                sched = p.scheduler
                timesteps = sched.timesteps[len(sched.timesteps) - p.num_timesteps :]  # what the pipeline runs
                x = adapter.unpack(callback_kwargs["latents"], h, w)
                known = adapter.renoise(sched, z0, noise, i + 1, timesteps) if i + 1 < len(timesteps) else z0
                return {"latents": adapter.pack((1 - keep) * known + keep * x)}

            kw = {"callback_on_step_end": blend, "callback_on_step_end_tensor_inputs": ["latents"]}
        size = {"height": h * f, "width": w * f} if sized else {}
        with adapter.denoising(lab):
            out = pipe(image=z0, strength=strength, num_inference_steps=s.num_inference_steps, generator=gens,
                       output_type="latent", **size, **adapter.call_kwargs(lab, cond, negative, s), **kw).images
        return adapter.unpack(out, h, w)

    args = (latents, conditioning, torch.arange(len(latents))) + (() if m is None else (m,))
    return lab.run_batched(run, *args, batch_size=batch_size)


def _own_img2img(lab: Lab, latents, conditioning, negative, s: Sampling, strength, seeds, m, batch_size):
    """img2img/inpainting through the adapter's own loop; each item's noise is the model's noise of its seed."""
    shape = tuple(latents.shape[1:])

    @torch.no_grad()
    def run(z0, cond, index, *rest):
        noise = lab.adapter.noise([seeds[i] for i in index.tolist()], shape).to(lab.device, lab.dtype)
        keep = rest[0].to(lab.device, lab.dtype) if rest else None
        with lab.adapter.denoising(lab):
            return lab.adapter.img2img(lab, z0.to(lab.device, lab.dtype), noise, cond, negative, s, strength, keep)

    args = (latents, conditioning, torch.arange(len(latents))) + (() if m is None else (m,))
    return lab.run_batched(run, *args, batch_size=batch_size)


def img2img(lab: Lab, latents: torch.Tensor, conditioning: Conditioning, *, strength: float = 0.6,
            seed: int | Sequence[int] = 0, sampling: Sampling | None = None, batch_size: int | None = None,
            output_type: str = "pt", **overrides: Any) -> torch.Tensor:
    """Image-to-image as a latent edit: noise clean latents part of the way, then denoise from there.

    1. Of the scheduler's ``num_inference_steps`` timesteps only the last ``int(num_inference_steps * strength)``
       are run (diffusers' img2img pipeline does exactly this; it is that pipeline that runs).
    2. ``latents`` (clean, e.g. from ``Lab.encode``) are noised to the first of those timesteps with the noise of
       ``seed`` (one seed, or one per item; drawn from CPU generators). ``strength=1`` keeps almost nothing.
    3. They are denoised with ``conditioning``. Stochastic schedulers draw their step noise from the same per-item
       generators, so a seed means one result with any scheduler.
    """
    _checks.choice(output_type, "output_type", ("pt", "latent"))
    out = _run_img2img(lab, latents, conditioning, strength=strength, seed=seed, mask=None, sampling=sampling,
                          batch_size=batch_size, **overrides)
    return out.float().cpu() if output_type == "latent" else lab.decode(out, batch_size=batch_size)


def _feathered(mask: torch.Tensor, size: tuple[int, int], feather: float) -> torch.Tensor:
    """An image-sized mask (n, 1, H, W) in [0, 1], blurred by a Gaussian of ``feather`` pixels (0: hard)."""
    m = mask.float()
    if tuple(m.shape[2:]) != size:
        m = torch.nn.functional.interpolate(m, size=size, mode="nearest")
    if feather > 0:
        r = max(1, int(3 * feather))
        x = torch.arange(-r, r + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (x / feather) ** 2)
        k = (k / k.sum()).view(1, 1, 1, -1)
        m = torch.nn.functional.conv2d(torch.nn.functional.pad(m, (r, r, 0, 0), mode="replicate"), k)
        m = torch.nn.functional.conv2d(torch.nn.functional.pad(m, (0, 0, r, r), mode="replicate"),
                                       k.transpose(2, 3))
    return m.clamp(0, 1)


def inpaint(lab: Lab, latents: torch.Tensor, conditioning: Conditioning, mask: torch.Tensor, *,
            strength: float = 1.0, seed: int | Sequence[int] = 0, image: torch.Tensor | None = None,
            feather: float = 2.0, sampling: Sampling | None = None, batch_size: int | None = None,
            output_type: str = "pt", **overrides: Any) -> torch.Tensor:
    """Latent inpainting: regenerate where ``mask`` is 1 and keep the rest of ``latents``.

    Every step denoises the whole latent, then the known latent, noised to the next step's level, is put back
    outside the mask (the model sees the known region at every step, so the seam stays coherent). ``mask`` is
    image-sized (area-averaged onto the latent grid: soft edges) or latent-sized; other options as :func:`img2img`.

    The kept *latent* is exact, but a VAE decoder mixes neighbouring latents, so decoded pixels outside the mask can
    still change a little. Pass the original ``image`` (n or 1, 3, H, W in [0, 1]) to composite in pixel space:
    outside the mask, feathered by a Gaussian of ``feather`` pixels, the result keeps ``image``'s pixels exactly.
    """
    if mask is None:
        raise TypeError("`mask` must be a tensor (1 = regenerate), got None")
    _checks.choice(output_type, "output_type", ("pt", "latent"))
    lab.check_request(latents, conditioning)  # the image's expected shape comes from the latents
    if image is not None:
        if output_type == "latent":
            raise ValueError("`image` (a pixel composite) needs output_type='pt'")
        _checks.tensor(image, "image", min_ndim=4)
        f = lab.vae_scale_factor
        want = (3, latents.shape[2] * f, latents.shape[3] * f)
        if image.ndim != 4 or tuple(image.shape[1:]) != want or image.shape[0] not in (1, len(latents)):
            raise ValueError(f"`image` must have shape (1 or {len(latents)}, {want[0]}, {want[1]}, {want[2]}), "
                             f"got {tuple(image.shape)}")
        _checks.within(image, "image", 0.0, 1.0)
        _checks.real(feather, "feather", low=0.0, high=64.0)
    out = _run_img2img(lab, latents, conditioning, strength=strength, seed=seed, mask=mask, sampling=sampling,
                          batch_size=batch_size, **overrides)
    if output_type == "latent":
        return out.float().cpu()
    decoded = lab.decode(out, batch_size=batch_size)
    if image is None:
        return decoded
    m = _feathered(mask.expand(len(latents), *mask.shape[1:]), tuple(decoded.shape[2:]), float(feather))
    return m * decoded + (1 - m) * image.float().expand_as(decoded)


def invert(lab: Lab, latents: torch.Tensor, conditioning: Conditioning, *, solver: str | None = None,
           sampling: Sampling | None = None, batch_size: int | None = None, **overrides: Any) -> Inversion:
    """Invert clean ``latents`` to the noise that regenerates them, and report how well it does.

    Diffusion models (SD, SDXL): deterministic DDIM run backwards, each step diffusers' ``DDIMInverseScheduler.step``
    on the (guided) model output (epsilon, v or sample prediction); the reconstruction is DDIM from that noise.
    Flow models (SD3, Flux): the flow ODE integrated backwards from sigma 0 to 1 on the pipeline's own (shifted)
    sigma grid with ``solver`` -- ``"euler"`` (default; the reconstruction is then the ordinary pipeline),
    ``"heun"``, or ``"fireflow"`` (second order at one model call per step; the reconstruction uses it too).

    The reconstruction error (latent RMSE and image PSNR) is reported, not hidden. It grows with guidance (the
    reason for null-text inversion), so guidance defaults to 1 (none) here unless ``sampling`` or
    ``guidance_scale=`` say otherwise.
    """
    solvers = lab.adapter.solvers()
    solver = solvers[0] if solver is None else solver
    if solver not in solvers:
        raise ValueError(f"`solver` must be one of {solvers} for this {lab.family} model, got {solver!r}")
    if (sampling is None or sampling.guidance_scale is None) and overrides.get("guidance_scale") is None:
        overrides["guidance_scale"] = 1.0
    s = lab.sampling(sampling, **overrides)
    conditioning = lab.check_request(latents, conditioning)
    negative = lab.negative_conditioning(s.negative_prompt)
    adapter = lab.adapter

    @torch.no_grad()
    def run(z0, cond):
        with adapter.denoising(lab):
            return adapter.invert(lab, z0.to(lab.device, lab.dtype), cond, negative, s, solver)

    @torch.no_grad()
    def back(noise, cond):
        with adapter.denoising(lab):
            return adapter.reconstruct(lab, noise.to(lab.device, lab.dtype), cond, negative, s, solver)

    noise = lab.run_batched(run, latents, conditioning, batch_size=batch_size).float()
    rec = lab.run_batched(back, noise, conditioning, batch_size=batch_size).float()
    original = lab.decode(latents, batch_size=batch_size)
    images = lab.decode(rec, batch_size=batch_size)
    rmse = (rec - latents.float().cpu()).pow(2).flatten(1).mean(1).sqrt()
    mse = (images - original).pow(2).flatten(1).mean(1).clamp(min=1e-12)
    return Inversion(noise=noise, reconstruction=rec, images=images, latent_rmse=rmse, psnr=10 * torch.log10(1 / mse))
