"""Video round trips: write then read back (frame count, size, codec, pixel format); atomic, no overwrite."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentlab.video import VideoWriter, read_video, write_video


def _frames(n=12, h=32, w=48):
    t = torch.linspace(0, 1, n).view(n, 1, 1, 1)
    base = torch.zeros(n, 3, h, w)
    base[:, 0] = t[:, 0]  # red ramps over time
    base[:, 2, : h // 2] = 1.0  # blue top half
    return base


def test_mp4_round_trip(tmp_path):
    out = write_video(tmp_path / "a.mp4", _frames(), fps=12)
    frames, info = read_video(out)
    assert frames.shape == (12, 32, 48, 3)
    assert info["codec"] == "h264" and info["pix_fmt"].startswith("yuv420p") and info["fps"] == 12
    # Content survives the codec: red ramps up, the top half stays blue.
    assert frames[-1, :, :, 0].mean() > frames[0, :, :, 0].mean() + 150
    assert frames[:, :8, :, 2].mean() > 200 and frames[:, -8:, :, 2].mean() < 50
    with open(out, "rb") as f:  # faststart: the moov atom comes before mdat
        head = f.read()
    assert head.index(b"moov") < head.index(b"mdat")


def test_gif_round_trip_and_upscale(tmp_path):
    out = write_video(tmp_path / "a.gif", _frames(6, 16, 16), fps=10, upscale=4)
    frames, info = read_video(out)
    assert frames.shape == (6, 64, 64, 3) and info["codec"] == "gif"


def test_streaming_append_and_uint8_input(tmp_path):
    with VideoWriter(tmp_path / "s.mp4", fps=8) as w:
        for _ in range(5):
            w.append(np.full((2, 16, 16, 3), 128, np.uint8))
    frames, _ = read_video(tmp_path / "s.mp4")
    assert len(frames) == 10 and abs(int(frames.mean()) - 128) <= 2


def test_never_overwrites_and_failed_writes_leave_nothing(tmp_path):
    out = tmp_path / "keep.mp4"
    out.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        VideoWriter(out, fps=12)
    assert out.read_bytes() == b"user data"
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(out, fps=12, overwrite=True) as w:
        w.append(_frames(3))
        raise RuntimeError("boom")
    assert out.read_bytes() == b"user data"  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["keep.mp4"]  # no partial file left behind
    write_video(out, _frames(3), fps=12, overwrite=True)
    assert len(read_video(out)[0]) == 3


def test_video_errors(tmp_path):
    with pytest.raises(ValueError, match=r"H.264 \(yuv420p\) needs an even width and height, got 15x16"):
        write_video(tmp_path / "odd.mp4", torch.rand(2, 3, 16, 15), fps=12)
    with pytest.raises(ValueError, match=r"`path` must end in one of \('.mp4', '.gif'\), got 'x.avi'"):
        VideoWriter(tmp_path / "x.avi", fps=12)
    with pytest.raises(ValueError, match=r"`fps` must be >= 0.01, got 1e-06"):  # ffmpeg's H.264 fails below 1e-4
        write_video(tmp_path / "slow.mp4", torch.rand(4, 3, 16, 16), fps=1e-6)
    with pytest.raises(ValueError, match=r"`fps` must be >= 0.01, got 0.0"):
        VideoWriter(tmp_path / "x.mp4", fps=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoWriter(tmp_path / "missing" / "x.mp4", fps=12)
    with VideoWriter(tmp_path / "size.mp4", fps=12) as w:
        w.append(torch.rand(1, 3, 16, 16))
        with pytest.raises(ValueError, match=r"every frame must be 16x16, got 32x32"):
            w.append(torch.rand(1, 3, 32, 32))


def failing_ffmpeg(folder, monkeypatch):
    """Make every ffmpeg call fail as an encoder does at the end (it reads all the frames, then exits 1 having written
    nothing: a full disk, a codec error): imageio-ffmpeg runs the binary IMAGEIO_FFMPEG_EXE names."""
    fake = folder / "ffmpeg-that-fails"
    fake.write_text('#!/bin/sh\ncase " $* " in *" -i - "*) cat > /dev/null;; esac\n'
                    'echo "fake ffmpeg: encoding failed" >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(fake))


def test_a_failed_encode_raises_and_keeps_the_previous_file(tmp_path, monkeypatch):
    """ffmpeg's failure is not success: nothing replaces the existing video. (imageio-ffmpeg does not report
    ffmpeg's exit status; VideoWriter.close counts the frames written.)"""
    import torch

    from latentlab.video import write_video

    out = write_video(tmp_path / "v.mp4", torch.rand(4, 3, 16, 16), fps=12)
    before = out.read_bytes()
    failing_ffmpeg(tmp_path, monkeypatch)
    with pytest.raises(OSError, match=r"ffmpeg failed to encode v.mp4: 0 of 4 frames .* existing file is untouched"):
        write_video(out, torch.rand(4, 3, 16, 16), fps=12, overwrite=True)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ffmpeg-that-fails", "v.mp4"]  # no partial file left
