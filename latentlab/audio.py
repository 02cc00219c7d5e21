"""Audio analysis for music videos: onset strength, onsets, beats, and what each video frame hears.

One responsibility: turn mono samples into timing -- pure numpy, no audio package needed. Decoding a file is the
video module's (the owner of the bundled ffmpeg: :func:`latentlab.video.decode_audio`).

- **Onset strength** by spectral flux (Bello et al., "A Tutorial on Onset Detection in Music Signals", 2005; the
  log-compressed variant of Böck & Widmer 2013): the half-wave-rectified increase of the log magnitude spectrum from
  one STFT frame to the next, summed over frequency. High where a note or a drum starts.
- **Onsets**: peaks of the onset strength above an adaptive threshold (local mean + ``delta`` x its spread).
- **Beats**: librosa's dynamic-programming beat tracker (Ellis 2007) when the optional ``latentlab[audio]`` extra
  is installed; otherwise a tempo from the onset-strength autocorrelation and the onsets nearest a regular grid.
- **Per-frame envelope**: the onset strength heard during each video frame (``[i / fps, (i + 1) / fps)``),
  which paces a morph: the path advances in proportion to it.
"""

from __future__ import annotations

import numpy as np

from latentlab import _checks

__all__ = ["HOP", "N_FFT", "SAMPLE_RATE", "beats", "frame_envelope", "onset_strength", "onsets"]

#: Analysis sample rate (Hz): audio is decoded to mono at this rate.
SAMPLE_RATE = 22050
#: STFT window and hop (samples): 46 ms windows every 11.6 ms.
N_FFT, HOP = 1024, 256


def _samples(y: object) -> np.ndarray:
    return _checks.real_values(y, "y", what="mono samples").astype(np.float32)


def _rate(sr: object, hop: object) -> int:
    """Check the sample rate and the hop (both positive ints); return the rate."""
    _checks.positive_int(hop, "hop")
    return _checks.positive_int(sr, "sr")


def _envelope(envelope: object) -> np.ndarray:
    env = _checks.real_values(envelope, "envelope", what="onset strengths, one per hop")
    if (env < 0).any():
        raise ValueError(f"`envelope` must be non-negative (an onset strength), got a minimum of {env.min():.4g}")
    return env


def onset_strength(y: np.ndarray, sr: int = SAMPLE_RATE, *, n_fft: int = N_FFT, hop: int = HOP) -> np.ndarray:
    """Spectral-flux onset strength, one value per hop; value ``j`` belongs to time ``j * hop / sr`` (the
    flux into the window centred there).

    >>> sr = 22050; y = np.zeros(sr); y[sr // 2] = 1.0          # one click at 0.5 s
    >>> env = onset_strength(y, sr)
    >>> round(int(np.argmax(env)) * HOP / sr, 2)
    0.5
    """
    y = _samples(y)
    sr, n_fft = _rate(sr, hop), _checks.positive_int(n_fft, "n_fft", minimum=2)
    pad = np.pad(y, (n_fft // 2, n_fft // 2 + hop), mode="reflect" if len(y) > n_fft else "constant")
    n = 1 + (len(pad) - n_fft) // hop
    frames = np.lib.stride_tricks.sliding_window_view(pad, n_fft)[::hop][:n] * np.hanning(n_fft).astype(np.float32)
    flux = np.empty(max(0, n - 1))
    prev = None
    for i in range(0, n, 2048):  # in blocks: flat memory on long tracks
        mag = np.log1p(10.0 * np.abs(np.fft.rfft(frames[i : i + 2048], axis=1))).astype(np.float32)
        block = mag if prev is None else np.concatenate([prev, mag])
        d = np.maximum(0.0, np.diff(block, axis=0)).sum(axis=1)
        flux[max(0, i - 1) : max(0, i - 1) + len(d)] = d
        prev = mag[-1:]
    # flux[j] compares the windows centred at (j + 1) and j hops; a log spectrum sees an impulse as soon as it enters
    # a window's edge, so the rise is attributed one hop later (measured: clicks 0.2 ms late, tone bursts 5 ms late).
    # The first two values have no earlier window to compare with: they repeat the first measured one.
    first = flux[:1] if len(flux) else np.zeros(1)
    return np.concatenate([first, first, flux])[: 1 + len(y) // hop].astype(np.float64)


def onsets(envelope: np.ndarray, sr: int = SAMPLE_RATE, *, hop: int = HOP, delta: float = 0.07,
           wait: float = 0.03) -> np.ndarray:
    """Onset times (seconds): peaks of the normalised ``envelope`` (0 to 1) that are the maximum within +-30 ms
    and exceed their +-100 ms neighbourhood's mean by ``delta``, at least ``wait`` seconds apart (the peak
    picking of Böck et al. 2012, as librosa's ``onset_detect`` does it).

    >>> sr = 22050; y = np.zeros(2 * sr); y[[5000, 20000, 33000]] = 1.0
    >>> np.round(onsets(onset_strength(y, sr), sr), 2).tolist()
    [0.23, 0.91, 1.5]
    """
    env = _envelope(envelope)
    sr = _rate(sr, hop)
    delta = _checks.real(delta, "delta", low=0.0)
    wait = _checks.real(wait, "wait", low=0.0)
    if env.max() - env.min() <= 0:
        return np.zeros(0)
    env = (env - env.min()) / (env.max() - env.min())
    k = max(1, round(0.03 * sr / hop))
    w = max(1, round(0.10 * sr / hop))
    local_max = env >= np.lib.stride_tricks.sliding_window_view(np.pad(env, k, mode="edge"), 2 * k + 1).max(axis=1)
    local_mean = np.lib.stride_tricks.sliding_window_view(np.pad(env, w, mode="edge"), 2 * w + 1).mean(axis=1)
    peaks = np.flatnonzero(local_max & (env >= local_mean + delta))
    out, last = [], -np.inf
    for p in peaks:
        t = p * hop / sr
        if t - last >= wait:
            out.append(t)
            last = t
    return np.asarray(out)


def beats(y: np.ndarray, sr: int = SAMPLE_RATE, *, hop: int = HOP, envelope: np.ndarray | None = None) -> np.ndarray:
    """Beat times (seconds): librosa's tracker when installed (``pip install 'latentlab[audio]'``), else a
    tempo from the autocorrelation of the onset strength (weighted by a log-normal tempo prior around 120 BPM, as
    librosa's tempo estimate is, against octave errors) and, on that grid, the strongest onset near each beat,
    from the first onset to the last. ``envelope``: the onset strength of ``y`` if already computed."""
    y = _samples(y)
    sr = _rate(sr, hop)
    if envelope is not None:
        envelope = _envelope(envelope)
        if len(envelope) != 1 + len(y) // hop:
            raise ValueError(f"`envelope` must be the onset strength of `y`: {1 + len(y) // hop} values "
                             f"(1 + len(y) // hop), got {len(envelope)}")
    try:
        import librosa
    except ImportError:
        librosa = None
    if librosa is not None:
        _, frames = librosa.beat.beat_track(y=y, sr=sr, hop_length=hop, units="frames")
        return np.asarray(frames, dtype=np.float64) * hop / sr
    env = onset_strength(y, sr, hop=hop) if envelope is None else envelope
    if env.size < 4 or env.max() <= 0:
        return np.zeros(0)
    x = env - env.mean()
    spec = np.fft.rfft(x, 2 * len(x))
    ac = np.fft.irfft(spec * np.conj(spec))[: len(x)]  # autocorrelation in O(n log n)
    lo, hi = int(60 / 200 * sr / hop), min(len(ac) - 1, int(60 / 50 * sr / hop))  # 50-200 BPM
    if hi <= lo:
        return onsets(env, sr, hop=hop)
    lags = np.arange(lo, hi + 1)
    bpm = 60 * sr / hop / lags
    prior = np.exp(-0.5 * np.log2(bpm / 120.0) ** 2)
    period = int(lags[np.argmax(ac[lo : hi + 1] * prior)])
    phase = int(np.argmax([env[p::period].sum() for p in range(period)]))
    grid = np.arange(phase, len(env), period)
    tol = max(1, period // 8)
    snapped = [g - tol + int(np.argmax(env[max(0, g - tol) : g + tol + 1])) if g >= tol else g for g in grid]
    # No beats before the music starts or after it ends: the grid runs from the first onset to the last.
    found = np.round(onsets(env, sr, hop=hop) * sr / hop)
    if found.size == 0:
        return np.zeros(0)
    snapped = [b for b in snapped if found[0] - tol <= b <= found[-1] + tol]
    return np.asarray(sorted(set(snapped)), dtype=np.float64) * hop / sr


def frame_envelope(envelope: np.ndarray, n_frames: int, fps: float, sr: int = SAMPLE_RATE, *,
                   hop: int = HOP) -> np.ndarray:
    """The onset strength heard during each video frame ``i`` (the sum over ``[i / fps, (i + 1) / fps)``),
    normalised to a maximum of 1 (all zeros for silence).

    >>> frame_envelope(np.array([0, 0, 4.0, 0, 0, 0, 2.0, 0]), 4, fps=1, sr=2, hop=1).tolist()
    [0.0, 1.0, 0.0, 0.5]
    """
    env = _envelope(envelope)
    sr = _rate(sr, hop)
    n_frames = _checks.positive_int(n_frames, "n_frames")
    fps = _checks.real(fps, "fps", low=0.0, low_inclusive=False)
    times = np.arange(len(env)) * hop / sr
    idx = np.floor(times * fps + 1e-9).astype(np.int64)
    out = np.zeros(n_frames)
    keep = idx < n_frames
    np.add.at(out, idx[keep], env[keep])
    peak = out.max()
    return out / peak if peak > 0 else out
