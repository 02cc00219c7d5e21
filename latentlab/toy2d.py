"""Two-dimensional diffusion and flow matching, small enough to train in seconds: the "train it yourself" lesson.

One responsibility: the maths of both model families on points in the plane, where every quantity can be drawn --
the data, the noising process, the learned vector field at every time, the sampling paths -- and trained on one
core in a few seconds (plain torch, no diffusers). The same conventions as the real models in latentlab:

- time ``t`` runs from 0 (data) to 1 (pure noise); sampling integrates from ``t = 1`` down to ``t = 0``;
- **diffusion** (variance preserving, cosine schedule): ``x_t = a(t) x0 + s(t) noise`` with ``a = cos(pi t / 2)``,
  ``s = sin(pi t / 2)``; the network predicts ``v = a noise - s x0`` (stable at both ends, as SD 2.x does) and is
  sampled deterministically with DDIM, the probability-flow ODE;
- **flow matching** (rectified flow, as SD3 and Flux): ``x_t = (1 - t) x0 + t noise``; the network predicts the
  velocity ``noise - x0`` and is sampled with Euler steps.

Both are written as an ODE ``dx/dt = velocity(x, t)`` so the two fields can be drawn and compared on one grid.

>>> import torch
>>> from latentlab import toy2d
>>> data = toy2d.sample("moons", 512, seed=0)
>>> model = toy2d.train(data, "flow", steps=50, seed=0)
>>> model.sample(toy2d.noise(256, seed=1), 8).shape
torch.Size([256, 2])
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from latentlab import _checks

__all__ = ["KINDS", "PRESETS", "ToyModel", "few_step_table", "field_grid", "forward_noise", "from_points", "noise",
           "reflow", "sample", "sliced_wasserstein", "straightness", "train"]

PRESETS = ("moons", "rings", "spiral", "gaussians", "checkerboard", "smiley")
KINDS = ("diffusion", "flow")
EMA_DECAY = 0.995


# --- data -----------------------------------------------------------------------------------------------------------

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(_checks.seed(seed))


def sample(name: str, n: int = 2048, *, seed: int = 0) -> torch.Tensor:
    """``n`` points (float32, ``(n, 2)``, roughly within [-2, 2]) from a preset distribution.

    Parameters
    ----------
    name : str
        One of :data:`PRESETS`: ``"moons"``, ``"rings"``, ``"spiral"``, ``"gaussians"`` (eight in a circle),
        ``"checkerboard"``, ``"smiley"``.
    n : int
        Number of points.
    seed : int
        The same seed gives the same points.

    Examples
    --------
    >>> sample("gaussians", 4, seed=0).shape
    torch.Size([4, 2])
    """
    name = _checks.choice(name, "name", PRESETS)
    n = _checks.positive_int(n, "n")
    g = _gen(seed)
    u = torch.rand(n, generator=g)
    jitter = torch.randn(n, 2, generator=g)
    if name == "moons":
        upper = torch.rand(n, generator=g) < 0.5
        a = u * math.pi
        x = torch.where(upper, torch.cos(a), 1 - torch.cos(a))
        y = torch.where(upper, torch.sin(a), 0.5 - torch.sin(a))
        pts = torch.stack([x - 0.5, y - 0.25], 1) * 1.6 + 0.06 * jitter
    elif name == "rings":
        r = torch.where(torch.rand(n, generator=g) < 0.4, 0.7, 1.6)
        a = u * 2 * math.pi
        pts = torch.stack([r * torch.cos(a), r * torch.sin(a)], 1) + 0.05 * jitter
    elif name == "spiral":
        r = 0.25 + 1.6 * u.sqrt()
        a = 3.2 * math.pi * u.sqrt()
        pts = torch.stack([r * torch.cos(a), r * torch.sin(a)], 1) + 0.05 * jitter
    elif name == "gaussians":
        k = torch.randint(0, 8, (n,), generator=g).float()
        a = k * math.pi / 4
        pts = 1.5 * torch.stack([torch.cos(a), torch.sin(a)], 1) + 0.1 * jitter
    elif name == "checkerboard":
        cells = torch.tensor([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0], dtype=torch.float32)
        pick = cells[torch.randint(0, len(cells), (n,), generator=g)]
        pts = (pick + torch.rand(n, 2, generator=g)) - 2.0
    else:  # smiley: a face outline, two eyes and a mouth
        part = torch.randint(0, 4, (n,), generator=g)
        a = u * 2 * math.pi
        face = torch.stack([1.7 * torch.cos(a), 1.7 * torch.sin(a)], 1)
        eye_l = torch.tensor([-0.6, 0.55]) + 0.12 * jitter
        eye_r = torch.tensor([0.6, 0.55]) + 0.12 * jitter
        m = math.pi * (1.15 + 0.7 * u)
        mouth = torch.stack([0.95 * torch.cos(m), 0.95 * torch.sin(m)], 1) + torch.tensor([0.0, 0.1])
        pts = torch.where((part == 0)[:, None], face, torch.where((part == 1)[:, None], eye_l,
                          torch.where((part == 2)[:, None], eye_r, mouth)))
        pts = pts + 0.04 * jitter
    return pts.float().contiguous()


def from_points(points: object, n: int = 2048, *, spread: float = 0.08, seed: int = 0) -> torch.Tensor:
    """A distribution from hand-drawn points: ``n`` draws from ``points`` (any ``(k, 2)`` array, k >= 3), centred,
    scaled to the presets' size (std about 1) and blurred by ``spread`` (in those units).

    Examples
    --------
    >>> from_points([[0, 0], [1, 0], [0, 1]], 10).shape
    torch.Size([10, 2])
    """
    if isinstance(points, torch.Tensor):
        pts = points.detach()
    else:
        try:
            pts = torch.as_tensor(points)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"`points` must be a (k, 2) array of numbers, got {type(points).__name__}") from e
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 3:
        raise ValueError(f"`points` must have shape (k, 2) with k >= 3, got {tuple(pts.shape)}")
    if not (pts.is_floating_point() or pts.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"`points` must hold real numbers, got {pts.dtype}")
    pts = _checks.finite(pts.double(), "points")
    spread = _checks.real(spread, "spread", low=0.0)
    n = _checks.positive_int(n, "n")
    centred = pts - pts.mean(0)
    scale = centred.pow(2).sum(1).mean().sqrt()
    if scale <= 0:
        raise ValueError("`points` are all the same point: draw a shape")
    centred = centred / scale * 1.4
    g = _gen(seed)
    pick = centred[torch.randint(0, len(centred), (n,), generator=g)]
    return (pick + spread * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()


def noise(n: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` standard Gaussian points (the ``t = 1`` end of both processes), seeded on a CPU generator."""
    return torch.randn(_checks.positive_int(n, "n"), 2, generator=_gen(seed))


def _coefficients(kind: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``a, s, da/dt, ds/dt`` of ``x_t = a x0 + s noise`` for ``kind``."""
    if kind == "flow":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    half = math.pi / 2
    a, s = torch.cos(half * t), torch.sin(half * t)
    return a, s, -half * s, half * a


def forward_noise(data: torch.Tensor, t: float, kind: str, *, seed: int = 0) -> torch.Tensor:
    """The noising process: ``data`` at time ``t`` (0 = data, 1 = noise) under ``kind``'s interpolation, with
    seeded noise."""
    data = _check_points(data, "data")
    kind = _checks.choice(kind, "kind", KINDS)
    t = float(_checks.unit_interval(t, "t"))
    a, s, _, _ = _coefficients(kind, torch.tensor(t))
    return a * data + s * torch.randn(data.shape, generator=_gen(seed))


# --- the model -------------------------------------------------------------------------------------------------------

class _Net(nn.Module):
    """An MLP on (x, y) and Fourier features of t."""

    def __init__(self, hidden: int = 128, frequencies: int = 6):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(frequencies, dtype=torch.float32) * math.pi / 2)
        self.body = nn.Sequential(nn.Linear(2 + 2 * frequencies, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                  nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ft = t.reshape(-1, 1) * self.freqs
        return self.body(torch.cat([x, torch.sin(ft), torch.cos(ft)], 1))


@dataclass(eq=False)
class ToyModel:
    """A trained (or training) 2-D model of ``kind`` ``"diffusion"`` or ``"flow"``.

    ``fit`` continues training (so a notebook can train in chunks and draw between them); ``velocity`` is the ODE
    field ``dx/dt`` at time ``t``; ``sample`` integrates it from noise to data in ``steps`` model calls.
    """

    kind: str
    net: nn.Module
    seed: int = 0
    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    lr: float = 3e-3

    def __post_init__(self):
        self._opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)  # what predicts: an average of recent weights
        self._gen = torch.Generator().manual_seed(self.seed)

    # training ----------------------------------------------------------------------------------------------------
    def fit(self, data: torch.Tensor, steps: int, *, batch_size: int = 256, noise: torch.Tensor | None = None,
            callback: Callable[[ToyModel], object] | None = None) -> ToyModel:
        """Train ``steps`` more steps on ``data`` (an ``(n, 2)`` tensor); ``callback(self)`` after each step (return
        ``False`` from it to stop early). Deterministic for a seed.

        ``noise`` (optional, shaped like ``data``) couples each data point with its own noise point instead of fresh
        Gaussian noise: training on (noise, sample) pairs of a trained model is *reflow* (see :func:`reflow`).
        """
        data = _check_points(data, "data")
        if noise is not None:
            noise = _check_points(noise, "noise")
            if noise.shape != data.shape:
                raise ValueError(f"`noise` must have the shape of `data` {tuple(data.shape)}, got {tuple(noise.shape)}")
            noise = noise.float()
        steps = _checks.positive_int(steps, "steps", minimum=0)
        batch_size = _checks.positive_int(batch_size, "batch_size")
        data = data.float()
        self.net.train()
        for _ in range(steps):
            idx = torch.randint(0, len(data), (batch_size,), generator=self._gen)
            x0 = data[idx]
            eps = torch.randn(batch_size, 2, generator=self._gen) if noise is None else noise[idx]
            t = torch.rand(batch_size, generator=self._gen)
            a, s, _, _ = _coefficients(self.kind, t[:, None])
            xt = a * x0 + s * eps
            target = eps - x0 if self.kind == "flow" else a * eps - s * x0
            loss = (self.net(xt, t) - target).pow(2).mean()
            self._opt.zero_grad(set_to_none=True)
            loss.backward()
            lr = self.lr * min(1.0, (self.steps_done + 1) / 100)  # warm-up
            for group in self._opt.param_groups:
                group["lr"] = lr
            self._opt.step()
            decay = min(EMA_DECAY, (1 + self.steps_done) / (10 + self.steps_done))
            with torch.no_grad():
                for pe, p in zip(self.ema.parameters(), self.net.parameters()):
                    pe.lerp_(p, 1 - decay)
            self.steps_done += 1
            self.losses.append(float(loss.detach()))
            if callback is not None and callback(self) is False:
                break
        self.net.eval()
        return self

    # the field ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, noise)`` the model predicts from points ``x`` at time ``t``."""
        x = _check_points(x, "x", min_n=1).float()
        tt = torch.as_tensor(t, dtype=torch.float32).expand(len(x)).clone()
        out = self.ema(x, tt)
        a, s, _, _ = _coefficients(self.kind, tt[:, None])
        if self.kind == "flow":  # out = noise - x0, x = (1 - t) x0 + t noise
            x0 = x - s * out
            return x0, x0 + out
        return a * x - s * out, s * x + a * out  # v-prediction, a^2 + s^2 = 1

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """``dx/dt`` of the sampling ODE at time ``t`` (points move along ``-velocity`` towards the data as ``t``
        falls)."""
        x0, eps = self.predict(x, t)
        tt = torch.as_tensor(t, dtype=torch.float32).expand(len(x)).reshape(-1, 1)
        _, _, da, ds = _coefficients(self.kind, tt)
        return da * x0 + ds * eps

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, steps: int, *, path: bool = False) -> torch.Tensor:
        """Integrate from ``noise`` (``t = 1``) to data (``t = 0``) in ``steps`` model calls: DDIM for diffusion,
        Euler for flow (both exact for a straight path). ``path=True`` returns every step, ``(steps + 1, n, 2)``."""
        x = _check_points(noise, "noise", min_n=1).float()
        steps = _checks.positive_int(steps, "steps")
        ts = torch.linspace(1.0, 0.0, steps + 1)
        out = [x]
        for t, t_next in itertools.pairwise(ts):
            x0, eps = self.predict(x, t)
            a, s, _, _ = _coefficients(self.kind, t_next)
            x = a * x0 + s * eps
            out.append(x)
        return torch.stack(out) if path else x


def _check_points(x: object, name: str, *, min_n: int = 2) -> torch.Tensor:
    x = _checks.tensor(x, name, min_ndim=2)
    if x.ndim != 2 or x.shape[1] != 2 or len(x) < min_n:
        raise ValueError(f"`{name}` must have shape (n, 2) with n >= {min_n}, got {tuple(x.shape)}")
    return x


def reflow(model: ToyModel, *, pairs: int = 4096, sample_steps: int = 32, steps: int = 2000, batch_size: int = 256,
           seed: int = 0) -> ToyModel:
    """Rectify ``model`` (Liu et al. 2022, "Flow straight and fast"): sample ``pairs`` (noise, image) couples from
    it with ``sample_steps`` steps and train a new flow model on those couples. Its paths are nearly straight, so
    one or two Euler steps land where many steps of ``model`` would: why few-step models can work.

    Examples
    --------
    >>> base = train(sample("moons", 256), "flow", steps=20)
    >>> reflow(base, pairs=64, steps=10).kind
    'flow'
    """
    if not isinstance(model, ToyModel):
        raise TypeError(f"`model` must be a ToyModel, got {type(model).__name__}")
    z = noise(_checks.positive_int(pairs, "pairs"), seed=seed + 7919)
    x0 = model.sample(z, _checks.positive_int(sample_steps, "sample_steps"))
    torch.manual_seed(_checks.seed(seed))
    new = ToyModel("flow", _Net(), seed=seed, lr=model.lr)
    return new.fit(x0, steps, batch_size=batch_size, noise=z)


def train(data: torch.Tensor, kind: str, *, steps: int = 2000, batch_size: int = 256, lr: float = 3e-3,
          hidden: int = 128, seed: int = 0, callback: Callable[[ToyModel], object] | None = None) -> ToyModel:
    """A new :class:`ToyModel` of ``kind`` trained ``steps`` steps on ``data`` (seeded: the same seed and data give
    the same model).

    Examples
    --------
    >>> m = train(sample("rings", 256), "diffusion", steps=20)
    >>> m.kind, m.steps_done
    ('diffusion', 20)
    """
    kind = _checks.choice(kind, "kind", KINDS)
    lr = _checks.real(lr, "lr", low=0.0)
    torch.manual_seed(_checks.seed(seed))  # the initial weights
    model = ToyModel(kind, _Net(_checks.positive_int(hidden, "hidden")), seed=seed, lr=lr)
    return model.fit(data, steps, batch_size=batch_size, callback=callback)


# --- measures --------------------------------------------------------------------------------------------------------

def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, *, projections: int = 128, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between two point clouds (0 for the same distribution; the same units as the
    points). Both are subsampled to the smaller size."""
    a = _check_points(a, "a").float()
    b = _check_points(b, "b").float()
    n = min(len(a), len(b))
    g = _gen(seed)
    a = a[torch.randperm(len(a), generator=g)[:n]]
    b = b[torch.randperm(len(b), generator=g)[:n]]
    angles = torch.rand(projections, generator=g) * math.pi
    dirs = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    pa, _ = (a @ dirs.T).sort(0)
    pb, _ = (b @ dirs.T).sort(0)
    return float((pa - pb).abs().mean())


def straightness(path: torch.Tensor) -> float:
    """Total path length / total chord over all points (``path`` is ``(steps + 1, n, 2)``): 1.0 for straight paths."""
    path = _checks.tensor(path, "path", ndim=3, what="(steps + 1, n, 2)")
    if path.shape[-1] != 2 or len(path) < 2:
        raise ValueError(f"`path` must have shape (steps + 1, n, 2) with at least 2 positions, got {tuple(path.shape)}")
    length = (path[1:] - path[:-1]).norm(dim=-1).sum()
    chord = (path[-1] - path[0]).norm(dim=-1).sum().clamp_min(1e-12)
    return float(length / chord)


def field_grid(lo: float = -3.0, hi: float = 3.0, n: int = 15) -> torch.Tensor:
    """An ``n x n`` grid of points (``(n * n, 2)``) on which to draw a vector field."""
    xs = torch.linspace(lo, hi, n)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    return torch.stack([gx.flatten(), gy.flatten()], 1)


def few_step_table(models: Mapping[str, ToyModel] | Sequence[ToyModel], data: torch.Tensor,
                   steps: Sequence[int] = (1, 2, 4, 8, 32), *, n: int = 2048, seed: int = 1) -> dict[str, dict[int, float]]:
    """Sliced Wasserstein distance to ``data`` of each model's samples at each number of steps (the same noise for
    all), keyed by the given names (a sequence of models is keyed by kind)."""
    data = _check_points(data, "data")
    if isinstance(models, ToyModel) or not isinstance(models, (Mapping, Sequence)) or not models:
        raise TypeError(f"`models` must be a non-empty dict {{name: ToyModel}} or list of ToyModels, got "
                        f"{type(models).__name__}")
    for m in (models.values() if isinstance(models, Mapping) else models):
        if not isinstance(m, ToyModel):
            raise TypeError(f"`models` must hold ToyModels, got a {type(m).__name__}")
    steps = [_checks.positive_int(k, "steps") for k in steps]
    if not isinstance(models, Mapping):
        kinds = [m.kind for m in models]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"two models of one kind ({kinds}): pass a dict {{name: model}}")
        models = dict(zip(kinds, models))
    z = noise(n, seed=seed)
    return {name: {k: sliced_wasserstein(m.sample(z, k), data) for k in steps} for name, m in models.items()}
