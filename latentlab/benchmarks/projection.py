"""Projection speed and quality: torch PCA vs scikit-learn PCA, and UMAP with vs without a PCA-to-50 step.

Data: a Gaussian mixture of ``--clusters`` clusters in ``--dim`` dimensions (latents flattened are wide: 256 for
the embedded model, 16,384 for SD 1.5 at 512 px), ``--sizes`` points. Every timing is printed beside its baseline
measured in the same run (scikit-learn PCA; UMAP on the raw data) as a ratio, with trustworthiness (on a 2,000
point subsample, which is what sklearn's O(n²) metric allows) and k-NN accuracy of the cluster labels.

    python -m latentlab.benchmarks.projection --sizes 10000 100000 --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def _data(n: int, dim: int, clusters: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(clusters, (n,), generator=g)
    centres = torch.randn(clusters, dim, generator=g) * 3 / dim**0.25
    return centres[labels] + torch.randn(n, dim, generator=g) * 0.5 / dim**0.25 * 4, labels


def _quality(x, emb, labels, rng=0):
    import torch

    from latentlab.project import knn_accuracy, trustworthiness

    g = torch.Generator().manual_seed(rng)
    idx = torch.randperm(len(x), generator=g)[:2000]
    return trustworthiness(x[idx], emb[idx]), knn_accuracy(emb[idx], labels[idx].tolist())


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentlab.benchmarks.projection", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--skip-umap-above", type=int, default=100_000,
                   help="skip UMAP on the raw data above this many points (it is the slow baseline)")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--no-warmup", action="store_true", help="do not pay numba's compilation before timing (smoke runs)")
    args = p.parse_args(argv)
    import numpy as np
    import torch
    from sklearn.decomposition import PCA as SkPCA

    from latentlab.project import PCA, UMAP

    torch.set_num_threads(args.threads)
    rows = []
    # Pay numba JIT before timing anything: both the small-data and the NN-descent (n > 4096) code paths.
    if not args.no_warmup:
        UMAP(pca_components=None, random_state=0).fit(torch.randn(5000, 60))
        UMAP(pca_components=None).fit(torch.randn(300, 60))
    for n in args.sizes:
        x, labels = _data(n, args.dim, args.clusters)
        xn = x.numpy()
        sk, t_sk = _timed(lambda xn=xn: SkPCA(50, svd_solver="randomized", random_state=0).fit_transform(xn))
        ours, t_ours = _timed(lambda x=x: PCA(50, svd_solver="randomized", random_state=0).fit_transform(x))
        agree = float(np.abs(np.corrcoef(sk[:, 0], ours[:, 0].numpy())[0, 1]))
        rows.append((n, "PCA-50 scikit-learn (randomized)", t_sk, 1.0, None, None, ""))
        rows.append((n, "PCA-50 latentlab (torch)", t_ours, t_sk / t_ours, None, None, f"corr(PC1) = ±{agree:.4f}"))
        print(f"n={n}: sklearn PCA {t_sk:.2f} s, torch PCA {t_ours:.2f} s -> {t_sk / t_ours:.2f}x", flush=True)
        with_pca, t_with = _timed(lambda x=x: UMAP(pca_components=50, random_state=0).fit_transform(x))
        tw_with, knn_with = _quality(x, with_pca, labels)
        if n <= args.skip_umap_above:
            raw, t_raw = _timed(lambda x=x: UMAP(pca_components=None, random_state=0).fit_transform(x))
            tw_raw, knn_raw = _quality(x, raw, labels)
            rows.append((n, "UMAP on raw data", t_raw, 1.0, tw_raw, knn_raw, ""))
            rows.append((n, "UMAP after PCA-50", t_with, t_raw / t_with, tw_with, knn_with, ""))
            print(f"n={n}: UMAP raw {t_raw:.1f} s (trust {tw_raw:.3f}), with PCA-50 {t_with:.1f} s (trust "
                  f"{tw_with:.3f}) -> {t_raw / t_with:.2f}x", flush=True)
        else:
            rows.append((n, "UMAP after PCA-50", t_with, None, tw_with, knn_with, "raw-data UMAP skipped"))
            print(f"n={n}: UMAP with PCA-50 {t_with:.1f} s (trust {tw_with:.3f}); raw skipped", flush=True)
    if args.markdown:
        lines = [(f"\n### Projections: {args.dim}-d Gaussian mixture ({args.clusters} clusters), {args.threads} CPU "
                  f"threads, torch {torch.__version__}\n"),
                 "| points | method | seconds | speed-up vs baseline | trustworthiness | k-NN acc. | note |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for n, m, t, r, tw, knn, note in rows:
            fmt = lambda v, f: "–" if v is None else format(v, f)
            lines.append(f"| {n:,} | {m} | {t:.2f} | {fmt(r, '.2f')}x | {fmt(tw, '.3f')} | {fmt(knn, '.3f')} | {note} |")
        with args.markdown.open("a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
