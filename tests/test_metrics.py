"""latentlab.metrics: the morph path measures, as properties and against independent oracles."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latentlab import metrics

dists = st.lists(st.floats(0, 10, allow_nan=False, allow_infinity=False), min_size=1, max_size=40)


def _gini_oracle(d):
    d = np.asarray(d, dtype=float)
    if d.sum() == 0:
        return 0.0
    return sum(abs(a - b) for a, b in itertools.product(d, d)) / (2 * len(d) ** 2 * d.mean())


@settings(max_examples=200, deadline=None)
@given(dists)
def test_gini_matches_the_pairwise_definition_and_lies_in_its_range(d):
    g = metrics.gini(d)
    assert g == pytest.approx(_gini_oracle(d), abs=1e-9)
    assert -1e-12 <= g <= 1 - 1 / len(d) + 1e-9
    assert metrics.smoothness(d) == pytest.approx(1 - g)


@settings(max_examples=100, deadline=None)
@given(dists, st.floats(0.01, 100))
def test_scale_free_measures_ignore_scale_and_the_others_scale_as_they_should(d, k):
    scaled = [k * x for x in d]
    assert metrics.gini(scaled) == pytest.approx(metrics.gini(d), abs=1e-9)
    assert metrics.jump_ratio(scaled) == pytest.approx(metrics.jump_ratio(d), rel=1e-9)
    assert metrics.path_length(scaled) == pytest.approx(k * metrics.path_length(d), rel=1e-9, abs=1e-12)
    assert metrics.distance_variance(scaled) == pytest.approx(k * k * metrics.distance_variance(d), rel=1e-9, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(dists)
def test_permuting_the_steps_changes_no_measure(d):
    r = list(reversed(d))
    for f in (metrics.gini, metrics.path_length, metrics.distance_variance, metrics.jump_ratio):
        assert f(r) == pytest.approx(f(d), rel=1e-9, abs=1e-12)


def test_even_steps_are_perfectly_smooth_and_one_jump_is_not():
    assert metrics.smoothness([0.2] * 16) == pytest.approx(1.0)
    assert metrics.jump_ratio([0.2] * 16) == pytest.approx(1.0)
    one = [0.0] * 15 + [1.0]
    assert metrics.smoothness(one) == pytest.approx(1 / 16)
    assert metrics.jump_ratio(one) == pytest.approx(16.0)
    assert metrics.distance_variance(one) == pytest.approx(np.var(one))


def test_path_scores_of_a_linear_fade_and_of_a_cut():
    fade = torch.linspace(0, 1, 17).view(17, 1, 1, 1).expand(17, 3, 8, 8)
    s = metrics.path_scores(fade)
    assert (s.ppl, s.smoothness, s.jump_ratio, s.n_frames) == (pytest.approx(1.0), pytest.approx(1.0),
                                                               pytest.approx(1.0), 17)
    assert s.distance == "pixel_distance"
    cut = torch.zeros(17, 3, 8, 8)
    cut[9:] = 1
    c = metrics.path_scores(cut)
    assert c.ppl == pytest.approx(1.0) and c.jump_ratio == pytest.approx(16.0)
    assert c.pdv > s.pdv


def test_embedding_distance_uses_the_embedding_and_names_itself():
    d = metrics.embedding_distance(lambda x: x.mean((2, 3)), name="means")
    a = torch.zeros(2, 2, 4, 4)
    a[:, 0] = 1
    b = torch.zeros(2, 2, 4, 4)
    b[:, 1] = 1
    assert d(a, b).tolist() == pytest.approx([1.0, 1.0])
    assert d(a, 3 * a).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert d.__name__ == "means"
    assert metrics.path_scores(torch.cat([a, b]), distance=d).distance == "means"


def test_pixel_distance_downsamples_large_images_by_area():
    a = torch.rand(2, 3, 256, 128)
    small = torch.nn.functional.interpolate(a, size=(64, 32), mode="area")
    assert torch.allclose(metrics.pixel_distance(a, torch.zeros_like(a)),
                          small.pow(2).flatten(1).mean(1).sqrt(), atol=1e-6)


def test_monotonic_reads_one_change_at_most():
    assert metrics.monotonic(["a"] * 5, "a", "b")
    assert metrics.monotonic(["b"] * 5, "a", "b")
    assert metrics.monotonic(["a", "a", "b", "b"], "a", "b")
    assert not metrics.monotonic(["a", "c", "b"], "a", "b")
    assert not metrics.monotonic(["a", "b", "a"], "a", "b")
    assert metrics.monotonic(["a", "a"], "a", "a") and not metrics.monotonic(["a", "b"], "a", "a")


@pytest.mark.parametrize("bad, match", [
    ([], "is empty"), ([1.0, -0.1], "non-negative"), ([float("nan")], "finite"),
])
def test_bad_distances_are_refused_by_name(bad, match):
    with pytest.raises(ValueError, match=f"`distances` (must be )?{match}"):
        metrics.gini(bad)


def test_bad_frames_are_refused_by_name():
    with pytest.raises(TypeError, match="`frames` must be a torch.Tensor"):
        metrics.path_scores(np.zeros((3, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"`frames` must be images \(N, C, H, W\), got shape \(3, 4, 4\)"):
        metrics.path_scores(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="at least 2 frames, got 1"):
        metrics.path_scores(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"same shape, got \(1, 3, 4, 4\) and \(1, 3, 4, 5\)"):
        metrics.pixel_distance(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
    with pytest.raises(TypeError, match="`embed` must be callable"):
        metrics.embedding_distance("clip")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_frames_are_refused_naming_the_argument(bad):
    f = torch.rand(4, 3, 8, 8)
    f[2, 0, 1, 1] = bad
    with pytest.raises(ValueError, match="`frames` must be finite, got 1 NaN/infinite value"):
        metrics.path_scores(f)
    with pytest.raises(ValueError, match="`b` must be finite"):
        metrics.pixel_distance(torch.rand(1, 3, 8, 8), f[2:3])
    with pytest.raises(TypeError, match="`frames` must have a floating-point dtype, got torch.uint8"):
        metrics.path_scores((f.nan_to_num(0) * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="`frames` is empty"):
        metrics.path_scores(torch.zeros(2, 3, 0, 8))
