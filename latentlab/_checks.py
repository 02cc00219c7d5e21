"""Input validation shared by every public function: one place that words the errors.

Messages name the argument, the constraint and what was received (shapes, dtypes, devices; never values of tensors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import numpy as np
import torch


def tensor(x: object, name: str, *, min_ndim: int = 1, floating: bool = True, empty: bool = False,
           ndim: int | None = None, what: str = "") -> torch.Tensor:
    """Return ``x`` if it is a tensor of at least ``min_ndim`` dims (exactly ``ndim`` when given; ``what`` says
    what that shape means, e.g. "(N, 3, H, W) images"), floating point unless told, not empty (unless ``empty``),
    with only finite values, else raise.

    This is latentlab's NaN policy, in one place: every public function that takes a tensor refuses NaN and
    infinity at its boundary with a ``ValueError`` naming the argument (it never propagates them silently).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} dimension(s){f' ({what})' if what else ''}, got shape "
                         f"{tuple(x.shape)}")
    if x.ndim < min_ndim:
        raise ValueError(f"`{name}` must have at least {min_ndim} dimension(s), got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"`{name}` must have a floating-point dtype, got {x.dtype}")
    if not empty and x.numel() == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(x.shape)}): give at least one item")
    return finite(x, name)


def real_values(x: object, name: str, *, what: str = "values", empty: bool = False) -> np.ndarray:
    """A 1-D run of real numbers -- a list, a numpy array or a tensor; integers allowed (PCM audio), bool and
    complex not -- finite and not empty (unless ``empty``), as a float64 numpy array: the same NaN policy as
    :func:`tensor` for the numpy side of the library (audio, metrics).

    >>> real_values([1, 2.5], "distances").tolist()
    [1.0, 2.5]
    >>> real_values([[1.0]], "y", what="mono samples")
    Traceback (most recent call last):
    ...
    ValueError: `y` must be 1-D (mono samples), got shape (1, 1)
    """
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"`{name}` must hold real numbers, got dtype {x.dtype}")
        arr = x.detach().cpu().double().numpy()
    elif isinstance(x, (np.ndarray, list, tuple)):
        try:
            arr = np.asarray(x)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"`{name}` must be a 1-D run of numbers ({what}): {e}") from None
        if arr.dtype.kind not in "iuf":
            raise TypeError(f"`{name}` must hold real numbers, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    else:
        raise TypeError(f"`{name}` must be a 1-D array, list or tensor of {what}, got {type(x).__name__}")
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D ({what}), got shape {arr.shape}")
    if not empty and arr.size == 0:
        raise ValueError(f"`{name}` is empty: give at least one value ({what})")
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise ValueError(f"`{name}` must be finite, got {bad} NaN/infinite value(s) in {arr.size} {what}")
    return arr


def same_kind(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """Raise unless every tensor has the shape, dtype and device of the first."""
    first, first_name = tensors[0], names[0]
    for t, name in zip(tensors[1:], names[1:]):
        if t.shape != first.shape:
            raise ValueError(
                f"`{first_name}` and `{name}` must have the same shape, got {tuple(first.shape)} and {tuple(t.shape)}"
            )
        if t.dtype != first.dtype:
            raise TypeError(f"`{first_name}` and `{name}` must have the same dtype, got {first.dtype} and {t.dtype}")
        if t.device != first.device:
            raise ValueError(
                f"`{first_name}` and `{name}` must be on the same device, got {first.device} and {t.device}"
            )


def unit_interval(t: object, name: str = "t") -> float | torch.Tensor:
    """Validate an interpolation parameter: a real number or a 1-D tensor, every value finite and in [0, 1].

    A 0-d tensor is returned as a float. Tensors are returned on their own device, as given.
    """
    if isinstance(t, bool):
        raise TypeError(f"`{name}` must be a real number or a 1-D tensor, got bool")
    if isinstance(t, Real):
        value = float(t)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"`{name}` must be in [0, 1], got {value!r}")
        return value
    if isinstance(t, torch.Tensor):
        if t.ndim == 0:
            return unit_interval(t.item(), name)
        if t.ndim != 1:
            raise ValueError(f"`{name}` must be a number or a 1-D tensor, got a tensor of shape {tuple(t.shape)}")
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"`{name}` must be a real tensor, got dtype {t.dtype}")
        if len(t) == 0:
            raise ValueError(f"`{name}` must not be empty")
        tt = t.detach().double()
        if not bool(torch.isfinite(tt).all()) or bool((tt < 0).any()) or bool((tt > 1).any()):
            bad = tt[~(torch.isfinite(tt) & (tt >= 0) & (tt <= 1))]
            raise ValueError(f"every value of `{name}` must be in [0, 1], got {len(bad)} outside (first: {bad[0].item()!r})")
        return t
    raise TypeError(f"`{name}` must be a real number or a 1-D tensor, got {type(t).__name__}")


def positive_int(n: object, name: str, *, minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"`{name}` must be an int, got {type(n).__name__}")
    if n < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {n}")
    return n


def seed(s: object, name: str = "seed") -> int:
    """A seed: an int (not a bool) in [0, 2**64), the range of a torch.Generator seed."""
    if isinstance(s, bool) or not isinstance(s, int):
        raise TypeError(f"`{name}` must be an int, got {type(s).__name__}")
    if not 0 <= s < 2**64:
        raise ValueError(f"`{name}` must be in [0, 2**64), got {s}")
    return s


def choice(value: object, name: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"`{name}` must be one of {tuple(options)}, got {value!r}")
    return value  # type: ignore[return-value]


def tensor_sequence(xs: object, name: str, *, min_len: int) -> list[torch.Tensor]:
    """A non-empty list/tuple of same-kind floating tensors, or a tensor whose first dim indexes them."""
    if isinstance(xs, torch.Tensor):
        tensor(xs, name, min_ndim=2)
        items = list(xs.unbind(0))
    elif isinstance(xs, (list, tuple)):
        items = [tensor(x, f"{name}[{i}]") for i, x in enumerate(xs)]
    else:
        raise TypeError(f"`{name}` must be a list or tuple of tensors, or a stacked tensor, got {type(xs).__name__}")
    if len(items) < min_len:
        raise ValueError(f"`{name}` must hold at least {min_len} tensors, got {len(items)}")
    same_kind(items, [f"{name}[{i}]" for i in range(len(items))])
    return items


def real(x: object, name: str, *, low: float | None = None, high: float | None = None,
         low_inclusive: bool = True) -> float:
    """A finite real number (not a bool) within ``[low, high]`` (``(low, high]`` with ``low_inclusive=False``).

    >>> real(7.5, "guidance_scale", low=0)
    7.5
    >>> real(float("nan"), "guidance_scale")
    Traceback (most recent call last):
    ...
    ValueError: `guidance_scale` must be a finite number, got nan
    """
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"`{name}` must be a real number, got {type(x).__name__}")
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"`{name}` must be {'>=' if low_inclusive else '>'} {low:g}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"`{name}` must be <= {high:g}, got {value!r}")
    return value


#: Frame rates a video can have: ffmpeg's H.264 muxer fails below 1e-4 fps (measured), and one frame per 100 s is
#: already a slide show; above 240 fps no player shows the frames.
MIN_FPS, MAX_FPS = 0.01, 240.0


def frame_rate(fps: object, name: str = "fps") -> float:
    """A video frame rate in [MIN_FPS, MAX_FPS] frames per second.

    >>> frame_rate(1e-6)
    Traceback (most recent call last):
    ...
    ValueError: `fps` must be >= 0.01, got 1e-06
    """
    return real(fps, name, low=MIN_FPS, high=MAX_FPS)


def finite(x: torch.Tensor, name: str) -> torch.Tensor:
    """Raise if a floating tensor holds NaN or infinity (names how many, never the values)."""
    if x.is_floating_point() and x.device.type != "meta" and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"`{name}` must be finite, got {bad} NaN/infinite value(s) in a tensor of shape "
                         f"{tuple(x.shape)}")
    return x


def within(x: torch.Tensor, name: str, low: float, high: float, *, hint: str = "") -> torch.Tensor:
    """Raise unless every value of a finite tensor lies in [low, high] (a little float slack allowed)."""
    finite(x, name)
    slack = 1e-3 * (high - low)
    lo, hi = float(x.min()), float(x.max())
    if lo < low - slack or hi > high + slack:
        raise ValueError(f"`{name}` values must be in [{low:g}, {high:g}], got values in [{lo:.4g}, {hi:.4g}]"
                         + (f"; {hint}" if hint else ""))
    return x
