"""Tensor helpers shared by the maths modules (layer 0, private: only latentlab's own modules import it).

One responsibility: the per-item view every operation works in -- a batch-first tensor as (items, features) rows
in the compute dtype (float32, or float64 for float64 input), and rows as unit vectors.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(items, features) view in the compute dtype: dim 0 is the batch when ndim >= 2, else one item."""
    x = x.to(dtype)
    return x.reshape(1, -1) if x.ndim == 1 else x.reshape(x.shape[0], -1)


def unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` as unit vectors (zero rows stay zero) and their norms."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / torch.where(n > 0, n, torch.ones_like(n)), n.squeeze(-1)
