"""The procedural "shapes" world the embedded default model is trained on.

One responsibility: render seeded, captioned 64x64 RGB images of one flat-coloured shape on a flat background,
with analytic anti-aliasing from 2-D signed distance functions (SDFs after Inigo Quilez,
https://iquilezles.org/articles/distfunctions2d/). Pure torch; nothing is stored, every sample is a function of
its seed, so the training set, the held-out prompts and the evaluator all agree on what a caption means.

A caption reads ``"a large red star on a blue background"``. Size and background words are sometimes omitted in
training captions (``drop_size``/``drop_background``) so prompts such as ``"a red star"`` also mean something.

Examples
--------
>>> from latentlab.embedded import world
>>> batch = world.sample(4, seed=0)
>>> batch.images.shape, batch.images.dtype
(torch.Size([4, 3, 64, 64]), torch.float32)
>>> len(batch.captions), batch.attributes[0].keys() == {"size", "colour", "shape", "background"}
(4, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.10, 0.25, 0.90),
    "purple": (0.55, 0.15, 0.75),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
#: Circumradius in pixels (of a 64-pixel image) for each size word.
# v2: "small" starts at 10.5 px (a shape about three latent pixels across: the 8x8 latent grid cannot hold less).
SIZES: dict[str, tuple[float, float]] = {"small": (10.5, 12.5), "medium": (14.5, 17.0), "large": (19.5, 22.5)}
#: Per-channel colour jitter of training renders (v2): colours are ranges, so in-betweens and img2img have meaning.
JITTER = 0.06
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
RESOLUTION = 64
#: How many of the prompts are never shown in training (compositional generalisation is what the evaluator tests).
N_HELD_OUT = 256
_HELD_OUT_SEED = 20261122


@dataclass(frozen=True)
class Batch:
    """Images in [0, 1] (batch, 3, 64, 64), their captions, and the attributes that made them."""

    images: torch.Tensor
    captions: list[str]
    attributes: list[dict[str, str]]


def caption(size: str | None, colour: str, shape: str, background: str | None) -> str:
    """The caption of one sample; ``None`` leaves that word out.

    >>> caption("large", "red", "star", "blue")
    'a large red star on a blue background'
    >>> caption(None, "red", "star", None)
    'a red star'
    """
    words = ["a"] + ([size] if size else []) + [colour, shape]
    if background:
        words += ["on", "a", background, "background"]
    return " ".join(words)


def attributes(prompt: tuple[str, str, str, str]) -> dict[str, str]:
    """A (size, colour, shape, background) prompt as the attribute dict that :class:`Batch` carries.

    >>> attributes(("large", "red", "star", "blue"))
    {'size': 'large', 'colour': 'red', 'shape': 'star', 'background': 'blue'}
    """
    return dict(zip(("size", "colour", "shape", "background"), prompt))


def all_prompts() -> list[tuple[str, str, str, str]]:
    """Every (size, colour, shape, background) with background != colour, in a fixed order (1008 of them)."""
    return [
        (s, c, sh, bg)
        for s in SIZE_NAMES
        for c in COLOUR_NAMES
        for sh in SHAPES
        for bg in COLOUR_NAMES
        if bg != c
    ]


def held_out_prompts() -> list[tuple[str, str, str, str]]:
    """The fixed set of ``N_HELD_OUT`` attribute combinations that training never shows."""
    combos = all_prompts()
    g = torch.Generator().manual_seed(_HELD_OUT_SEED)
    idx = torch.randperm(len(combos), generator=g)[:N_HELD_OUT].sort().values
    return [combos[i] for i in idx.tolist()]


def training_prompts() -> list[tuple[str, str, str, str]]:
    """All combinations not in :func:`held_out_prompts`."""
    held = set(held_out_prompts())
    return [p for p in all_prompts() if p not in held]


# --- signed distance functions: p is (..., 2) in units of the shape's circumradius r -------------------------------


def _sd_circle(p: torch.Tensor) -> torch.Tensor:
    return p.norm(dim=-1) - 1.0


def _sd_box(p: torch.Tensor, half: tuple[float, float]) -> torch.Tensor:
    d = p.abs() - p.new_tensor(half)
    outside = d.clamp(min=0).norm(dim=-1)
    inside = d.max(dim=-1).values.clamp(max=0)
    return outside + inside


def _sd_square(p: torch.Tensor) -> torch.Tensor:
    return _sd_box(p, (0.72, 0.72))  # circumradius ~1


def _sd_triangle(p: torch.Tensor) -> torch.Tensor:
    # Equilateral triangle with circumradius 1 (side sqrt(3)); IQ's sdEquilateralTriangle with r = side / 2.
    k = math.sqrt(3.0)
    r = k / 2
    x = p[..., 0].abs() - r
    y = p[..., 1] + r / k
    flip = (x + k * y) > 0
    x2 = torch.where(flip, (x - k * y) / 2, x)
    y2 = torch.where(flip, (-k * x - y) / 2, y)
    x2 = x2 - x2.clamp(-2 * r, 0.0)
    return -torch.sqrt(x2**2 + y2**2) * torch.sign(y2)


def _sd_star(p: torch.Tensor) -> torch.Tensor:
    # IQ's sdStar5 with outer radius 1 and inner ratio 0.5.
    k1 = p.new_tensor([0.809016994375, -0.587785252292])
    k2 = p.new_tensor([-0.809016994375, -0.587785252292])
    x = p[..., 0].abs()
    q = torch.stack([x, p[..., 1]], dim=-1)
    q = q - 2.0 * (q @ k1).clamp(min=0).unsqueeze(-1) * k1
    q = q - 2.0 * (q @ k2).clamp(min=0).unsqueeze(-1) * k2
    q = torch.stack([q[..., 0].abs(), q[..., 1] - 1.0], dim=-1)
    ba = 0.5 * p.new_tensor([0.587785252292, 0.809016994375]) - p.new_tensor([0.0, 1.0])
    h = ((q @ ba) / (ba @ ba)).clamp(0.0, 1.0)
    d = (q - h.unsqueeze(-1) * ba).norm(dim=-1)
    return d * torch.sign(q[..., 1] * ba[0] - q[..., 0] * ba[1])


def _sd_cross(p: torch.Tensor) -> torch.Tensor:
    return torch.minimum(_sd_box(p, (0.95, 0.3)), _sd_box(p, (0.3, 0.95)))


def _sd_ring(p: torch.Tensor) -> torch.Tensor:
    return (p.norm(dim=-1) - 0.75).abs() - 0.25


_SDF = {
    "circle": _sd_circle,
    "square": _sd_square,
    "triangle": _sd_triangle,
    "star": _sd_star,
    "cross": _sd_cross,
    "ring": _sd_ring,
}


def render(
    shape: str,
    colour: str,
    background: str,
    *,
    radius: float,
    center: tuple[float, float],
    angle: float,
    resolution: int = RESOLUTION,
) -> torch.Tensor:
    """Render one image (3, resolution, resolution) in [0, 1]; ``radius`` and ``center`` in pixels.

    Coverage of each pixel is ``clamp(0.5 - sdf_in_pixels, 0, 1)``: exact anti-aliasing for straight edges.

    >>> img = render("circle", "red", "blue", radius=10, center=(32, 32), angle=0.0)
    >>> img.shape, bool(img[0, 32, 32] > 0.8), bool(img[2, 0, 0] > 0.8)
    (torch.Size([3, 64, 64]), True, True)
    """
    if shape not in _SDF:
        raise ValueError(f"`shape` must be one of {SHAPES}, got {shape!r}")
    for name, value in (("colour", colour), ("background", background)):
        if value not in COLOURS:
            raise ValueError(f"`{name}` must be one of {COLOUR_NAMES}, got {value!r}")
    alpha = coverage(shape, radius=radius, center=center, angle=angle, resolution=resolution)
    return _compose(alpha, torch.tensor(COLOURS[colour]), torch.tensor(COLOURS[background]))


def _compose(alpha: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    return bg.view(3, 1, 1) + (fg - bg).view(3, 1, 1) * alpha.unsqueeze(0)


def coverage(shape: str, *, radius: float, center: tuple[float, float], angle: float, resolution: int = RESOLUTION):
    """The shape's per-pixel coverage (resolution, resolution) in [0, 1]."""
    coords = torch.arange(resolution, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    px = torch.stack([xx - center[0], center[1] - yy], dim=-1)  # y up
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float32)
    p = (px @ rot) / radius
    sdf_px = _SDF[shape](p) * radius
    return (0.5 - sdf_px).clamp(0.0, 1.0)


def sample(
    n: int,
    *,
    seed: int,
    prompts: list[tuple[str, str, str, str]] | None = None,
    drop_size: float = 0.0,
    drop_background: float = 0.0,
    resolution: int = RESOLUTION,
    jitter: float = 0.0,
) -> Batch:
    """Draw ``n`` seeded samples whose attributes come uniformly from ``prompts`` (default: all of them).

    Position and rotation are never in the caption: they are what the noise seed decides.
    """
    if n < 1:
        raise ValueError(f"`n` must be >= 1, got {n}")
    prompts = all_prompts() if prompts is None else prompts
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(prompts), (n,), generator=g).tolist()
    return render_prompts(
        [prompts[j] for j in idx], seed=seed + 1, drop_size=drop_size, drop_background=drop_background,
        resolution=resolution, jitter=jitter,
    )


def render_prompts(
    prompts: list[tuple[str, str, str, str]],
    *,
    seed: int,
    drop_size: float = 0.0,
    drop_background: float = 0.0,
    resolution: int = RESOLUTION,
    jitter: float = 0.0,
) -> Batch:
    """Render exactly these (size, colour, shape, background) prompts, in order, with seeded position/rotation."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(len(prompts), 6, generator=g).tolist()
    # Drawn after (and from another generator than) the positions, so jitter=0 renders exactly what it always did.
    jit = (torch.rand(len(prompts), 2, 3, generator=torch.Generator().manual_seed(seed + 7_777_777)) * 2 - 1) * jitter
    images, captions, attrs = [], [], []
    scale = resolution / RESOLUTION
    for k, (size, colour, shape, bg) in enumerate(prompts):
        uu = u[k]
        lo, hi = SIZES[size]
        radius = (lo + (hi - lo) * uu[0]) * scale
        margin = radius + 2 * scale
        cx = margin + (resolution - 2 * margin) * uu[1]
        cy = margin + (resolution - 2 * margin) * uu[2]
        angle = 2 * math.pi * uu[3]
        if jitter:
            alpha = coverage(shape, radius=radius, center=(cx, cy), angle=angle, resolution=resolution)
            fg_j = (torch.tensor(COLOURS[colour]) + jit[k, 0]).clamp(0, 1)
            images.append(_compose(alpha, fg_j, (torch.tensor(COLOURS[bg]) + jit[k, 1]).clamp(0, 1)))
        else:
            images.append(render(shape, colour, bg, radius=radius, center=(cx, cy), angle=angle, resolution=resolution))
        captions.append(
            caption(None if uu[4] < drop_size else size, colour, shape, None if uu[5] < drop_background else bg)
        )
        attrs.append(attributes((size, colour, shape, bg)))
    return Batch(torch.stack(images), captions, attrs)
