"""Music videos, measured: analysis speed on a long track, and how a rendered video follows its music.

- ``--analyse``: a synthetic 3-minute track (drums and a bass line at 120 BPM, made here) is written as wav,
  decoded with the bundled ffmpeg and analysed (onset strength, per-frame envelope at 12 fps, beats), one thread;
  printed as seconds and as a ratio to the track's length (real time).
- ``--demo PATH``: writes the 8-second demo track the README's music-video command uses (``data/demo-beat.flac``).
- ``--figure MANIFEST``: a rendered audio morph's per-frame envelope (from its manifest) against the per-frame
  change of its video (RMS between consecutive decoded frames), as a PNG beside it, with their correlation.

    python -m latentlab.benchmarks.audio --analyse --threads 1
    python -m latentlab.benchmarks.audio --figure music.mp4.json -o data/music-video-pacing.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import torch


def synthetic_track(seconds: float, *, bpm: float = 120.0, sr: int = 22050, seed: int = 0) -> np.ndarray:
    """Kick on every beat, snare on 2 and 4, hats on eighths (some skipped), a bass note per bar; float32 mono."""
    g = np.random.default_rng(seed)
    n = int(seconds * sr)
    y = np.zeros(n, dtype=np.float64)
    beat = 60.0 / bpm

    def add(at, sound):
        i = int(at * sr)
        if i < n:
            y[i : i + len(sound)] += sound[: n - i]

    t = np.arange(int(0.25 * sr)) / sr
    kick = np.sin(2 * np.pi * (50 + 100 * np.exp(-t * 30)) * t) * np.exp(-t * 12)
    snare = g.standard_normal(len(t)) * np.exp(-t * 25) * 0.5
    hat = g.standard_normal(int(0.05 * sr)) * np.exp(-np.arange(int(0.05 * sr)) / sr * 80) * 0.2
    notes = [55.0, 55.0, 65.4, 49.0]
    for k in range(int(seconds / beat) + 1):
        add(k * beat, kick)
        if k % 4 in (1, 3):
            add(k * beat, snare)
        for half in (0.0, 0.5):
            if g.random() < 0.8:
                add((k + half) * beat, hat)
        if k % 4 == 0:
            tb = np.arange(int(4 * beat * sr)) / sr
            add(k * beat, 0.25 * np.sin(2 * np.pi * notes[(k // 4) % 4] * tb) * np.exp(-tb * 0.8))
    return (0.9 * y / np.abs(y).max()).astype(np.float32)


def write_wav(path: Path, y: np.ndarray, sr: int = 22050) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(y, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def analyse_timing(seconds: float = 180.0) -> dict:
    from latentlab import audio
    from latentlab.video import decode_audio

    with tempfile.TemporaryDirectory() as d:
        wav = write_wav(Path(d) / "track.wav", synthetic_track(seconds))
        t0 = time.perf_counter()
        y = decode_audio(wav)
        t1 = time.perf_counter()
        env = audio.onset_strength(y)
        audio.frame_envelope(env, int(seconds * 12), 12.0)
        t2 = time.perf_counter()
        beats = audio.beats(y, envelope=env)
        t3 = time.perf_counter()
    return {"track_seconds": seconds, "decode_s": round(t1 - t0, 3), "onset_envelope_s": round(t2 - t1, 3),
            "beats_s": round(t3 - t2, 3), "total_s": round(t3 - t0, 3),
            "total_over_real_time": round((t3 - t0) / seconds, 5), "beats_found": len(beats),
            "bpm_found": round(60 / float(np.median(np.diff(beats))), 1) if len(beats) > 1 else None,
            "threads": torch.get_num_threads()}


def figure(manifest: Path, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from latentlab.video import read_video

    man = json.loads(Path(manifest).read_text())
    env = np.asarray(man["settings"]["audio"]["envelope"])
    frames, _ = read_video(Path(manifest).parent / man["video"])
    x = frames.astype(np.float64) / 255
    change = np.sqrt(((x[1:] - x[:-1]) ** 2).mean(axis=(1, 2, 3)))  # change[i]: into frame i + 1
    fps = man["settings"]["fps"]
    t = np.arange(1, len(frames)) / fps
    corr = float(np.corrcoef(env[1:], change)[0, 1])
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(t, env[1:], label="music: onset strength per frame")
    ax.plot(t, change / change.max(), label="video: change into the frame (RMS, scaled)")
    ax.set_xlabel("seconds")
    ax.set_title(f"An audio-paced morph follows its music (correlation {corr:.2f})", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return {"figure": str(out), "correlation": round(corr, 3), "frames": len(frames)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentlab.benchmarks.audio", description=__doc__.split("\n\n")[0])
    p.add_argument("--analyse", action="store_true")
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--demo", type=Path, metavar="PATH")
    p.add_argument("--figure", type=Path, metavar="MANIFEST")
    p.add_argument("-o", "--output", type=Path, default=Path("music-video-pacing.png"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.analyse:
        print(json.dumps(analyse_timing(args.seconds)))
    if args.demo:
        import subprocess

        import imageio_ffmpeg

        with tempfile.TemporaryDirectory() as d:
            wav = write_wav(Path(d) / "demo.wav", synthetic_track(8.0, seed=1))
            subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(wav), str(args.demo)],
                           check=True)
        print(json.dumps({"demo": str(args.demo), "bytes": args.demo.stat().st_size}))
    if args.figure:
        print(json.dumps(figure(args.figure, args.output)))


if __name__ == "__main__":
    main()
