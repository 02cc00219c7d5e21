"""Frame schedules, easing, keyframe paths (chained and C1 spline) and seamless loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import latentlab as ll


@given(st.integers(2, 8), st.integers(2, 200), st.booleans(), st.sampled_from(ll.EASINGS))
def test_schedule_exact_count_and_no_duplicates(k, n, loop, easing):
    s = ll.schedule(k, n, loop=loop, easing=easing)
    assert len(s) == n == len(s.segment) == len(s.position)
    assert all(0 <= seg < s.n_segments for seg in s.segment)
    assert all(0.0 <= t <= 1.0 for t in s.t)
    # Strictly increasing positions: no frame is repeated at a join or at the seam.
    assert all(p1 > p0 for p0, p1 in zip(s.position, s.position[1:]))
    assert s.position[0] == 0.0
    if loop:
        assert s.position[-1] < k  # the seam frame (back at keyframe 0) is not included
        step = k / n
        assert s.position[-1] == pytest.approx(k - step)
    else:
        assert s.position[-1] == k - 1 and s.t[-1] == 1.0


def test_schedule_frames_on_keyframes():
    s = ll.schedule(3, 9)  # frames at 0, .25, ..., 2 keyframe units
    assert s.position == (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
    assert s.segment[4] == 1 and s.t[4] == 0.0


@given(st.sampled_from(ll.EASINGS), st.lists(st.floats(0, 1), min_size=2, max_size=20))
def test_easing_monotone_with_exact_endpoints(easing, ts):
    assert ll.ease(0.0, easing) == 0.0 and ll.ease(1.0, easing) == 1.0
    ts = sorted(ts)
    vals = [ll.ease(t, easing) for t in ts]
    assert all(0.0 <= v <= 1.0 for v in vals)
    assert all(v1 >= v0 - 1e-15 for v0, v1 in itertools.pairwise(vals))
    tensor_vals = ll.ease(torch.tensor(ts, dtype=torch.float64), easing)
    torch.testing.assert_close(tensor_vals, torch.tensor(vals, dtype=torch.float64))


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"`easing` must be one of .*got 'bounce'"):
        ll.schedule(2, 10, easing="bounce")
    with pytest.raises(ValueError, match=r"`n_frames` must be >= 2, got 1"):
        ll.schedule(2, 1)
    with pytest.raises(ValueError, match=r"`n_keyframes` must be >= 2, got 1"):
        ll.schedule(1, 5)


def _keys(k, seed=0, shape=(2, 4, 6, 6)):
    return [ll.noise(list(range(seed + 10 * i, seed + 10 * i + shape[0])), shape) for i in range(k)]


@pytest.mark.parametrize("method", ["slerp", "lerp", "spline"])
def test_path_passes_through_keyframes(method):
    keys = _keys(4)
    path = ll.keyframe_path(keys, 13, method=method)  # frames 0, 4, 8, 12 land on keyframes
    assert path.shape == (13, *keys[0].shape)
    for i, f in enumerate([0, 4, 8, 12]):
        assert torch.equal(path[f], keys[i])
    loop = ll.keyframe_path(keys, 16, method=method, loop=True)
    for i, f in enumerate([0, 4, 8, 12]):
        assert torch.equal(loop[f], keys[i])


def test_chained_slerp_matches_slerp_per_segment():
    keys = _keys(3)
    path = ll.keyframe_path(keys, 5, method="slerp", easing="smoothstep")
    torch.testing.assert_close(path[1], ll.slerp(keys[0], keys[1], ll.ease(0.5, "smoothstep")))
    torch.testing.assert_close(path[3], ll.slerp(keys[1], keys[2], 0.5))


def _velocity_jump(path, frame):
    """Relative difference of the velocities just before and just after ``frame``."""
    before = (path[frame] - path[frame - 1]).double()
    after = (path[frame + 1] - path[frame]).double()
    return ((after - before).norm() / before.norm()).item()


def test_spline_is_c1_at_keyframes_where_chained_slerp_is_not():
    keys = _keys(4, shape=(1, 4, 8, 8))
    n_per_seg = 200
    n = 3 * n_per_seg + 1
    spline = ll.keyframe_path(keys, n, method="spline")
    chain = ll.keyframe_path(keys, n, method="slerp")
    for f in (n_per_seg, 2 * n_per_seg):  # interior keyframes
        assert _velocity_jump(spline.double(), f) < 0.05
        assert _velocity_jump(chain.double(), f) > 0.5
    # Looping spline is C1 at the seam too.
    loop = ll.keyframe_path(keys, 4 * n_per_seg, method="spline", loop=True)
    wrapped = torch.cat([loop[-1:], loop[:2]])
    assert _velocity_jump(wrapped.double(), 1) < 0.05


def test_spline_stays_on_the_shell_of_gaussian_latents():
    keys = _keys(5, shape=(1, 4, 16, 16))
    path = ll.keyframe_path(keys, 60, method="spline", loop=True)
    z = ll.norm_zscore(path.reshape(60, -1))
    assert z.abs().max() < 4
    lerp_path = ll.keyframe_path(keys, 60, method="lerp", loop=True)
    assert ll.norm_zscore(lerp_path.reshape(60, -1)).min() < -10  # midpoints ~0.71 of the norm: z ~ -13


def test_keyframe_path_errors():
    keys = _keys(2)
    with pytest.raises(ValueError, match=r"`method` must be one of \('slerp', 'lerp', 'spline'\), got 'cubic'"):
        ll.keyframe_path(keys, 10, method="cubic")
    with pytest.raises(ValueError, match=r"`keyframes` must hold at least 2 tensors, got 1"):
        ll.keyframe_path(keys[:1], 10)
    with pytest.raises(ValueError, match=r"`keyframes\[0\]` and `keyframes\[1\]` must have the same shape"):
        ll.keyframe_path([keys[0], keys[1][:1]], 10)


def test_circular_walk_is_seamless_and_gaussian():
    shape = (1, 4, 32, 32)
    a, b = ll.noise(1, shape), ll.noise(2, shape)
    n = 48
    walk = ll.circular_walk(a, b, n)
    assert walk.shape == (n, *shape)
    assert torch.equal(walk[0], a)
    steps = (walk[1:] - walk[:-1]).reshape(n - 1, -1).norm(dim=1)
    seam = (walk[0] - walk[-1]).norm()
    assert seam == pytest.approx(steps.mean().item(), rel=0.05)  # the seam is an ordinary step
    assert steps.std() / steps.mean() < 0.05
    assert ll.norm_zscore(walk.reshape(n, -1)).abs().max() < 4
    torch.testing.assert_close(walk[n // 4], b, rtol=1e-5, atol=1e-5)  # theta = pi / 2
    assert math.isclose(float(walk[n // 2].flatten()[0]), float(-a.flatten()[0]), rel_tol=1e-5)


@given(st.lists(st.floats(0, 10), min_size=1, max_size=12), st.lists(st.floats(0, 1), min_size=1, max_size=20))
def test_retime_is_a_monotone_map_of_the_unit_interval_fixing_its_ends(dist, ts):
    from latentlab.paths import retime

    samples = torch.linspace(0, 1, len(dist) + 1)
    out = retime(samples, dist, torch.tensor(sorted(ts), dtype=torch.float64))
    assert bool((out.diff() >= -1e-12).all()) and bool(((out >= 0) & (out <= 1)).all())
    ends = retime(samples, dist, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert ends.tolist() == [0.0, 1.0]


def test_retime_spreads_change_evenly():
    """A segment whose first half changes 3x as much as its second gets 3/4 of the frames in its first half."""
    from latentlab.paths import retime

    t = torch.linspace(0, 1, 9, dtype=torch.float64)
    out = retime([0, 0.5, 1], [3.0, 1.0], t)
    change = torch.where(out <= 0.5, 3 * out, 1.5 + (out - 0.5))  # cumulative change at the retimed points
    torch.testing.assert_close(change.diff(), torch.full((8,), 0.25, dtype=torch.float64), atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match=r"`distances` must have len\(samples\) - 1 = 2 values, got 1"):
        retime([0, 0.5, 1], [1.0], 0.5)
    with pytest.raises(ValueError, match=r"`samples` must increase strictly from 0 to 1"):
        retime([0, 0.7, 0.5, 1], [1.0, 1.0, 1.0], 0.5)


def test_easing_stays_inside_the_unit_interval_at_the_last_float_below_one():
    """smootherstep(0.9999999999999999) computed 1.0000000000000013 before clamping (Hypothesis found it about
    one run in four); every curve maps [0, 1] onto [0, 1]."""
    t = 0.9999999999999999
    for easing in ll.EASINGS:
        assert 0.0 <= ll.ease(t, easing) <= 1.0
        assert float(ll.ease(torch.tensor([t], dtype=torch.float64), easing)[0]) <= 1.0
