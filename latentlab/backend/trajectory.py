"""Denoising trajectories: every step's latent and the clean latent the model predicted at it.

One responsibility: run the ordinary pipeline and read the UNet's own output with a forward hook (nothing is
patched), combining classifier-free guidance as the pipeline does and converting the output to x0 with the
scheduler's cumulative alphas (epsilon, v or sample prediction).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from latentlab.backend.lab import cpu_generators, step_seeds
from latentlab.backend.records import Conditioning, Trajectory
from latentlab.sampling import Sampling

if TYPE_CHECKING:
    from latentlab.backend.lab import Lab

__all__ = ["alphas_cumprod_at", "trajectory"]


def alphas_cumprod_at(scheduler, t: torch.Tensor) -> torch.Tensor:
    """Cumulative alpha at (possibly fractional) timestep t, interpolating sigma linearly as Euler schedulers do."""
    ac = scheduler.alphas_cumprod.double()
    sigmas = ((1 - ac) / ac).sqrt()
    tt = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
    lo = int(min(max(0, int(tt)), len(ac) - 1))
    hi = min(lo + 1, len(ac) - 1)
    sigma = sigmas[lo] + (sigmas[hi] - sigmas[lo]) * (tt - lo)
    return 1 / (1 + sigma**2)


@torch.no_grad()
def trajectory(
    lab: Lab,
    latents: torch.Tensor,
    conditioning: Conditioning,
    *,
    sampling: Sampling | None = None,
    batch_size: int | None = None,
    **overrides: Any,
) -> Trajectory:
    """Denoise like :meth:`generate` and record every step's latents and predicted clean latent (x0).

    x0 comes from the UNet's own output (read with a forward hook; nothing is patched), combined for
    classifier-free guidance as the pipeline combines it, and converted with the scheduler's cumulative alphas:
    ``x0 = (x_t - sqrt(1 - ᾱ) ε) / sqrt(ᾱ)`` for epsilon prediction, ``sqrt(ᾱ) x_t - sqrt(1 - ᾱ) v`` for
    v-prediction. Decode any of them with :meth:`decode` to watch the image form.
    """
    s = lab.sampling(sampling, **overrides)
    conditioning = lab.check_request(latents, conditioning)
    lab.compute_batch(batch_size)  # validates
    pipe = lab.pipeline("text2image", s.scheduler)
    negative = lab.negative_conditioning(s.negative_prompt)
    pred_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    cfg = s.guidance_scale
    guided = cfg > 1.0 and lab.pipe.unet.config.time_cond_proj_dim is None
    x0s, lats, ts = [], [], []

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        out = output[0] if isinstance(output, tuple) else output.sample
        if guided:  # the pipeline batches [unconditional, conditional]
            x = x.chunk(2)[1]
            uncond, cond = out.chunk(2)
            out = uncond + cfg * (cond - uncond)
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

    def on_step_end(pipe, i, t, callback_kwargs):
        lats.append(callback_kwargs["latents"].float().cpu())
        return {}

    f = lab.vae_scale_factor

    def run(z, cond):
        for record in (lats, x0s, ts):
            record.clear()
        handle = lab.pipe.unet.register_forward_hook(hook, with_kwargs=True)
        try:
            final = pipe(
                latents=z.to(lab.device, lab.dtype), height=z.shape[2] * f, width=z.shape[3] * f,
                num_inference_steps=s.num_inference_steps, guidance_scale=cfg, output_type="latent",
                generator=cpu_generators(step_seeds(z)),
                callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"],
                **lab.pipeline_kwargs(cond, negative, s),
            ).images
        finally:
            handle.remove()
        # batch-first (b, 2 * steps + 1, C, h, w) so chunks concatenate
        return torch.stack([*lats, *x0s, final.float().cpu()], dim=1)

    packed = lab.run_batched(run, latents, conditioning, batch_size=batch_size)
    n = len(ts)
    return Trajectory(tuple(ts), packed[:, :n].transpose(0, 1).contiguous(),
                      packed[:, n : 2 * n].transpose(0, 1).contiguous(),
                      lab.decode(packed[:, -1], batch_size=batch_size))

