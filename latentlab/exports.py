"""Exports into the tools users already have: ComfyUI latents and conditioning, Deforum keyframe schedules, and
directions as plain ``.npy`` vectors.

One responsibility: file formats of other tools, each with a reader, so an exploration started in latentlab can be
finished elsewhere (and every writer is tested by reading its file back).

- **ComfyUI latents** (``.latent``): what ComfyUI's ``SaveLatent`` writes and its ``LoadLatent`` node reads: a
  safetensors file with ``latent_tensor`` (batch, 4, h, w) and an empty ``latent_format_version_0`` marker. ComfyUI
  keeps latents as the VAE produces them and applies the model's scaling inside the model, so a diffusers latent
  ``z`` is stored as ``z / scaling_factor + shift_factor`` (the VAE config's ``scaling_factor``: 0.18215 for SD
  1.x/2.x, 0.13025 for SDXL; SD3 and Flux latents have 16 channels and a ``shift_factor`` too, which ComfyUI's SD3
  and Flux latent formats subtract on the way in: ``(latent - shift) * scale``). Flux.2's ComfyUI latents are its
  128 patchified, batch-norm-normalised channels with no scale (``Lab.comfyui_latents`` puts them in that layout).
  A morph's initial noise exported this way is, inside ComfyUI, exactly latentlab's per-frame noise.
- **ComfyUI conditioning**: ComfyUI holds conditioning as a list of ``[cond (1, 77, D), {"pooled_output": (1, D)}]``
  per item and has no core file format for it; :func:`write_comfyui_conditioning` stores the tensors in one
  safetensors file (``cond``, optional ``pooled_output`` and ``attention_mask``) and :func:`read_comfyui_conditioning` returns exactly
  ComfyUI's structure (a custom node is three lines: ``return (read_comfyui_conditioning(path),)``).
- **Deforum schedules**: ``prompts`` as ``{"frame": "prompt"}`` and ``seed_schedule`` / ``cfg_scale_schedule`` /
  ``steps_schedule`` as Deforum's ``"0:(1), 47:(2)"`` strings, plus ``max_frames``, ``fps`` and the sampler.
- **Directions** as ``.npy`` (no pickles): one float32 array, e.g. a prompt direction (77, D) or a latent direction.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from latentlab import _checks
from latentlab._files import atomic_write, atomic_write_text, check_input, check_output
from latentlab.backend import Conditioning
from latentlab.morph import Keyframe, MorphSettings
from latentlab.sampling import Sampling

__all__ = [
    "load_direction", "read_comfyui_conditioning", "read_comfyui_latent", "read_deforum_schedule", "save_direction",
    "write_comfyui_conditioning", "write_comfyui_latent", "write_deforum_schedule",
]


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], *, overwrite: bool) -> Path:
    from safetensors.torch import save_file

    data = {k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata=meta), overwrite=overwrite)


def write_comfyui_latent(latents: torch.Tensor, path: str | os.PathLike, *, scaling_factor: float,
                         shift_factor: float = 0.0, overwrite: bool = False) -> Path:
    """Write diffusers-scaled ``latents`` (batch, C, h, w) as a ComfyUI ``.latent`` file (see the module notes).

    Examples
    --------
    >>> import tempfile
    >>> z = torch.randn(3, 4, 8, 8)
    >>> path = write_comfyui_latent(z, Path(tempfile.mkdtemp()) / "noise.latent", scaling_factor=0.18215)
    >>> torch.allclose(read_comfyui_latent(path, scaling_factor=0.18215), z)
    True
    >>> flux = torch.randn(1, 16, 8, 8)                     # Flux: 16 channels, scale and shift
    >>> path = write_comfyui_latent(flux, Path(tempfile.mkdtemp()) / "f.latent", scaling_factor=0.3611,
    ...                             shift_factor=0.1159)
    >>> torch.allclose(read_comfyui_latent(path, scaling_factor=0.3611, shift_factor=0.1159), flux, atol=1e-6)
    True
    """
    _checks.tensor(latents, "latents", min_ndim=4)
    _checks.finite(latents, "latents")
    _checks.real(scaling_factor, "scaling_factor", low=0.0, low_inclusive=False)
    _checks.real(shift_factor, "shift_factor")
    path = check_output(path, "path", overwrite=overwrite, suffixes=(".latent",))
    return _save_safetensors(path, {"latent_tensor": latents.float() / scaling_factor + shift_factor,
                                    "latent_format_version_0": torch.tensor([])},
                             {"latentlab": json.dumps({"scaling_factor": scaling_factor,
                                                       "shift_factor": shift_factor})}, overwrite=overwrite)


def read_comfyui_latent(path: str | os.PathLike, *, scaling_factor: float, shift_factor: float = 0.0) -> torch.Tensor:
    """A ComfyUI ``.latent`` file as diffusers-scaled latents (ComfyUI's own ``LoadLatent`` arithmetic, then
    ``(x - shift_factor) * scaling_factor``)."""
    data = _load_safetensors(path, "ComfyUI latent")
    if "latent_tensor" not in data:
        raise ValueError(f"{path} is not a ComfyUI latent (no latent_tensor)")
    multiplier = 1.0 if "latent_format_version_0" in data else 1.0 / 0.18215  # ComfyUI's LoadLatent
    return (data["latent_tensor"].float() * multiplier - shift_factor) * scaling_factor


def write_comfyui_conditioning(conditioning: Conditioning, path: str | os.PathLike, *,
                               overwrite: bool = False) -> Path:
    """Write ``conditioning`` (one item per frame) for :func:`read_comfyui_conditioning`."""
    if not isinstance(conditioning, Conditioning):
        raise TypeError(f"`conditioning` must be a Conditioning, got {type(conditioning).__name__}")
    path = check_output(path, "path", overwrite=overwrite, suffixes=(".safetensors",))
    tensors = {"cond": conditioning.prompt_embeds}
    if conditioning.pooled_prompt_embeds is not None:
        tensors["pooled_output"] = conditioning.pooled_prompt_embeds
    if conditioning.attention_mask is not None:  # text-token masks (Chroma, ...): ComfyUI's "attention_mask"
        tensors["attention_mask"] = conditioning.attention_mask
    return _save_safetensors(path, tensors, {"format": "comfyui-conditioning"}, overwrite=overwrite)


def read_comfyui_conditioning(path: str | os.PathLike) -> list:
    """ComfyUI's CONDITIONING structure: ``[[cond (1, 77, D), {"pooled_output": (1, D)}], ...]``, one per item
    (``"attention_mask"`` too where the model masks its text tokens)."""
    data = _load_safetensors(path, "conditioning file")
    if "cond" not in data:
        raise ValueError(f"{path} is not a conditioning file (no cond tensor)")
    extra = {k: data[k] for k in ("pooled_output", "attention_mask") if k in data}
    return [[data["cond"][i : i + 1], {k: v[i : i + 1] for k, v in extra.items()}] for i in range(len(data["cond"]))]


def _load_safetensors(path, what: str) -> dict:
    """Every tensor of a safetensors file, with damaged files reported as ValueError naming the path."""
    from latentlab import store

    try:
        return store.load(path)[0]
    except ValueError as e:
        raise ValueError(f"{e} (expected a {what})") from None


def _keyframe_frames(settings: MorphSettings) -> list[int]:
    """The frame nearest to each keyframe (:func:`latentlab.paths.schedule` puts keyframe ``j`` at frame
    ``j * denom / n_segments``, exactly on a frame only when that divides; Deforum keys are whole frames)."""
    k, n = len(settings.keyframes), settings.n_frames
    n_seg, denom = (k, n) if settings.loop else (k - 1, n - 1)
    frames = [round(j * denom / n_seg) for j in range(k)]
    if len(set(frames)) != k:
        raise ValueError(f"{n} frames cannot give each of {k} keyframes a frame of its own")
    return frames


def _schedule_string(pairs) -> str:
    return ", ".join(f"{frame}:({value})" for frame, value in pairs)


def write_deforum_schedule(settings: MorphSettings, path: str | os.PathLike, *, sampling: Sampling | None = None,
                           overwrite: bool = False) -> Path:
    """Deforum-style settings JSON for a morph: prompts and seeds at their keyframes' frames (see module notes).

    ``sampling`` (default ``settings.sampling``) should be the complete record (``lab.sampling(...)``) so that
    steps, guidance and scheduler are written; fields left ``None`` are left out.

    Examples
    --------
    >>> import tempfile
    >>> s = MorphSettings(keyframes=(Keyframe("a red star", 1), Keyframe("a blue ring", 2)), n_frames=48)
    >>> path = write_deforum_schedule(s, Path(tempfile.mkdtemp()) / "deforum.json")
    >>> d = json.loads(path.read_text())
    >>> d["prompts"], d["seed_schedule"], d["max_frames"]
    ({'0': 'a red star', '47': 'a blue ring'}, '0:(1), 47:(2)', 48)
    """
    if not isinstance(settings, MorphSettings):
        raise TypeError(f"`settings` must be a MorphSettings, got {type(settings).__name__}")
    if any(k.image is not None or k.mix is not None for k in settings.keyframes):
        raise ValueError("keyframes from images or Mix blends have no Deforum equivalent: export the plan's "
                         "latents and conditioning to ComfyUI instead")
    path = check_output(path, "path", overwrite=overwrite, suffixes=(".json", ".txt"))
    s = sampling or settings.sampling
    prompts, seeds = settings.resolved()
    frames = _keyframe_frames(settings)
    doc = {
        "prompts": {str(f): p for f, p in zip(frames, prompts)},
        "seed_behavior": "schedule",
        "seed_schedule": _schedule_string(zip(frames, seeds)),
        "max_frames": settings.n_frames,
        "fps": settings.fps,
        "animation_mode": "None" if not settings.loop else "Interpolation",
        "latentlab": {"noise_interpolation": settings.noise_interpolation,
                      "prompt_interpolation": settings.prompt_interpolation, "loop": settings.loop},
    }
    if s.guidance_scale is not None:
        doc["cfg_scale_schedule"] = _schedule_string([(0, s.guidance_scale)])
    if s.num_inference_steps is not None:
        doc["steps_schedule"] = _schedule_string([(0, s.num_inference_steps)])
    if s.scheduler is not None:
        doc["sampler"] = s.scheduler
    if s.negative_prompt:
        doc["negative_prompts"] = {"0": s.negative_prompt}
    atomic_write_text(path, json.dumps(doc, indent=1), overwrite=overwrite)
    return path


_ENTRY = re.compile(r"^\s*(\d+)\s*:\s*\((.*)\)\s*$")


def _parse_schedule(text: str, name: str) -> list[tuple[int, str]]:
    out = []
    for part in text.split(","):
        m = _ENTRY.match(part)
        if not m:
            raise ValueError(f"`{name}` is not a Deforum schedule (\"0:(v), 24:(w)\"): bad entry {part.strip()!r}")
        out.append((int(m.group(1)), m.group(2).strip()))
    return out


def read_deforum_schedule(path: str | os.PathLike) -> MorphSettings:
    """A Deforum-style schedule as :class:`~latentlab.morph.MorphSettings`: one keyframe per prompt frame (seeds
    from ``seed_schedule`` at the same frames), ``max_frames``, ``fps``, and constant steps/guidance/sampler."""
    path = check_input(path, "Deforum schedule")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a Deforum schedule (not JSON: {e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("prompts"), dict) or "max_frames" not in d:
        raise ValueError(f"{path} is not a Deforum schedule (needs prompts and max_frames)")
    prompt_at = sorted((int(f), p) for f, p in d["prompts"].items())
    seeds = _parse_schedule(d["seed_schedule"], "seed_schedule") if "seed_schedule" in d else []
    seed_at = {f: int(v) for f, v in seeds}
    keyframes = tuple(Keyframe(p, seed_at.get(f)) for f, p in prompt_at)
    sampling = {}
    if "steps_schedule" in d:
        sampling["num_inference_steps"] = int(_parse_schedule(d["steps_schedule"], "steps_schedule")[0][1])
    if "cfg_scale_schedule" in d:
        sampling["guidance_scale"] = float(_parse_schedule(d["cfg_scale_schedule"], "cfg_scale_schedule")[0][1])
    if "sampler" in d:
        sampling["scheduler"] = d["sampler"]
    if "negative_prompts" in d:
        sampling["negative_prompt"] = next(iter(d["negative_prompts"].values()))
    extra = d.get("latentlab", {})
    return MorphSettings(keyframes=keyframes, n_frames=int(d["max_frames"]), fps=float(d.get("fps", 12.0)),
                         sampling=Sampling(**sampling), loop=bool(extra.get("loop", False)),
                         **{k: extra[k] for k in ("noise_interpolation", "prompt_interpolation") if k in extra})


def save_direction(direction, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a direction (a tensor, or a :class:`~latentlab.backend.Conditioning` from ``prompt_direction``: its
    ``prompt_embeds``) as a float32 ``.npy`` array."""
    if isinstance(direction, Conditioning):
        direction = direction.prompt_embeds
    _checks.tensor(direction, "direction", min_ndim=1)
    _checks.finite(direction, "direction")
    path = check_output(path, "path", overwrite=overwrite, suffixes=(".npy",))
    arr = direction.detach().cpu().float().numpy()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a temporary name
            np.save(f, arr, allow_pickle=False)

    return atomic_write(path, write, overwrite=overwrite)


def load_direction(path: str | os.PathLike) -> torch.Tensor:
    """A direction saved by :func:`save_direction` (or any numeric ``.npy``; pickles are refused)."""
    path = check_input(path, ".npy direction")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a plain numeric .npy array ({e})") from None
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{path} holds {arr.dtype}, not numbers")
    return torch.from_numpy(np.ascontiguousarray(arr)).float()
