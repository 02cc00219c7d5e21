"""Music videos: an audio track analysed into an :class:`AudioTrack`, and where it puts every frame on the path.

One responsibility: timing from sound and from seconds. :func:`analyse` decodes the selected part of a file
(the bundled ffmpeg) and measures it (:mod:`latentlab.audio`: spectral-flux onset strength per frame, beats);
:func:`frame_positions` turns a morph's keyframe times (``--at``), beats and envelope into each frame's position
along the keyframe path, which :func:`latentlab.morph.plan` uses instead of even spacing:

- ``--at t0 t1 ...``: keyframe ``k`` is reached at ``t_k`` seconds (frame ``t_k * fps``);
- ``envelope``: between those anchors (by default the first and last frame) the path advances in proportion to the
  onset strength heard during each frame (plus a small floor, so a quiet passage still moves): fast on the drums,
  slow in the silences;
- ``beats``: keyframes land on beats (the frame nearest each chosen beat), spread over the track.

The audio is muxed into the finished silent mp4 in a separate atomic step (:func:`latentlab.video.mux_audio`), so
frames, cache and resume never depend on it.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from pathlib import Path

import numpy as np

from latentlab import _checks
from latentlab import audio as _audio
from latentlab.morph.settings import AUDIO_PACINGS, AudioTrack, MorphSettings, frames_for_duration

__all__ = ["ENVELOPE_FLOOR", "analyse", "frame_positions"]

#: Share of the mean envelope added to every frame's advance: silence still moves the path, slowly.
ENVELOPE_FLOOR = 0.1


def analyse(path: str | Path, *, fps: float, offset: float = 0.0, seconds: float | None = None,
            n_frames: int | None = None, pacing: str = "envelope") -> tuple[AudioTrack, int]:
    """Decode and measure ``seconds`` of ``path`` from ``offset`` (default: to the end of the track, or
    ``n_frames / fps`` when ``n_frames`` is given); returns the :class:`AudioTrack` and the number of frames.

    Every problem is a ``ValueError``/``FileNotFoundError`` naming the option, raised before any model work:
    a missing or undecodable file, a negative offset or one past the end, a selection shorter than two frames or
    longer than what is left of the track, and silence when the pacing needs sound.
    """
    from latentlab.video import AUDIO_FORMATS, decode_audio

    path = Path(path)
    _checks.choice(pacing, "--audio-pacing", AUDIO_PACINGS)
    fps = _checks.frame_rate(fps)
    offset = _checks.real(offset, "--audio-offset", low=0.0)
    if not path.is_file():
        raise FileNotFoundError(f"--audio does not exist: {path}")
    if path.suffix.lower() not in AUDIO_FORMATS:
        raise ValueError(f"--audio must be an audio file ({', '.join(AUDIO_FORMATS)}), got {path.name}")
    y = decode_audio(path, sr=_audio.SAMPLE_RATE, name="--audio")
    total = len(y) / _audio.SAMPLE_RATE
    if offset >= total:
        raise ValueError(f"--audio-offset {offset:g} s is past the end of {path.name} ({total:.2f} s long)")
    left = total - offset
    if n_frames is not None:
        n_frames = _checks.positive_int(n_frames, "--frames", minimum=2)
        duration = n_frames / fps
    elif seconds is not None:
        n_frames = frames_for_duration(seconds, fps)
        duration = n_frames / fps
    else:
        n_frames = math.floor(left * fps)
        if n_frames < 2:
            raise ValueError(f"{path.name} has {left:.3f} s left after --audio-offset {offset:g}: shorter than two "
                             f"frames at {fps:g} fps")
        n_frames = frames_for_duration(n_frames / fps, fps)
        duration = n_frames / fps
    if duration > left + 0.5 / fps:
        raise ValueError(f"{path.name} has {left:.2f} s of audio after --audio-offset {offset:g}, shorter than the "
                         f"{duration:.2f} s video ({n_frames} frames at {fps:g} fps): use a shorter --seconds/--frames")
    start = round(offset * _audio.SAMPLE_RATE)
    sel = y[start : start + round(duration * _audio.SAMPLE_RATE)]
    if pacing != "none" and (sel.size == 0 or float(np.abs(sel).max()) < 1e-4):
        raise ValueError(f"the selected part of {path.name} is silent: nothing to pace the morph by (use "
                         "--audio-pacing none to only add it to the video)")
    strength = _audio.onset_strength(sel) if pacing != "none" else None
    env = _audio.frame_envelope(strength, n_frames, fps) if pacing == "envelope" else ()
    beat_times = tuple(round(float(b), 6) for b in _audio.beats(sel, envelope=strength)) if pacing == "beats" else ()
    try:
        import librosa  # noqa: F401
        tracker = "librosa.beat.beat_track"
    except ImportError:
        tracker = "onset autocorrelation (install latentlab[audio] for librosa's tracker)"
    track = AudioTrack(
        path=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest(), offset=offset, duration=duration,
        pacing=pacing, envelope=tuple(round(float(v), 6) for v in env), beats=beat_times,
        analysis=(("sample_rate", str(_audio.SAMPLE_RATE)), ("n_fft", str(_audio.N_FFT)), ("hop", str(_audio.HOP)),
                  ("onset_strength", "log spectral flux"), ("envelope_floor", str(ENVELOPE_FLOOR)),
                  ("beat_tracker", tracker if pacing == "beats" else "")))
    return track, n_frames


def _anchors(settings: MorphSettings) -> tuple[list[float], list[float]] | None:
    """(frame, keyframe position) pairs the path must pass through, or None for even spacing."""
    n, fps, k = settings.n_frames, settings.fps, len(settings.keyframes)
    n_seg = k if settings.loop else k - 1
    end = float(n if settings.loop else n - 1)  # a loop reaches keyframe 0 again one frame after the last
    audio = settings.audio
    if settings.keyframe_times is not None:
        frames = [t * fps for t in settings.keyframe_times]
    elif audio is not None and audio.pacing == "beats":
        beats = [b * fps for b in audio.beats if b * fps <= n - 1]
        if len(beats) < k:
            raise ValueError(f"--audio-pacing beats: the selected audio has {len(beats)} beat(s) for {k} keyframes; "
                             "use fewer keyframes, a longer selection, or --audio-pacing envelope")
        pick = np.round(np.linspace(0, len(beats) - 1, k)).astype(int) if not settings.loop else \
            np.round(np.linspace(0, len(beats), k + 1)[:-1]).astype(int)
        frames = [float(round(beats[i])) for i in pick]  # the frame nearest each chosen beat shows the keyframe
        if any(b <= a for a, b in itertools.pairwise(frames)):
            raise ValueError(f"--audio-pacing beats: {k} keyframes do not fit on distinct frames of the beats; "
                             "raise --fps or use fewer keyframes")
    elif audio is not None and audio.pacing == "envelope":
        return [0.0, end], [0.0, float(n_seg)]
    else:
        return None
    positions = list(range(k))
    if settings.loop:
        frames, positions = frames + [end], positions + [k]
    return frames, [float(p) for p in positions]


def frame_positions(settings: MorphSettings) -> list[float] | None:
    """Each frame's position along the keyframe path (keyframe units), or None when frames are spread evenly.

    Between consecutive anchors (keyframe times or beats; else the first and last frame) the position advances
    linearly in time, or -- with an ``envelope`` audio track -- in proportion to the cumulative onset strength
    (plus :data:`ENVELOPE_FLOOR` of its mean), so the largest frame-to-frame changes fall on the onsets.
    Frames before the first anchor hold the first keyframe, after the last the last one.
    """
    anchors = _anchors(settings)
    if anchors is None:
        return None
    frames, positions = np.asarray(anchors[0]), np.asarray(anchors[1])
    n = settings.n_frames
    audio = settings.audio
    if audio is not None and audio.pacing == "envelope":
        env = np.asarray(audio.envelope, dtype=np.float64)
        step = env + ENVELOPE_FLOOR * max(float(env.mean()), 1e-6)  # step[i]: the advance into frame i
        clock = np.concatenate([[0.0], np.cumsum(step[1:])])  # warped time at every frame
        clock = np.concatenate([clock, [clock[-1] + float(step.mean())]])  # one frame further (a loop's seam)
    else:
        clock = np.arange(n + 1, dtype=np.float64)
    at = np.interp(frames, np.arange(n + 1), clock)  # the anchors on the (warped) clock
    out = np.interp(clock[:n], at, positions)  # before the first / after the last anchor: held
    n_seg = len(settings.keyframes) if settings.loop else len(settings.keyframes) - 1
    out = np.clip(out, 0.0, float(n_seg))
    if settings.loop:
        out = np.minimum(out, np.nextafter(float(n_seg), 0.0))
    # Anchors that fall on a frame land exactly (no float residue): that frame shows the keyframe itself.
    for f, p in zip(frames, positions):
        if float(f).is_integer() and 0 <= int(f) < n:
            out[int(f)] = p
    return [float(x) for x in out]
