"""Denoising trajectories: every step's latent and the clean latent the model predicted at it.

One responsibility: a :class:`Trajectory` for any model family, over an engine. The family adapter runs the steps
and reads x0: diffusion models from the UNet's own output (a forward hook on the ordinary pipeline; nothing is
patched) and the scheduler's cumulative alphas; flow models from the velocity, ``x0 = x_sigma - sigma v``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from latentlab.backend.records import Conditioning, Trajectory
from latentlab.sampling import Sampling

if TYPE_CHECKING:
    from latentlab.backend.engine import Engine

__all__ = ["trajectory"]


@torch.no_grad()
def trajectory(
    lab: Engine,
    latents: torch.Tensor,
    conditioning: Conditioning,
    *,
    sampling: Sampling | None = None,
    batch_size: int | None = None,
    on_step: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    **overrides: Any,
) -> Trajectory:
    """Denoise like :meth:`~latentlab.backend.engine.Engine.generate` and record every step's latents and the
    predicted clean latent (x0). Decode any of them with ``decode`` to watch the image form.

    ``on_step(step, start, latents, x0)``, if given, is called as each step ends, once per compute batch: the
    latents after step ``step`` and the x0 predicted at it for items ``start, start + 1, ...`` (CPU, float32) --
    to show a trajectory while it is computed (after an out-of-memory retry a batch's steps are reported again)."""
    s = lab.sampling(sampling, **overrides)
    conditioning = lab.check_request(latents, conditioning)
    lab.compute_batch(batch_size)  # validates
    if on_step is not None and not callable(on_step):
        raise TypeError(f"`on_step` must be callable or None, got {type(on_step).__name__}")
    negative = lab.negative_conditioning(s.negative_prompt)
    ts: list[tuple[float, ...]] = []
    done = [0]

    def run(z, cond):
        start, real = done[0], min(len(z), len(latents) - done[0])  # the chunk's own items (padding dropped)
        report = None if on_step is None else (
            lambda i, lat, x0: on_step(i, start, lat[:real].float().cpu(), x0[:real].float().cpu()))
        with lab.adapter.denoising(lab):
            steps, lats, x0s, final = lab.adapter.trajectory(lab, z.to(lab.device, lab.dtype), cond, negative, s,
                                                             on_step=report)
        done[0] += real
        ts[:] = [steps]
        # batch-first (b, 2 * steps + 1, C, h, w) so chunks concatenate
        return torch.cat([lats, x0s, final.unsqueeze(1)], dim=1)

    packed = lab.run_batched(run, latents, conditioning, batch_size=batch_size)
    n = len(ts[0])
    return Trajectory(ts[0], packed[:, :n].transpose(0, 1).contiguous(),
                      packed[:, n : 2 * n].transpose(0, 1).contiguous(),
                      lab.decode(packed[:, -1], batch_size=batch_size))
