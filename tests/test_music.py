"""Music videos: onsets, beats and envelope pacing on synthetic tracks made here (no data files), keyframes in
seconds, the muxed audio lining up with the source, and every bad audio input refused before model work."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
import torch
from fakes import FakeBackend

from latentlab import audio
from latentlab.morph import Keyframe, MorphSettings, manifest_path, plan, render_frame, render_morph
from latentlab.morph.music import analyse, frame_positions

SR = audio.SAMPLE_RATE


def _write_wav(path, y, sr=SR):
    pcm = (np.clip(y, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())
    return path


def _clicks(times, seconds, *, sr=SR, noise=0.003, seed=0):
    """Short decaying clicks (1 kHz, 15 ms) at ``times`` over faint noise."""
    g = np.random.default_rng(seed)
    y = noise * g.standard_normal(int(seconds * sr))
    t = np.arange(int(0.015 * sr)) / sr
    click = np.sin(2 * np.pi * 1000 * t) * np.exp(-t * 300)
    for c in times:
        i = round(c * sr)
        y[i : i + len(click)] += 0.8 * click[: len(y) - i]
    return y.astype(np.float32)


def _f_measure(found, truth, tol=0.05):
    found, truth = list(found), list(truth)
    hits = 0
    for t in truth:
        j = next((j for j, f in enumerate(found) if abs(f - t) <= tol), None)
        if j is not None:
            hits += 1
            found.pop(j)
    p = hits / max(1, hits + len(found))
    r = hits / max(1, len(truth))
    return 2 * p * r / max(p + r, 1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_onsets_of_click_tracks_and_tone_bursts(seed):
    g = np.random.default_rng(seed)
    times = np.cumsum(g.uniform(0.12, 0.6, size=30)) + 0.1  # irregular gaps, 120 ms or more
    y = _clicks(times, times[-1] + 0.5, seed=seed)
    assert _f_measure(audio.onsets(audio.onset_strength(y)), times) >= 0.95
    # tone bursts of random pitch (a piano-like attack) instead of clicks
    tones = np.zeros_like(y)
    t = np.arange(int(0.4 * SR)) / SR
    for c in times:
        burst = np.sin(2 * np.pi * g.uniform(200, 2000) * t) * np.exp(-t * 12) * np.minimum(1, (0.4 - t) / 0.05)  # decays, then fades out
        i = round(c * SR)
        tones[i : i + len(burst)] += 0.5 * burst[: len(tones) - i]
    assert _f_measure(audio.onsets(audio.onset_strength(tones)), times) >= 0.95


def test_beats_of_a_steady_beat():
    times = np.arange(0.5, 12, 0.5)  # 120 BPM
    found = audio.beats(_clicks(times, 12.5))
    assert _f_measure(found, times) >= 0.9


def _settings(track, n, **kw):
    keys = (Keyframe("a red star", 1), Keyframe("a blue ring", 2), Keyframe("a green square", 3))
    return MorphSettings(keyframes=keys, n_frames=n, fps=12.0, audio=track, **kw)


def test_envelope_pacing_puts_the_largest_changes_on_the_clicks(tmp_path):
    clicks = [1.0, 2.3, 3.1, 4.6, 5.5]
    wav = _write_wav(tmp_path / "clicks.wav", _clicks(clicks, 6.0))
    track, n = analyse(wav, fps=12.0)
    assert n == 72 and track.duration == pytest.approx(6.0) and len(track.envelope) == 72
    settings = _settings(track, n)
    pos = np.asarray(frame_positions(settings))
    assert pos[0] == 0 and pos[-1] == 2 and (np.diff(pos) >= 0).all()
    steps = np.diff(pos)  # steps[i]: the change into frame i + 1
    biggest = np.sort(np.argsort(steps)[-len(clicks):] + 1)
    click_frames = np.round(np.asarray(clicks) * 12)
    assert all(np.abs(click_frames - f).min() <= 1 for f in biggest), (biggest, click_frames)
    # ... and so do the largest changes between rendered frames (the fake backend's images follow the latents)
    fake = FakeBackend()
    p = plan(fake, settings)
    images = fake.generate(*p.inputs(0, n))
    change = (images[1:] - images[:-1]).flatten(1).norm(dim=1).numpy()
    top = np.argsort(change)[-len(clicks):] + 1
    assert all(np.abs(click_frames - f).min() <= 1 for f in top)


def test_keyframes_in_seconds_land_on_their_frames():
    keys = (Keyframe("a red star", 1), Keyframe("a blue ring", 2), Keyframe("a green square", 3))
    s = MorphSettings(keyframes=keys, n_frames=60, fps=12.0, keyframe_times=(0.5, 2.0, 4.5))
    pos = frame_positions(s)
    assert pos[6] == 0 and pos[24] == 1 and pos[54] == 2 and pos[0] == 0 and pos[-1] == 2
    assert pos[15] == pytest.approx(0.5)
    p = plan(FakeBackend(), s)
    assert (p.frames[24]["noise_segment"], p.frames[24]["noise_t"]) == (1, 0.0)
    with pytest.raises(ValueError, match=r"`keyframe_times` \(--at\) must increase"):
        MorphSettings(keyframes=keys, n_frames=60, fps=12.0, keyframe_times=(0.0, 3.0, 2.0))
    with pytest.raises(ValueError, match=r"must lie inside the video \(0 to 4.91667 s"):
        MorphSettings(keyframes=keys, n_frames=60, fps=12.0, keyframe_times=(0.0, 3.0, 5.5))
    with pytest.raises(ValueError, match=r"one time per keyframe: 3 keyframes"):
        MorphSettings(keyframes=keys, n_frames=60, fps=12.0, keyframe_times=(0.0, 3.0))


def test_beats_pacing_puts_keyframes_on_beats(tmp_path):
    beat_times = np.arange(0.5, 6, 0.5)
    wav = _write_wav(tmp_path / "beat.wav", _clicks(beat_times, 6.0))
    track, n = analyse(wav, fps=12.0, pacing="beats")
    pos = frame_positions(_settings(track, n))
    # keyframe 0 is held until its beat, the others are reached on theirs
    key_frames = [max(i for i, x in enumerate(pos) if x == 0), pos.index(1.0), pos.index(2.0)]
    assert all(np.abs(beat_times * 12 - f).min() <= 1 for f in key_frames)


def test_audio_morph_is_muxed_in_sync_and_recorded(tmp_path):
    from latentlab.video import decode_audio, read_video

    g = np.random.default_rng(3)
    clicks = np.cumsum(g.uniform(0.3, 0.7, size=8)) + 0.6
    src = _clicks(clicks, 6.0)
    wav = _write_wav(tmp_path / "track.wav", src)
    track, n = analyse(wav, fps=12.0, offset=0.5, seconds=4.0)
    assert n == 48
    fake = FakeBackend()
    out = render_morph(fake, _settings(track, n), tmp_path / "m.mp4", progress=False, upscale=2)
    frames, _ = read_video(out)
    assert len(frames) == 48
    heard = decode_audio(out)
    want = src[int(0.5 * SR) : int(4.5 * SR)]
    assert abs(len(heard) - len(want)) <= SR / 12  # durations agree within one frame
    m = min(len(heard), len(want))
    a, b = np.abs(heard[:m]), np.abs(want[:m])
    lags = np.arange(-SR // 12, SR // 12 + 1, 32)
    corr = [np.dot(a[max(0, k) : m + min(0, k)], b[max(0, -k) : m - max(0, k)]) for k in lags]
    assert abs(int(lags[int(np.argmax(corr))])) <= SR / 12  # aligned within one frame
    man = json.loads(manifest_path(out).read_text())
    rec = man["settings"]["audio"]
    assert rec["offset"] == 0.5 and rec["duration"] == 4.0 and len(rec["envelope"]) == 48
    assert rec["sha256"] == __import__("hashlib").sha256(wav.read_bytes()).hexdigest()
    p = plan(fake, _settings(track, n))
    assert torch.equal(render_frame(fake, manifest_path(out), 17), fake.generate(*p.inputs(17, 18)))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.mp4", "m.mp4.json", "track.wav"]


def test_every_audio_format_ffmpeg_writes_is_read(tmp_path):
    import subprocess

    import imageio_ffmpeg

    wav = _write_wav(tmp_path / "t.wav", _clicks([0.5, 1.0, 1.5], 2.0))
    for ext, codec in ((".mp3", "libmp3lame"), (".flac", "flac"), (".m4a", "aac"), (".ogg", "libvorbis")):
        out = tmp_path / f"t{ext}"
        r = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(wav), "-c:a", codec,
                            str(out)], capture_output=True, check=False)
        assert r.returncode == 0, r.stderr  # the bundled ffmpeg writes every one of them
        _track, n = analyse(out, fps=12.0)
        assert n in (23, 24, 25), ext
        found = audio.onsets(audio.onset_strength(__import__("latentlab.video", fromlist=["x"]).decode_audio(out)))
        assert _f_measure(found, [0.5, 1.0, 1.5], tol=0.06) == 1.0, ext


def test_bad_audio_is_refused_before_model_work(tmp_path, capsys, monkeypatch):
    from latentlab import cli

    monkeypatch.setattr(cli, "_load_lab", lambda *a, **k: pytest.fail("a model was loaded"))
    wav = _write_wav(tmp_path / "ok.wav", _clicks([0.5, 1.0], 2.0))
    silent = _write_wav(tmp_path / "silent.wav", np.zeros(SR * 2, dtype=np.float32))
    corrupt = tmp_path / "corrupt.mp3"
    corrupt.write_bytes(b"ID3\x03\x00\x00\x00not really an mp3" * 10)
    cases = [
        (["--audio", str(tmp_path / "missing.wav")], "--audio does not exist"),
        (["--audio", str(corrupt)], "`--audio` could not be decoded as audio: corrupt.mp3"),
        (["--audio", str(silent)], "is silent"),
        (["--audio", str(wav), "--seconds", "5"], "shorter than the 5.00 s video"),
        (["--audio", str(wav), "--audio-offset", "-1"], "`--audio-offset` must be >= 0"),
        (["--audio", str(wav), "--audio-offset", "9"], "--audio-offset 9 s is past the end of ok.wav (2.00 s long)"),
        (["--audio", str(wav), "-o", str(tmp_path / "x.gif")], "--audio needs an mp4 output"),
        (["--at", "0", "5"], "must lie inside the video"),
        (["--at", "3", "1"], "must increase"),
        (["--at", "0", "1", "2"], "one time per keyframe: 2 keyframes, got 3"),
        (["--audio-offset", "2"], "--audio-offset and --audio-pacing need --audio FILE"),
        (["--pacing", "even", "--pacing-clip", str(tmp_path / "no-clip")], "`--pacing-clip` does not exist"),
        (["--pacing-clip"], "--pacing-clip measures the change for --pacing even"),
    ]
    for extra, message in cases:
        args = ["morph", "a red star", "a blue ring", "-o", str(tmp_path / "out.mp4"), *extra]
        assert cli.main(args) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.mp3", "ok.wav", "silent.wav"]


def test_cli_renders_an_audio_morph_and_recreates_its_frames(tiny_sd_path, tmp_path, capsys):
    from latentlab import cli
    from latentlab.video import decode_audio, read_video

    wav = _write_wav(tmp_path / "t.wav", _clicks([0.3, 0.9, 1.4, 1.8], 3.0))
    out = tmp_path / "m.mp4"
    assert cli.main(["morph", "a red star", "a blue ring", "--model", str(tiny_sd_path), "--steps", "2",
                     "--audio", str(wav), "--audio-offset", "0.5", "--seconds", "2", "--pacing", "even",
                     "--workers", "1", "-o", str(out)]) == 0
    frames, _ = read_video(out)
    assert len(frames) == 24 and abs(len(decode_audio(out)) / SR - 2.0) <= 1 / 12
    man = json.loads(manifest_path(out).read_text())
    assert man["settings"]["audio"]["offset"] == 0.5 and man["settings"]["pacing"] == "even"
    assert cli.main(["frame", str(manifest_path(out)), "7", "-o", str(tmp_path / "f.png")]) == 0
    with pytest.raises(SystemExit):
        cli.main(["morph", "a", "b", "--audio-pacing", "loud"])
    assert "invalid choice: 'loud'" in capsys.readouterr().err


def test_even_pacing_makes_the_perceptual_change_follow_the_envelope():
    from latentlab.morph.settings import AudioTrack

    g = np.random.default_rng(0)
    env = np.where(g.random(60) < 0.2, 1.0, 0.05)
    env[0] = 0.0
    track = AudioTrack(path="x.wav", sha256="0" * 64, offset=0.0, duration=5.0, envelope=tuple(env))
    fake = FakeBackend()
    s = _settings(track, 60, pacing="even")
    images = fake.generate(*plan(fake, s).inputs(0, 60))
    change = (images[1:] - images[:-1]).flatten(1).norm(dim=1).numpy()
    assert np.corrcoef(change, env[1:])[0, 1] > 0.9
