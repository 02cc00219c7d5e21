"""Tensor helpers shared by the maths modules (layer 0, private: only latentlab's own modules import it).

One responsibility: the per-item view every operation works in -- a batch-first tensor as (items, features) rows
in the compute dtype (float32, or float64 for float64 input), and rows as unit vectors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run torch's CPU operators with at most ``n`` threads inside the block; the previous count comes back after.

    Why: one image through a small model is a long chain of small operators, where a second thread brings nothing
    when the machine is idle (measured on the embedded UNet at batch 1: 31 ms with one thread, 32 ms with two) and
    costs 2-5x when another process is busy on the other core. The setting is process-wide, so use it around
    latency-bound work only.
    """
    before = torch.get_num_threads()
    if n >= before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def native_bfloat16() -> bool:
    """Whether this CPU runs bfloat16 convolutions natively (oneDNN's own answer: AVX512-BF16 or AMX); without it
    bfloat16 is emulated and slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False
