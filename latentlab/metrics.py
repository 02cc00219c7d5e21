"""How good a morph is, as numbers: the literature's path measures over the frames of a morph.

One responsibility: turn a sequence of frames (or of their embeddings) into the measures that image-morphing
papers report, so that every interpolation mode can be compared on the same scale. Pure torch: the distance is a
plain function of two image batches (RMS pixels by default, or ``1 - cos`` of any embedding such as the embedded
CLIP's, :func:`embedding_distance`).

Measures over the ``n - 1`` consecutive-frame distances ``d_i`` of ``n`` frames:

- **PPL** (perceptual path length), ``sum d_i``: how far the morph travels. A detour through a third image makes
  it longer (Karras et al. 2019 define PPL as the expected distance of small steps; DiffMorpher and IMPUS report
  the sum over a morph's frames).
- **PDV** (perceptual distance variance), ``var(d_i)``: how unevenly the morph changes (DiffMorpher, Zhang et al.
  2024, whose retiming lowers it by 86 % against uniform ``t`` at 6 % more PPL).
- **Smoothness**, ``1 - Gini(d_i)``: 1 when every step changes the image equally, near 0 when one step does all
  the change (AID, He et al. 2024). Unlike PDV it is scale-free.
- **Jump ratio**, ``max d_i / mean d_i``: the largest single change against the average one (1 is perfectly even).

Attribute measures need a reader of attributes (the synthetic world's evaluator supplies one):
:func:`monotonic` tells whether a sequence of read values changes from the first endpoint's value to the second's
at most once and never comes back.

References: Karras et al., "A Style-Based Generator Architecture for GANs" (2019); Zhang et al., "DiffMorpher"
(CVPR 2024); He et al., "AID: Attention Interpolation of Text-to-Image Diffusion" (NeurIPS 2024); Yang et al.,
"IMPUS" (ICLR 2024).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from latentlab import _checks

__all__ = [
    "PathScores",
    "consecutive_distances",
    "distance_variance",
    "embedding_distance",
    "gini",
    "jump_ratio",
    "monotonic",
    "path_length",
    "path_scores",
    "pixel_distance",
    "smoothness",
]

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pixel_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RMS pixel difference of each pair of images (``(N, C, H, W)`` in [0, 1]), area-downsampled to at most 64 px
    on the long side so large images cost little. Returns ``(N,)``.

    >>> pixel_distance(torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.5)).tolist()
    [0.5, 0.5]
    """
    _check_images(a, "a")
    _check_images(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"`a` and `b` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    side = max(a.shape[-2:])
    if side > 64:
        size = (max(1, a.shape[-2] * 64 // side), max(1, a.shape[-1] * 64 // side))
        a = torch.nn.functional.interpolate(a, size=size, mode="area")
        b = torch.nn.functional.interpolate(b, size=size, mode="area")
    return (a.float() - b.float()).pow(2).flatten(1).mean(1).sqrt()


def embedding_distance(embed: Callable[[torch.Tensor], torch.Tensor], *, name: str | None = None) -> Distance:
    """A distance ``1 - cos`` between embeddings of images, e.g. ``embedding_distance(clip.embed_images)``.

    ``embed`` maps ``(N, C, H, W)`` images to ``(N, D)`` vectors (normalised here, so any scale works).

    >>> d = embedding_distance(lambda x: x.flatten(1))
    >>> round(float(d(torch.ones(1, 1, 2, 2), -torch.ones(1, 1, 2, 2))[0]), 6)
    2.0
    """
    if not callable(embed):
        raise TypeError(f"`embed` must be callable, got {type(embed).__name__}")

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        e = embed(torch.cat([a, b])).float()
        e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return (1 - (e[: len(a)] * e[len(a) :]).sum(-1)).clamp(min=0)

    distance.__name__ = name or f"embedding:{getattr(embed, '__qualname__', 'embed')}"
    return distance


def consecutive_distances(frames: torch.Tensor, *, distance: Distance | None = None) -> torch.Tensor:
    """The ``n - 1`` distances between consecutive frames of ``frames`` ``(n, C, H, W)`` (float64).

    >>> f = torch.zeros(3, 1, 2, 2); f[1] += 0.1; f[2] += 0.4
    >>> [round(x, 6) for x in consecutive_distances(f).tolist()]
    [0.1, 0.3]
    """
    _check_images(frames, "frames")
    if len(frames) < 2:
        raise ValueError(f"`frames` must hold at least 2 frames, got {len(frames)}")
    d = (distance or pixel_distance)(frames[:-1], frames[1:])
    return torch.as_tensor(d).detach().double().flatten().cpu()


def path_length(distances: Sequence[float] | torch.Tensor) -> float:
    """PPL: the sum of the consecutive distances."""
    return float(_distances(distances).sum())


def distance_variance(distances: Sequence[float] | torch.Tensor) -> float:
    """PDV: the (population) variance of the consecutive distances."""
    return float(_distances(distances).var(unbiased=False))


def gini(distances: Sequence[float] | torch.Tensor) -> float:
    """The Gini coefficient of non-negative values: 0 when all are equal, ``1 - 1/n`` when one holds everything.
    All zero (a still morph) counts as perfectly even: 0.

    >>> gini([1, 1, 1, 1]), round(gini([0, 0, 0, 4]), 6)
    (0.0, 0.75)
    """
    d = _distances(distances)
    total = float(d.sum())
    if total == 0:
        return 0.0
    n = len(d)
    s = d.sort().values
    # sum_i sum_j |d_i - d_j| / (2 n^2 mean), in O(n log n) from the sorted values
    k = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * k - n - 1) * s).sum() / (n * total))


def smoothness(distances: Sequence[float] | torch.Tensor) -> float:
    """AID's smoothness: ``1 - gini(distances)`` (1: every frame changes the image by the same amount)."""
    return 1.0 - gini(distances)


def jump_ratio(distances: Sequence[float] | torch.Tensor) -> float:
    """The largest consecutive distance over the mean one (1 when even; a still morph counts as 1)."""
    d = _distances(distances)
    mean = float(d.mean())
    return 1.0 if mean == 0 else float(d.max()) / mean


@dataclass(frozen=True)
class PathScores:
    """The path measures of one morph (see the module notes); ``distance`` names the distance used."""

    ppl: float
    pdv: float
    smoothness: float
    jump_ratio: float
    n_frames: int
    distance: str

    def to_dict(self) -> dict:
        return asdict(self)


def path_scores(frames: torch.Tensor, *, distance: Distance | None = None) -> PathScores:
    """PPL, PDV, smoothness (1 - Gini) and jump ratio of the frames of one morph ``(n, C, H, W)``.

    >>> f = torch.linspace(0, 1, 5).view(5, 1, 1, 1).expand(5, 3, 4, 4)
    >>> s = path_scores(f)
    >>> round(s.ppl, 6), round(s.smoothness, 6), round(s.jump_ratio, 6)
    (1.0, 1.0, 1.0)
    """
    d = consecutive_distances(frames, distance=distance)
    name = getattr(distance or pixel_distance, "__name__", "distance")
    return PathScores(path_length(d), distance_variance(d), smoothness(d), jump_ratio(d), len(frames), name)


def monotonic(values: Sequence, start, end) -> bool:
    """Whether a sequence of read attribute values goes from ``start`` to ``end`` in one change: it reads
    ``start`` up to some frame and ``end`` after it, with nothing else and no return. ``start == end``: every value
    must equal it.

    >>> monotonic(["red", "red", "blue"], "red", "blue"), monotonic(["red", "blue", "red", "blue"], "red", "blue")
    (True, False)
    """
    values = list(values)
    k = 0
    while k < len(values) and values[k] == start:
        k += 1
    return all(v == end for v in values[k:])


def _distances(distances) -> torch.Tensor:
    d = torch.from_numpy(_checks.real_values(distances, "distances", what="consecutive-frame distances"))
    if bool((d < 0).any()):
        raise ValueError(f"`distances` must be non-negative, got a minimum of {float(d.min()):.4g}")
    return d


def _check_images(x, name: str) -> None:
    """Images (N, C, H, W): a floating tensor, finite (the NaN policy, :func:`latentlab._checks.tensor`)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of images (N, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"`{name}` must be images (N, C, H, W), got shape {tuple(x.shape)}")
    _checks.tensor(x, name, min_ndim=4)
