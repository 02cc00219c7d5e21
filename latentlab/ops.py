"""Latent operations: interpolation, weighted spherical blends, grids and arithmetic. Pure torch.

Every operation treats each batch item on its own: for an input of shape ``(batch, *dims)`` (ndim >= 2) angles and
norms are taken per item over all of ``dims``; a 1-D input is a single item. Work is done in float32 (float64 for
float64 inputs) and results come back in the input dtype, so fp16 latents of 128x128 (65,536 values an item, whose
sum of squares overflows fp16) are safe.

References
----------
- Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985 (slerp).
- White, "Sampling Generative Networks", arXiv:1609.04468 (slerp for Gaussian latents).
- Buss & Fillmore, "Spherical averages and applications to spherical splines and interpolation", ACM TOG 2001
  (weighted spherical means, used by :func:`blend` and :func:`grid`).
- The norm of a standard Gaussian vector in d dimensions follows a chi distribution with d degrees of freedom:
  mean ``sqrt(2) Γ((d+1)/2) / Γ(d/2)`` and variance ``d - mean**2`` (:func:`expected_norm`, :func:`norm_zscore`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from latentlab import _checks
from latentlab._tensors import compute_dtype, flat, unit

__all__ = [
    "add_direction",
    "analogy",
    "blend",
    "expected_norm",
    "grid",
    "lerp",
    "norm_zscore",
    "renormalize",
    "slerp",
]

#: Angles (radians) below this count as parallel (slerp falls back to lerp); within this of pi, as antipodal.
EPS_ANGLE = 1e-4


def _t_column(t: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t as a (T, 1, 1) tensor in ``like``'s dtype and device (T = 1 for a number)."""
    tt = torch.as_tensor(t, dtype=like.dtype, device=like.device).reshape(-1, 1, 1)
    return tt


def _reshape_out(out: torch.Tensor, a: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """(T, items, features) -> a's shape (number t) or (T, *a.shape) (tensor t), in a's dtype."""
    out = out.to(a.dtype)
    if isinstance(t, torch.Tensor):
        return out.reshape(len(t), *a.shape)
    return out.reshape(a.shape)


def lerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Linear interpolation ``(1 - t) * a + t * b``.

    Parameters
    ----------
    a, b : torch.Tensor
        Same shape, dtype and device; floating point.
    t : float or 1-D torch.Tensor
        In [0, 1]. A number gives the shape of ``a``; a tensor of ``T`` values gives ``(T, *a.shape)``.

    Examples
    --------
    >>> a, b = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    >>> lerp(a, b, 0.25).shape, lerp(a, b, 0.25).mean().item()
    (torch.Size([2, 4, 8, 8]), 0.25)
    >>> lerp(a, b, torch.linspace(0, 1, 5)).shape
    torch.Size([5, 2, 4, 8, 8])
    """
    _checks.tensor(a, "a")
    _checks.tensor(b, "b")
    _checks.same_kind([a, b], ["a", "b"])
    t = _checks.unit_interval(t)
    cd = compute_dtype(a.dtype)
    fa, fb = flat(a, cd), flat(b, cd)
    tt = _t_column(t, fa)
    out = fa + (fb - fa) * tt
    out = torch.where(tt == 0, fa, torch.where(tt == 1, fb, out))  # exact endpoints
    return _reshape_out(out, a, t)


def _angle(ua: torch.Tensor, ub: torch.Tensor) -> torch.Tensor:
    """Angle between unit rows, stable at 0 and pi (unlike acos of the dot product)."""
    return 2 * torch.atan2(
        torch.linalg.vector_norm(ua - ub, dim=-1), torch.linalg.vector_norm(ua + ub, dim=-1)
    )


def slerp(
    a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor, *, eps: float = EPS_ANGLE
) -> torch.Tensor:
    """Spherical linear interpolation between ``a`` and ``b``, per batch item.

    The direction moves along the great circle from ``a`` to ``b`` at constant angular speed (the angle to ``a``
    is exactly ``t`` times the angle between them) and the norm is interpolated linearly. For inputs of equal norm
    this is Shoemake's slerp and the norm is preserved; for Gaussian latents it keeps every frame in the typical
    set, where lerp's midpoints are about 30 % too short.

    Parameters
    ----------
    a, b : torch.Tensor
        Same shape, dtype and device; floating point. ``(batch, *dims)`` or a single 1-D vector.
    t : float or 1-D torch.Tensor
        In [0, 1]. A number gives the shape of ``a``; a tensor of ``T`` values gives ``(T, *a.shape)``.
    eps : float
        Angles below ``eps`` radians count as parallel; the item is then interpolated linearly (which is what
        slerp tends to). Items where ``a`` or ``b`` is all zeros (no direction) are interpolated linearly too.

    Returns
    -------
    torch.Tensor
        In the dtype of ``a``; exactly ``a`` at ``t = 0`` and exactly ``b`` at ``t = 1``.

    Raises
    ------
    ValueError
        If an item of ``a`` and ``b`` points in opposite directions (angle within ``eps`` of pi): every great
        circle joins them, so the path is undefined. Interpolate through a third keyframe instead.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> a, b = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    >>> slerp(a, b, 0.5).shape
    torch.Size([2, 4, 8, 8])
    >>> slerp(a, b, torch.linspace(0, 1, 7)).shape
    torch.Size([7, 2, 4, 8, 8])
    >>> x = torch.tensor([1.0, 0.0]); y = torch.tensor([0.0, 1.0])
    >>> slerp(x, y, 0.5)
    tensor([0.7071, 0.7071])
    """
    _checks.tensor(a, "a")
    _checks.tensor(b, "b")
    _checks.same_kind([a, b], ["a", "b"])
    t = _checks.unit_interval(t)
    if not (isinstance(eps, (int, float)) and 0 < eps < 0.5):
        raise ValueError(f"`eps` must be a number in (0, 0.5), got {eps!r}")
    cd = compute_dtype(a.dtype)
    fa, fb = flat(a, cd), flat(b, cd)
    ua, na = unit(fa)
    ub, nb = unit(fb)
    theta = _angle(ua, ub)  # (items,)
    has_dir = (na > 0) & (nb > 0)
    antipodal = has_dir & (theta > math.pi - eps)
    if bool(antipodal.any()):
        items = antipodal.nonzero().flatten().tolist()
        raise ValueError(
            f"`a` and `b` point in opposite directions for item(s) {items[:10]} (angle within {eps} rad of pi); "
            "the great circle between them is undefined: add an intermediate keyframe"
        )
    spherical = has_dir & (theta >= eps)
    tt = _t_column(t, fa)  # (T, 1, 1)
    th = theta.view(1, -1, 1)
    sin_th = torch.where(spherical.view(1, -1, 1), torch.sin(th), torch.ones_like(th))
    direction = (torch.sin((1 - tt) * th) * ua + torch.sin(tt * th) * ub) / sin_th
    norm = (1 - tt) * na.view(1, -1, 1) + tt * nb.view(1, -1, 1)
    out_sph = direction * norm
    out_lin = fa + (fb - fa) * tt
    out = torch.where(spherical.view(1, -1, 1), out_sph, out_lin)
    out = torch.where(tt == 0, fa, torch.where(tt == 1, fb, out))  # exact endpoints
    return _reshape_out(out, a, t)


def _weights(weights: object, k: int) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64) if not isinstance(weights, torch.Tensor) else weights
    if w.ndim != 1 or len(w) != k:
        raise ValueError(f"`weights` must be 1-D with one weight per latent ({k}), got shape {tuple(w.shape)}")
    w = w.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("`weights` must be finite and non-negative")
    if float(w.sum()) <= 0:
        raise ValueError("`weights` must not sum to zero")
    return w / w.sum()


def _spherical_mean(u: torch.Tensor, w: torch.Tensor, *, max_iter: int = 200, tol: float = 1e-13) -> torch.Tensor:
    """Weighted Fréchet (Karcher) mean on the unit sphere, Buss & Fillmore's fixed-point iteration.

    u: (K, items, D) unit rows (float64); w: (M, K) weight sets summing to 1. Returns (M, items, D).
    """
    q = torch.einsum("mk,kid->mid", w, u)
    q, qn = unit(q)
    if bool((qn < 1e-9).any()):
        raise ValueError("the weighted latents cancel out (their weighted mean direction is zero): no spherical mean")
    active = (w > 0).view(w.shape[0], w.shape[1], 1, 1)  # weight-0 points must not influence (or break) the mean
    for _ in range(max_iter):
        cos = torch.einsum("mid,kid->mki", q, u).clamp(-1, 1)  # (M, K, items)
        theta = _angle(q.unsqueeze(1), u.unsqueeze(0))
        if bool(((theta > math.pi - 1e-6) & active.squeeze(-1)).any()):
            raise ValueError("a weighted latent is antipodal to the running spherical mean: no unique mean")
        scale = torch.where(theta > 1e-12, theta / torch.sin(theta).clamp(min=1e-300), torch.ones_like(theta))
        logs = scale.unsqueeze(-1) * (u.unsqueeze(0) - cos.unsqueeze(-1) * q.unsqueeze(1))  # (M, K, items, D)
        v = (w.view(*w.shape, 1, 1) * torch.where(active, logs, torch.zeros_like(logs))).sum(1)
        vn = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        step = torch.where(vn > 0, v / vn.clamp(min=1e-300), torch.zeros_like(v))
        q, _ = unit(torch.cos(vn) * q + torch.sin(vn) * step)
        if float(vn.detach().max()) < tol:  # converged to well below float32 resolution (float64 work)
            break
    return q


def _blend_sets(latents: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """Blend with M weight sets (M, K) -> (M, *shape) in the latents' dtype."""
    like = latents[0]
    x = torch.stack([flat(z, torch.float64) for z in latents])  # (K, items, D)
    u, n = unit(x)
    w = w.to(x.device)
    norm = torch.einsum("mk,ki->mi", w, n).unsqueeze(-1)
    has_dir = (n > 0).all(0)  # (items,)
    if bool(has_dir.all()):
        out = _spherical_mean(u, w) * norm
    else:  # an all-zero latent has no direction: those items are blended linearly
        lin = torch.einsum("mk,kid->mid", w, x)
        sph = _spherical_mean(u[:, has_dir], w) * norm[:, has_dir]
        out = lin.clone()
        out[:, has_dir] = sph
    return out.to(like.dtype).reshape(w.shape[0], *like.shape)


def blend(latents: Sequence[torch.Tensor] | torch.Tensor, weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Weighted spherical blend of any number of latents, per batch item.

    The direction is the weighted spherical mean (the point on the sphere minimising the weighted sum of squared
    angles to each input, Buss & Fillmore 2001); the norm is the weighted mean of the norms. With two latents this
    is exactly :func:`slerp`: ``blend([a, b], [1 - t, t]) == slerp(a, b, t)``. Unlike a normalised weighted sum,
    it does not depend on how the weights are split among nearby latents.

    Parameters
    ----------
    latents : sequence of torch.Tensor, or a stacked tensor (K, *shape)
        At least one latent; all of one shape, dtype and device.
    weights : sequence of float or 1-D tensor
        One non-negative weight per latent, not all zero; normalised to sum to 1.

    Raises
    ------
    ValueError
        If the weighted directions cancel out or one is antipodal to the mean (no unique spherical mean).

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> zs = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(3)]
    >>> blend(zs, [0.5, 0.25, 0.25]).shape
    torch.Size([1, 4, 8, 8])
    >>> torch.allclose(blend(zs[:2], [0.7, 0.3]), slerp(zs[0], zs[1], 0.3), atol=1e-5)
    True
    """
    items = _checks.tensor_sequence(latents, "latents", min_len=1)
    w = _weights(weights, len(items))
    return _blend_sets(items, w.unsqueeze(0))[0]


def grid(
    top_left: torch.Tensor,
    top_right: torch.Tensor,
    bottom_left: torch.Tensor,
    bottom_right: torch.Tensor,
    *,
    rows: int,
    cols: int,
) -> torch.Tensor:
    """Spherical bilinear interpolation between four corner latents: a ``(rows, cols, *shape)`` grid.

    Cell ``(i, j)`` is the spherical blend of the corners with bilinear weights for ``u = j / (cols - 1)``,
    ``v = i / (rows - 1)``; the edges are therefore slerps between their two corners, and the corners are the
    inputs.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> c = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(4)]
    >>> grid(*c, rows=3, cols=5).shape
    torch.Size([3, 5, 1, 4, 8, 8])
    """
    corners = _checks.tensor_sequence(
        [top_left, top_right, bottom_left, bottom_right], "corners", min_len=4
    )
    rows = _checks.positive_int(rows, "rows", minimum=2)
    cols = _checks.positive_int(cols, "cols", minimum=2)
    v, u = torch.meshgrid(
        torch.linspace(0, 1, rows, dtype=torch.float64), torch.linspace(0, 1, cols, dtype=torch.float64), indexing="ij"
    )
    u, v = u.flatten(), v.flatten()
    w = torch.stack([(1 - u) * (1 - v), u * (1 - v), (1 - u) * v, u * v], dim=1)
    out = _blend_sets(corners, w)
    return out.reshape(rows, cols, *top_left.shape)


def _numel_per_item(x: torch.Tensor) -> int:
    return x.numel() if x.ndim == 1 else x[0].numel()


def expected_norm(d: int) -> float:
    """Mean norm of a standard Gaussian vector in ``d`` dimensions (the chi distribution's mean, ~ sqrt(d - 1/2)).

    >>> round(expected_norm(4 * 64 * 64), 3)
    127.998
    """
    d = _checks.positive_int(d, "d")
    return math.sqrt(2.0) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))


def norm_zscore(x: torch.Tensor) -> torch.Tensor:
    """How many standard deviations each item's norm is from a standard Gaussian's: the in-distribution score.

    Fresh noise scores around 0 (|z| < 3 for 99.7 % of seeds); a lerp midpoint of two seeds of a 4x64x64 latent
    scores about -53, the sum of three seeds about +133. Returns a float32 tensor of shape ``(batch,)`` (0-d for a
    1-D input).

    Examples
    --------
    >>> z = torch.randn(8, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    >>> bool(norm_zscore(z).abs().max() < 4)
    True
    >>> bool(norm_zscore(lerp(z[:1], z[1:2], 0.5)) < -30)
    True
    """
    _checks.tensor(x, "x")
    d = _numel_per_item(x)
    mu = expected_norm(d)
    sigma = math.sqrt(max(d - mu * mu, 1e-12))
    n = torch.linalg.vector_norm(flat(x, torch.float64), dim=-1)
    z = ((n - mu) / sigma).float()
    return z.reshape(()) if x.ndim == 1 else z


def renormalize(x: torch.Tensor, *, norm: float | None = None) -> torch.Tensor:
    """Rescale each item to ``norm`` (default: the expected norm of standard Gaussian noise of its size).

    Items that are all zeros are returned unchanged (they have no direction to rescale).

    >>> z = 3 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    >>> norm_zscore(renormalize(z)).abs().max().item() < 1e-3
    True
    """
    _checks.tensor(x, "x")
    if norm is not None and not (
        isinstance(norm, (int, float)) and not isinstance(norm, bool) and math.isfinite(norm) and norm >= 0
    ):
        raise ValueError(f"`norm` must be a finite number >= 0, got {norm!r}")
    return _rescale(x, expected_norm(_numel_per_item(x)) if norm is None else float(norm))


def _rescale(x: torch.Tensor, target: float) -> torch.Tensor:
    cd = compute_dtype(x.dtype)
    u, n = unit(flat(x, cd))
    out = torch.where((n > 0).unsqueeze(-1), u * target, flat(x, cd))
    return out.to(x.dtype).reshape(x.shape)


def analogy(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, renormalize: bool = True) -> torch.Tensor:
    """Latent arithmetic ``a - b + c`` ("c is to ? as b is to a"), per item.

    The sum of three independent noise tensors has a norm ``sqrt(3)`` times too large; with ``renormalize=True``
    (default) each item is rescaled to the expected Gaussian norm so the result is in distribution again. Check
    any result with :func:`norm_zscore`.

    >>> g = torch.Generator().manual_seed(0)
    >>> a, b, c = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    >>> bool(norm_zscore(analogy(a, b, c, renormalize=False)) > 5), bool(norm_zscore(analogy(a, b, c)).abs() < 1e-3)
    (True, True)
    """
    for name, v in (("a", a), ("b", b), ("c", c)):
        _checks.tensor(v, name)
    _checks.same_kind([a, b, c], ["a", "b", "c"])
    cd = compute_dtype(a.dtype)
    out = (a.to(cd) - b.to(cd) + c.to(cd)).to(a.dtype)
    return _rescale(out, expected_norm(_numel_per_item(out))) if renormalize else out


def add_direction(
    x: torch.Tensor, direction: torch.Tensor, amount: float = 1.0, *, renormalize: bool = False
) -> torch.Tensor:
    """Move ``x`` by ``amount`` times ``direction``: ``x + amount * direction``.

    ``direction`` has the shape of ``x`` or of one item of it (then it moves every item). Pass a unit direction
    to move by ``amount`` in norm units. ``renormalize=True`` rescales the result to the expected Gaussian norm.

    >>> x = torch.zeros(2, 3); d = torch.tensor([1.0, 0.0, 0.0])
    >>> add_direction(x, d, 2.0)
    tensor([[2., 0., 0.],
            [2., 0., 0.]])
    """
    _checks.tensor(x, "x")
    _checks.tensor(direction, "direction")
    if direction.shape != x.shape and (x.ndim < 2 or direction.shape not in (x.shape[1:], (1, *x.shape[1:]))):
        raise ValueError(
            f"`direction` must have the shape of `x` {tuple(x.shape)} or of one item {tuple(x.shape[1:])}, "
            f"got {tuple(direction.shape)}"
        )
    if direction.device != x.device:
        raise ValueError(f"`x` and `direction` must be on the same device, got {x.device} and {direction.device}")
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount):
        raise ValueError(f"`amount` must be a finite number, got {amount!r}")
    cd = compute_dtype(x.dtype)
    out = (x.to(cd) + amount * direction.to(cd)).to(x.dtype)
    return _rescale(out, expected_norm(_numel_per_item(out))) if renormalize else out
