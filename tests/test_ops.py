"""Properties and reference values for latentlab.ops (lerp, slerp, blend, grid, arithmetic)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.spatial import geometric_slerp
from scipy.stats import chi

import latentlab as ll
from latentlab.ops import EPS_ANGLE

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def angle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-item angle, float64, via an independent route (acos of the clamped cosine)."""
    x = x.double().reshape(x.shape[0], -1)
    y = y.double().reshape(y.shape[0], -1)
    cos = (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))
    return torch.acos(cos.clamp(-1, 1))


@st.composite
def pairs(draw, max_batch=4, max_dim=12):
    """Two float64 tensors (batch, dim) with arbitrary values, including zeros and wildly different norms."""
    batch = draw(st.integers(1, max_batch))
    dim = draw(st.integers(2, max_dim))
    elements = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)
    a = draw(hnp.arrays(np.float64, (batch, dim), elements=elements))
    b = draw(hnp.arrays(np.float64, (batch, dim), elements=elements))
    return torch.from_numpy(a), torch.from_numpy(b)


def well_separated(a, b, margin=1e-3):
    """True when every item has both norms > 0 and an angle away from 0 and pi."""
    na, nb = a.norm(dim=1), b.norm(dim=1)
    if bool((na < 1e-6).any()) or bool((nb < 1e-6).any()):
        return False
    th = angle(a, b)
    return bool((th > margin).all()) and bool((th < math.pi - margin).all())


unit_t = st.floats(0.0, 1.0, allow_nan=False)


# --- lerp ----------------------------------------------------------------------------------------------------------


@given(pairs(), unit_t)
def test_lerp_endpoints_exact_and_formula(ab, t):
    a, b = ab
    assert torch.equal(ll.lerp(a, b, 0.0), a)
    assert torch.equal(ll.lerp(a, b, 1.0), b)
    torch.testing.assert_close(ll.lerp(a, b, t), (1 - t) * a + t * b, rtol=1e-9, atol=1e-9)


def test_lerp_tensor_t_shape_and_values():
    a, b = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2)
    out = ll.lerp(a, b, torch.tensor([0.0, 0.25, 1.0]))
    assert out.shape == (3, 3, 4, 2, 2)
    assert out[1].unique().tolist() == [0.25]


# --- slerp: properties ---------------------------------------------------------------------------------------------


@given(pairs(), unit_t)
def test_slerp_finite_or_clear_error_on_any_input(ab, t):
    a, b = ab
    try:
        out = ll.slerp(a, b, t)
    except ValueError as e:
        assert "opposite directions" in str(e)
        assert bool((angle(a, b) > math.pi - 2 * EPS_ANGLE).any())
        return
    assert torch.isfinite(out).all()
    assert out.shape == a.shape


@given(pairs())
def test_slerp_endpoints_exact(ab):
    a, b = ab
    assume(well_separated(a, b))
    assert torch.equal(ll.slerp(a, b, 0.0), a)
    assert torch.equal(ll.slerp(a, b, 1.0), b)
    both = ll.slerp(a, b, torch.tensor([0.0, 1.0]))
    assert torch.equal(both[0], a) and torch.equal(both[1], b)


@given(pairs(), unit_t)
def test_slerp_symmetry(ab, t):
    a, b = ab
    assume(well_separated(a, b))
    torch.testing.assert_close(ll.slerp(a, b, t), ll.slerp(b, a, 1 - t), rtol=1e-7, atol=1e-7)


@given(pairs(), unit_t)
def test_slerp_norm_interpolates_linearly_and_is_preserved_for_equal_norms(ab, t):
    a, b = ab
    assume(well_separated(a, b))
    out = ll.slerp(a, b, t)
    expected = (1 - t) * a.norm(dim=1) + t * b.norm(dim=1)
    torch.testing.assert_close(out.norm(dim=1), expected, rtol=1e-9, atol=1e-9)
    b_same = b / b.norm(dim=1, keepdim=True) * a.norm(dim=1, keepdim=True)
    torch.testing.assert_close(ll.slerp(a, b_same, t).norm(dim=1), a.norm(dim=1), rtol=1e-9, atol=1e-9)


@given(pairs(), unit_t)
def test_slerp_angle_is_linear_in_t(ab, t):
    a, b = ab
    assume(well_separated(a, b, margin=1e-2))
    out = ll.slerp(a, b, t)
    torch.testing.assert_close(angle(a, out), t * angle(a, b), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(angle(out, b), (1 - t) * angle(a, b), rtol=1e-6, atol=1e-6)


@given(pairs(), unit_t)
def test_slerp_batch_equals_stack_of_items(ab, t):
    a, b = ab
    assume(well_separated(a, b))
    whole = ll.slerp(a, b, t)
    items = torch.cat([ll.slerp(a[i : i + 1], b[i : i + 1], t) for i in range(len(a))])
    torch.testing.assert_close(whole, items, rtol=0, atol=1e-12)


@given(pairs(), st.lists(unit_t, min_size=1, max_size=5))
def test_slerp_tensor_t_equals_each_float_t(ab, ts):
    a, b = ab
    assume(well_separated(a, b))
    out = ll.slerp(a, b, torch.tensor(ts, dtype=torch.float64))
    assert out.shape == (len(ts), *a.shape)
    for k, t in enumerate(ts):
        torch.testing.assert_close(out[k], ll.slerp(a, b, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_slerp_keeps_dtype_and_device(dtype):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 8, 8, generator=g).to(dtype), torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    for fn in (ll.slerp, ll.lerp):
        out = fn(a, b, 0.3)
        assert out.dtype == dtype and out.device == a.device
        assert fn(a, b, torch.tensor([0.1, 0.9])).dtype == dtype


def test_slerp_fp16_128px_latents_do_not_overflow():
    # 4 x 128 x 128 = 65,536 values an item: their sum of squares (~65,536) is above fp16's max (65,504).
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 4, 128, 128, generator=g).half()
    b = torch.randn(2, 4, 128, 128, generator=g).half()
    out = ll.slerp(a, b, 0.5)
    assert torch.isfinite(out).all()
    ref = ll.slerp(a.double(), b.double(), 0.5)
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-3)
    assert abs(ll.norm_zscore(out.float())).max() < 6


def test_slerp_parallel_falls_back_to_lerp():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    out = ll.slerp(a, 3 * a, 0.5)
    torch.testing.assert_close(out, 2 * a)
    tiny = a + torch.tensor([[0.0, 1e-7, 0.0]])
    assert torch.isfinite(ll.slerp(a, tiny, 0.5)).all()


def test_slerp_zero_norm_item_is_linear_and_finite():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 2.0], [0.0, 1.0]])
    out = ll.slerp(a, b, 0.5)
    torch.testing.assert_close(out[0], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(out[1], torch.tensor([math.sqrt(0.5)] * 2))


def test_slerp_antipodal_raises_with_items_named():
    a = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    b = a.clone()
    b[1] = -a[1]
    with pytest.raises(ValueError, match=r"opposite directions for item\(s\) \[1\]"):
        ll.slerp(a, b, 0.5)


# --- slerp: reference values from an independent oracle -----------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_slerp_matches_scipy_geometric_slerp(seed):
    rng = np.random.default_rng(seed)
    dim = int(rng.integers(2, 40))
    u, v = rng.standard_normal(dim), rng.standard_normal(dim)
    u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)
    ts = np.linspace(0, 1, 9)
    expected = geometric_slerp(u, v, ts)
    ours = ll.slerp(torch.from_numpy(u), torch.from_numpy(v), torch.from_numpy(ts)).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-12)
    # Unequal norms: our direction follows the same great circle, our norm is the lerp of the norms.
    ours = ll.slerp(torch.from_numpy(3 * u), torch.from_numpy(5 * v), torch.from_numpy(ts)).numpy()
    np.testing.assert_allclose(ours, expected * (3 + 2 * ts)[:, None], atol=1e-11)


def test_slerp_reference_value_by_hand():
    out = ll.slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 1 / 3)
    torch.testing.assert_close(out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))


# --- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [ll.lerp, ll.slerp])
def test_interpolation_error_messages(fn):
    a = torch.zeros(1, 4, 64, 64)
    with pytest.raises(ValueError, match=r"`a` and `b` must have the same shape, got \(1, 4, 64, 64\) and \(1, 4, 96, 64\)"):
        fn(a, torch.zeros(1, 4, 96, 64), 0.5)
    with pytest.raises(TypeError, match=r"`a` and `b` must have the same dtype, got torch.float32 and torch.float16"):
        fn(a, a.half(), 0.5)
    with pytest.raises(ValueError, match=r"`a` and `b` must be on the same device, got cpu and meta"):
        fn(a, torch.zeros(1, 4, 64, 64, device="meta"), 0.5)
    with pytest.raises(ValueError, match=r"`t` must be in \[0, 1\], got 1.5"):
        fn(a, a, 1.5)
    with pytest.raises(ValueError, match=r"`t` must be in \[0, 1\], got nan"):
        fn(a, a, float("nan"))
    with pytest.raises(ValueError, match=r"every value of `t` must be in \[0, 1\], got 1 outside \(first: -0.5\)"):
        fn(a, a, torch.tensor([0.0, -0.5]))
    with pytest.raises(ValueError, match=r"`t` must be a number or a 1-D tensor, got a tensor of shape \(2, 2\)"):
        fn(a, a, torch.zeros(2, 2))
    with pytest.raises(TypeError, match=r"`t` must be a real number or a 1-D tensor, got str"):
        fn(a, a, "0.5")
    with pytest.raises(TypeError, match=r"`a` must be a torch.Tensor, got list"):
        fn([0.0, 1.0], a, 0.5)
    with pytest.raises(TypeError, match=r"`b` must have a floating-point dtype, got torch.int64"):
        fn(torch.zeros(2, dtype=torch.int64).float(), torch.zeros(2, dtype=torch.int64), 0.5)


# --- blend and grid ------------------------------------------------------------------------------------------------


@settings(deadline=None)
@given(pairs(max_batch=3, max_dim=10), unit_t)
def test_blend_of_two_is_slerp(ab, t):
    a, b = ab
    assume(well_separated(a, b, margin=1e-2))
    torch.testing.assert_close(ll.blend([a, b], [1 - t, t]), ll.slerp(a, b, t), rtol=1e-6, atol=1e-6)


@settings(deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 5), st.lists(st.floats(0.01, 10), min_size=5, max_size=5))
def test_blend_properties(seed, k, raw_w):
    g = torch.Generator().manual_seed(seed)
    zs = [torch.randn(2, 3, 4, 4, generator=g) for _ in range(k)]
    w = raw_w[:k]
    out = ll.blend(zs, w)
    # Norm is the weighted mean of norms.
    wn = torch.tensor(w, dtype=torch.float64) / sum(w)
    norms = torch.stack([z.reshape(2, -1).double().norm(dim=1) for z in zs])
    torch.testing.assert_close(out.reshape(2, -1).double().norm(dim=1), (wn[:, None] * norms).sum(0), rtol=1e-5, atol=1e-5)
    # Order of the latents does not matter; scale of the weights does not matter.
    perm = list(reversed(range(k)))
    torch.testing.assert_close(ll.blend([zs[i] for i in perm], [w[i] for i in perm]), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ll.blend(zs, [3 * x for x in w]), out, rtol=1e-5, atol=1e-5)
    # Batch equals stack of items.
    items = torch.cat([ll.blend([z[i : i + 1] for z in zs], w) for i in range(2)])
    torch.testing.assert_close(out, items, rtol=1e-6, atol=1e-6)
    # The spherical mean is a stationary point: weighted tangent vectors sum to zero.
    u = out.reshape(2, -1).double()
    u = u / u.norm(dim=1, keepdim=True)
    total = torch.zeros_like(u)
    for wi, z in zip(wn, zs):
        v = z.reshape(2, -1).double()
        v = v / v.norm(dim=1, keepdim=True)
        cos = (u * v).sum(1, keepdim=True)
        th = torch.acos(cos.clamp(-1, 1))
        total += wi * th / torch.sin(th) * (v - cos * u)
    assert total.norm(dim=1).max() < 1e-5


def test_blend_single_weight_returns_that_latent_and_zero_weights_ignored():
    g = torch.Generator().manual_seed(3)
    zs = [torch.randn(1, 16, generator=g) for _ in range(3)]
    torch.testing.assert_close(ll.blend(zs, [0, 1, 0]), zs[1])
    zs_anti = [zs[0], -zs[0], zs[2]]  # an antipodal latent with weight 0 must not matter
    torch.testing.assert_close(ll.blend(zs_anti, [0.5, 0.0, 0.5]), ll.slerp(zs[0], zs[2], 0.5), rtol=1e-5, atol=1e-5)


def test_blend_errors():
    z = torch.zeros(1, 4)
    with pytest.raises(ValueError, match=r"`weights` must be 1-D with one weight per latent \(2\), got shape \(3,\)"):
        ll.blend([z, z], [1, 2, 3])
    with pytest.raises(ValueError, match=r"`weights` must be finite and non-negative"):
        ll.blend([z, z], [1, -1])
    with pytest.raises(ValueError, match=r"`weights` must not sum to zero"):
        ll.blend([z, z], [0, 0])
    with pytest.raises(ValueError, match=r"`latents\[0\]` and `latents\[1\]` must have the same shape"):
        ll.blend([z, torch.zeros(1, 5)], [1, 1])
    a = torch.tensor([[1.0, 0.0]])
    with pytest.raises(ValueError, match=r"cancel out"):
        ll.blend([a, -a], [1, 1])


def test_grid_corners_and_edges():
    g = torch.Generator().manual_seed(0)
    c = [torch.randn(2, 4, 4, 4, generator=g) for _ in range(4)]
    out = ll.grid(*c, rows=4, cols=5)
    assert out.shape == (4, 5, 2, 4, 4, 4)
    for (i, j), corner in zip([(0, 0), (0, 4), (3, 0), (3, 4)], c):
        torch.testing.assert_close(out[i, j], corner, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0, 2], ll.slerp(c[0], c[1], 0.5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2, 0], ll.slerp(c[0], c[2], 2 / 3), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"`rows` must be >= 2, got 1"):
        ll.grid(*c, rows=1, cols=3)


# --- norms and arithmetic ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 3, 10, 256, 16384])
def test_expected_norm_matches_scipy_chi(d):
    assert ll.expected_norm(d) == pytest.approx(chi(d).mean(), rel=1e-10)


def test_norm_zscore_separates_noise_from_lerp_midpoints():
    z = ll.noise(list(range(64)), (64, 4, 32, 32))
    scores = ll.norm_zscore(z)
    assert scores.shape == (64,) and scores.dtype == torch.float32
    assert abs(scores.mean()) < 0.5 and 0.6 < scores.std() < 1.5  # ~ N(0, 1) over seeds
    mid = ll.lerp(z[:32], z[32:], 0.5)
    assert (ll.norm_zscore(mid) < -20).all()
    assert (ll.norm_zscore(ll.slerp(z[:32], z[32:], 0.5)).abs() < 4).all()
    assert ll.norm_zscore(z[0, 0, 0]).shape == ()


def test_renormalize_and_arithmetic():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    raw = ll.analogy(a, b, c, renormalize=False)
    torch.testing.assert_close(raw, a - b + c)
    assert (ll.norm_zscore(raw) > 5).all()
    fixed = ll.analogy(a, b, c)
    assert (ll.norm_zscore(fixed).abs() < 1e-3).all()
    torch.testing.assert_close(fixed / torch.linalg.vector_norm(fixed, dim=(1, 2, 3), keepdim=True), raw / torch.linalg.vector_norm(raw, dim=(1, 2, 3), keepdim=True))
    assert torch.equal(ll.renormalize(torch.zeros(1, 3)), torch.zeros(1, 3))
    torch.testing.assert_close(ll.renormalize(a, norm=2.0).reshape(2, -1).norm(dim=1), torch.tensor([2.0, 2.0]))
    d = torch.randn(4, 8, 8, generator=g)
    torch.testing.assert_close(ll.add_direction(a, d, 0.5), a + 0.5 * d)
    with pytest.raises(ValueError, match=r"`direction` must have the shape of `x` \(2, 4, 8, 8\) or of one item"):
        ll.add_direction(a, torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match=r"`amount` must be a finite number, got inf"):
        ll.add_direction(a, d, float("inf"))
    with pytest.raises(ValueError, match=r"`norm` must be a finite number >= 0, got -1"):
        ll.renormalize(a, norm=-1)


# --- the NaN policy, generated over every tensor argument of every public op --------------------------------------

def _op_calls():
    """(name, call with tensors, the tensors' argument names): every public function of ops and paths that takes
    tensors. test_every_public_op_is_in_the_nan_table keeps this inventory complete."""
    from latentlab import paths

    def z():
        return torch.randn(2, 4, 8, 8)

    return {
        "lerp": (lambda a, b: ll.lerp(a, b, 0.3), {"a": z(), "b": z()}),
        "slerp": (lambda a, b: ll.slerp(a, b, 0.3), {"a": z(), "b": z()}),
        "blend": (lambda x: ll.blend([x, torch.randn(2, 4, 8, 8)], [0.5, 0.5]), {"latents[0]": z()}),
        "grid": (lambda c: ll.grid(c, *[torch.randn(2, 4, 8, 8) for _ in range(3)], rows=2, cols=2),
                 {"corners[0]": z()}),
        "norm_zscore": (lambda x: ll.norm_zscore(x), {"x": z()}),
        "renormalize": (lambda x: ll.renormalize(x), {"x": z()}),
        "analogy": (lambda a, b, c: ll.analogy(a, b, c), {"a": z(), "b": z(), "c": z()}),
        "add_direction": (lambda x, direction: ll.add_direction(x, direction, 1.0),
                          {"x": z(), "direction": torch.randn(4, 8, 8)}),
        "keyframe_path": (lambda k: paths.keyframe_path([k, torch.randn(2, 4, 8, 8)], 5), {"keyframes[0]": z()}),
        "path_at": (lambda k: paths.path_at([k, torch.randn(2, 4, 8, 8)], [0], [0.5]), {"keyframes[0]": z()}),
        "circular_walk": (lambda a, b: paths.circular_walk(a, b, 4), {"a": z(), "b": z()}),
    }


def test_every_public_op_is_in_the_nan_table():
    import inspect

    from latentlab import ops, paths

    takes_tensors = {name for mod in (ops, paths) for name in mod.__all__
                     if inspect.isfunction(getattr(mod, name))
                     and any("Tensor" in str(p.annotation) for p in inspect.signature(getattr(mod, name)).parameters.values()
                             if p.name not in ("t", "strength", "weights", "samples", "distances"))}
    assert takes_tensors <= set(_op_calls()), f"add to the NaN table: {sorted(takes_tensors - set(_op_calls()))}"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("op", sorted(_op_calls()))
def test_every_op_refuses_nonfinite_tensors_naming_the_argument(op, bad):
    """latentlab's NaN policy (README): refuse at the boundary, never propagate silently."""
    call, tensors = _op_calls()[op]
    for name in tensors:
        args = {k: v.clone() for k, v in tensors.items()}
        args[name].view(-1)[3] = bad
        with pytest.raises(ValueError, match=rf"`{re.escape(name)}` must be finite, got 1 NaN/infinite value"):
            call(*args.values())


# --- every other kind of bad tensor, generated over the same inventory --------------------------------------------

def _bad_tensor(kind: str, good: torch.Tensor):
    """A bad (or merely unusual) version of ``good``: what a user passes by mistake."""
    return {
        "int": lambda: good.round().to(torch.int64),
        "bool": lambda: good > 0,
        "complex": lambda: good.to(torch.complex64),
        "numpy": lambda: good.numpy(),
        "list": lambda: good.tolist(),
        "zero-size": lambda: good[:0],
        "scalar": lambda: good.flatten()[0],
        "float16": lambda: good.half(),
        "bfloat16": lambda: good.bfloat16(),
        "non-contiguous": lambda: good.transpose(-1, -2).contiguous().transpose(-1, -2),
        "requires-grad": lambda: good.clone().requires_grad_(True),
    }[kind]()


#: Unusual but valid: the result equals the plain float32 call's.
BENIGN = ("non-contiguous", "requires-grad")
#: Wrong: a ValueError/TypeError naming the argument (float16/bfloat16 may instead compute the right answer).
HARMFUL = ("int", "bool", "complex", "numpy", "list", "zero-size", "scalar")


@pytest.mark.parametrize("kind", BENIGN + HARMFUL + ("float16", "bfloat16"))
@pytest.mark.parametrize("op", sorted(_op_calls()))
def test_every_op_handles_every_kind_of_bad_tensor(op, kind):
    """Each tensor argument of each public op, given each kind of bad tensor, ends in the right result or in a
    ValueError/TypeError that names the argument -- never a deep traceback, a silent wrong result or NaN."""
    call, tensors = _op_calls()[op]
    torch.manual_seed(0)  # some calls draw their other tensors
    clean = call(*[v.clone() for v in tensors.values()])
    for name in tensors:
        args = {k: v.clone() for k, v in tensors.items()}
        args[name] = _bad_tensor(kind, args[name])
        torch.manual_seed(0)
        try:
            out = call(*args.values())
        except (ValueError, TypeError) as e:
            assert kind not in BENIGN, f"{op}({name}={kind}) refused a valid input: {e}"
            assert f"`{name.split('[')[0]}" in str(e) or f"`{name}`" in str(e), f"{op}({name}={kind}): {e}"
            continue
        assert kind in BENIGN or kind in ("float16", "bfloat16"), f"{op}({name}={kind}) was accepted"
        out_t = out if isinstance(out, torch.Tensor) else getattr(out, "latents", out)
        assert torch.isfinite(out_t.float()).all()
        tol = 1e-5 if kind in BENIGN else 2e-2
        torch.testing.assert_close(out_t.detach().float(), clean.float() if isinstance(clean, torch.Tensor)
                                   else getattr(clean, "latents", clean).float(), atol=tol, rtol=tol)
