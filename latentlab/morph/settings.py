"""Morph settings: keyframes and everything else that determines the frames of a morph, validated on construction.

A keyframe without a seed keeps the previous keyframe's seed (the first defaults to 0); one without a prompt keeps
the previous prompt. So ``["a red star", "a blue ring"]`` morphs the prompt at a fixed seed, and one prompt with
several seeds is a seed walk.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from latentlab import _checks
from latentlab.paths import EASINGS, METHODS
from latentlab.sampling import Sampling, check_prompt

__all__ = ["AUDIO_PACINGS", "MAX_FRAMES", "PACINGS", "PROMPT_METHODS", "AudioTrack", "Keyframe", "Mix",
           "MorphSettings", "frames_for_duration"]

PACINGS: tuple[str, ...] = ("none", "even")
#: How the prompt path moves between keyframes: ``"auto"`` (the default): the model's own choice
#: (``Backend.default_prompt_interpolation``: ``"attention"`` for the UNet family, else ``"lerp"``; the plan
#: resolves it, manifests record both); an interpolation of the prompt encodings
#: (:data:`latentlab.paths.METHODS`); ``"mix"``: every frame is denoised with both keyframes' prompts and their predictions are mixed
#: (:class:`latentlab.backend.PredictionMix`; twice the work, no in-between encoding that names a third thing); or
#: ``"attention"``: every attention over the text sees both prompts' tokens, shared by the frame's weight
#: (:class:`latentlab.backend.AttentionMix`, AID's fused interpolation; SD, SDXL, SD3, Flux.1).
PROMPT_METHODS: tuple[str, ...] = ("auto", *METHODS, "mix", "attention")
#: How music paces a morph: the path moves faster where the music is loud/percussive ("envelope"), keyframes land
#: on beats ("beats"), or the audio is only muxed ("none").
AUDIO_PACINGS: tuple[str, ...] = ("envelope", "beats", "none")
#: More frames than this is refused up front: a plan holds a small record per frame (~300 bytes) and a video of a
#: million frames runs 23 hours at 12 fps; a typo (``--frames 100000000``) should not start a 30 GB plan.
MAX_FRAMES = 1_000_000
_PLAN_BYTES_PER_FRAME = 300


@dataclass(frozen=True)
class Mix:
    """A keyframe that lies between known items, e.g. a point clicked on a map: its noise is the spherical blend
    (:func:`latentlab.ops.blend`) of the noise of ``seeds`` with ``seed_weights``, its conditioning the weighted
    mean of the encodings of ``prompts`` with ``prompt_weights``. Re-creatable from the manifest, like a seed."""

    seeds: tuple[int, ...]
    seed_weights: tuple[float, ...]
    prompts: tuple[str, ...]
    prompt_weights: tuple[float, ...]

    def __post_init__(self):
        for name, values, kind in (("seeds", self.seeds, int), ("prompts", self.prompts, str)):
            if not isinstance(values, tuple) or not values or not all(
                    isinstance(v, kind) and not isinstance(v, bool) for v in values):
                raise TypeError(f"`mix.{name}` must be a non-empty tuple of {kind.__name__}, got {values!r}")
        for name, w, n in (("seed_weights", self.seed_weights, len(self.seeds)),
                           ("prompt_weights", self.prompt_weights, len(self.prompts))):
            if not isinstance(w, tuple) or len(w) != n:
                raise ValueError(f"`mix.{name}` must have {n} weights, got {w!r}")
            vals = [_checks.real(x, f"mix.{name}", low=0.0) for x in w]
            if sum(vals) <= 0:
                raise ValueError(f"`mix.{name}` must not all be zero")
        for s in self.seeds:
            _checks.seed(s, "mix.seeds")
        for i, p in enumerate(self.prompts):
            check_prompt(p, f"mix.prompts[{i}]")


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
    mix: Mix | None = None


@dataclass(frozen=True)
class AudioTrack:
    """The part of an audio file a morph follows, and what the analysis found in it (recorded in the manifest).

    ``offset``/``duration``: seconds of the file used (the video lasts ``duration``). ``envelope``: the onset
    strength heard during each video frame, normalised to a maximum of 1 (:func:`latentlab.audio.frame_envelope`).
    ``beats``: beat times in seconds from ``offset``. ``analysis``: how they were computed (sample rate, STFT
    window and hop, the beat tracker).
    """

    path: str
    sha256: str
    offset: float
    duration: float
    pacing: str = "envelope"
    envelope: tuple[float, ...] = ()
    beats: tuple[float, ...] = ()
    analysis: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        _checks.choice(self.pacing, "audio_pacing", AUDIO_PACINGS)
        _checks.real(self.offset, "audio_offset", low=0.0)
        _checks.real(self.duration, "audio duration", low=0.0, low_inclusive=False)
        for i, v in enumerate(self.envelope):
            _checks.real(v, f"audio envelope[{i}]", low=0.0, high=1.0)
        if any(b < 0 for b in self.beats) or any(b2 <= b1 for b1, b2 in zip(self.beats, self.beats[1:])):
            raise ValueError("audio beats must be non-negative and increasing")


@dataclass(frozen=True)
class MorphSettings:
    """Everything that determines the frames of a morph (serialised into the manifest).

    The prompt path (``prompt_interpolation``, :data:`PROMPT_METHODS`): by default (``"auto"``) a UNet model (SD,
    SDXL) denoises every in-between with both keyframes' prompts in every cross attention, shared by the frame's
    weight (``"attention"``, :class:`~latentlab.backend.AttentionMix`, AID's fused interpolation; the cost of
    ``"lerp"``); other models interpolate the prompt encodings (``"lerp"``; SD3 and Flux.1 take ``"attention"``
    when asked, but on the SD3-layout flow twin it measured no cleaner at 1.6x the time). Measured on
    the embedded model (BENCHMARKS.md): between held-out prompts one attribute apart 83.5 % of attention in-betweens
    read as one of the two prompts' attributes against 72.2 % with lerp (random pairs: 72.0 % against 53.8 %), with
    more monotonic morphs and a shorter perceptual path, but the change comes in sharper steps; ``pacing="even"``
    evens them out (lerp's smoothness, 80.6 % clean). ``"mix"`` mixes the two prompts' predictions (twice the
    work). A morph whose keyframes all share one prompt (a seed walk) has nothing to mix and does none.

    ``sampling`` holds steps, guidance, negative prompt and scheduler (``None`` fields: the model's defaults,
    resolved by the backend and recorded complete in the manifest).
    """

    keyframes: tuple[Keyframe, ...]
    n_frames: int = 48
    fps: float = 12.0
    loop: bool = False
    noise_interpolation: str = "slerp"
    noise_easing: str = "linear"
    prompt_interpolation: str = "auto"
    prompt_easing: str = "linear"
    sampling: Sampling = field(default_factory=Sampling)
    height: int | None = None
    width: int | None = None
    pacing: str = "none"
    pacing_samples: int = 8
    pacing_steps: int | None = None
    pacing_refine: int = 0
    keyframe_times: tuple[float, ...] | None = None
    audio: AudioTrack | None = None

    def __post_init__(self):
        if not isinstance(self.keyframes, tuple) or len(self.keyframes) < 2:
            raise ValueError(f"`keyframes` must be a tuple of at least 2 Keyframe, got {self.keyframes!r}")
        for i, k in enumerate(self.keyframes):
            if not isinstance(k, Keyframe):
                raise TypeError(f"`keyframes[{i}]` must be a Keyframe, got {type(k).__name__}")
            if k.seed is not None and (isinstance(k.seed, bool) or not isinstance(k.seed, int) or not 0 <= k.seed < 2**64):
                raise ValueError(f"`keyframes[{i}].seed` must be an int in [0, 2**64), got {k.seed!r}")
            if k.prompt is not None:
                check_prompt(k.prompt, f"keyframes[{i}].prompt")
        if self.keyframes[0].prompt is None and self.keyframes[0].mix is None:
            raise ValueError("the first keyframe needs a prompt")
        for i, k in enumerate(self.keyframes):
            if k.mix is not None and not isinstance(k.mix, Mix):
                raise TypeError(f"`keyframes[{i}].mix` must be a Mix, got {type(k.mix).__name__}")
        for i, k in enumerate(self.keyframes):
            if k.image is not None and not Path(k.image).is_file():
                raise FileNotFoundError(f"`keyframes[{i}].image` does not exist: {k.image}")
        _checks.positive_int(self.n_frames, "n_frames", minimum=2)
        if self.n_frames > MAX_FRAMES:
            raise ValueError(f"`n_frames` must be <= {MAX_FRAMES:,}, got {self.n_frames:,} (its plan alone would need "
                             f"~{self.n_frames * _PLAN_BYTES_PER_FRAME / 2**30:.1f} GiB of memory)")
        _checks.frame_rate(self.fps)
        if not isinstance(self.loop, bool):
            raise TypeError(f"`loop` must be a bool, got {type(self.loop).__name__}")
        _checks.choice(self.noise_interpolation, "noise_interpolation", METHODS)
        _checks.choice(self.prompt_interpolation, "prompt_interpolation", PROMPT_METHODS)
        _checks.choice(self.noise_easing, "noise_easing", EASINGS)
        _checks.choice(self.prompt_easing, "prompt_easing", EASINGS)
        if not isinstance(self.sampling, Sampling):
            raise TypeError(f"`sampling` must be a latentlab.Sampling, got {type(self.sampling).__name__}")
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                _checks.positive_int(getattr(self, name), name)
        _checks.choice(self.pacing, "pacing", PACINGS)
        _checks.positive_int(self.pacing_samples, "pacing_samples", minimum=2)
        _checks.positive_int(self.pacing_refine, "pacing_refine", minimum=0)
        if self.pacing_steps is not None:
            _checks.positive_int(self.pacing_steps, "pacing_steps")
        duration = self.n_frames / self.fps
        if self.keyframe_times is not None:
            times = self.keyframe_times
            if not isinstance(times, tuple) or len(times) != len(self.keyframes):
                raise ValueError(f"`keyframe_times` (--at) must give one time per keyframe: {len(self.keyframes)} "
                                 f"keyframes, got {len(times) if isinstance(times, tuple) else times!r}")
            vals = [_checks.real(t, "keyframe_times", low=0.0) for t in times]
            if any(b <= a for a, b in itertools.pairwise(vals)):
                raise ValueError(f"`keyframe_times` (--at) must increase, got {list(vals)}")
            last = (self.n_frames - 1) / self.fps
            if vals[-1] > last + 1e-9 or (self.loop and vals[-1] >= duration):
                raise ValueError(f"`keyframe_times` (--at) must lie inside the video (0 to {last:g} s at {self.fps:g} "
                                 f"fps, {self.n_frames} frames), got {vals[-1]:g}")
            if self.loop and vals[0] != 0:
                raise ValueError(f"`keyframe_times` (--at) of a loop must start at 0, got {vals[0]:g}")
        if self.audio is not None:
            if not isinstance(self.audio, AudioTrack):
                raise TypeError(f"`audio` must be an AudioTrack, got {type(self.audio).__name__}")
            if self.audio.pacing == "envelope" and len(self.audio.envelope) != self.n_frames:
                raise ValueError(f"`audio.envelope` must have one value per frame ({self.n_frames}), got "
                                 f"{len(self.audio.envelope)}")
            if self.audio.pacing == "beats" and self.keyframe_times is not None:
                raise ValueError("--audio-pacing beats places the keyframes on beats; it cannot be combined with --at")

    def resolved(self) -> tuple[list[str], list[int]]:
        """Prompts and seeds of every keyframe after carrying missing values forward."""
        prompts, seeds = [], []
        prompt, seed = None, 0
        for k in self.keyframes:
            if k.mix is not None and k.prompt is None:
                prompt = k.mix.prompts[max(range(len(k.mix.prompts)), key=lambda j: k.mix.prompt_weights[j])]
            prompt = k.prompt if k.prompt is not None else prompt
            seed = k.seed if k.seed is not None else seed
            prompts.append(prompt)
            seeds.append(seed)
        return prompts, seeds

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MorphSettings:
        """The inverse of :meth:`to_dict` (unknown keys are an error)."""
        if not isinstance(d, dict):
            raise TypeError(f"`settings` must be a dict, got {type(d).__name__}")
        d = dict(d)
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"`settings` has unknown key(s) {sorted(unknown)}")
        if not isinstance(d.get("keyframes"), (list, tuple)):
            raise ValueError("`settings.keyframes` must be a list of keyframes")
        d["keyframes"] = tuple(
            Keyframe(**{**k, "mix": None if k.get("mix") is None else Mix(**{key: tuple(v) for key, v in k["mix"].items()})})
            for k in d["keyframes"])
        d["sampling"] = Sampling.from_dict(d.get("sampling") or {})
        if d.get("keyframe_times") is not None:
            d["keyframe_times"] = tuple(d["keyframe_times"])
        if d.get("audio") is not None:
            a = dict(d["audio"])
            for key in ("envelope", "beats"):
                a[key] = tuple(a.get(key) or ())
            a["analysis"] = tuple(tuple(x) for x in a.get("analysis") or ())
            d["audio"] = AudioTrack(**a)
        return cls(**d)


def frames_for_duration(seconds: float, fps: float) -> int:
    """Exact frame count for a duration: ``round(seconds * fps)``; a duration shorter than two frames is refused.

    >>> frames_for_duration(4, 12)
    48
    """
    seconds = _checks.real(seconds, "seconds", low=0.0, low_inclusive=False)
    fps = _checks.frame_rate(fps)
    n = round(seconds * fps)
    if n < 2:
        raise ValueError(f"`seconds` {seconds:g} at {fps:g} fps gives {n} frame(s); a morph needs at least 2")
    if not math.isfinite(n) or n > MAX_FRAMES:
        raise ValueError(f"`seconds` {seconds:g} at {fps:g} fps gives {n:,} frames, more than {MAX_FRAMES:,}")
    return n
