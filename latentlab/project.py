"""Projections of latents and embeddings, with the scikit-learn contract, and directions in latent space.

One responsibility: map sets of vectors (latents, CLIP or prompt embeddings; any shape, flattened per item) to a
few coordinates and back, and turn the axes found into directions one can move along. It owns scikit-learn and
umap-learn (both imported lazily, inside the functions that use them).

- :class:`PCA`: torch SVD (exact for small inputs, ``torch.pca_lowrank`` randomized for large ones — Halko,
  Martinsson & Tropp 2011), ``fit``/``transform``/``inverse_transform``, fitted attributes ending in ``_`` as in
  scikit-learn (``components_``, ``mean_``, ``explained_variance_``, ``explained_variance_ratio_``).
- :class:`UMAP`: umap-learn (McInnes, Healy & Melville 2018), after a PCA to 50 dimensions for wide inputs (the
  usual practice: faster, and removes noise dimensions).
- Directions: a PCA component in σ units, the difference of two prompts' embeddings, Gram-Schmidt
  orthogonalisation, and moving a latent/embedding along a direction.
- Structure metrics: k-NN accuracy of known labels in a projection and scikit-learn's trustworthiness
  (Venna & Kaski 2001).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from latentlab import _checks

__all__ = ["PCA", "UMAP", "knn_accuracy", "move", "orthogonalize", "pca_direction", "trustworthiness"]


def _as_2d(x, name: str = "X") -> tuple[torch.Tensor, tuple[int, ...]]:
    """(n, *shape) tensor or array -> (n, d) float tensor and the per-item shape."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as e:
            raise TypeError(f"`{name}` must be a tensor or array of shape (n_samples, ...), got {type(x).__name__}") from e
    if x.ndim < 2:
        raise ValueError(f"`{name}` must have shape (n_samples, ...), got {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"`{name}` must be finite (found NaN or inf)")
    return x.reshape(x.shape[0], -1), tuple(x.shape[1:])


class PCA:
    """Principal component analysis in torch, with scikit-learn's interface.

    Parameters
    ----------
    n_components : int
        Number of components to keep (≤ min(n_samples, n_features)).
    svd_solver : {"auto", "full", "covariance_eigh", "randomized"}
        ``"covariance_eigh"``: eigendecomposition of the d x d covariance, accumulated in float64 (exact; for
        narrow data). ``"auto"``: an exact SVD when the data are small (≤ 2,000 samples or features), else
        randomized (measured here: covariance_eigh took 2.8x scikit-learn's randomized time on 100k x 1024).
    random_state : int
        Seeds the randomized solver (results are then reproducible).

    Examples
    --------
    >>> x = torch.randn(100, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    >>> pca = PCA(n_components=3, random_state=0).fit(x)
    >>> pca.components_.shape, pca.transform(x).shape, pca.inverse_transform(pca.transform(x)).shape
    (torch.Size([3, 256]), torch.Size([100, 3]), torch.Size([100, 4, 8, 8]))
    """

    def __init__(self, n_components: int = 2, *, svd_solver: str = "auto", random_state: int | None = 0,
                 n_oversamples: int = 10, n_iter: int = 4):
        self.n_components = n_components
        self.svd_solver = svd_solver
        self.random_state = random_state
        self.n_oversamples = n_oversamples
        self.n_iter = n_iter

    def __repr__(self) -> str:
        return f"PCA(n_components={self.n_components}, svd_solver={self.svd_solver!r}, random_state={self.random_state})"

    def fit(self, X, y=None) -> PCA:
        """Fit on ``X`` (n_samples, ...) — items of any shape are flattened; ``y`` is ignored."""
        x, self.item_shape_ = _as_2d(X)
        n, d = x.shape
        k = _checks.positive_int(self.n_components, "n_components")
        if k > min(n, d):
            raise ValueError(f"`n_components` must be <= min(n_samples, n_features) = {min(n, d)}, got {k}")
        _checks.choice(self.svd_solver, "svd_solver", ("auto", "full", "covariance_eigh", "randomized"))
        x = x.double() if x.dtype == torch.float64 else x.float()
        self.mean_ = x.mean(0)
        xc = x - self.mean_
        if not bool((xc != 0).any()):
            raise ValueError(f"`X` is constant ({n} identical items): it has no variance to project")
        solver = self.svd_solver
        if solver == "auto":
            solver = "full" if max(n, d) <= 2000 or k > 0.8 * min(n, d) else "randomized"
        if solver == "covariance_eigh":
            cov = xc.T.double() @ xc.double()
            evals, evecs = torch.linalg.eigh(cov)
            order = evals.flip(0)[:k].clamp(min=0)
            s, v = order.sqrt().to(x.dtype), evecs.flip(1)[:, :k].T.to(x.dtype)
        elif solver == "full":
            _, s, vh = torch.linalg.svd(xc, full_matrices=False)
            s, v = s[:k], vh[:k]
        else:
            with torch.random.fork_rng(devices=[], enabled=self.random_state is not None):
                if self.random_state is not None:
                    torch.manual_seed(self.random_state)
                _, s, vv = torch.pca_lowrank(xc, q=min(k + self.n_oversamples, n, d), center=False, niter=self.n_iter)
            s, v = s[:k], vv[:, :k].T
        # Deterministic signs (as scikit-learn's svd_flip): the largest-|value| entry of each component positive.
        sign = torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True)))
        v = v * sign
        self.components_ = v
        self.singular_values_ = s
        self.explained_variance_ = s**2 / max(n - 1, 1)
        total = xc.pow(2).sum() / max(n - 1, 1)
        self.explained_variance_ratio_ = self.explained_variance_ / total
        self.n_features_in_ = d
        self.svd_solver_ = solver
        return self

    def _check_fitted(self):
        if not hasattr(self, "components_"):
            raise RuntimeError("this PCA is not fitted yet: call fit(X) first")

    def transform(self, X) -> torch.Tensor:
        """Coordinates (n, n_components) of ``X`` on the fitted components."""
        self._check_fitted()
        x, shape = _as_2d(X)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"`X` items must have {self.n_features_in_} values (shape {self.item_shape_}), "
                             f"got shape {shape}")
        return (x.to(self.components_.dtype) - self.mean_) @ self.components_.T

    def fit_transform(self, X, y=None) -> torch.Tensor:
        """``fit(X)`` then ``transform(X)``."""
        return self.fit(X).transform(X)

    def inverse_transform(self, Z) -> torch.Tensor:
        """Coordinates (n, n_components) -> points in the original space, shaped like the fitted items."""
        self._check_fitted()
        z = torch.as_tensor(Z, dtype=self.components_.dtype)
        if z.ndim != 2 or z.shape[1] != len(self.components_):
            raise ValueError(f"`Z` must have shape (n, {len(self.components_)}), got {tuple(z.shape)}")
        return (z @ self.components_ + self.mean_).reshape(len(z), *self.item_shape_)


@contextmanager
def _torch_threads_kept():
    """Keep torch's thread count across a umap-learn call.

    umap-learn's first fit in a process starts numba's OpenMP threading layer, which sets the OpenMP thread count of
    the whole process to every core -- and torch's intra-op pool shares that setting. A process pinned to one torch
    thread (a widget's worker, a benchmark, a busy machine) silently ran torch on every core afterwards: measured
    here, one batch of 16 embedded-model images went from 2.7 s to 59 s after a UMAP fit while the other core was
    busy. The count is put back after every call.
    """
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


class UMAP:
    """UMAP with scikit-learn's interface; a PCA to ``pca_components`` first when the input is wider.

    umap-learn is imported on first use (its import and first fit pay numba's compilation: tens of seconds).
    ``transform`` maps new points with the fitted model. torch's thread count is the same after every call as
    before it (umap-learn's numba would otherwise change it for the whole process).
    """

    def __init__(self, n_components: int = 2, *, n_neighbors: int = 15, min_dist: float = 0.1,
                 metric: str = "euclidean", pca_components: int | None = 50, random_state: int | None = 0):
        self.n_components = n_components
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.metric = metric
        self.pca_components = pca_components
        self.random_state = random_state

    def _pre(self, x: torch.Tensor, fit: bool) -> torch.Tensor:
        if self.pca_components is None or x.shape[1] <= self.pca_components:
            return x
        if fit:
            self.pca_ = PCA(min(self.pca_components, len(x)), random_state=self.random_state).fit(x)
        return self.pca_.transform(x)

    def fit(self, X, y=None) -> UMAP:
        """Fit on ``X`` (n_samples, ...); the embedding of ``X`` is ``embedding_``."""
        x, self.item_shape_ = _as_2d(X)
        _checks.positive_int(self.n_components, "n_components")
        _checks.positive_int(self.n_neighbors, "n_neighbors", minimum=2)
        if len(x) <= self.n_neighbors:
            raise ValueError(f"UMAP needs more than `n_neighbors` = {self.n_neighbors} samples, got {len(x)}")
        try:
            import umap
        except ImportError as e:  # pragma: no cover - umap-learn is a dependency
            raise ImportError("UMAP needs umap-learn: pip install umap-learn") from e
        # a seed makes umap-learn single-threaded; n_jobs=1 says so (else it warns on every fit)
        self.umap_ = umap.UMAP(n_components=self.n_components, n_neighbors=self.n_neighbors, min_dist=self.min_dist,
                               metric=self.metric, random_state=self.random_state,
                               n_jobs=1 if self.random_state is not None else -1)
        pre = self._pre(x, True).float().numpy()
        with _torch_threads_kept():
            self.embedding_ = torch.as_tensor(self.umap_.fit_transform(pre))
        self.n_features_in_ = x.shape[1]
        return self

    def fit_transform(self, X, y=None) -> torch.Tensor:
        """Fit on ``X`` and return its embedding (n, n_components)."""
        return self.fit(X).embedding_

    def transform(self, X) -> torch.Tensor:
        """Embed new points with the fitted model."""
        if not hasattr(self, "umap_"):
            raise RuntimeError("this UMAP is not fitted yet: call fit(X) first")
        x, _ = _as_2d(X)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"`X` items must have {self.n_features_in_} values (shape {self.item_shape_}), "
                             f"got {x.shape[1]}")
        pre = self._pre(x, False).float().numpy()
        with _torch_threads_kept():
            return torch.as_tensor(self.umap_.transform(pre))

    def inverse_transform(self, Z) -> torch.Tensor:
        """Points of the fitted space for map points ``Z`` (n, n_components): umap-learn's ``inverse_transform``
        (a weighted mean of the training points whose map neighbourhood holds each point; McInnes et al., the
        UMAP documentation's "inverse transforms"), through the PCA back to the input's shape when one ran first.
        Euclidean metric only (umap-learn's own limit for this method)."""
        if not hasattr(self, "umap_"):
            raise RuntimeError("this UMAP is not fitted yet: call fit(X) first")
        z, _ = _as_2d(Z)
        if z.shape[1] != self.n_components:
            raise ValueError(f"`Z` points must have {self.n_components} coordinates, got shape {tuple(z.shape)}")
        with _torch_threads_kept():
            x = torch.as_tensor(self.umap_.inverse_transform(z.float().numpy())).float()
        if hasattr(self, "pca_"):
            x = self.pca_.inverse_transform(x)
        return x.reshape(len(z), *self.item_shape_)


# --- directions ------------------------------------------------------------------------------------------------


def pca_direction(pca: PCA, index: int = 0) -> torch.Tensor:
    """Component ``index`` of a fitted :class:`PCA` scaled to one standard deviation of the data along it, shaped
    like the fitted items: ``x + k * d`` moves ``x`` by ``k`` σ along that axis."""
    pca._check_fitted()
    if not isinstance(index, int) or not 0 <= index < len(pca.components_):
        raise ValueError(f"`index` must be in [0, {len(pca.components_)}), got {index!r}")
    d = pca.components_[index] * pca.explained_variance_[index].sqrt()
    return d.reshape(pca.item_shape_)


def orthogonalize(direction: torch.Tensor, against: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Remove from ``direction`` its components along ``against`` (one direction or several; Gram-Schmidt), so that
    moving along the result leaves those directions' coordinates unchanged. Keeps the input's norm."""
    _checks.tensor(direction, "direction")
    if isinstance(against, torch.Tensor):
        others = [_checks.tensor(against, "against")]
        names = ["against"]
    elif isinstance(against, (list, tuple)) and against:
        others = [_checks.tensor(o, f"against[{i}]") for i, o in enumerate(against)]
        names = [f"against[{i}]" for i in range(len(others))]
    else:
        raise TypeError("`against` must be a tensor (one direction) or a non-empty list of tensors, got "
                        + (f"an empty {type(against).__name__}" if isinstance(against, (list, tuple))
                           else type(against).__name__))
    d = direction.double().flatten()
    basis: list[torch.Tensor] = []
    for i, (o, name) in enumerate(zip(others, names)):
        if o.shape != direction.shape:
            raise ValueError(f"`{name}` must have the shape of `direction` {tuple(direction.shape)}, "
                             f"got {tuple(o.shape)}")
        v = o.double().flatten()
        for b in basis:
            v = v - (v @ b) * b
        if v.norm() > 1e-12:
            basis.append(v / v.norm())
    norm = d.norm()
    for b in basis:
        d = d - (d @ b) * b
    if d.norm() < 1e-9 * max(float(norm), 1e-30):
        raise ValueError("`direction` lies in the span of `against`: nothing is left after orthogonalising")
    return (d * norm / d.norm()).to(direction.dtype).reshape(direction.shape)


def move(x: torch.Tensor, direction: torch.Tensor, k: float | torch.Tensor, *, renormalize: bool = False) -> torch.Tensor:
    """``x + k * direction`` per batch item (``direction`` shaped like one item); with ``k`` a 1-D tensor, a
    (len(k), *x.shape) sweep. ``renormalize=True`` rescales each result to its item's original norm (for noise
    latents, which must stay on their Gaussian shell)."""
    _checks.tensor(x, "x")
    _checks.tensor(direction, "direction")
    if tuple(direction.shape) != tuple(x.shape[1:]) and tuple(direction.shape) != tuple(x.shape):
        raise ValueError(f"`direction` must have the shape of one item of `x` {tuple(x.shape[1:])}, "
                         f"got {tuple(direction.shape)}")
    d = direction.to(x)
    if isinstance(k, torch.Tensor) and k.ndim == 1:
        return torch.stack([move(x, direction, float(v), renormalize=renormalize) for v in k])
    out = x + float(k) * d
    if renormalize:
        n0 = x.flatten(1).norm(dim=1).view(-1, *[1] * (x.ndim - 1))
        n1 = out.flatten(1).norm(dim=1).view(-1, *[1] * (x.ndim - 1)).clamp(min=1e-12)
        out = out * n0 / n1
    return out


# --- inverse projections: a point on a 2-D map -> something to generate -------------------------------------------


def knn_weights(coords, point, *, k: int = 8, power: float = 2.0, eps: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` map items nearest to ``point`` and inverse-distance weights for them (``1 / d**power``, summing
    to 1). A point on top of an item gets all of that item's weight. Works for any map (PCA, UMAP, ...): blend the
    items' noise with :func:`latentlab.ops.blend` and their prompt embeddings linearly with these weights.

    Returns ``(indices, weights)``, both of length ``min(k, n)``, nearest first.

    >>> idx, w = knn_weights(torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]]), (0.25, 0.0), k=2)
    >>> idx.tolist(), [round(v, 2) for v in w.tolist()]
    ([0, 1], [0.9, 0.1])
    """
    c, _ = _as_2d(coords, "coords")
    if c.shape[1] != 2:
        raise ValueError(f"`coords` must have shape (n, 2), got {tuple(c.shape)}")
    pt = torch.as_tensor(point, dtype=c.dtype).flatten()
    if pt.shape != (2,) or not bool(torch.isfinite(pt).all()):
        raise ValueError(f"`point` must be two finite numbers (x, y), got {point!r}")
    k = min(_checks.positive_int(k, "k"), len(c))
    _checks.real(power, "power", low=0.0)
    d = (c - pt).norm(dim=1)
    dist, idx = d.topk(k, largest=False)
    if float(dist[0]) <= eps:
        w = torch.zeros(k, dtype=c.dtype)
        w[0] = 1.0
        return idx, w
    w = dist.pow(-power)
    return idx, w / w.sum()


def inverse_pca(pca: PCA, point, items, coords=None, *, renormalize: bool = True) -> torch.Tensor:
    """A new item at ``point`` of a 2-D PCA map: the nearest item, moved within the PCA plane by the map offset
    (``x + components_.T @ (point - its coordinates)``), then (``renormalize``) rescaled to the norm of a standard
    Gaussian of its size -- the shell where diffusion noise lives. ``items`` are what the PCA was fitted on (e.g.
    noise latents); ``coords`` their map coordinates (default: ``pca.transform(items)``).

    Without renormalisation, ``pca.transform`` of the result is exactly ``point`` (the move stays in the plane).
    """
    pca._check_fitted()
    x, shape = _as_2d(items, "items")
    if x.shape[1] != pca.n_features_in_:
        raise ValueError(f"`items` must have {pca.n_features_in_} values each (what the PCA was fitted on), "
                         f"got {x.shape[1]}")
    if len(pca.components_) != 2:
        raise ValueError(f"`pca` must have 2 components (a 2-D map), got {len(pca.components_)}")
    c = pca.transform(x) if coords is None else _as_2d(coords, "coords")[0]
    idx, _ = knn_weights(c, point, k=1)
    i = int(idx[0])
    pt = torch.as_tensor(point, dtype=c.dtype).flatten()
    out = x[i].to(pca.components_.dtype) + (pt - c[i]).to(pca.components_.dtype) @ pca.components_
    if renormalize:
        out = out * (out.numel() ** 0.5) / out.norm().clamp(min=1e-12)
    return out.reshape(shape).to(x.dtype)


# --- how much structure a projection keeps ---------------------------------------------------------------------


def knn_accuracy(points, labels, *, n_neighbors: int = 5, cv: int = 5, random_state: int = 0) -> float:
    """Cross-validated accuracy of a k-NN classifier predicting ``labels`` from ``points`` (e.g. 2-D coordinates):
    how well a projection keeps a known attribute together."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    x, _ = _as_2d(points, "points")
    folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=random_state)
    scores = cross_val_score(KNeighborsClassifier(n_neighbors=n_neighbors), x.numpy(), list(labels), cv=folds)
    return float(scores.mean())


def trustworthiness(X, embedding, *, n_neighbors: int = 5) -> float:
    """scikit-learn's trustworthiness in [0, 1]: are the embedding's near neighbours near in the original space?"""
    from sklearn.manifold import trustworthiness as tw

    x, _ = _as_2d(X)
    e, _ = _as_2d(embedding, "embedding")
    return float(tw(x.double().numpy(), e.double().numpy(), n_neighbors=n_neighbors))
