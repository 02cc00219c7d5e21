"""Save and load latents and embeddings with their provenance, in safetensors (never pickles).

One responsibility: files of named tensors plus a JSON provenance record (seed, prompt, model id, scheduler, steps,
guidance, versions, anything else the caller adds) stored in the safetensors header's string metadata. Files are
written under a temporary name and renamed into place; an existing file is refused unless ``overwrite=True``.

Examples
--------
>>> import tempfile, torch
>>> from pathlib import Path
>>> path = Path(tempfile.mkdtemp()) / "z.safetensors"
>>> save(path, {"latents": torch.zeros(1, 4, 8, 8)}, provenance={"seed": 7, "prompt": "a red star"})
PosixPath('...z.safetensors')
>>> tensors, prov = load(path)
>>> tensors["latents"].shape, prov["seed"], prov["prompt"]
(torch.Size([1, 4, 8, 8]), 7, 'a red star')
"""

from __future__ import annotations

import functools
import json
import os
import platform
from pathlib import Path

import torch

from latentlab import _checks
from latentlab._files import atomic_write, check_input

__all__ = ["PROVENANCE_KEY", "load", "save", "versions"]

PROVENANCE_KEY = "latentlab.provenance"


def versions() -> dict[str, str]:
    """Versions of the packages that determine a result (those that are imported or installed)."""
    return dict(_versions())


@functools.cache
def _versions() -> tuple[tuple[str, str], ...]:
    from importlib import metadata

    from latentlab._version import __version__

    out = {"latentlab": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("diffusers", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return tuple(out.items())


def save(path: str | os.PathLike, tensors: dict[str, torch.Tensor], *, provenance: dict | None = None,
         overwrite: bool = False) -> Path:
    """Write ``tensors`` and a JSON-serialisable ``provenance`` dict (plus :func:`versions`) to ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"`path` must end in .safetensors, got {path.name!r}")
    if not isinstance(tensors, dict) or not tensors:
        raise TypeError("`tensors` must be a non-empty dict of name -> torch.Tensor")
    for k, v in tensors.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise TypeError(f"`tensors` must map str to torch.Tensor, got {type(k).__name__} -> {type(v).__name__}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    record = {"versions": versions(), **(provenance or {})}
    try:
        meta = json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`provenance` must be JSON-serialisable: {e}") from None
    for k, v in tensors.items():
        _checks.finite(v, f"tensors[{k!r}]")
    # Tensors that share memory (views of one another) cannot be saved as they are: each is stored as its own copy.
    data = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata={PROVENANCE_KEY: meta}), overwrite=overwrite)


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", keys=None,
         rows: slice | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read tensors and provenance written by :func:`save` (any safetensors file works; provenance may be empty).

    ``keys`` reads only those tensors and ``rows`` only those rows of each (a slice of the first dimension): the
    rest of the file is never read (safetensors maps it), so a column of a large file costs only its own bytes.
    """
    from safetensors import safe_open

    path = check_input(path, "safetensors file")
    if rows is not None and not isinstance(rows, slice):
        raise TypeError(f"`rows` must be a slice, got {type(rows).__name__}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            names = list(f.keys()) if keys is None else list(keys)
            missing = [k for k in names if k not in f.keys()]  # noqa: SIM118 - safe_open is not a dict
            if missing:
                raise KeyError(f"no tensor(s) {missing}")
            tensors = {k: f.get_tensor(k) if rows is None else f.get_slice(k)[rows] for k in names}
        provenance = json.loads(meta.get(PROVENANCE_KEY, "{}"))
    except KeyError as e:
        raise KeyError(f"{path}: {e.args[0]}") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a readable safetensors file (truncated or another format?): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(provenance, dict):
        raise ValueError(f"{path} has a provenance record that is not a JSON object")
    return tensors, provenance
