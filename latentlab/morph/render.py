"""Rendering a morph: frames in compute batches, streamed to the video, cached for resume, recorded in a manifest.

One responsibility: turn a :class:`~latentlab.morph.plan.Plan` into files without ever losing work or a user's file.

1. Everything that can be checked without a model is checked first (:func:`check_render`): output suffix and
   folder, existing files, keyframe images that are not images, frame sizes that would not fit in memory.
2. One render per output at a time: a lock file beside the video names the process that holds it.
3. Frames are generated ``compute_batch`` at a time (the backend's one meaning of batch size) and streamed to the
   encoder; each finished frame is stored in :func:`cache_dir` under :func:`frame_key`. A killed render resumes
   from there with identical frames; damaged cache entries are detected, re-rendered and reported.
4. The video is written under a temporary name and renamed into place; the manifest last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latentlab import _checks
from latentlab._files import check_output, disk_full_hint, partial_path
from latentlab.backend import AttentionMix, Backend, Conditioning, PredictionMix
from latentlab.distributed import Ranks, ranks
from latentlab.morph.manifest import MANIFEST_VERSION, manifest_path, write_manifest
from latentlab.morph.plan import pixel_distance, plan
from latentlab.morph.settings import MorphSettings
from latentlab.morph.workers import LocalWorkers, auto_workers
from latentlab.sampling import Sampling
from latentlab.store import versions

__all__ = ["MAX_FRAME_SIDE", "RenderLocked", "cache_dir", "check_render", "frame_key", "render_morph"]

log = logging.getLogger(__name__)

#: Longest side of an output frame after upscaling (H.264 encoders and players top out around 8K).
MAX_FRAME_SIDE = 8192
#: Streaming chunk when the backend runs everything in one call (GPU): frames held in memory at once.
GPU_CHUNK = 64


class RenderLocked(RuntimeError):
    """Another live process is rendering to the same output."""


def cache_dir(video: str | os.PathLike) -> Path:
    """Where finished frames of ``video`` are kept until it is complete: ``.morph.mp4.frames/`` beside it."""
    video = Path(video)
    return video.with_name(f".{video.name}.frames")


def _lock_path(video: Path) -> Path:
    return video.with_name(f".{video.name}.lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Lock:
    """An exclusive lock file holding the owner's pid; a lock left by a dead process is taken over."""

    def __init__(self, video: Path, r: Ranks | None = None):
        self.path = _lock_path(video)
        self.video = video
        self.r = r or Ranks()

    def __enter__(self):
        """Rank 0 takes the lock for the whole job; every rank learns whether it could."""
        error = None
        if self.r.is_main:
            try:
                self._take()
            except RenderLocked as e:
                error = str(e)
        error = self.r.broadcast(error)
        if error:
            raise RenderLocked(error)
        return self

    def _take(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _pid_alive(pid):
                    raise RenderLocked(f"another render (process {pid}) is writing {self.video}; wait for it to "
                                       f"finish, or remove {self.path} if that process is gone") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise RenderLocked(f"could not take the lock {self.path} for {self.video}")

    def __exit__(self, *exc):
        if self.r.is_main:
            self.path.unlink(missing_ok=True)


def frame_key(lab: Backend, latents: torch.Tensor, conditioning: Conditioning, sampling: Sampling, *,
              batch_size: int | None = None) -> str:
    """Hash of everything that determines one frame's pixels: the backend's :meth:`~Backend.provenance` (model
    fingerprint, scheduler config, compute batch, device, dtype), the complete ``sampling``, the versions of
    torch/diffusers/latentlab, and the exact bytes of the frame's initial latent and conditioning."""
    _checks.tensor(latents, "latents", min_ndim=2)
    if not isinstance(conditioning, (Conditioning, PredictionMix, AttentionMix)):
        raise TypeError("`conditioning` must be a Conditioning, a PredictionMix or an AttentionMix, got "
                        f"{type(conditioning).__name__}")
    if not isinstance(sampling, Sampling):
        raise TypeError(f"`sampling` must be a Sampling, got {type(sampling).__name__}")
    return _frame_key(_key_prefix(lab, sampling, batch_size), latents, conditioning)


def _key_prefix(lab: Backend, sampling: Sampling, batch_size: int | None) -> bytes:
    """The part of every frame key that is the same for all frames of a render (computed once per render)."""
    meta = {"backend": lab.provenance(batch_size), "sampling": sampling.to_dict(), "versions": versions()}
    return json.dumps(meta, sort_keys=True, default=str).encode()


def _frame_key(prefix: bytes, latents: torch.Tensor, conditioning: Conditioning | PredictionMix | AttentionMix
               ) -> str:
    h = hashlib.sha256(prefix)
    if isinstance(conditioning, (PredictionMix, AttentionMix)):
        h.update(b"prediction-mix" if isinstance(conditioning, PredictionMix) else b"attention-mix")
        conds, extra = (conditioning.a, conditioning.b), (conditioning.weight.double(),)
    else:
        conds, extra = (conditioning,), ()
    fields = [t for c in conds for t in (c.prompt_embeds, c.pooled_prompt_embeds, c.attention_mask)]
    for t in (latents, *fields, *extra):
        if t is not None:
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8: what is cached and what the video encoder receives."""
    _checks.finite(images, "frames")
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def check_render(settings: MorphSettings, output: str | os.PathLike, *, overwrite: bool = False, upscale: int = 1,
                 batch_size: int | None = None, frame_size: tuple[int, int] | None = None) -> Path:
    """Every check that needs no model: run by :func:`render_morph` and by the CLI before it loads one.

    ``frame_size`` (height, width) of the model's frames, when known, bounds the upscaled frame size.
    """
    from latentlab.video import FORMATS, read_image

    if not isinstance(settings, MorphSettings):
        raise TypeError(f"`settings` must be a MorphSettings, got {type(settings).__name__}")
    if isinstance(output, str | os.PathLike) and not overwrite:
        # An earlier render of this video that stopped after writing it, before its manifest (a full disk): say so.
        video, cache = Path(output), cache_dir(output)
        kept = sum(1 for _ in cache.glob("*.safetensors")) if cache.is_dir() else 0
        if kept and video.is_file() and not manifest_path(video).exists():
            raise FileExistsError(f"{video} exists without its manifest: an earlier render of it stopped before "
                                  f"writing the manifest, and {cache} keeps its {kept} frame(s); pass overwrite=True "
                                  "(CLI: --overwrite) to finish it from them")
    output = check_output(output, "output", overwrite=overwrite, suffixes=FORMATS)
    man = manifest_path(output)
    if man.exists() and not overwrite:
        raise FileExistsError(f"{man} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    _checks.positive_int(upscale, "upscale")
    if batch_size is not None:
        _checks.positive_int(batch_size, "batch_size")
    if frame_size is not None:
        h, w = (settings.height or frame_size[0]) * upscale, (settings.width or frame_size[1]) * upscale
        if max(h, w) > MAX_FRAME_SIDE:
            frames_gib = 16 * 3 * h * w * 4 / 2**30
            raise ValueError(f"`upscale` {upscale} makes {w}x{h} frames (longest side over {MAX_FRAME_SIDE}); "
                             f"upscaling a batch of 16 of them would need ~{frames_gib:.0f} GiB of memory")
    for i, k in enumerate(settings.keyframes):
        if k.image is not None:
            try:
                read_image(k.image)
            except (OSError, ValueError, SyntaxError) as e:
                raise ValueError(f"`keyframes[{i}].image` is not a readable image: {k.image} ({e})") from None
    if settings.audio is not None:
        if output.suffix.lower() != ".mp4":
            raise ValueError(f"--audio needs an mp4 output (a gif has no sound), got {output.name}")
        if not Path(settings.audio.path).is_file():
            raise FileNotFoundError(f"--audio does not exist: {settings.audio.path}")
    from latentlab.morph.music import frame_positions

    frame_positions(settings)  # keyframe times and beats fit the video (raises before any model work)
    return output


def _read_cached(path: Path, size: tuple[int, int] | None) -> np.ndarray | None:
    """A cached frame, or None when the entry is damaged (truncated, foreign, wrong shape)."""
    from latentlab import store

    try:
        frame = store.load(path)[0]["frame"]
    except Exception:  # noqa: BLE001 - any unreadable entry is re-rendered, never trusted
        return None
    if frame.dtype != torch.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or (
            size is not None and tuple(frame.shape[:2]) != size):
        return None
    return frame.numpy()


def call_sizes(n_frames: int, compute: int | None, batch_size: int | None) -> list[int | None]:
    """The compute batch each frame of an ``n_frames`` render is generated at: ``batch_size`` (the backend's
    compute batch), except the frames of a last, partial compute batch, which are generated at its own size so that
    no call is padded with work that is thrown away (their bits differ from a padded call's by float rounding, ~1e-6;
    their cache keys and manifest records say so)."""
    if not compute or n_frames % compute == 0:
        return [batch_size] * n_frames
    full = n_frames - n_frames % compute
    return [batch_size] * full + [n_frames % compute] * (n_frames - full)


def _chunk_keys(prefixes: dict, p, start: int, stop: int, sizes: list[int | None]):
    """Frames ``start:stop`` of plan ``p``: their initial latents, conditioning and cache keys (``prefixes``: the
    :func:`_key_prefix` of each call size)."""
    lat, cond = p.inputs(start, stop)
    return lat, cond, [_frame_key(prefixes[sizes[start + i]], lat[i : i + 1], cond[i]) for i in range(stop - start)]


def _cached_frames(cache: Path, keys: list[str], size: tuple[int, int]):
    """The cached frame of every key (None where missing or damaged; damaged entries are removed), with the counts
    of frames found and of damaged entries."""
    frames: list[np.ndarray | None] = [None] * len(keys)
    found = damaged = 0
    for i, key in enumerate(keys):
        file = cache / f"{key}.safetensors"
        if file.is_file():
            frames[i] = _read_cached(file, size)
            if frames[i] is None:
                damaged += 1
                file.unlink(missing_ok=True)
            else:
                found += 1
    return frames, found, damaged


def _store_frames(cache: Path, keys: list[str], todo: list[int], images: np.ndarray, start: int, video: str) -> None:
    from latentlab import store

    cache.mkdir(exist_ok=True)
    for i, img in zip(todo, images):
        store.save(cache / f"{keys[i]}.safetensors", {"frame": torch.from_numpy(img)},
                   provenance={"index": start + i, "video": video}, overwrite=True)


@dataclass(frozen=True)
class _Job:
    """What every chunk of one render needs (built once per render; workers inherit it by fork)."""

    lab: Backend
    plan: object
    sampling: Sampling
    cache: Path
    sizes: list  # call size of every frame (call_sizes)
    prefixes: dict  # call size -> _key_prefix
    frame_size: tuple[int, int]
    video: str

    def keys(self, start: int, stop: int):
        return _chunk_keys(self.prefixes, self.plan, start, stop, self.sizes)


def _render_chunk(job: _Job, start: int, stop: int):
    """Render the frames ``start:stop`` that are not in the cache into it, each at its call size:
    ``(rendered, damaged entries, frames (uint8 arrays), keys)``."""
    lat, cond, keys = job.keys(start, stop)
    frames, _, bad = _cached_frames(job.cache, keys, job.frame_size)
    todo = [i for i, fr in enumerate(frames) if fr is None]
    for call in dict.fromkeys(job.sizes[start + i] for i in todo):  # at most two call sizes, in frame order
        group = [i for i in todo if job.sizes[start + i] == call]
        images = _to_uint8(job.lab.generate(lat[group], cond[group], sampling=job.sampling, batch_size=call))
        try:
            _store_frames(job.cache, keys, group, images, start, job.video)
        except OSError as e:
            hint = disk_full_hint(e, job.cache.parent)
            if hint:
                raise OSError(e.errno, hint) from e
            raise
        for i, img in zip(group, images):
            frames[i] = img
    return len(todo), bad, frames, keys


def _resolve_workers(workers, lab: Backend, batch_size: int | None, n_chunks: int, world_size: int) -> int:
    if workers == "auto":
        return auto_workers(device=str(lab.provenance(batch_size)["device"]), n_chunks=n_chunks,
                            world_size=world_size)
    _checks.positive_int(workers, "workers")
    if workers > 1 and (world_size > 1 or "fork" not in multiprocessing.get_all_start_methods()):
        raise ValueError(f"`workers` {workers} needs a single-process job on a system with fork; got world size "
                         f"{world_size}")
    return min(workers, n_chunks)


def _render_share(job: _Job, r: Ranks, *, chunk: int, progress: bool) -> tuple[list[int], int]:
    """Distributed phase 1: this rank renders the missing frames of its blocks of ``chunk`` frames into the cache.

    Returns how many frames each rank rendered and how many damaged cache entries all found (on every rank). A
    failure on any rank is raised on every rank (:meth:`Ranks.gather_checked`)."""
    from tqdm.auto import tqdm

    n = len(job.plan.frames)
    chunk = r.block(n, chunk)  # short renders: every rank gets work (frame keys do not change)
    mine = r.share(n, block=chunk)
    rendered, damaged, error = 0, 0, None
    try:
        with tqdm(total=len(mine), desc=f"frames (rank {r.rank}/{r.world_size})", unit="frame",
                  disable=not progress) as bar:
            for start in mine[::chunk]:
                stop = min(n, start + chunk)
                done, bad, _, _ = _render_chunk(job, start, stop)
                rendered, damaged = rendered + done, damaged + bad
                bar.update(stop - start)
    except Exception as e:  # noqa: BLE001 - reported on every rank below
        error = (isinstance(e, OSError) and disk_full_hint(e, job.cache.parent)) or f"{type(e).__name__}: {e}"
    results = r.gather_checked((rendered, damaged), error, failed="the distributed render failed",
                               kept=f"finished frames are kept in {job.cache}")
    return [count for count, _ in results], sum(bad for _, bad in results)


def render_morph(
    lab: Backend,
    settings: MorphSettings,
    output: str | os.PathLike,
    *,
    batch_size: int | None = None,
    upscale: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    distance=None,
    keep_cache: bool = False,
    on_progress=None,
    on_frames=None,
    workers: int | str = 1,
) -> Path:
    """Render ``settings`` with ``lab`` to ``output`` (.mp4/.gif) and write its manifest; returns the video path.

    ``batch_size`` is the number of frames the denoiser sees per call (default: the backend's compute batch); the
    manifest records it, and :func:`~latentlab.morph.render_frame` re-creates a frame at the same compute batch.
    See the module notes for validation, locking, caching and resume. ``on_progress(done, total)`` is called after
    every batch of frames (widgets show their own progress bar with it); ``on_frames(start, frames)`` with the frames
themselves, as ``(n, H, W, 3)`` uint8 arrays exactly as they go to the video encoder (before ``upscale``).

    ``workers``: ``1`` renders in this process; ``N`` forks N single-thread worker processes that render compute
    batches into the frame cache while this process streams them to the video (same frames: see
    :mod:`latentlab.morph.workers`); ``"auto"`` picks one per available core for CPU renders (the CLI's default).
    """
    from tqdm.auto import tqdm

    from latentlab.video import VideoWriter

    f = lab.vae_scale_factor
    _, lh, lw = lab.latent_shape(height=settings.height, width=settings.width)
    output = check_render(settings, output, overwrite=overwrite, upscale=upscale, batch_size=batch_size,
                          frame_size=(lh * f, lw * f))
    s = lab.sampling(settings.sampling)
    compute = lab.compute_batch(batch_size)
    chunk = compute or GPU_CHUNK
    cache = cache_dir(output)
    r = ranks()
    n_workers = _resolve_workers(workers, lab, batch_size, -(-settings.n_frames // chunk), r.world_size)
    if n_workers > 1 and batch_size is None and compute:
        # Balance the workers: the smallest number of whole batches per worker that fits, each as large as it can be
        # (48 frames on 2 workers: 4 batches of 12, not 16 + 16 + 16 with one worker idle for a third of the time).
        per_worker = -(-settings.n_frames // (n_workers * compute))
        balanced = -(-settings.n_frames // (n_workers * per_worker))
        if balanced < compute:
            batch_size = compute = chunk = balanced
    sizes = call_sizes(settings.n_frames, compute, batch_size)
    leave = r.together(failed=f"rank 0 could not write {output} (finished frames are kept in {cache})")
    with _Lock(output, r), leave:
        p = plan(lab, settings, distance=distance)
        for i, call in enumerate(sizes):
            if call != batch_size:
                p.frames[i]["compute_batch"] = call  # a last, partial compute batch: generated at its own size
        size = (lh * f, lw * f)
        job = _Job(lab, p, s, cache, sizes, {c: _key_prefix(lab, s, c) for c in set(sizes)}, size, output.name)
        by_rank, damaged = None, 0
        if r.world_size > 1:
            by_rank, damaged = _render_share(job, r, chunk=chunk, progress=progress)
            if not r.is_main:
                return output  # rank 0 assembles the video and the manifest from the cache (this rank waits for it)
        # With audio the frames go to a silent video first; the sound is muxed in afterwards, atomically.
        silent = partial_path(output, suffix=".silent.mp4") if settings.audio is not None else None
        writer = VideoWriter(silent or output, fps=settings.fps, upscale=upscale, overwrite=overwrite or bool(silent))
        reused = rendered = 0
        starts = list(range(0, settings.n_frames, chunk))

        def render(start: int) -> tuple[int, int]:  # in a worker: the frames go to the cache only
            return _render_chunk(job, start, min(settings.n_frames, start + chunk))[:2]

        pool = LocalWorkers(n_workers, render) if n_workers > 1 else None
        try:
            with writer, pool or contextlib.nullcontext(), tqdm(total=settings.n_frames, desc="frames", unit="frame",
                                                                disable=not progress) as bar:
                if pool is not None:
                    pool.run(starts)
                for start in starts:
                    stop = min(settings.n_frames, start + chunk)
                    if pool is None:
                        done, bad, frames, keys = _render_chunk(job, start, stop)
                    else:
                        done, bad = pool.wait(start)
                        _, _, keys = job.keys(start, stop)
                        frames, _, _ = _cached_frames(cache, keys, size)
                        if any(fr is None for fr in frames):  # removed or damaged since it was written
                            raise OSError(f"frames {start}-{stop - 1} vanished from the cache {cache} while rendering")
                    reused, rendered, damaged = reused + (stop - start) - done, rendered + done, damaged + bad
                    writer.append(np.stack(frames))
                    if on_frames is not None:
                        on_frames(start, np.stack(frames))
                    for i in range(stop - start):
                        p.frames[start + i]["key"] = keys[i]
                    bar.update(stop - start)
                    if on_progress is not None:
                        on_progress(stop, settings.n_frames)
        except OSError as e:
            hint = disk_full_hint(e, output.parent)
            if hint:
                raise OSError(e.errno, f"{hint} (finished frames are kept in {cache})") from e
            raise
        finally:
            if cache.is_dir() and not any(cache.iterdir()):
                cache.rmdir()  # nothing to resume from: leave nothing behind
        if silent is not None:
            from latentlab.video import mux_audio

            a = settings.audio
            try:
                mux_audio(silent, a.path, offset=a.offset, duration=settings.n_frames / settings.fps, output=output,
                          overwrite=overwrite)
            finally:
                silent.unlink(missing_ok=True)
        if damaged:
            warnings.warn(f"{damaged} damaged frame(s) in the cache {cache} were rendered again", RuntimeWarning,
                          stacklevel=2)
        if by_rank is None:
            by_rank = [rendered]
        else:
            reused -= sum(by_rank)  # frames the ranks rendered in this run are not reuse
            by_rank[0] += rendered  # frames rank 0 had to render again while assembling (damaged meanwhile)
        if reused:
            log.info("resumed: %d of %d frames came from %s", reused, settings.n_frames, cache)
        prompts, seeds = settings.resolved()
        write_manifest(manifest_path(output), {
            "manifest_version": MANIFEST_VERSION,
            "video": output.name,
            "model": lab.model_id,
            "sampling": s.to_dict(),
            "backend": lab.provenance(batch_size),
            "schedule": lab.schedule(height=lh * lab.vae_scale_factor, width=lw * lab.vae_scale_factor, sampling=s),
            "settings": settings.to_dict(),
            "prompt_method": p.prompt_method,
            "pacing_distance": None if settings.pacing == "none"
            else getattr(distance or pixel_distance, "__name__", "?"),
            "resolved_keyframes": [{"prompt": pr, "seed": sd} for pr, sd in zip(prompts, seeds)],
            "upscale": upscale,
            "frames_reused_from_cache": reused,
            "damaged_cache_frames": damaged,
            "distributed": {"world_size": r.world_size, "frames_rendered_by_rank": by_rank},
            "workers": {"processes": n_workers, "torch_threads_each": 1 if pool is not None else torch.get_num_threads(),
                        "frames_rendered_by_worker": sorted(pool.rendered_by_pid.values(), reverse=True)
                        if pool is not None else [rendered]},
            "image_keyframes": p.image_keyframes,
            "frames": p.frames,
            "versions": versions(),
        })
    if not keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    return output
