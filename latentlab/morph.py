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

import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from latentlab import _checks
from latentlab.backend import Conditioning, Generator
from latentlab.paths import EASINGS, METHODS, ease, path_at, retime, schedule
from latentlab.seeds import noise
from latentlab.store import versions

__all__ = ["MANIFEST_VERSION", "PACINGS", "Keyframe", "MorphSettings", "Plan", "cache_dir", "clip_distance",
           "frame_key", "pixel_distance", "plan", "render_frame", "render_morph"]

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
PACINGS: tuple[str, ...] = ("none", "even")
#: Below this inversion round-trip PSNR (dB) an image keyframe gets a warning: the frame no longer looks like it.
IMAGE_KEYFRAME_MIN_PSNR = 20.0


@dataclass(frozen=True)
class Keyframe:
    """One keyframe: a prompt, a seed, an image, or several (missing prompt/seed carry over from the previous
    keyframe).

    An ``image`` (path to a png/jpg/webp) is encoded with the VAE and DDIM-inverted with the keyframe's prompt at
    the morph's steps and guidance: the resulting noise is the keyframe's point on the noise path (its seed is then
    unused). The frame at the keyframe approximates the image; the inversion's reconstruction PSNR is recorded in
    the manifest, with a warning below ``IMAGE_KEYFRAME_MIN_PSNR``. Inversion is most faithful at low guidance:
    on the embedded model, 10 steps, 21-26 dB at guidance 4 and about 13 dB at 7.5.
    """

    prompt: str | None = None
    seed: int | None = None
    image: str | None = None


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
    pacing: str = "none"
    pacing_samples: int = 8
    pacing_steps: int | None = None

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
        for i, k in enumerate(self.keyframes):
            if k.image is not None and not Path(k.image).is_file():
                raise FileNotFoundError(f"`keyframes[{i}].image` does not exist: {k.image}")
        _checks.positive_int(self.n_frames, "n_frames", minimum=2)
        if not (isinstance(self.fps, (int, float)) and 0 < self.fps <= 240):
            raise ValueError(f"`fps` must be in (0, 240], got {self.fps!r}")
        _checks.choice(self.noise_interpolation, "noise_interpolation", METHODS)
        _checks.choice(self.prompt_interpolation, "prompt_interpolation", METHODS)
        _checks.choice(self.noise_easing, "noise_easing", EASINGS)
        _checks.choice(self.prompt_easing, "prompt_easing", EASINGS)
        _checks.choice(self.pacing, "pacing", PACINGS)
        _checks.positive_int(self.pacing_samples, "pacing_samples", minimum=2)
        if self.pacing_steps is not None:
            _checks.positive_int(self.pacing_steps, "pacing_steps")

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
    """Where every frame of a morph lies on the noise path and on the prompt path, plus the keyframes.

    Inputs are computed per slice (:meth:`inputs`), so a 1,000-frame render never holds 1,000 latents or prompt
    embeddings at once.
    """

    settings: MorphSettings
    keys: list[torch.Tensor]
    conds: list[Conditioning]
    frames: list[dict] = field(default_factory=list)
    image_keyframes: list[dict] = field(default_factory=list)

    def inputs(self, start: int, stop: int) -> tuple[torch.Tensor, Conditioning]:
        """Initial latents (n, C, h, w) and conditioning (n items) of frames ``start:stop``."""
        fr = self.frames[start:stop]
        s = self.settings
        lat = path_at(self.keys, [f["noise_segment"] for f in fr], [f["noise_t"] for f in fr],
                      method=s.noise_interpolation, loop=s.loop)[:, 0]
        cond = Conditioning.cat(self.conds).map(
            lambda t: path_at([x.float().cpu().unsqueeze(0) for x in t], [f["prompt_segment"] for f in fr],
                              [f["prompt_t"] for f in fr], method=s.prompt_interpolation, loop=s.loop)[:, 0].to(t.dtype)
        )
        return lat, cond

    @property
    def latents(self) -> torch.Tensor:
        return self.inputs(0, len(self.frames))[0]

    @property
    def conditioning(self) -> Conditioning:
        return self.inputs(0, len(self.frames))[1]


def pixel_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The weight-free default distance between consecutive frames: RMS pixel difference (images in [0, 1],
    area-downsampled to at most 64 px so large models' previews cost little). Returns one value per pair."""
    side = max(a.shape[-2:])
    if side > 64:
        size = (max(1, a.shape[-2] * 64 // side), max(1, a.shape[-1] * 64 // side))
        a = torch.nn.functional.interpolate(a, size=size, mode="area")
        b = torch.nn.functional.interpolate(b, size=size, mode="area")
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


def clip_distance(clip) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A distance from a :class:`latentlab.clip.CLIP`: ``1 - cos`` of the image embeddings."""

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        e = clip.embed_images(torch.cat([a, b]))
        return (1 - (e[: len(a)] * e[len(a) :]).sum(1)).clamp(min=0)

    distance.__name__ = f"clip:{clip.model_id}"
    return distance


def plan(lab: Generator, settings: MorphSettings, *, distance=None, frames: list[dict] | None = None) -> Plan:
    """Where every frame lies on both paths (cheap unless ``settings.pacing == "even"``).

    With ``frames`` (a manifest's per-frame records) those positions are used as they are: that is how a single
    frame is re-created without re-running the pacing previews.

    Pacing ``"even"``: every segment is previewed at ``pacing_samples + 1`` evenly spaced points (both paths
    linear, ``pacing_steps`` denoising steps), the change between consecutive previews is measured with
    ``distance`` (default :func:`pixel_distance`; :func:`clip_distance` for a perceptual one) and the segment is
    re-timed with :func:`latentlab.paths.retime` so that frames change by about the same amount. Easing composes
    on top: a frame's ``t`` is ``retime(ease(raw))``, so easing still shapes the (now perceptual) speed and frames
    still land exactly on the keyframes.
    """
    prompts, seeds = settings.resolved()
    shape = (1, *lab.latent_shape(height=settings.height, width=settings.width))
    keys = [noise(s, shape) for s in seeds]
    conds = [lab.encode_prompt(p) for p in prompts]
    images = []
    for i, k in enumerate(settings.keyframes):
        if k.image is not None:
            keys[i], note = _image_key(lab, k.image, conds[i], shape, settings)
            images.append({"keyframe": i, **note})
    if frames is not None:
        if len(frames) != settings.n_frames:
            raise ValueError(f"`frames` must have {settings.n_frames} records, got {len(frames)}")
        return Plan(settings, keys, conds, [dict(f) for f in frames], images)
    k = len(prompts)
    ns = schedule(k, settings.n_frames, loop=settings.loop, easing=settings.noise_easing)
    ps = schedule(k, settings.n_frames, loop=settings.loop, easing=settings.prompt_easing)
    records = [
        {"index": i, "noise_segment": ns.segment[i], "noise_t": ns.t[i], "prompt_segment": ps.segment[i],
         "prompt_t": ps.t[i]}
        for i in range(settings.n_frames)
    ]
    if settings.pacing == "even":
        records = _pace(lab, settings, keys, conds, records, ns, ps, distance or pixel_distance)
    return Plan(settings, keys, conds, records, images)


def _image_key(lab, path: str, cond: Conditioning, shape, settings) -> torch.Tensor:
    """An image keyframe's noise: load, fit to the model's size (centre crop, area resize), encode, DDIM-invert."""
    from latentlab.video import read_image

    f = getattr(lab, "vae_scale_factor", 8)
    h, w = shape[2] * f, shape[3] * f
    img = read_image(path)
    ih, iw = img.shape[2:]
    scale = max(h / ih, w / iw)
    nh, nw = max(h, round(ih * scale)), max(w, round(iw * scale))
    img = torch.nn.functional.interpolate(img, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - h) // 2, (nw - w) // 2
    img = img[:, :, top : top + h, left : left + w].clamp(0, 1)
    g = settings.guidance_scale if settings.guidance_scale is not None else getattr(lab, "guidance_scale", 1.0)
    inv = lab.invert(lab.encode(img), cond, num_inference_steps=settings.num_inference_steps, guidance_scale=g)
    psnr = float(inv.psnr[0])
    log.info("image keyframe %s: inversion round trip %.1f dB", path, psnr)
    if psnr < IMAGE_KEYFRAME_MIN_PSNR:
        warnings.warn(f"image keyframe {path}: the morph reproduces it at only {psnr:.1f} dB "
                      f"(guidance_scale={g:g}, {settings.num_inference_steps} steps); DDIM inversion drifts under "
                      "classifier-free guidance: a lower guidance_scale (1-4) or more steps keeps the image",
                      RuntimeWarning, stacklevel=3)
    note = {"image": path, "sha256": _file_digest(path), "inversion_psnr_db": round(psnr, 2)}
    return inv.noise.to(torch.float32), note


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _pace(lab, settings, keys, conds, records, ns, ps, distance):
    n_seg = ns.n_segments
    m = settings.pacing_samples
    grid = [j / m for j in range(m + 1)]
    probe = Plan(settings, keys, conds, [
        {"noise_segment": s, "noise_t": g, "prompt_segment": s, "prompt_t": g} for s in range(n_seg) for g in grid
    ])
    steps = settings.pacing_steps or max(2, (settings.num_inference_steps or getattr(lab, "num_inference_steps", 8)) // 2)
    lat, cond = probe.inputs(0, len(probe.frames))
    log.info("pacing: previewing %d points at %d steps", len(lat), steps)
    images = lab.generate(lat, cond, negative_prompt=settings.negative_prompt, num_inference_steps=steps,
                          guidance_scale=settings.guidance_scale)
    images = images.view(n_seg, m + 1, *images.shape[1:])
    per_seg = [distance(images[s, :-1], images[s, 1:]).double() for s in range(n_seg)]
    out = []
    for r in records:
        r = dict(r)
        raw_n = ns.position[r["index"]] - ns.segment[r["index"]]
        raw_p = ps.position[r["index"]] - ps.segment[r["index"]]
        r["noise_t"] = float(retime(grid, per_seg[r["noise_segment"]], ease(raw_n, settings.noise_easing))[0])
        r["prompt_t"] = float(retime(grid, per_seg[r["prompt_segment"]], ease(raw_p, settings.prompt_easing))[0])
        out.append(r)
    return out


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


def cache_dir(video: str | os.PathLike) -> Path:
    """Where finished frames of ``video`` are kept until it is complete: ``.morph.mp4.frames/`` beside it."""
    video = Path(video)
    return video.with_name(f".{video.name}.frames")


def frame_key(lab, latents: torch.Tensor, conditioning: Conditioning, *, negative_prompt, num_inference_steps,
              guidance_scale) -> str:
    """Hash of everything that determines one frame's pixels: the model (:meth:`Lab.fingerprint`), scheduler,
    steps, guidance, negative prompt, how the backend batches (batch size / invariance, device, dtype), the
    versions of torch/diffusers/latentlab, and the exact bytes of the frame's initial latent and conditioning."""
    h = hashlib.sha256()
    fp = lab.fingerprint() if hasattr(lab, "fingerprint") else lab.model_id
    batching = getattr(lab, "_resolve_batch", None)
    meta = {
        "model": fp, "scheduler": _scheduler_record(lab), "steps": num_inference_steps, "guidance": guidance_scale,
        "negative": negative_prompt, "batching": batching(1, None) if batching else None,
        "device": str(getattr(lab, "device", "")), "dtype": str(getattr(lab, "dtype", "")), "versions": versions(),
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for t in (latents, conditioning.prompt_embeds, conditioning.pooled_prompt_embeds):
        if t is not None:
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8: what is cached and what the video encoder receives."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def render_morph(
    lab,
    settings: MorphSettings,
    output: str | os.PathLike,
    *,
    batch_size: int = 16,
    upscale: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    distance=None,
    keep_cache: bool = False,
) -> Path:
    """Render ``settings`` with ``lab`` to ``output`` (.mp4/.gif) and write its manifest; returns the video path.

    1. Validation (output suffix, existing files, sizes) happens before any model work.
    2. Frames are planned (:func:`plan`; pacing previews if asked), then generated ``batch_size`` at a time and
       streamed to the encoder: memory stays flat however long the video.
    3. Every finished frame is also stored in :func:`cache_dir` under its :func:`frame_key`. A render that is
       killed and run again takes its finished frames from there and produces identical frames (the backend is
       batch-invariant on CPU); the cache is removed after success unless ``keep_cache``.
    4. The video is written under a temporary name and renamed into place; the manifest last.
    """
    import shutil

    from tqdm.auto import tqdm

    from latentlab import store
    from latentlab.video import VideoWriter

    output = Path(output)
    man = manifest_path(output)
    if man.exists() and not overwrite:
        raise FileExistsError(f"{man} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    _checks.positive_int(batch_size, "batch_size")
    writer = VideoWriter(output, fps=settings.fps, upscale=upscale, overwrite=overwrite)
    p = plan(lab, settings, distance=distance)
    steps = settings.num_inference_steps
    kw = dict(negative_prompt=settings.negative_prompt, num_inference_steps=steps,
              guidance_scale=settings.guidance_scale)
    cache = cache_dir(output)
    cache.mkdir(exist_ok=True)
    reused = 0
    with writer, tqdm(total=settings.n_frames, desc="frames", unit="frame", disable=not progress) as bar:
        for start in range(0, settings.n_frames, batch_size):
            stop = min(settings.n_frames, start + batch_size)
            lat, cond = p.inputs(start, stop)
            keys = [frame_key(lab, lat[i : i + 1], cond[i], **kw) for i in range(stop - start)]
            frames: list[np.ndarray | None] = [None] * (stop - start)
            for i, key in enumerate(keys):
                f = cache / f"{key}.safetensors"
                if f.is_file():
                    frames[i] = store.load(f)[0]["frame"].numpy()
                    reused += 1
            todo = [i for i, fr in enumerate(frames) if fr is None]
            if todo:
                images = _to_uint8(lab.generate(lat[todo], cond[todo], **kw))
                for i, img in zip(todo, images):
                    frames[i] = img
                    store.save(cache / f"{keys[i]}.safetensors", {"frame": torch.from_numpy(img)},
                               provenance={"index": start + i, "video": output.name}, overwrite=True)
            writer.append(np.stack(frames))
            for i in range(stop - start):
                p.frames[start + i]["key"] = keys[i]
            bar.update(stop - start)
    if reused:
        log.info("resumed: %d of %d frames came from %s", reused, settings.n_frames, cache)
    prompts, seeds = settings.resolved()
    _write_json_atomic(man, {
        "manifest_version": MANIFEST_VERSION,
        "video": output.name,
        "model": lab.model_id,
        "model_fingerprint": lab.fingerprint() if hasattr(lab, "fingerprint") else None,
        "num_inference_steps": steps if steps is not None else getattr(lab, "num_inference_steps", None),
        "guidance_scale": settings.guidance_scale if settings.guidance_scale is not None
        else getattr(lab, "guidance_scale", None),
        "scheduler": _scheduler_record(lab),
        "settings": settings.to_dict(),
        "pacing_distance": None if settings.pacing == "none" else getattr(distance or pixel_distance, "__name__", "?"),
        "resolved_keyframes": [{"prompt": pr, "seed": s} for pr, s in zip(prompts, seeds)],
        "upscale": upscale,
        "frames_reused_from_cache": reused,
        "image_keyframes": p.image_keyframes,
        "frames": p.frames,
        "versions": versions(),
    })
    if not keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    return output


def render_frame(lab, manifest: str | os.PathLike | dict, index: int) -> torch.Tensor:
    """Re-create frame ``index`` of a rendered morph from its manifest: (1, 3, H, W) in [0, 1].

    Uses the manifest's own per-frame positions (so paced renders need no previews) and warns if the model's
    fingerprint differs from the one that rendered the video.
    """
    data = manifest if isinstance(manifest, dict) else json.loads(Path(manifest).read_text())
    if data.get("manifest_version") != MANIFEST_VERSION:
        raise ValueError(f"unsupported manifest version {data.get('manifest_version')!r}")
    settings = MorphSettings.from_dict(data["settings"])
    _checks.positive_int(index, "index", minimum=0)
    if index >= settings.n_frames:
        raise ValueError(f"`index` must be < {settings.n_frames} (the number of frames), got {index}")
    fp = data.get("model_fingerprint")
    if fp and hasattr(lab, "fingerprint") and lab.fingerprint() != fp:
        warnings.warn(f"the manifest was rendered by model {data['model']!r} with fingerprint {fp}, this one is "
                      f"{lab.fingerprint()}: the frame will differ", RuntimeWarning, stacklevel=2)
    p = plan(lab, settings, frames=data["frames"])
    recorded = {d["keyframe"]: d["sha256"] for d in data.get("image_keyframes", [])}
    for d in p.image_keyframes:
        if recorded.get(d["keyframe"]) not in (None, d["sha256"]):
            warnings.warn(f"keyframe image {d['image']} changed since the render: the frame will differ",
                          RuntimeWarning, stacklevel=2)
    lat, cond = p.inputs(index, index + 1)
    return lab.generate(lat, cond, negative_prompt=settings.negative_prompt,
                        num_inference_steps=data["num_inference_steps"], guidance_scale=data["guidance_scale"])


def frames_for_duration(seconds: float, fps: float) -> int:
    """Exact frame count for a duration: ``round(seconds * fps)`` (at least 2)."""
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"`seconds` must be a positive number, got {seconds!r}")
    return max(2, round(seconds * fps))
