"""Morph manifests: the JSON record beside a video that re-creates any of its frames.

One responsibility: write manifests (atomically, strict JSON: no NaN), read them back with a clear error for every
way a file can be wrong (missing, truncated, binary, not an object, missing or unknown keys, a newer version),
and re-create one frame (:func:`render_frame`). Version 1 manifests (latentlab 0.1 before the ``Sampling``
record) are read too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch

from latentlab import _checks
from latentlab._files import atomic_write_text
from latentlab.backend import Backend
from latentlab.morph.settings import PROMPT_METHODS, MorphSettings
from latentlab.sampling import Sampling

__all__ = ["MANIFEST_VERSION", "manifest_path", "manifest_settings", "read_manifest", "render_frame",
           "write_manifest"]

MANIFEST_VERSION = 2
_REQUIRED = ("manifest_version", "video", "model", "sampling", "backend", "settings", "frames")
_OPTIONAL = ("pacing_distance", "resolved_keyframes", "upscale", "frames_reused_from_cache", "damaged_cache_frames",
             "image_keyframes", "versions", "distributed", "workers", "schedule", "prompt_method")


def manifest_path(video: str | os.PathLike) -> Path:
    """The manifest that sits beside ``video``: ``morph.mp4`` -> ``morph.mp4.json``."""
    video = Path(video)
    return video.with_name(video.name + ".json")


def write_manifest(path: Path, data: dict) -> Path:
    """Strict JSON (a NaN anywhere is a bug upstream, not something to write), atomically."""
    return atomic_write_text(path, json.dumps(data, indent=1, allow_nan=False) + "\n")


def _from_v1(d: dict) -> dict:
    """A version-1 manifest (sampling fields inside settings, model fingerprint at the top) as version 2."""
    d = dict(d)
    settings = dict(d.get("settings") or {})
    sampling = {k: settings.pop(k, None) for k in ("num_inference_steps", "guidance_scale", "negative_prompt")}
    sampling["num_inference_steps"] = d.pop("num_inference_steps", None) or sampling["num_inference_steps"]
    g = d.pop("guidance_scale", None)
    sampling["guidance_scale"] = sampling["guidance_scale"] if g is None else g
    sampling["scheduler"] = (d.pop("scheduler", None) or {}).get("class")
    d.update(manifest_version=MANIFEST_VERSION, settings=settings, sampling=sampling,
             backend={"model": d.get("model"), "model_fingerprint": d.pop("model_fingerprint", None),
                      "compute_batch": 16, "batch_invariant": True})
    return d


def read_manifest(manifest: str | os.PathLike | dict) -> dict:
    """A validated manifest (a path or an already parsed dict); ``ValueError`` says what is wrong with it."""
    if isinstance(manifest, dict):
        data, name = manifest, "the manifest"
    else:
        path = Path(manifest)
        name = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such manifest: {path}")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a latentlab manifest (binary, not UTF-8 JSON text)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): truncated or edited?") from None
    if not isinstance(data, dict):
        raise ValueError(f"{name} is not a latentlab manifest (its JSON is a {type(data).__name__}, not an object)")
    version = data.get("manifest_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{name} is not a latentlab video manifest (no integer manifest_version)")
    if version > MANIFEST_VERSION:
        raise ValueError(f"{name} was written by a newer latentlab (manifest_version {version}; this version reads "
                         f"up to {MANIFEST_VERSION}): upgrade latentlab")
    if version < 1:
        raise ValueError(f"{name} has an unknown manifest_version {version}")
    if version == 1:
        data = _from_v1(data)
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{name} is missing key(s) {missing}")
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ValueError(f"{name} has unknown key(s) {unknown} (edited, or from another tool?)")
    try:
        settings = MorphSettings.from_dict(_settings_as_written(data["settings"]))
        Sampling.from_dict(data["sampling"])
    except FileNotFoundError:
        raise
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} has invalid settings: {e}") from None
    if not isinstance(data["frames"], list) or len(data["frames"]) != settings.n_frames:
        raise ValueError(f"{name} must list {settings.n_frames} frames, got "
                         f"{len(data['frames']) if isinstance(data['frames'], list) else type(data['frames']).__name__}")
    if not isinstance(data["model"], str):
        raise ValueError(f"{name} has no model name")
    method = data.get("prompt_method")
    if method is not None and (method not in PROMPT_METHODS or method == "auto"):
        raise ValueError(f"{name}: `prompt_method` must be one of {[m for m in PROMPT_METHODS if m != 'auto']}, "
                         f"got {method!r}")
    if settings.prompt_interpolation == "auto" and method is None:
        raise ValueError(f"{name} has prompt interpolation 'auto' but no resolved `prompt_method`")
    _check_nested(data, settings, name)
    return data


def _settings_as_written(d):
    """Settings written before the prompt path was a setting ran ``"lerp"`` (not today's default)."""
    if isinstance(d, dict) and "prompt_interpolation" not in d:
        return {**d, "prompt_interpolation": "lerp"}
    return d


def manifest_settings(data: dict) -> MorphSettings:
    """The settings of a validated manifest as they ran: prompt interpolation ``"auto"`` replaced by the method
    the render resolved (``prompt_method``), so a frame is re-created the same way whatever this model would
    pick now; settings written before the prompt path was recorded ran ``"lerp"``."""
    settings = MorphSettings.from_dict(_settings_as_written(data["settings"]))
    if settings.prompt_interpolation == "auto":
        settings = dataclasses.replace(settings, prompt_interpolation=data["prompt_method"])
    return settings


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_nested(data: dict, settings: MorphSettings, name: str) -> None:
    """Every nested field that re-creating a frame reads, checked before any model loads."""
    backend = data["backend"]
    if not isinstance(backend, dict):
        raise ValueError(f"{name}: `backend` must be an object, got {type(backend).__name__}")
    for key in ("compute_batch",):
        if key in backend and (not _is_int(backend[key]) or backend[key] < 0):
            raise ValueError(f"{name}: `backend.{key}` must be a non-negative integer, got {backend[key]!r}")
    n_seg = len(settings.keyframes) if settings.loop else len(settings.keyframes) - 1
    for i, f in enumerate(data["frames"]):
        if not isinstance(f, dict):
            raise ValueError(f"{name}: `frames[{i}]` must be an object, got {type(f).__name__}")
        for key in ("noise_segment", "prompt_segment"):
            v = f.get(key)
            if not _is_int(v) or not 0 <= v < n_seg:
                raise ValueError(f"{name}: `frames[{i}].{key}` must be an integer in [0, {n_seg}), got {v!r}")
        for key in ("noise_t", "prompt_t"):
            v = f.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{name}: `frames[{i}].{key}` must be a number in [0, 1], got {v!r}")
        call = f.get("compute_batch")
        if call is not None and (not _is_int(call) or call < 1):
            raise ValueError(f"{name}: `frames[{i}].compute_batch` must be a positive integer, got {call!r}")
    images = data.get("image_keyframes", [])
    if not isinstance(images, list) or not all(
            isinstance(d, dict) and _is_int(d.get("keyframe")) and isinstance(d.get("sha256"), str) for d in images):
        raise ValueError(f"{name}: `image_keyframes` must list objects with an integer keyframe and a sha256")
    workers = data.get("workers")
    if workers is not None and not isinstance(workers, dict):
        raise ValueError(f"{name}: `workers` must be an object, got {type(workers).__name__}")


def render_frame(lab: Backend, manifest: str | os.PathLike | dict, index: int) -> torch.Tensor:
    """Re-create frame ``index`` of a rendered morph from its manifest: (1, 3, H, W) in [0, 1].

    Uses the manifest's own per-frame positions (so paced renders need no previews), its complete sampling
    settings and its compute batch (so the frame is bit-identical to the video's on the same machine), and warns
    if the model's fingerprint differs from the one that rendered the video.
    """
    from latentlab.morph.plan import plan

    data = read_manifest(manifest)
    settings = manifest_settings(data)
    _checks.positive_int(index, "index", minimum=0)
    if index >= settings.n_frames:
        raise ValueError(f"`index` must be < {settings.n_frames} (the number of frames), got {index}")
    recorded = data["backend"]
    fp = recorded.get("model_fingerprint")
    if fp and lab.provenance()["model_fingerprint"] != fp:
        warnings.warn(f"the manifest was rendered by model {data['model']!r} with fingerprint {fp}, this one is "
                      f"{lab.provenance()['model_fingerprint']}: the frame will differ", RuntimeWarning, stacklevel=2)
    ran = [o.split(":")[0] for o in recorded.get("optimizations", [])]
    here = [o.split(":")[0] for o in lab.provenance().get("optimizations", [])]
    if ran != here:
        warnings.warn(f"the manifest was rendered with the optimizations {ran or 'none'}, this model runs "
                      f"{here or 'none'} (Lab.optimize): the frame will differ in the last bits", RuntimeWarning,
                      stacklevel=2)
    p = plan(lab, settings, frames=data["frames"])
    shas = {d["keyframe"]: d["sha256"] for d in data.get("image_keyframes", [])}
    for d in p.image_keyframes:
        if shas.get(d["keyframe"]) not in (None, d["sha256"]):
            warnings.warn(f"keyframe image {d['image']} changed since the render: the frame will differ",
                          RuntimeWarning, stacklevel=2)
    lat, cond = p.inputs(index, index + 1)
    call = data["frames"][index].get("compute_batch") or recorded.get("compute_batch") or None  # a last, partial
    # batch has its own size. At some batch sizes the last float bits depend on torch's thread count (measured: up to
    # 5e-6), so the frame is re-created at the thread count that rendered it.
    threads = (data.get("workers") or {}).get("torch_threads_each")
    before = torch.get_num_threads()
    if threads and str(recorded.get("device", "cpu")).startswith("cpu"):
        torch.set_num_threads(threads)
    try:
        return lab.generate(lat, cond, sampling=Sampling.from_dict(data["sampling"]), batch_size=call)
    finally:
        torch.set_num_threads(before)
