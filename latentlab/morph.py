"""Morphs and walks: keyframes (prompt and/or seed) -> per-frame (noise, prompt embedding) -> video + manifest.

One responsibility: orchestrate a render. The noise path and the prompt path are independent: each has its own
interpolation and easing over the same frames. Frames are generated in batches and streamed to the video writer;
a JSON manifest beside the video records everything that determines every frame (model, scheduler, settings,
keyframe seeds and prompts, per-frame segment and t of both paths, versions), and :func:`render_frame` re-creates
any single frame from it.

A keyframe without a seed keeps the previous keyframe's seed (the first defaults to 0); one without a prompt keeps
the previous prompt. So ``["a red star", "a blue ring"]`` morphs the prompt at a fixed seed, and one prompt with
several seeds is a seed walk.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from latentlab import _checks
from latentlab.backend import Conditioning, Generator
from latentlab.paths import EASINGS, METHODS, keyframe_path, schedule
from latentlab.seeds import noise
from latentlab.store import versions

__all__ = ["Keyframe", "MorphSettings", "plan", "render_morph", "render_frame", "MANIFEST_VERSION"]

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Keyframe:
    """One keyframe: a prompt, a seed, or both (missing values carry over from the previous keyframe)."""

    prompt: str | None = None
    seed: int | None = None


@dataclass(frozen=True)
class MorphSettings:
    """Everything that determines the frames of a morph (serialised into the manifest)."""

    keyframes: tuple[Keyframe, ...]
    n_frames: int = 48
    fps: float = 12.0
    loop: bool = False
    noise_interpolation: str = "slerp"
    noise_easing: str = "linear"
    prompt_interpolation: str = "lerp"
    prompt_easing: str = "linear"
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None

    def __post_init__(self):
        if not isinstance(self.keyframes, tuple) or len(self.keyframes) < 2:
            raise ValueError(f"`keyframes` must be a tuple of at least 2 Keyframe, got {self.keyframes!r}")
        for i, k in enumerate(self.keyframes):
            if not isinstance(k, Keyframe):
                raise TypeError(f"`keyframes[{i}]` must be a Keyframe, got {type(k).__name__}")
            if k.seed is not None and (isinstance(k.seed, bool) or not isinstance(k.seed, int) or not 0 <= k.seed < 2**64):
                raise ValueError(f"`keyframes[{i}].seed` must be an int in [0, 2**64), got {k.seed!r}")
        if self.keyframes[0].prompt is None:
            raise ValueError("the first keyframe needs a prompt")
        _checks.positive_int(self.n_frames, "n_frames", minimum=2)
        if not (isinstance(self.fps, (int, float)) and 0 < self.fps <= 240):
            raise ValueError(f"`fps` must be in (0, 240], got {self.fps!r}")
        _checks.choice(self.noise_interpolation, "noise_interpolation", METHODS)
        _checks.choice(self.prompt_interpolation, "prompt_interpolation", METHODS)
        _checks.choice(self.noise_easing, "noise_easing", EASINGS)
        _checks.choice(self.prompt_easing, "prompt_easing", EASINGS)

    def resolved(self) -> tuple[list[str], list[int]]:
        """Prompts and seeds of every keyframe after carrying missing values forward."""
        prompts, seeds = [], []
        prompt, seed = None, 0
        for k in self.keyframes:
            prompt = k.prompt if k.prompt is not None else prompt
            seed = k.seed if k.seed is not None else seed
            prompts.append(prompt)
            seeds.append(seed)
        return prompts, seeds

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MorphSettings:
        d = dict(d)
        d["keyframes"] = tuple(Keyframe(**k) for k in d["keyframes"])
        return cls(**d)


@dataclass(frozen=True)
class Plan:
    """Per-frame inputs of a morph: initial latents (N, C, h, w) and conditioning (N items)."""

    latents: torch.Tensor
    conditioning: Conditioning
    frames: list[dict] = field(default_factory=list)


def plan(lab: Generator, settings: MorphSettings) -> Plan:
    """Compute every frame's initial noise and prompt conditioning (cheap: no denoising)."""
    prompts, seeds = settings.resolved()
    k = len(prompts)
    shape = (1, *lab.latent_shape(height=settings.height, width=settings.width))
    keys = [noise(s, shape) for s in seeds]
    lat = keyframe_path(keys, settings.n_frames, method=settings.noise_interpolation, loop=settings.loop,
                        easing=settings.noise_easing)[:, 0]
    conds = [lab.encode_prompt(p) for p in prompts]
    cond_path = Conditioning.cat(conds).map(
        lambda t: keyframe_path(
            [x.float().cpu().unsqueeze(0) for x in t], settings.n_frames, method=settings.prompt_interpolation,
            loop=settings.loop, easing=settings.prompt_easing,
        )[:, 0].to(t.dtype)
    )
    ns = schedule(k, settings.n_frames, loop=settings.loop, easing=settings.noise_easing)
    ps = schedule(k, settings.n_frames, loop=settings.loop, easing=settings.prompt_easing)
    frames = [
        {"index": i, "noise_segment": ns.segment[i], "noise_t": ns.t[i], "prompt_segment": ps.segment[i],
         "prompt_t": ps.t[i]}
        for i in range(settings.n_frames)
    ]
    return Plan(lat, cond_path, frames)


def _scheduler_record(lab) -> dict:
    sched = getattr(getattr(lab, "pipe", None), "scheduler", None)
    if sched is None:
        return {}
    return {"class": type(sched).__name__, "config": {k: v for k, v in dict(sched.config).items()
                                                      if isinstance(v, (int, float, str, bool, type(None), list))}}


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def manifest_path(video: str | os.PathLike) -> Path:
    """The manifest that sits beside ``video``: ``morph.mp4`` -> ``morph.mp4.json``."""
    video = Path(video)
    return video.with_name(video.name + ".json")


def render_morph(
    lab,
    settings: MorphSettings,
    output: str | os.PathLike,
    *,
    batch_size: int = 16,
    upscale: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Render ``settings`` with ``lab`` to ``output`` (.mp4/.gif) and write its manifest; returns the video path.

    Validation (output suffix, existing files, sizes) happens before any model work.
    """
    from tqdm.auto import tqdm

    from latentlab.video import VideoWriter

    output = Path(output)
    man = manifest_path(output)
    if man.exists() and not overwrite:
        raise FileExistsError(f"{man} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    writer = VideoWriter(output, fps=settings.fps, upscale=upscale, overwrite=overwrite)
    p = plan(lab, settings)
    steps = settings.num_inference_steps
    with writer, tqdm(total=settings.n_frames, desc="frames", unit="frame", disable=not progress) as bar:
        for start in range(0, settings.n_frames, batch_size):
            sl = slice(start, min(settings.n_frames, start + batch_size))
            images = lab.generate(p.latents[sl], p.conditioning[sl], negative_prompt=settings.negative_prompt,
                                  num_inference_steps=steps, guidance_scale=settings.guidance_scale)
            writer.append(images)
            bar.update(images.shape[0])
    prompts, seeds = settings.resolved()
    _write_json_atomic(man, {
        "manifest_version": MANIFEST_VERSION,
        "video": output.name,
        "model": lab.model_id,
        "num_inference_steps": steps if steps is not None else getattr(lab, "num_inference_steps", None),
        "guidance_scale": settings.guidance_scale if settings.guidance_scale is not None
        else getattr(lab, "guidance_scale", None),
        "scheduler": _scheduler_record(lab),
        "settings": settings.to_dict(),
        "resolved_keyframes": [{"prompt": pr, "seed": s} for pr, s in zip(prompts, seeds)],
        "upscale": upscale,
        "frames": p.frames,
        "versions": versions(),
    })
    return output


def render_frame(lab, manifest: str | os.PathLike | dict, index: int) -> torch.Tensor:
    """Re-create frame ``index`` of a rendered morph from its manifest: (1, 3, H, W) in [0, 1]."""
    data = manifest if isinstance(manifest, dict) else json.loads(Path(manifest).read_text())
    if data.get("manifest_version") != MANIFEST_VERSION:
        raise ValueError(f"unsupported manifest version {data.get('manifest_version')!r}")
    settings = MorphSettings.from_dict(data["settings"])
    _checks.positive_int(index, "index", minimum=0)
    if index >= settings.n_frames:
        raise ValueError(f"`index` must be < {settings.n_frames} (the number of frames), got {index}")
    p = plan(lab, settings)
    return lab.generate(p.latents[index : index + 1], p.conditioning[index], negative_prompt=settings.negative_prompt,
                        num_inference_steps=data["num_inference_steps"], guidance_scale=data["guidance_scale"])


def frames_for_duration(seconds: float, fps: float) -> int:
    """Exact frame count for a duration: ``round(seconds * fps)`` (at least 2)."""
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"`seconds` must be a positive number, got {seconds!r}")
    return max(2, round(seconds * fps))
