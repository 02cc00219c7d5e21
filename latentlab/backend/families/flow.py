"""What the flow-matching transformer families (SD3/SD3.5, Flux.1) share: the rectified-flow ODE and its solvers.

One responsibility: the flow side of the adapter interface, over one velocity call per family. A flow model
predicts the velocity ``v = noise - x0`` of the straight path ``x_sigma = (1 - sigma) x0 + sigma noise``, so

- the clean latent predicted at any step is ``x0 = x_sigma - sigma v`` (trajectories, exactly);
- sampling integrates ``dx/dsigma = v`` from sigma = 1 to 0, and inversion integrates the same ODE backwards from
  0 to 1 on the same (shifted) sigma grid the pipeline uses -- so the pipeline regenerates an inversion's source;
- solvers (k-diffusion's calling convention: ``integrate(velocity, x, sigmas)``): ``euler`` (one call per step;
  what ``FlowMatchEulerDiscreteScheduler`` does), ``heun`` (two calls per step except the last: second order), and
  ``fireflow`` (second order at one call per step: each step's midpoint velocity is reused as the next step's
  initial velocity; Deng et al., "FireFlow: Fast Inversion of Rectified Flow for Image Semantic Editing", 2024).

Generation with the Euler scheduler runs the diffusers pipeline itself (parity); Heun runs :func:`integrate` on the
pipeline's own sigmas (diffusers' ``FlowMatchHeunDiscreteScheduler`` takes no custom sigmas or ``mu``, so Flux's
pipeline cannot run it). References: Liu et al., "Flow Straight and Fast" (2022); Esser et al., "Scaling Rectified
Flow Transformers" (SD3, 2024).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from latentlab.backend.engine import import_diffusers
from latentlab.backend.families.base import Family
from latentlab.backend.records import Conditioning
from latentlab.sampling import Sampling

if TYPE_CHECKING:
    from latentlab.backend.engine import Engine

__all__ = ["FLOW_SCHEDULERS", "SOLVERS", "FlowFamily", "integrate", "model_calls", "renormalised_cfg"]

#: Schedulers a flow model accepts (diffusers' class names).
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
#: ODE solvers of :func:`integrate`.
SOLVERS = ("euler", "heun", "fireflow")

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def model_calls(solver: str, steps: int) -> int:
    """Velocity evaluations :func:`integrate` makes for ``steps`` steps ending at sigma 0 (fewer when it does not).

    >>> [model_calls(s, 8) for s in SOLVERS]
    [8, 15, 9]
    """
    return {"euler": steps, "heun": 2 * steps - 1, "fireflow": steps + 1}[solver]


def integrate(velocity: Velocity, x: torch.Tensor, sigmas: torch.Tensor, *, solver: str = "euler",
              on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Integrate ``dx/dsigma = velocity(x, sigma)`` along ``sigmas`` (decreasing: sampling; increasing: inversion).

    ``on_step(i, x_next, v)`` sees the state after step ``i`` and the velocity the step used at ``sigmas[i]``
    (Euler and Heun: the model's velocity there; FireFlow: the reused midpoint velocity).

    Examples
    --------
    The straight path of a flow (constant velocity) is integrated exactly by every solver:

    >>> x0, noise = torch.zeros(1, 2), torch.ones(1, 2)
    >>> sigmas = torch.linspace(1, 0, 5)
    >>> [integrate(lambda x, s: noise - x0, noise, sigmas, solver=s).tolist() for s in SOLVERS]
    [[[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]]]
    """
    if solver not in SOLVERS:
        raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}")
    v_reuse = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        h = s_next - s
        if solver == "euler":
            v = velocity(x, s)
            x_next = x + h * v
        elif solver == "heun":
            v = velocity(x, s)
            x_next = x + h * v
            if float(s_next) > 0:  # the last step to sigma 0 stays first order (as k-diffusion's Heun)
                x_next = x + h * (v + velocity(x_next, s_next)) / 2
        else:  # fireflow: midpoint with the previous midpoint velocity as this step's initial velocity
            v0 = velocity(x, s) if v_reuse is None else v_reuse
            v = velocity(x + h / 2 * v0, s + h / 2)
            x_next = x + h * v
            v_reuse = v
        if on_step is not None:
            on_step(i, x_next, v)
        x = x_next
    return x


def renormalised_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance rescaled to the conditional prediction's norm along the last axis (what the Lumina 2
    and Qwen-Image pipelines do)."""
    guided = uncond + scale * (cond - uncond)
    return guided * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))


@contextlib.contextmanager
def swapped_attn_processors(transformer, processors):
    """Run ``transformer`` with ``processors`` (one processor, or a dict by layer name) for the block, through
    diffusers' public ``set_attn_processor``; its own processors are restored after."""
    old = transformer.attn_processors
    transformer.set_attn_processor(processors)
    try:
        yield
    finally:
        transformer.set_attn_processor(old)


class FlowFamily(Family):
    """Shared behaviour of the flow-matching families; subclasses add prompt encoding and the velocity call."""

    denoiser_name = "transformer"
    weight_components = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    #: Guidance and steps of the family's pipelines when a model says nothing else.
    default_steps, default_guidance = 28, 3.5
    #: Whether the transformer patches the VAE-layout latents itself (its config's ``patch_size`` and
    #: ``sample_size`` give the size factor and the native size: SD3, Lumina 2).
    transformer_patches: ClassVar[bool] = False

    def size_patch(self, pipe: Any) -> int:
        return int(pipe.transformer.config.patch_size) if self.transformer_patches else self.latent_patch

    def facts_from_configs(self, folder, vae_factor: int) -> dict:
        facts = super().facts_from_configs(folder, vae_factor)
        if not self.transformer_patches:
            return facts
        import json
        from pathlib import Path

        try:
            cfg = json.loads((Path(folder) / "transformer" / "config.json").read_text())
        except (OSError, ValueError):
            return facts
        s = int(cfg.get("sample_size", 128)) * vae_factor
        return facts | {"size": (s, s), "size_multiple": vae_factor * int(cfg.get("patch_size", 2))}

    def default_sampling(self, pipe: Any) -> Sampling:
        name = type(pipe.scheduler).__name__
        name = name if name in FLOW_SCHEDULERS else FLOW_SCHEDULERS[0]
        return Sampling(self.default_steps, self.default_guidance, "", name)

    def check_scheduler(self, name: str) -> None:
        if name not in FLOW_SCHEDULERS:
            raise ValueError(f"`scheduler` must be a flow-matching scheduler for this {self.family} model "
                             f"({', '.join(FLOW_SCHEDULERS)}), got {name!r}: noise-prediction schedulers such as "
                             "DDIM do not apply to a velocity-predicting model")

    def solvers(self) -> tuple[str, ...]:
        return SOLVERS

    # --- VAE: SD3/Flux VAEs have a shift as well as a scale --------------------------------------------------------

    def scale(self, vae: Any, z: torch.Tensor) -> torch.Tensor:
        return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    def unscale(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        return latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)

    # --- the noise schedule ---------------------------------------------------------------------------------------

    def pipeline_sigmas(self, steps: int):
        """The ``sigmas=`` the pipeline passes its scheduler (None: the scheduler's own spacing)."""
        return

    def image_seq_len(self, pipe: Any, h: int, w: int) -> int:
        """Image tokens for a latent of ``h`` x ``w`` (what the dynamic shift's ``mu`` depends on)."""
        p = self.size_patch(pipe)
        return (h // p) * (w // p)

    def mu(self, pipe: Any, h: int, w: int, steps: int) -> float | None:
        """The dynamic shift ``mu`` the pipeline computes for a latent of ``h`` x ``w`` and ``steps`` steps (None: not
        used)."""
        cfg = pipe.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return None
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        return calculate_shift(self.image_seq_len(pipe, h, w), cfg.get("base_image_seq_len", 256),
                               cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                               cfg.get("max_shift", 1.15))

    def sigmas(self, engine: Engine, h: int, w: int, steps: int) -> tuple[torch.Tensor, float | None]:
        """The pipeline's sigma grid for ``steps`` steps (terminal 0 included) and its ``mu``: built by a fresh
        scheduler from the model's config exactly as the pipeline builds it."""
        diffusers = import_diffusers()
        sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(engine.pipe.scheduler.config)
        mu = self.mu(engine.pipe, h, w, steps)
        kw = {"mu": mu} if mu is not None else {}
        sigmas = self.pipeline_sigmas(steps)
        if sigmas is not None:
            kw["sigmas"] = sigmas
        sched.set_timesteps(steps, device="cpu", **kw)
        return sched.sigmas.float(), mu

    def schedule(self, engine: Engine, *, height: int, width: int, sampling: Sampling) -> dict:
        f = engine.vae_scale_factor
        sigmas, mu = self.sigmas(engine, height // f, width // f, sampling.num_inference_steps)
        return {"mu": mu, "sigmas": [round(float(s), 6) for s in sigmas]}

    # --- denoising ----------------------------------------------------------------------------------------------

    def velocity(self, engine: Engine, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                 negative: Conditioning, sampling: Sampling) -> torch.Tensor:
        """The (guided) velocity at noise level ``sigma`` for VAE-layout latents ``x``, as the pipeline computes it."""
        raise NotImplementedError

    def _grid(self, engine, z, sampling, *, invert=False) -> torch.Tensor:
        sigmas, _ = self.sigmas(engine, z.shape[2], z.shape[3], sampling.num_inference_steps)
        return (sigmas.flip(0) if invert else sigmas).to(z.device)

    def _solve(self, engine, z, cond, negative, sampling, solver, sigmas, on_step=None):
        def velocity(x, s):
            return self.velocity(engine, x, s, cond, negative, sampling)

        return integrate(velocity, z, sigmas, solver=solver, on_step=on_step)

    def generate(self, engine, z, cond, negative, sampling):
        if sampling.scheduler == "FlowMatchEulerDiscreteScheduler":
            return super().generate(engine, z, cond, negative, sampling)
        return self._solve(engine, z, cond, negative, sampling, "heun", self._grid(engine, z, sampling))

    def img2img(self, engine, z0, noise, cond, negative, sampling, strength, keep):
        """diffusers' flow img2img recipe (``FluxImg2ImgPipeline``) on the pipeline's sigmas: of ``N`` steps the last
        ``int(N * strength)`` run, from the clean latents noised to the first of them (``(1 - s) z0 + s noise``);
        for inpainting, after every step the known latent noised to the next level is put back where ``keep`` is 0
        (the clean latent after the last step)."""
        steps = sampling.num_inference_steps
        sigmas = self._grid(engine, z0, sampling)
        start = int(max(steps - min(steps * strength, steps), 0))
        sigmas = sigmas[start:]
        solver = "euler" if sampling.scheduler == "FlowMatchEulerDiscreteScheduler" else "heun"
        x = (1 - sigmas[0]) * z0 + sigmas[0] * noise
        for i in range(len(sigmas) - 1):
            x = self._solve(engine, x, cond, negative, sampling, solver, sigmas[i : i + 2])
            if keep is not None:
                s = sigmas[i + 1]
                x = (1 - keep) * ((1 - s) * z0 + s * noise) + keep * x
        return x

    def renoise(self, scheduler, z0, noise, step, timesteps):
        sigma = timesteps[step] / scheduler.config.num_train_timesteps
        return (1 - sigma) * z0 + sigma * noise

    def trajectory(self, engine, z, cond, negative, sampling, on_step=None):
        """Euler or Heun on the pipeline's sigmas, recording each step's latent and ``x0 = x - sigma v``."""
        lats, x0s = [], []
        solver = "euler" if sampling.scheduler == "FlowMatchEulerDiscreteScheduler" else "heun"
        state = {"x": z}

        def record(i, x_next, v):
            x0s.append((state["x"].double() - sigmas[i].double() * v.double()).float().cpu())
            lats.append(x_next.float().cpu())
            state["x"] = x_next
            if on_step is not None:
                on_step(i, lats[-1], x0s[-1])

        sigmas = self._grid(engine, z, sampling)
        final = self._solve(engine, z, cond, negative, sampling, solver, sigmas, on_step=record)
        steps = tuple(float(s) * engine.pipe.scheduler.config.num_train_timesteps for s in sigmas[:-1])
        return steps, torch.stack(lats, 1), torch.stack(x0s, 1), final.float().cpu()

    def invert(self, engine, z0, cond, negative, sampling, solver):
        return self._solve(engine, z0, cond, negative, sampling, solver, self._grid(engine, z0, sampling, invert=True))

    def reconstruct(self, engine, noise, cond, negative, sampling, solver):
        if solver == "euler":  # the ordinary pipeline (Euler) on the same sigmas
            return self.generate(engine, noise, cond, negative, sampling.replace(
                scheduler="FlowMatchEulerDiscreteScheduler"))
        return self._solve(engine, noise, cond, negative, sampling, solver, self._grid(engine, noise, sampling))
