"""Paths through latent space: keyframes to per-frame latents, frame schedules, easing and seamless loops.

A path visits ``K`` keyframes in order (and returns to the first when ``loop=True``). A :class:`Schedule` says,
for each of exactly ``n_frames`` frames, which segment it lies on and where (``t``); frames are spread evenly over
the segments with exact integer arithmetic, so no frame is repeated at a segment join or at a loop's seam.

Methods
-------
``"lerp"`` / ``"slerp"``
    Chained interpolation, segment by segment (slerp: see :func:`latentlab.ops.slerp`).
``"spline"``
    A C1-smooth spherical path: a Catmull-Rom cubic Hermite spline through the keyframes' unit directions,
    projected back onto the sphere, with a Catmull-Rom spline of their norms. It passes through every keyframe and
    its velocity is continuous there, where chained slerp turns a corner.

References: Catmull & Rom, "A class of local interpolating splines" (1974); Shoemake (1985) for slerp; easing
curves as in Penner, "Robert Penner's Easing Functions" (2001) and Perlin's smootherstep (2002).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from latentlab import _checks
from latentlab._tensors import compute_dtype, flat, unit
from latentlab.ops import lerp, slerp

__all__ = ["EASINGS", "METHODS", "Schedule", "circular_walk", "ease", "keyframe_path", "path_at", "retime", "schedule",
           "schedule_at"]

EASINGS: tuple[str, ...] = ("linear", "smoothstep", "smootherstep", "cosine", "ease-in", "ease-out")
METHODS: tuple[str, ...] = ("slerp", "lerp", "spline")


def ease(t: float | torch.Tensor, easing: str = "linear") -> float | torch.Tensor:
    """Map ``t`` in [0, 1] through an easing curve; every curve is monotone with ``ease(0) == 0``, ``ease(1) == 1``.

    ``smoothstep`` (3t²-2t³), ``smootherstep`` (6t⁵-15t⁴+10t³) and ``cosine`` start and end at zero velocity;
    ``ease-in`` (t²) starts slowly, ``ease-out`` (1-(1-t)²) ends slowly.

    >>> [round(ease(x, "smoothstep"), 3) for x in (0.0, 0.25, 0.5, 1.0)]
    [0.0, 0.156, 0.5, 1.0]
    """
    _checks.choice(easing, "easing", EASINGS)
    t = _checks.unit_interval(t)
    if easing == "linear":
        return t
    out = _EASE[easing](t)
    # Rounding can push a polynomial a few ulps past its end (smootherstep(0.9999999999999999) computed
    # 1.0000000000000013): every curve maps [0, 1] onto [0, 1], so clamp.
    return out.clamp(0.0, 1.0) if isinstance(out, torch.Tensor) else min(1.0, max(0.0, out))


def _cosine(t):
    c = torch.cos(t * math.pi) if isinstance(t, torch.Tensor) else math.cos(t * math.pi)
    return (1 - c) / 2


_EASE = {
    "smoothstep": lambda t: t * t * (3 - 2 * t),
    "smootherstep": lambda t: t * t * t * (t * (6 * t - 15) + 10),
    "cosine": _cosine,
    "ease-in": lambda t: t * t,
    "ease-out": lambda t: 1 - (1 - t) * (1 - t),
}


@dataclass(frozen=True)
class Schedule:
    """Where each frame of a path lies: frame ``i`` is ``t[i]`` of the way along segment ``segment[i]``.

    Segment ``s`` runs from keyframe ``s`` to keyframe ``s + 1`` (to keyframe 0 for the last segment of a loop).
    ``position[i]`` is the frame's place in keyframe units before easing (``segment + raw t``).
    """

    segment: tuple[int, ...]
    t: tuple[float, ...]
    position: tuple[float, ...]
    n_keyframes: int
    loop: bool
    easing: str

    def __len__(self) -> int:
        return len(self.t)

    @property
    def n_segments(self) -> int:
        return self.n_keyframes if self.loop else self.n_keyframes - 1


def schedule(n_keyframes: int, n_frames: int, *, loop: bool = False, easing: str = "linear") -> Schedule:
    """Spread exactly ``n_frames`` frames evenly over the segments between ``n_keyframes`` keyframes.

    An open path's first frame is the first keyframe and its last frame the last keyframe; a loop's frames stop
    one step short of its first keyframe, so playing the frames on repeat has no duplicate at the seam. Frames
    landing on an interior keyframe appear once (as ``t = 0`` of the next segment). Easing applies within each
    segment, so the easing curves that stop at zero velocity pause on every keyframe.

    Examples
    --------
    >>> s = schedule(3, 5)
    >>> s.segment, s.t
    ((0, 0, 1, 1, 1), (0.0, 0.5, 0.0, 0.5, 1.0))
    >>> schedule(2, 4, loop=True).position
    (0.0, 0.5, 1.0, 1.5)
    """
    n_keyframes = _checks.positive_int(n_keyframes, "n_keyframes", minimum=2)
    n_frames = _checks.positive_int(n_frames, "n_frames", minimum=2)
    if not isinstance(loop, bool):
        raise TypeError(f"`loop` must be a bool, got {type(loop).__name__}")
    _checks.choice(easing, "easing", EASINGS)
    n_seg = n_keyframes if loop else n_keyframes - 1
    denom = n_frames if loop else n_frames - 1
    segments, ts, positions = [], [], []
    for k in range(n_frames):
        seg, rem = divmod(k * n_seg, denom)  # exact: frame k sits at k * n_seg / denom segments
        if seg == n_seg:  # the open path's last frame: end of the last segment
            seg, rem = n_seg - 1, denom
        segments.append(seg)
        raw = rem / denom
        ts.append(float(ease(raw, easing)))
        positions.append(seg + raw)
    return Schedule(tuple(segments), tuple(ts), tuple(positions), n_keyframes, loop, easing)


def schedule_at(positions: Sequence[float], n_keyframes: int, *, loop: bool = False,
                easing: str = "linear") -> Schedule:
    """A :class:`Schedule` whose frames sit at given ``positions`` along the path, in keyframe units (``1.5``:
    half-way from keyframe 1 to 2), e.g. paced by music or placed in time. Non-decreasing, from 0 to the number of
    segments (excluded for a loop). A frame on an interior keyframe is ``t = 0`` of the next segment, the open
    path's end ``t = 1`` of the last; easing applies within each segment as in :func:`schedule`.

    >>> s = schedule_at([0.0, 0.25, 1.0, 2.0], 3)
    >>> s.segment, s.t
    ((0, 0, 1, 1), (0.0, 0.25, 0.0, 1.0))
    """
    n_keyframes = _checks.positive_int(n_keyframes, "n_keyframes", minimum=2)
    _checks.choice(easing, "easing", EASINGS)
    n_seg = n_keyframes if loop else n_keyframes - 1
    pos = [float(p) for p in positions]
    if len(pos) < 2:
        raise ValueError(f"`positions` must hold at least 2 frames, got {len(pos)}")
    if any(not math.isfinite(p) for p in pos) or any(b < a for a, b in itertools.pairwise(pos)):
        raise ValueError("`positions` must be finite and non-decreasing")
    if pos[0] < 0 or pos[-1] > n_seg or (loop and pos[-1] >= n_seg):
        raise ValueError(f"`positions` must lie in [0, {n_seg}{')' if loop else ']'}, got [{pos[0]:g}, {pos[-1]:g}]")
    segments, ts = [], []
    for p in pos:
        seg = min(math.floor(p), n_seg - 1)
        segments.append(seg)
        ts.append(float(ease(p - seg, easing)))
    return Schedule(tuple(segments), tuple(ts), tuple(pos), n_keyframes, loop, easing)


def _hermite(p0, p1, m0, m1, t):
    """Cubic Hermite interpolation; t: (T, 1, 1), the rest broadcastable."""
    t2, t3 = t * t, t * t * t
    return (2 * t3 - 3 * t2 + 1) * p0 + (t3 - 2 * t2 + t) * m0 + (-2 * t3 + 3 * t2) * p1 + (t3 - t2) * m1


def _catmull_rom_tangents(p: torch.Tensor, loop: bool) -> torch.Tensor:
    """Tangents (K, ...) for uniform Catmull-Rom; one-sided differences at an open path's ends."""
    if loop:
        return (torch.roll(p, -1, 0) - torch.roll(p, 1, 0)) / 2
    m = torch.empty_like(p)
    m[1:-1] = (p[2:] - p[:-2]) / 2
    m[0] = p[1] - p[0]
    m[-1] = p[-1] - p[-2]
    return m


def keyframe_path(
    keyframes: Sequence[torch.Tensor] | torch.Tensor,
    n_frames: int,
    *,
    method: str = "slerp",
    loop: bool = False,
    easing: str = "linear",
) -> torch.Tensor:
    """Per-frame latents along a path through ``keyframes``: a tensor of shape ``(n_frames, *keyframe.shape)``.

    Parameters
    ----------
    keyframes : sequence of torch.Tensor, or a stacked tensor (K, *shape)
        At least two, all of one shape, dtype and device. Batch items are independent paths.
    n_frames : int
        Exact number of frames (>= 2).
    method : {"slerp", "lerp", "spline"}
        Chained slerp or lerp, or the C1-smooth spherical spline (module docstring).
    loop : bool
        Return to the first keyframe; the seam has no duplicated frame.
    easing : str
        One of :data:`EASINGS`, applied within each segment.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> keys = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(4)]
    >>> keyframe_path(keys, 30, method="spline", loop=True).shape
    torch.Size([30, 1, 4, 8, 8])
    >>> path = keyframe_path(keys, 7)
    >>> torch.equal(path[0], keys[0]) and torch.equal(path[-1], keys[-1])
    True
    """
    keys = _checks.tensor_sequence(keyframes, "keyframes", min_len=2)
    sched = schedule(len(keys), n_frames, loop=loop, easing=easing)
    return path_at(keys, sched.segment, sched.t, method=method, loop=loop)


def path_at(
    keyframes: Sequence[torch.Tensor] | torch.Tensor,
    segment: Sequence[int],
    t: Sequence[float],
    *,
    method: str = "slerp",
    loop: bool = False,
) -> torch.Tensor:
    """The path through ``keyframes`` at given points: ``t[i]`` of the way along segment ``segment[i]``.

    :func:`keyframe_path` is this at a :func:`schedule`'s points; re-timed paths (e.g. perceptually even pacing)
    evaluate it at their own points. Returns ``(len(t), *keyframe.shape)``.

    >>> keys = torch.eye(2).view(2, 1, 2)
    >>> path_at(keys, [0, 0], [0.0, 0.5], method="lerp").squeeze(1)
    tensor([[1.0000, 0.0000],
            [0.5000, 0.5000]])
    """
    keys = _checks.tensor_sequence(keyframes, "keyframes", min_len=2)
    _checks.choice(method, "method", METHODS)
    k = len(keys)
    n_seg = k if loop else k - 1
    seg = torch.as_tensor(list(segment), dtype=torch.long)
    tt = torch.as_tensor(list(t), dtype=torch.float64)
    if seg.ndim != 1 or seg.shape != tt.shape:
        raise ValueError(f"`segment` and `t` must be 1-D and of equal length, got {tuple(seg.shape)} and {tuple(tt.shape)}")
    if len(seg) and (int(seg.min()) < 0 or int(seg.max()) >= n_seg):
        raise ValueError(f"`segment` values must be in [0, {n_seg}), got {int(seg.min())}..{int(seg.max())}")
    _checks.unit_interval(tt, "t")
    like = keys[0]
    if method in ("slerp", "lerp"):
        fn = slerp if method == "slerp" else lerp
        out = torch.empty((len(tt), *like.shape), dtype=like.dtype, device=like.device)
        for s in range(n_seg):
            idx = (seg == s).nonzero().flatten()
            if len(idx):
                out[idx.to(like.device)] = fn(keys[s], keys[(s + 1) % k], tt[idx].to(like.device))
        return out
    return _spline(keys, seg, tt, loop).to(like.dtype).reshape(len(tt), *like.shape)


def _spline(keys: list[torch.Tensor], seg: torch.Tensor, t: torch.Tensor, loop: bool) -> torch.Tensor:
    cd = compute_dtype(keys[0].dtype)
    x = torch.stack([flat(z, cd) for z in keys])  # (K, items, D)
    u, n = unit(x)
    if bool((n == 0).any()):
        raise ValueError("`keyframes` must not contain all-zero items for method='spline' (no direction)")
    mu = _catmull_rom_tangents(u, loop)
    mn = _catmull_rom_tangents(n, loop)
    k = len(keys)
    i0, i1 = seg.to(x.device), ((seg + 1) % k).to(x.device)
    tt = t.to(device=x.device, dtype=cd).view(-1, 1, 1)
    c = _hermite(u[i0], u[i1], mu[i0], mu[i1], tt)  # (T, items, D)
    d, cn = unit(c)
    if bool((cn < 1e-3).any()):
        raise ValueError(
            "the spline through `keyframes` passes near the origin (consecutive keyframes nearly opposite): "
            "add intermediate keyframes or use method='slerp'"
        )
    r = _hermite(n[i0], n[i1], mn[i0], mn[i1], tt.squeeze(-1)).unsqueeze(-1)
    out = d * r
    # Exact keyframes where a frame lands on one (t == 0 or 1), like the chained methods.
    at0 = (t == 0).to(x.device)
    at1 = (t == 1).to(x.device)
    out[at0] = x[i0[at0]]
    out[at1] = x[i1[at1]]
    return out


def retime(samples: Sequence[float] | torch.Tensor, distances: Sequence[float] | torch.Tensor,
           t: float | torch.Tensor) -> torch.Tensor:
    """Re-time a segment so equal steps in ``t`` make equal changes: invert the cumulative ``distances``.

    ``samples`` are increasing points from 0 to 1 where a segment was previewed and ``distances`` the change
    between consecutive previews (``len(samples) - 1`` non-negative values). The cumulative change, normalised to
    [0, 1], is a monotone curve C; the result is C⁻¹(t) (piecewise linear), so frames at evenly spaced ``t`` are
    evenly spaced in the distance. A tiny floor on the distances keeps C strictly increasing (a segment that does
    not change at all is re-timed linearly). 0 and 1 map to themselves.

    >>> [round(x, 3) for x in retime([0, 0.5, 1], [3.0, 1.0], torch.tensor([0.0, 0.75, 1.0])).tolist()]
    [0.0, 0.5, 1.0]
    """
    x = torch.as_tensor(samples, dtype=torch.float64).flatten()
    d = torch.as_tensor(distances, dtype=torch.float64).flatten()
    if len(x) < 2 or len(d) != len(x) - 1:
        raise ValueError(f"`distances` must have len(samples) - 1 = {len(x) - 1} values, got {len(d)}")
    if x[0] != 0 or x[-1] != 1 or bool((x.diff() <= 0).any()):
        raise ValueError("`samples` must increase strictly from 0 to 1")
    if not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
        raise ValueError("`distances` must be finite and non-negative")
    d = d + max(float(d.mean()), 1e-12) * 1e-3
    c = torch.cat([torch.zeros(1, dtype=torch.float64), d.cumsum(0)])
    c = c / c[-1]
    tt = torch.as_tensor(_checks.unit_interval(t), dtype=torch.float64).reshape(-1)
    j = torch.searchsorted(c, tt, right=True).clamp(1, len(c) - 1)
    w = (tt - c[j - 1]) / (c[j] - c[j - 1])
    out = (x[j - 1] + w * (x[j] - x[j - 1])).clamp(0, 1)
    out[tt == 0], out[tt == 1] = 0.0, 1.0
    return out


def circular_walk(a: torch.Tensor, b: torch.Tensor, n_frames: int) -> torch.Tensor:
    """A seamless loop ``a cos θ + b sin θ`` for ``θ = 2πk / n_frames``: shape ``(n_frames, *a.shape)``.

    For independent standard Gaussian ``a`` and ``b`` (two seeds' noise) every frame is itself exactly standard
    Gaussian, since ``cos² + sin² = 1``: the walk never leaves the distribution the model was trained on. Frame 0
    is ``a``; the frame after the last would be ``a`` again.

    >>> from latentlab.seeds import noise
    >>> walk = circular_walk(noise(1, (1, 4, 8, 8)), noise(2, (1, 4, 8, 8)), 24)
    >>> walk.shape, torch.equal(walk[0], noise(1, (1, 4, 8, 8)))
    (torch.Size([24, 1, 4, 8, 8]), True)
    """
    _checks.tensor(a, "a")
    _checks.tensor(b, "b")
    _checks.same_kind([a, b], ["a", "b"])
    n_frames = _checks.positive_int(n_frames, "n_frames", minimum=2)
    cd = compute_dtype(a.dtype)
    theta = torch.arange(n_frames, dtype=torch.float64) * (2 * math.pi / n_frames)
    c = torch.cos(theta).to(device=a.device, dtype=cd).view(-1, *[1] * a.ndim)
    s = torch.sin(theta).to(device=a.device, dtype=cd).view(-1, *[1] * a.ndim)
    out = (a.to(cd) * c + b.to(cd) * s).to(a.dtype)
    out[0] = a  # exact first frame
    return out
