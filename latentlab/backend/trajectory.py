"""Denoising trajectories: every step's latent and the clean latent the model predicted at it.

One responsibility: a :class:`Trajectory` for any model family, over an engine. The family adapter runs the steps
and reads x0: diffusion models from the UNet's own output (a forward hook on the ordinary pipeline; nothing is
patched) and the scheduler's cumulative alphas; flow models from the velocity, ``x0 = x_sigma - sigma v``.
"""

from __future__ import annotations

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
    **overrides: Any,
) -> Trajectory:
    """Denoise like :meth:`~latentlab.backend.engine.Engine.generate` and record every step's latents and the
    predicted clean latent (x0). Decode any of them with ``decode`` to watch the image form."""
    s = lab.sampling(sampling, **overrides)
    conditioning = lab.check_request(latents, conditioning)
    lab.compute_batch(batch_size)  # validates
    negative = lab.negative_conditioning(s.negative_prompt)
    ts: list[tuple[float, ...]] = []

    def run(z, cond):
        with lab.adapter.denoising(lab):
            steps, lats, x0s, final = lab.adapter.trajectory(lab, z.to(lab.device, lab.dtype), cond, negative, s)
        ts[:] = [steps]
        # batch-first (b, 2 * steps + 1, C, h, w) so chunks concatenate
        return torch.cat([lats, x0s, final.unsqueeze(1)], dim=1)

    packed = lab.run_batched(run, latents, conditioning, batch_size=batch_size)
    n = len(ts[0])
    return Trajectory(ts[0], packed[:, :n].transpose(0, 1).contiguous(),
                      packed[:, n : 2 * n].transpose(0, 1).contiguous(),
                      lab.decode(packed[:, -1], batch_size=batch_size))
