"""Video files: stream frames to mp4 (H.264) or gif with the ffmpeg bundled in imageio-ffmpeg, atomically.

One responsibility, and the only module that imports imageio/imageio-ffmpeg. Frames are piped to ffmpeg as they
come (memory stays flat over long renders); the file is written under a temporary name beside the target and
renamed into place only when complete, so a killed render never leaves a half-written video under the final name
and never clobbers an existing file. An existing output is refused unless ``overwrite=True``.

mp4: libx264, yuv420p (plays everywhere; needs even width and height), ``-movflags +faststart`` (playable while
downloading), ``macro_block_size=1`` (imageio-ffmpeg would otherwise resize to multiples of 16).
gif: ffmpeg's palettegen/paletteuse (one palette for the whole clip), looping forever.
Audio (music videos): :func:`decode_audio` reads any file ffmpeg reads (mp3, wav, flac, m4a/aac, ogg) to mono
samples; :func:`mux_audio` adds an AAC track to a finished mp4 in a separate, atomic step.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from latentlab import _checks
from latentlab._files import atomic_write, check_input, check_output, finish, partial_path, remove_stale_partials

__all__ = ["AUDIO_FORMATS", "FORMATS", "IMAGE_FORMATS", "VideoWriter", "decode_audio", "image_grid", "mux_audio",
           "png_bytes", "read_image", "read_video", "write_image", "write_video"]

log = logging.getLogger(__name__)

FORMATS = (".mp4", ".gif")
IMAGE_FORMATS = (".png", ".jpg", ".jpeg", ".webp")
AUDIO_FORMATS = (".mp3", ".wav", ".flac", ".m4a", ".aac", ".ogg", ".oga", ".opus")


def _to_uint8_frames(frames: torch.Tensor | np.ndarray, upscale: int) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] tensor, or (N, H, W, 3) uint8 array -> (N, H*up, W*up, 3) uint8."""
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"array `frames` must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
        frames = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    _checks.tensor(frames, "frames", min_ndim=4)
    _checks.finite(frames, "frames")
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"`frames` must be (N, 3, H, W), got shape {tuple(frames.shape)}")
    x = frames.detach().float().cpu()
    if upscale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=upscale, mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


class VideoWriter:
    """Stream frames into ``path`` (.mp4 or .gif); use as a context manager.

    Parameters
    ----------
    path : path-like
        Target file; its suffix picks the format.
    fps : float
        Frames per second.
    upscale : int
        Integer upscaling (bicubic) applied to every frame before encoding, for small models' tiny frames.
    overwrite : bool
        Replace an existing file (atomically, at the end). Without it an existing file raises ``FileExistsError``
        before any work.
    quality : int
        x264 constant rate factor for mp4 (lower is better; 18 is visually lossless).

    Examples
    --------
    >>> import tempfile, torch
    >>> out = Path(tempfile.mkdtemp()) / "demo.mp4"
    >>> with VideoWriter(out, fps=12) as w:
    ...     w.append(torch.rand(6, 3, 32, 48))
    >>> frames, info = read_video(out)
    >>> frames.shape, info["codec"]
    ((6, 32, 48, 3), 'h264')
    """

    def __init__(self, path: str | os.PathLike, *, fps: float, upscale: int = 1, overwrite: bool = False,
                 quality: int = 18):
        self.path = check_output(path, "path", overwrite=overwrite, suffixes=FORMATS)
        fps = _checks.frame_rate(fps)
        self.upscale = _checks.positive_int(upscale, "upscale")
        self.fps, self.quality, self.overwrite = float(fps), int(quality), bool(overwrite)
        remove_stale_partials(self.path)  # a killed render's half-encoded video
        self.tmp = partial_path(self.path)
        self._gen = None
        self._size: tuple[int, int] | None = None
        self.n_frames = 0

    def _open(self, width: int, height: int) -> None:
        import imageio_ffmpeg

        if self.path.suffix.lower() == ".mp4":
            if width % 2 or height % 2:
                raise ValueError(
                    f"H.264 (yuv420p) needs an even width and height, got {width}x{height}; use an even size or "
                    "upscale=2"
                )
            kw = dict(codec="libx264", pix_fmt_out="yuv420p", quality=None,
                      output_params=["-crf", str(self.quality), "-movflags", "+faststart"])
        else:
            kw = dict(codec="gif", pix_fmt_out="rgb24", quality=None,
                      output_params=["-filter_complex", "split[a][b];[a]palettegen=stats_mode=full[p];[b][p]paletteuse",
                                     "-loop", "0"])
        self._gen = imageio_ffmpeg.write_frames(
            str(self.tmp), (width, height), fps=self.fps, macro_block_size=1, ffmpeg_log_level="error", **kw
        )
        self._gen.send(None)
        self._size = (width, height)

    def append(self, frames: torch.Tensor | np.ndarray) -> None:
        """Append frames: (N, 3, H, W) float tensor in [0, 1] or (N, H, W, 3) uint8 array."""
        arr = _to_uint8_frames(frames, self.upscale)
        h, w = arr.shape[1:3]
        if self._gen is None:
            self._open(w, h)
        elif (w, h) != self._size:
            raise ValueError(f"every frame must be {self._size[0]}x{self._size[1]}, got {w}x{h}")
        for frame in arr:
            self._gen.send(np.ascontiguousarray(frame))
        self.n_frames += len(arr)

    def close(self) -> Path:
        """Finish the file, check that the encoder wrote every frame, and only then move it into place.

        imageio-ffmpeg does not report ffmpeg's exit status, so a failed encode (an impossible frame rate, a disk
        that filled up) would otherwise look like success; the finished file is decoded and its frames counted.
        On a failure ``OSError`` is raised, the partial file is removed and an existing target is left untouched.
        """
        import imageio_ffmpeg

        if self._gen is None:
            self.abort()
            raise ValueError(f"no frames were written to {self.path}; nothing was saved")
        self._gen.close()
        self._gen = None
        try:
            written = imageio_ffmpeg.count_frames_and_secs(str(self.tmp))[0] if self.tmp.is_file() else 0
        except (OSError, RuntimeError, ValueError):
            written = 0
        if written != self.n_frames:
            self.tmp.unlink(missing_ok=True)
            raise OSError(f"ffmpeg failed to encode {self.path.name}: {written} of {self.n_frames} frames were "
                          f"written (fps {self.fps:g}; a full disk?); nothing was saved"
                          + (" and the existing file is untouched" if self.path.exists() else ""))
        return finish(self.tmp, self.path, overwrite=self.overwrite)

    def abort(self) -> None:
        if self._gen is not None:
            try:
                self._gen.close()
            except Exception as e:  # noqa: BLE001 - ffmpeg may already be gone; we only clean up
                log.debug("ffmpeg did not close cleanly while aborting: %s", e)
            self._gen = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:  # noqa: PYI034 - a final class; Self needs Python 3.11 typing only
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(path: str | os.PathLike, frames: torch.Tensor | np.ndarray, *, fps: float, upscale: int = 1,
                overwrite: bool = False) -> Path:
    """Write all ``frames`` at once (see :class:`VideoWriter`)."""
    if not isinstance(frames, (torch.Tensor, np.ndarray)):
        raise TypeError(f"`frames` must be a (N, 3, H, W) float tensor or a (N, H, W, 3) uint8 array, got "
                        f"{type(frames).__name__}")
    if frames.ndim != 4:
        raise ValueError(f"`frames` must have 4 dimensions ((N, 3, H, W) or (N, H, W, 3)), got shape "
                         f"{tuple(frames.shape)}")
    if len(frames) == 0:
        raise ValueError(f"`frames` must hold at least one frame, got {len(frames)}")
    with VideoWriter(path, fps=fps, upscale=upscale, overwrite=overwrite) as w:
        w.append(frames)
    return Path(path)


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Decode a video to (N, H, W, 3) uint8 and report codec, pixel format, fps and size (for round-trip tests)."""
    import imageio_ffmpeg

    path = check_input(path, "video")
    try:
        gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = gen.__next__()
        w, h = meta["size"]
        frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in gen]
    except (OSError, RuntimeError, ValueError, StopIteration) as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ValueError(f"{path} is not a readable video (truncated or another format?): {first}") from None
    if not frames:
        raise ValueError(f"{path} is not a readable video: no frames")
    codec = (meta.get("codec") or "").split()[0].rstrip(",")
    info = {"fps": meta.get("fps"), "size": (w, h), "codec": codec, "pix_fmt": meta.get("pix_fmt")}
    return np.stack(frames), info


def image_grid(images: torch.Tensor, n_cols: int, *, gap: int = 2, fill: float = 1.0) -> torch.Tensor:
    """Tile (N, 3, H, W) images row by row into one (3, rows*(H+gap)-gap, cols*(W+gap)-gap) image.

    >>> image_grid(torch.zeros(6, 3, 4, 4), 3).shape
    torch.Size([3, 10, 16])
    """
    _checks.tensor(images, "images", ndim=4, what="(N, C, H, W) images")
    n_cols = _checks.positive_int(n_cols, "n_cols")
    n, c, h, w = images.shape
    rows = -(-n // n_cols)
    out = torch.full((c, rows * (h + gap) - gap, n_cols * (w + gap) - gap), float(fill), dtype=images.dtype)
    for i in range(n):
        r, k = divmod(i, n_cols)
        out[:, r * (h + gap) : r * (h + gap) + h, k * (w + gap) : k * (w + gap) + w] = images[i]
    return out


def _one_image(image: object) -> torch.Tensor:
    """One image, (3, H, W) or (1, 3, H, W), finite: returned as (1, 3, H, W)."""
    _checks.tensor(image, "image", min_ndim=3)
    x = image if image.ndim == 4 else image.unsqueeze(0)
    if x.ndim != 4 or x.shape[:2] != (1, 3):
        raise ValueError(f"`image` must be one image (3, H, W) or (1, 3, H, W), got shape {tuple(image.shape)}")
    return x


def write_image(path: str | os.PathLike, image: torch.Tensor, *, upscale: int = 1, overwrite: bool = False) -> Path:
    """Write one (3, H, W) or (1, 3, H, W) image in [0, 1] to .png/.jpg/.webp, atomically (temporary name, then
    rename); an existing file is refused unless ``overwrite``."""
    import imageio.v3 as iio

    path = check_output(path, "path", overwrite=overwrite, suffixes=IMAGE_FORMATS)
    arr = _to_uint8_frames(_one_image(image), _checks.positive_int(upscale, "upscale"))[0]
    return atomic_write(path, lambda tmp: iio.imwrite(tmp, arr), overwrite=overwrite)


def png_bytes(image: torch.Tensor, *, upscale: int = 1) -> bytes:
    """One (3, H, W) or (1, 3, H, W) image in [0, 1] as PNG file bytes (for notebook widgets and data URLs)."""
    import io

    import imageio.v3 as iio

    arr = _to_uint8_frames(_one_image(image), _checks.positive_int(upscale, "upscale"))[0]
    buf = io.BytesIO()
    iio.imwrite(buf, arr, extension=".png")
    return buf.getvalue()


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file to (1, 3, H, W) float32 in [0, 1] (alpha dropped, greyscale expanded)."""
    import imageio.v3 as iio

    path = check_input(path, "image")
    try:
        arr = np.asarray(iio.imread(path))
    except Exception as e:  # noqa: BLE001 - imageio raises many types for files that are not images
        raise ValueError(f"{path} is not a readable image ({type(e).__name__})") from None
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"{path} is not an RGB(A) or greyscale image (array shape {arr.shape})")
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0
    return torch.from_numpy(arr[..., :3].astype(np.float32) / scale).permute(2, 0, 1).unsqueeze(0).contiguous()


def _ffmpeg(args: list[str]) -> tuple[int, bytes, str]:
    """Run the bundled ffmpeg; (exit code, stdout bytes, the last line of stderr)."""
    import subprocess

    import imageio_ffmpeg

    p = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", *args],
                       capture_output=True, check=False)
    err = p.stderr.decode("utf-8", "replace").strip().splitlines()
    return p.returncode, p.stdout, (err[-1] if err else "")


def decode_audio(path: str | os.PathLike, *, sr: int = 22050, name: str = "audio") -> np.ndarray:
    """The whole audio track of ``path`` as mono float32 samples at ``sr`` Hz, decoded by the bundled ffmpeg.

    ``FileNotFoundError`` for a missing file, ``ValueError`` (naming ``name``) for one ffmpeg cannot decode or
    that has no audio stream.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"`{name}` is a folder, not an audio file: {path}")
    if not path.is_file():
        raise FileNotFoundError(f"`{name}` does not exist: {path}")
    code, out, err = _ffmpeg(["-i", str(path), "-vn", "-ac", "1", "-ar", str(int(sr)), "-f", "f32le", "-"])
    if code != 0 or not out:
        why = err or "no audio stream"
        raise ValueError(f"`{name}` could not be decoded as audio: {path.name} ({why})")
    return np.frombuffer(out, dtype="<f4").astype(np.float32)


def mux_audio(video: str | os.PathLike, audio: str | os.PathLike, *, offset: float, duration: float,
              output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``output``: the mp4 ``video`` (stream-copied, untouched) with ``duration`` seconds of ``audio``
    from ``offset`` as AAC, starting together and cut to the video's length. Atomic (a temporary file beside
    ``output``, checked, then renamed); ``OSError`` if ffmpeg fails, with nothing replaced."""
    output = check_output(output, "output", overwrite=overwrite, suffixes=(".mp4",))
    remove_stale_partials(output)
    tmp = partial_path(output)
    code, _, err = _ffmpeg(["-y", "-i", str(video), "-ss", f"{float(offset):.6f}", "-t", f"{float(duration):.6f}",
                            "-i", str(audio), "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac",
                            "-b:a", "192k", "-t", f"{float(duration):.6f}", "-movflags", "+faststart",
                            "-f", "mp4", str(tmp)])
    if code != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise OSError(f"ffmpeg could not add the audio to {output.name}: {err or 'unknown error'}; nothing was "
                      "replaced")
    return finish(tmp, output, overwrite=overwrite)
