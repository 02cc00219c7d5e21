"""Seeds to noise: the one place where a seed becomes a tensor.

A seed means the same noise on every device: noise is always drawn from a CPU ``torch.Generator`` in float32 and
only then moved, exactly as diffusers' ``randn_tensor`` does with a CPU generator. A list of seeds gives one batch
item per seed, each equal to that seed drawn alone, so a frame can be re-created without its neighbours.

Variation seeds follow the convention of the AUTOMATIC1111 web UI: the noise of ``seed`` slerped towards the noise of
``subseed`` by ``strength``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from latentlab import _checks
from latentlab.ops import slerp

__all__ = ["noise", "variation_noise"]


def _seed_list(seed: object, name: str) -> list[int] | None:
    """None for a single int seed, else the validated list."""
    if isinstance(seed, bool):
        raise TypeError(f"`{name}` must be an int or a list of ints, got bool")
    if isinstance(seed, int):
        _checks.seed(seed, name)
        return None
    if isinstance(seed, (list, tuple, range)):
        if not seed:
            raise ValueError(f"`{name}` must not be an empty list")
        for i, s in enumerate(seed):
            if isinstance(s, bool) or not isinstance(s, int):
                raise TypeError(f"`{name}[{i}]` must be an int, got {type(s).__name__}")
            _checks.seed(s, f"{name}[{i}]")
        return list(seed)
    raise TypeError(f"`{name}` must be an int or a list of ints, got {type(seed).__name__}")


def _shape(shape: object) -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or not shape:
        raise TypeError(f"`shape` must be a non-empty tuple of ints, got {shape!r}")
    for i, d in enumerate(shape):
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"`shape[{i}]` must be a positive int, got {d!r}")
    return tuple(shape)


def noise(
    seed: int | Sequence[int],
    shape: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard Gaussian noise of ``shape`` for ``seed``, identical on every device.

    Equal, bit for bit, to ``diffusers.utils.torch_utils.randn_tensor(shape, generator=g)`` with
    ``g = torch.Generator("cpu").manual_seed(seed)``; with a list of seeds (one per item, ``len(seed) ==
    shape[0]``), equal to ``randn_tensor`` with a list of such generators: item ``i`` is ``noise(seed[i],
    (1, *shape[1:]))``.

    Parameters
    ----------
    seed : int or list of int
        In ``[0, 2**64)``.
    shape : tuple of int
        Full shape, batch first.
    device, dtype
        Where the result goes and its dtype; the draw itself is always float32 on the CPU.

    Examples
    --------
    >>> noise(0, (1, 4, 8, 8)).shape
    torch.Size([1, 4, 8, 8])
    >>> both = noise([7, 8], (2, 4, 8, 8))
    >>> torch.equal(both[1:], noise(8, (1, 4, 8, 8)))
    True
    """
    seeds = _seed_list(seed, "seed")
    shape = _shape(shape)
    if seeds is None:
        out = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)  # type: ignore[arg-type]
    else:
        if len(seeds) != shape[0]:
            raise ValueError(
                f"`seed` must give one seed per batch item: got {len(seeds)} seeds for shape {shape} "
                f"(batch {shape[0]})"
            )
        out = torch.cat(
            [torch.randn((1, *shape[1:]), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
        )
    return out.to(device=device, dtype=dtype)


def variation_noise(
    seed: int | Sequence[int],
    subseed: int | Sequence[int],
    strength: float | torch.Tensor,
    shape: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Noise of ``seed`` moved towards the noise of ``subseed`` along the great circle by ``strength``.

    ``strength = 0`` is exactly ``noise(seed, shape)``, ``1`` exactly ``noise(subseed, shape)``; small values give
    variations of an image that keep its composition. A 1-D tensor of strengths gives ``(T, *shape)``.

    >>> v = variation_noise(1, 2, 0.1, (1, 4, 8, 8))
    >>> v.shape, torch.equal(variation_noise(1, 2, 0.0, (1, 4, 8, 8)), noise(1, (1, 4, 8, 8)))
    (torch.Size([1, 4, 8, 8]), True)
    """
    strength = _checks.unit_interval(strength, "strength")
    base = noise(seed, shape)
    other = noise(subseed, shape)
    return slerp(base, other, strength).to(device=device, dtype=dtype)
