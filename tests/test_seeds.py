"""Seeds -> noise: parity with diffusers' randn_tensor, per-item reproducibility, variation seeds."""

from __future__ import annotations

import pytest
import torch

import latentlab as ll


def test_noise_equals_diffusers_randn_tensor_bit_for_bit():
    from diffusers.utils.torch_utils import randn_tensor

    shape = (1, 4, 64, 64)
    ours = ll.noise(1234, shape)
    theirs = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(1234))
    assert ours.dtype == torch.float32
    assert torch.equal(ours, theirs)
    seeds = [5, 6, 7]
    batched = ll.noise(seeds, (3, 4, 16, 16))
    theirs = randn_tensor((3, 4, 16, 16), generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])
    assert torch.equal(batched, theirs)


def test_each_item_reproducible_alone_and_in_any_batch():
    shape = (4, 8, 8)
    batch = ll.noise([10, 11, 12], (3, *shape))
    for i, s in enumerate([10, 11, 12]):
        assert torch.equal(batch[i : i + 1], ll.noise(s, (1, *shape)))
        assert torch.equal(ll.noise([99, s], (2, *shape))[1:], batch[i : i + 1])
    assert not torch.equal(batch[0], batch[1])
    assert torch.equal(ll.noise(3, (1, *shape)), ll.noise(3, (1, *shape)))
    assert torch.equal(ll.noise(range(10, 13), (3, *shape)), batch)  # any sequence of ints: a range too
    with pytest.raises(ValueError, match="empty"):
        ll.noise(range(0), (1, *shape))


def test_device_and_dtype_are_applied_after_the_cpu_draw():
    ref = ll.noise(0, (1, 4, 8, 8))
    half = ll.noise(0, (1, 4, 8, 8), dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, ref.half())
    meta = ll.noise(0, (1, 4, 8, 8), device="meta")
    assert meta.device.type == "meta"


def test_noise_errors():
    with pytest.raises(ValueError, match=r"one seed per batch item: got 2 seeds for shape \(3, 4\) \(batch 3\)"):
        ll.noise([1, 2], (3, 4))
    with pytest.raises(TypeError, match=r"`seed` must be an int or a list of ints, got float"):
        ll.noise(1.5, (1, 4))
    with pytest.raises(TypeError, match=r"`seed\[1\]` must be an int, got str"):
        ll.noise([1, "2"], (2, 4))
    with pytest.raises(ValueError, match=r"`seed` must be in \[0, 2\*\*64\), got -1"):
        ll.noise(-1, (1, 4))
    with pytest.raises(ValueError, match=r"`shape\[1\]` must be a positive int, got 0"):
        ll.noise(1, (1, 0))
    with pytest.raises(ValueError, match=r"`seed` must not be an empty list"):
        ll.noise([], (1, 4))


def test_variation_noise_endpoints_and_closeness():
    shape = (1, 4, 16, 16)
    a, b = ll.noise(1, shape), ll.noise(2, shape)
    assert torch.equal(ll.variation_noise(1, 2, 0.0, shape), a)
    assert torch.equal(ll.variation_noise(1, 2, 1.0, shape), b)
    near = ll.variation_noise(1, 2, 0.1, shape)
    far = ll.variation_noise(1, 2, 0.5, shape)
    assert (near - a).norm() < (far - a).norm()
    assert ll.norm_zscore(far).abs().item() < 4  # stays in distribution, unlike a lerp
    per_item = ll.variation_noise([1, 3], [2, 4], 0.3, (2, 4, 16, 16))
    assert torch.equal(per_item[1:], ll.variation_noise(3, 4, 0.3, shape))
    assert ll.variation_noise(1, 2, torch.tensor([0.0, 0.5]), shape).shape == (2, *shape)
    with pytest.raises(ValueError, match=r"`strength` must be in \[0, 1\], got 2.0"):
        ll.variation_noise(1, 2, 2.0, shape)
