"""Sampling settings: one frozen, validated record of how a denoising run samples.

One responsibility: the settings that, with the model, the initial latents and the conditioning, determine an
image -- ``num_inference_steps``, ``guidance_scale``, ``negative_prompt`` and the ``scheduler`` -- checked on
construction, so the CLI and the widgets can refuse bad values before any model is loaded. A field left ``None``
means "the model's default"; the backend fills those in exactly one place (``Lab.sampling``), and what it returns
is *complete* (no ``None``) and is what manifests, atlases and cache keys record (``to_dict``).

Torch-free and diffusers-free on purpose (layer 1): scheduler names are plain strings, resolved to diffusers
classes by the backend.

Examples
--------
>>> s = Sampling(num_inference_steps=20, guidance_scale=4.0)
>>> s.complete
False
>>> s.replace(negative_prompt="", scheduler="DDIMScheduler").complete
True
>>> Sampling(guidance_scale=float("nan"))
Traceback (most recent call last):
...
ValueError: `guidance_scale` must be a finite number, got nan
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from latentlab import _checks

__all__ = ["MAX_GUIDANCE", "MAX_STEPS", "SCHEDULERS", "STOCHASTIC_SCHEDULERS", "Sampling"]

#: diffusers schedulers that work with Stable-Diffusion-family pipelines and need no extra package.
SCHEDULERS: tuple[str, ...] = (
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
)
#: Schedulers that draw fresh noise while stepping. The backend gives them one seeded CPU generator per item, so a
#: seed still means one image.
STOCHASTIC_SCHEDULERS: frozenset[str] = frozenset(
    {"DDPMScheduler", "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LCMScheduler"}
)
#: Upper bounds that catch typos (``--steps 20000``) rather than model limits: training schedules have 1,000 steps,
#: and guidance far above 30 only saturates colours.
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0


@dataclass(frozen=True)
class Sampling:
    """How to sample: every field ``None`` means "the model's default" (see ``Lab.sampling``).

    Parameters
    ----------
    num_inference_steps : int, optional
        Denoising steps, 1 to ``MAX_STEPS``.
    guidance_scale : float, optional
        Classifier-free guidance scale, finite, 0 to ``MAX_GUIDANCE`` (<= 1 runs no unconditional branch).
    negative_prompt : str, optional
        The text of the unconditional branch ("" is the usual empty prompt).
    scheduler : str, optional
        A diffusers scheduler class name (``SCHEDULERS`` lists those tested with SD pipelines), built from the
        model's own scheduler config by the backend.
    """

    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    scheduler: str | None = None

    def __post_init__(self):
        if self.num_inference_steps is not None:
            _checks.positive_int(self.num_inference_steps, "num_inference_steps")
            if self.num_inference_steps > MAX_STEPS:
                raise ValueError(f"`num_inference_steps` must be <= {MAX_STEPS}, got {self.num_inference_steps}")
        if self.guidance_scale is not None:
            g = _checks.real(self.guidance_scale, "guidance_scale", low=0.0, high=MAX_GUIDANCE)
            object.__setattr__(self, "guidance_scale", g)
        if self.negative_prompt is not None:
            check_prompt(self.negative_prompt, "negative_prompt")
        if self.scheduler is not None and (not isinstance(self.scheduler, str) or not self.scheduler.isidentifier()
                                           or not self.scheduler.endswith("Scheduler")):
            raise ValueError(f"`scheduler` must be a diffusers scheduler class name such as {SCHEDULERS[0]!r}, "
                             f"got {self.scheduler!r}")

    @property
    def complete(self) -> bool:
        """True when no field is left to a default."""
        return all(getattr(self, f.name) is not None for f in dataclasses.fields(self))

    @property
    def stochastic(self) -> bool:
        """True when the scheduler draws noise while stepping."""
        return self.scheduler in STOCHASTIC_SCHEDULERS

    def replace(self, **changes) -> Sampling:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def over(self, defaults: Sampling) -> Sampling:
        """This record with its ``None`` fields taken from ``defaults``."""
        return Sampling(**{f.name: getattr(defaults, f.name) if getattr(self, f.name) is None
                           else getattr(self, f.name) for f in dataclasses.fields(self)})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Sampling:
        """The inverse of :meth:`to_dict`; unknown keys are an error (a manifest from another version)."""
        if not isinstance(d, dict):
            raise TypeError(f"`sampling` must be a dict, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"`sampling` has unknown key(s) {sorted(unknown)}")
        return cls(**d)


def check_prompt(prompt: object, name: str = "prompt") -> str:
    """A prompt is a ``str`` that can be encoded as UTF-8 (command lines can carry undecodable bytes)."""
    if not isinstance(prompt, str):
        raise TypeError(f"`{name}` must be a string, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"`{name}` is not valid UTF-8 text (undecodable bytes in the input?)") from None
    return prompt
