"""Projections and directions: PCA against scikit-learn, UMAP contract, directions in sigma units."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latentlab.project import PCA, UMAP, knn_accuracy, move, orthogonalize, pca_direction, trustworthiness


def _data(n=300, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = 10 * 0.8 ** torch.arange(d, dtype=torch.float64)  # well-separated spectrum
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scales + 3.0


@pytest.mark.parametrize("solver", ["full", "covariance_eigh", "randomized"])
def test_pca_matches_scikit_learn(solver):
    from sklearn.decomposition import PCA as SkPCA

    x = _data()
    ours = PCA(5, svd_solver=solver, random_state=0).fit(x)
    sk = SkPCA(5, svd_solver="full").fit(x.numpy())
    np.testing.assert_allclose(ours.explained_variance_.numpy(), sk.explained_variance_, rtol=1e-3)
    np.testing.assert_allclose(ours.explained_variance_ratio_.numpy(), sk.explained_variance_ratio_, rtol=1e-3)
    # components equal up to sign (both fix signs the same way)
    np.testing.assert_allclose(np.abs(ours.components_.numpy() @ sk.components_.T), np.eye(5), atol=1e-3)
    np.testing.assert_allclose(np.abs(ours.transform(x).numpy()), np.abs(sk.transform(x.numpy())), atol=1e-2)


def test_pca_inverse_transform_round_trips_with_all_components_and_keeps_item_shape():
    x = torch.randn(50, 2, 3, 4, generator=torch.Generator().manual_seed(1))
    pca = PCA(24).fit(x)
    torch.testing.assert_close(pca.inverse_transform(pca.transform(x)), x, atol=1e-4, rtol=0)
    assert PCA(2, random_state=3, svd_solver="randomized").fit(x).components_.shape == (2, 24)
    with pytest.raises(ValueError, match=r"`n_components` must be <= min\(n_samples, n_features\) = 24, got 25"):
        PCA(25).fit(x)
    with pytest.raises(RuntimeError, match="not fitted"):
        PCA(2).transform(x)
    with pytest.raises(ValueError, match=r"`X` items must have 24 values"):
        pca.transform(torch.randn(3, 5))
    with pytest.raises(ValueError, match="finite"):
        PCA(2).fit(torch.full((4, 3), float("nan")))


def test_randomized_pca_is_reproducible_with_random_state():
    x = _data(n=3000, d=60).float()
    a = PCA(3, svd_solver="randomized", random_state=7).fit(x).components_
    b = PCA(3, svd_solver="randomized", random_state=7).fit(x).components_
    assert torch.equal(a, b)


def test_pca_direction_moves_by_sigma_units():
    x = _data()
    pca = PCA(3).fit(x)
    d = pca_direction(pca, 1)
    shifted = pca.transform(move(x[:5], d, 2.0))
    delta = shifted - pca.transform(x[:5])
    torch.testing.assert_close(delta[:, 1], torch.full((5,), 2.0, dtype=delta.dtype) * pca.explained_variance_[1].sqrt())
    torch.testing.assert_close(delta[:, [0, 2]], torch.zeros(5, 2, dtype=delta.dtype), atol=1e-9, rtol=0)
    sweep = move(x[:2], d, torch.tensor([-1.0, 0.0, 1.0]))
    assert sweep.shape == (3, 2, 40) and torch.equal(sweep[1], x[:2])


@settings(max_examples=50)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4))
def test_orthogonalize_removes_the_span_and_keeps_the_norm(seed, n_other):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(16, generator=g, dtype=torch.float64)
    others = [torch.randn(16, generator=g, dtype=torch.float64) for _ in range(n_other)]
    out = orthogonalize(d, others)
    for o in others:
        assert abs(float(out @ o)) < 1e-8 * float(o.norm() * out.norm())
    torch.testing.assert_close(out.norm(), d.norm())


def test_orthogonalize_and_move_errors():
    d = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match="lies in the span"):
        orthogonalize(d, torch.tensor([2.0, 0.0]))
    with pytest.raises(ValueError, match=r"`against` must have the shape"):
        orthogonalize(d, torch.ones(3))
    with pytest.raises(ValueError, match=r"`against\[1\]` must have the shape"):
        orthogonalize(d, [torch.tensor([0.0, 1.0]), torch.ones(3)])
    with pytest.raises(TypeError, match=r"`against` must be a tensor \(one direction\) or a non-empty list"):
        orthogonalize(d, [])
    with pytest.raises(ValueError, match=r"`direction` must have the shape of one item of `x` \(2,\)"):
        move(torch.ones(4, 2), torch.ones(3), 1.0)
    z = torch.randn(3, 4, 8, 8)
    moved = move(z, torch.randn(4, 8, 8), 3.0, renormalize=True)
    torch.testing.assert_close(moved.flatten(1).norm(dim=1), z.flatten(1).norm(dim=1))


def test_structure_metrics_see_structure_and_its_absence():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    centres = torch.randn(4, 10, generator=g) * 10
    x = centres[labels] + torch.randn(200, 10, generator=g)
    emb = PCA(2).fit_transform(x)
    assert knn_accuracy(emb, labels.tolist()) > 0.95
    shuffled = emb[torch.randperm(200, generator=g)]
    assert knn_accuracy(shuffled, labels.tolist()) < 0.5
    assert trustworthiness(x, emb) > trustworthiness(x, shuffled) + 0.2


@pytest.mark.slow
def test_umap_contract_and_pca_first_for_wide_inputs():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(120) % 3
    x = (torch.randn(3, 80, generator=g) * 8)[labels] + torch.randn(120, 80, generator=g)
    u = UMAP(n_neighbors=10, pca_components=20, random_state=0)
    emb = u.fit_transform(x)
    assert emb.shape == (120, 2) and u.pca_.components_.shape == (20, 80)
    assert knn_accuracy(emb, labels.tolist()) > 0.95
    assert u.transform(x[:5]).shape == (5, 2)
    with pytest.raises(ValueError, match=r"more than `n_neighbors` = 10 samples, got 5"):
        UMAP(n_neighbors=10).fit(x[:5])
    # the way back: a cluster's map point inverts to that cluster (through the PCA, in the input's shape)
    centres = torch.stack([emb[labels == c].mean(0) for c in range(3)])
    back = u.inverse_transform(centres)
    assert back.shape == (3, 80)
    means = torch.stack([x[labels == c].mean(0) for c in range(3)])
    assert torch.equal(torch.cdist(back, means).argmin(1), torch.arange(3))
    with pytest.raises(ValueError, match=r"`Z` points must have 2 coordinates, got shape \(1, 3\)"):
        u.inverse_transform(torch.zeros(1, 3))
    with pytest.raises(RuntimeError, match="not fitted"):
        UMAP().inverse_transform(centres)


@pytest.mark.slow
def test_umap_leaves_torchs_thread_count_alone():
    """umap-learn's first fit in a process starts numba's OpenMP layer, which set the process's OpenMP thread count
    (torch's too) to every core: a process pinned to fewer threads then ran torch oversubscribed (one batch of
    images 22x slower on a busy machine). A fresh process, since the layer starts once per process."""
    import os
    import subprocess
    import sys

    n = 1 if (os.cpu_count() or 1) > 1 else 2  # anything but the core count numba would set
    code = (
        "import torch\n"
        f"torch.set_num_threads({n})\n"
        "counts = [torch.get_num_threads()]\n"  # torch's OpenMP state in use, as in any process that generated
        "from latentlab.project import UMAP\n"
        "x = torch.randn(120, 64, generator=torch.Generator().manual_seed(0))\n"
        "u = UMAP(n_neighbors=15, random_state=0).fit(x)\n"
        "counts.append(torch.get_num_threads())\n"
        "u.transform(x[:3]); counts.append(torch.get_num_threads())\n"
        "u.inverse_transform(u.embedding_[:2]); counts.append(torch.get_num_threads())\n"
        "print(counts)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str([n, n, n, n])


# --- inverse projections ------------------------------------------------------------------------------------------

_pts = st.tuples(st.floats(-10, 10), st.floats(-10, 10))


@settings(max_examples=60)
@given(seed=st.integers(0, 10_000), point=_pts, k=st.integers(1, 12), power=st.floats(0.5, 4))
def test_knn_weights_are_a_convex_combination_of_the_nearest_items(seed, point, k, power):
    from latentlab.project import knn_weights

    coords = torch.randn(20, 2, generator=torch.Generator().manual_seed(seed)) * 3
    idx, w = knn_weights(coords, point, k=k, power=power)
    assert len(idx) == len(w) == min(k, 20)
    assert bool((w >= 0).all()) and abs(float(w.sum()) - 1) < 1e-5
    d = (coords - torch.tensor(point)).norm(dim=1)
    assert torch.equal(idx, d.argsort()[: len(idx)]) or torch.allclose(d[idx], d.sort().values[: len(idx)])
    assert bool((w[:-1] >= w[1:] - 1e-6).all())  # nearer items weigh more


def test_knn_weights_on_an_item_picks_that_item():
    from latentlab.project import knn_weights

    coords = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.5]])
    idx, w = knn_weights(coords, (1.0, 1.0), k=3)
    assert int(idx[0]) == 1 and w.tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"`point` must be two finite numbers"):
        knn_weights(coords, (float("nan"), 0))
    with pytest.raises(ValueError, match=r"`coords` must have shape \(n, 2\), got \(3, 3\)"):
        knn_weights(torch.zeros(3, 3), (0, 0))


@settings(max_examples=40)
@given(seed=st.integers(0, 10_000), point=_pts)
def test_inverse_pca_lands_on_the_point_and_on_the_gaussian_shell(seed, point):
    from latentlab.project import PCA, inverse_pca

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(30, 4, 4, 4, generator=g)
    pca = PCA(2).fit(noise)
    exact = inverse_pca(pca, point, noise, renormalize=False)
    assert exact.shape == (4, 4, 4)
    torch.testing.assert_close(pca.transform(exact[None])[0], torch.tensor(point, dtype=torch.float32),
                               rtol=1e-4, atol=1e-4)
    shell = inverse_pca(pca, point, noise)
    assert abs(float(shell.norm()) - 64**0.5) < 1e-3
    # On an item's own coordinates (no renormalisation) the item itself comes back.
    c = pca.transform(noise)
    torch.testing.assert_close(inverse_pca(pca, c[3].tolist(), noise, renormalize=False), noise[3], rtol=0,
                               atol=1e-5)
