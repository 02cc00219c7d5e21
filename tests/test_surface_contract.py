"""Generated contract of the rest of the public surface (issue #26): every array argument of every public function of
every public module -- audio, metrics, projections, seeds, store, the toy 2-D lab, video, exports, morph keys --
tried with every kind of bad value, and with Hypothesis-drawn arrays of any dtype, shape and values.

Each call ends in the right result or in ``ValueError``/``TypeError`` naming the argument; the harmless variants (a
non-contiguous view, ``requires_grad``, a list or the other array library holding the same numbers) give the plain
result; a refused write leaves nothing behind. ``test_ops.py`` covers ``ops``/``paths`` and ``test_lab_contract.py``
the backend (through :class:`~latentlab.Lab`); the inventory test below fails when any public module gains a
function with a tensor or array argument that no table tries.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import FakeBackend, FakeCLIP
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import latentlab
from latentlab import audio, exports, metrics, project, seeds, store, toy2d, video
from latentlab.atlas import Atlas
from latentlab.backend import AttentionMix, Conditioning, PredictionMix

#: Modules whose tensor functions another generated test owns (the module -> that test).
COVERED_ELSEWHERE = {
    "latentlab.ops": "test_ops.py", "latentlab.paths": "test_ops.py",
    # The backend's functions are what Lab's methods run, after Engine.check_request; tried through Lab.
    "latentlab.backend": "test_lab_contract.py",
    "latentlab.widgets": "test_widget_contract.py",
}


#: Public classes whose array arguments are not a user's input: results the library builds (a user reads them) and
#: the Backend protocol (its implementation, Lab, is tried by test_lab_contract.py).
NOT_INPUTS = {"latentlab.backend.records.Inversion", "latentlab.backend.records.Trajectory",
              "latentlab.backend.records.Tokens", "latentlab.morph.plan.Plan", "latentlab.backend.protocol.Backend"}


@dataclass
class Case:
    """One public function: ``call(**arrays)`` with good arrays from ``good()`` (fresh each time)."""

    call: Callable
    good: Callable[[], dict]
    #: kinds the function may accept besides the harmless ones (e.g. a batch axis it documents).
    accepts: tuple[str, ...] = ()
    #: integers are valid input (PCM samples, counts): the result must equal the float call's.
    ints: bool = False
    #: arguments that may be None.
    optional: tuple[str, ...] = ()
    #: the function writes files: a refusal must leave its folder empty.
    writes: bool = False
    #: any dtype is stored as given (a store), so only non-finite values and non-tensors are wrong.
    any_dtype: bool = False
    #: the result identifies its input exactly (a hash), so another dtype of the same numbers gives another result.
    hashes: bool = False
    #: extra keyword arguments (fixed, not tried).
    needs: dict = field(default_factory=dict)


def _frames(n=5, seed=0):
    return torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def _signal():
    t = np.arange(22050, dtype=np.float32) / 22050
    return (np.sin(2 * np.pi * 220 * t) * ((np.arange(22050) % 4000) < 400)).astype(np.float32)


def _envelope():
    return audio.onset_strength(_signal())


def _out(folder: Path, name: str) -> Path:
    return folder / name


def _append(frames):
    """VideoWriter.append into a writer that is then aborted: what append accepted, as the frames it encoded."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        w = video.VideoWriter(Path(d) / "v.gif", fps=4)
        try:
            w.append(frames)
            return torch.tensor([float(w.n_frames)])
        finally:
            w.abort()


@pytest.fixture(scope="module")
def atlas_map():
    from latentlab.atlas import AtlasMap, build_atlas

    atlas = build_atlas(FakeBackend(), ["a red star", "a blue ring", "a green square"], [1, 2], clip=FakeCLIP(),
                        progress=False)
    return AtlasMap(atlas, space="image_embeds", clip=FakeCLIP())


@pytest.fixture(scope="module")
def clip():
    from latentlab.clip import CLIP

    return CLIP.default()


@pytest.fixture(scope="module")
def toy():
    return toy2d.train(torch.randn(64, 2), "flow", steps=2, batch_size=8)


def _cases(folder: Path) -> dict[str, Case]:
    """The table: every public tensor/array function outside ops, paths, backend and widgets."""
    from latentlab.morph import frame_key
    from latentlab.sampling import Sampling

    def fk(latents, lab):
        return frame_key(lab, latents, lab.encode_prompt(["a red star"]), Sampling(num_inference_steps=2))

    return {
        "audio.onset_strength": Case(lambda y: audio.onset_strength(y), lambda: {"y": _signal()}, ints=True),
        "audio.beats": Case(lambda y, envelope: audio.beats(y, envelope=envelope),
                            lambda: {"y": _signal(), "envelope": _envelope()}, ints=True, optional=("envelope",)),
        "audio.onsets": Case(lambda envelope: audio.onsets(envelope), lambda: {"envelope": _envelope()}, ints=True),
        "audio.frame_envelope": Case(lambda envelope: audio.frame_envelope(envelope, 8, 4.0),
                                     lambda: {"envelope": _envelope()}, ints=True),
        "metrics.consecutive_distances": Case(lambda frames: metrics.consecutive_distances(frames),
                                              lambda: {"frames": _frames()}),
        "metrics.path_scores": Case(lambda frames: metrics.path_scores(frames).to_dict(), lambda: {"frames": _frames()}),
        "metrics.pixel_distance": Case(lambda a, b: metrics.pixel_distance(a, b),
                                       lambda: {"a": _frames(), "b": _frames(seed=1)}),
        **{f"metrics.{f}": Case(lambda distances, f=f: getattr(metrics, f)(distances),
                                lambda: {"distances": torch.rand(6, generator=torch.Generator().manual_seed(2))},
                                ints=True)
           for f in ("path_length", "distance_variance", "gini", "smoothness", "jump_ratio")},
        "project.move": Case(lambda x, direction: project.move(x, direction, 0.5),
                             lambda: {"x": torch.randn(3, 8), "direction": torch.randn(8)}),
        "project.orthogonalize": Case(lambda direction, against: project.orthogonalize(direction, against),
                                      lambda: {"direction": torch.randn(8), "against": torch.randn(8)}),
        "seeds.variation_noise": Case(lambda strength: seeds.variation_noise([1, 2], [3, 4], strength, (2, 4, 8, 8)),
                                      lambda: {"strength": torch.tensor([0.2, 0.4])}, accepts=("scalar",)),
        "store.save": Case(lambda tensors: store.save(_out(folder, "t.safetensors"), {"x": tensors}),
                           lambda: {"tensors": torch.randn(2, 3)}, writes=True, any_dtype=True),
        "toy2d.forward_noise": Case(lambda data: toy2d.forward_noise(data, 0.5, "flow"),
                                    lambda: {"data": torch.randn(40, 2)}),
        "toy2d.sliced_wasserstein": Case(lambda a, b: toy2d.sliced_wasserstein(a, b),
                                         lambda: {"a": torch.randn(40, 2), "b": torch.randn(40, 2) + 1}),
        "toy2d.straightness": Case(lambda path: toy2d.straightness(path), lambda: {"path": torch.randn(5, 40, 2)}),
        "toy2d.train": Case(lambda data: toy2d.train(data, "flow", steps=2, batch_size=8).steps_done,
                            lambda: {"data": torch.randn(40, 2)}),
        "toy2d.few_step_table": Case(
            lambda data: toy2d.few_step_table([toy2d.train(torch.randn(40, 2), "flow", steps=1)], data, (1,), n=16),
            lambda: {"data": torch.randn(40, 2)}),
        "video.image_grid": Case(lambda images: video.image_grid(images, 2), lambda: {"images": _frames()}),
        "video.png_bytes": Case(lambda image: video.png_bytes(image), lambda: {"image": _frames(1)[0]},
                                accepts=("extra-dim",)),  # documented: (3, H, W) or (1, 3, H, W)
        "video.write_image": Case(lambda image: video.write_image(_out(folder, "i.png"), image),
                                  lambda: {"image": _frames(1)[0]}, accepts=("extra-dim",), writes=True),
        "video.write_video": Case(lambda frames: video.write_video(_out(folder, "v.gif"), frames, fps=4),
                                  lambda: {"frames": _frames(3)}, writes=True),
        "exports.write_comfyui_latent": Case(
            lambda latents: exports.write_comfyui_latent(latents, _out(folder, "l.latent"), scaling_factor=0.18),
            lambda: {"latents": torch.randn(2, 4, 8, 8)}, writes=True,
            accepts=("extra-dim",)),  # a 5-D latent is a video model's (ComfyUI stores those too)
        # --- public classes: constructors and methods that take arrays
        "atlas.core.Atlas.__init__": Case(
            lambda noise, latents, image_embeds, prompt_embeds, thumbnails: Atlas(
                noise, latents, image_embeds, prompt_embeds, thumbnails, [{"prompt": "p", "seed": i} for i in range(3)]
            ).noise,
            lambda: {"noise": torch.randn(3, 4, 4, 4), "latents": torch.randn(3, 4, 4, 4),
                     "image_embeds": torch.randn(3, 8), "prompt_embeds": torch.randn(3, 8),
                     "thumbnails": torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)}),
        "atlas.inverse.AtlasMap.transform": Case(lambda vectors, atlas_map: atlas_map.transform(vectors),
                                                 lambda: {"vectors": torch.randn(3, 8)}, needs={"atlas_map": "atlas_map"}),
        "atlas.inverse.AtlasMap.embed": Case(lambda images, atlas_map: atlas_map.embed(None, None, images),
                                             lambda: {"images": _frames(2)}, needs={"atlas_map": "atlas_map"}),
        "atlas.inverse.AtlasMap.land": Case(
            lambda noise, atlas_map: atlas_map.land(FakeBackend(), noise, FakeBackend().encode_prompt(["a red star"]))[1],
            lambda: {"noise": FakeBackend().noise(1)}, needs={"atlas_map": "atlas_map"}),
        "backend.records.Conditioning.__init__": Case(
            lambda prompt_embeds: Conditioning(prompt_embeds).prompt_embeds, lambda: {"prompt_embeds": torch.randn(2, 5, 8)}),
        "backend.records.Conditioning.weighted_sum": Case(
            lambda weights: Conditioning(torch.arange(48.0).reshape(3, 2, 8)).weighted_sum(weights).prompt_embeds,
            lambda: {"weights": torch.tensor([0.2, 0.3, 0.5])}, ints=True),  # [1, -1, 1]: arithmetic
        "backend.records.PredictionMix.__init__": Case(
            lambda weight: PredictionMix(Conditioning(torch.ones(2, 3, 4)), Conditioning(torch.zeros(2, 3, 4)),
                                         weight).weight, lambda: {"weight": torch.tensor([0.25, 0.75])}),
        "backend.records.AttentionMix.__init__": Case(
            lambda weight: AttentionMix(Conditioning(torch.ones(2, 3, 4)), Conditioning(torch.zeros(2, 3, 4)),
                                        weight).weight, lambda: {"weight": torch.tensor([0.25, 0.75])}),
        **{f"clip.CLIP.{m}": Case(call, lambda: {"images": _frames(2)}, needs={"clip": "clip"}) for m, call in {
            "preprocess": lambda images, clip: clip.preprocess(images),
            "embed_images": lambda images, clip: clip.embed_images(images),
            "similarity": lambda images, clip: clip.similarity(images, ["a red star"]),
            "zero_shot": lambda images, clip: clip.zero_shot(images, ["red", "blue"])}.items()},
        "toy2d.ToyModel.fit": Case(lambda data, toy: copy.deepcopy(toy).fit(data, 1, batch_size=8).steps_done,
                                   lambda: {"data": torch.randn(40, 2)}, needs={"toy": "toy"}),
        "toy2d.ToyModel.predict": Case(lambda x, toy: toy.predict(x, 0.5)[0], lambda: {"x": torch.randn(10, 2)},
                                       needs={"toy": "toy"}),
        "toy2d.ToyModel.velocity": Case(lambda x, toy: toy.velocity(x, 0.5), lambda: {"x": torch.randn(10, 2)},
                                        needs={"toy": "toy"}),
        "toy2d.ToyModel.sample": Case(lambda noise, toy: toy.sample(noise, 2), lambda: {"noise": torch.randn(10, 2)},
                                      needs={"toy": "toy"}),
        "video.VideoWriter.append": Case(_append, lambda: {"frames": _frames(2)}, writes=True),
        "morph.render.frame_key": Case(fk, lambda: {"latents": torch.randn(1, 4, 8, 8)}, needs={"lab": "tiny_lab"},
                                        accepts=("extra-dim",), hashes=True),  # a hash of any latent (video models' are 5-D)
    }


# --- the inventory ---------------------------------------------------------------------------------------------------

def _public_modules():
    for info in pkgutil.walk_packages(latentlab.__path__, "latentlab."):
        parts = info.name.split(".")
        if any(p.startswith("_") for p in parts[1:]) or parts[1] in ("benchmarks", "cli") or "embedded" in parts:
            continue
        yield importlib.import_module(info.name)


def _array_params(fn) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if any(k in str(p.annotation) for k in ("Tensor", "ndarray"))
            and not str(p.annotation).startswith("Callable")]


def test_the_inventory_covers_every_public_array_function(tmp_path):
    """Every function in a public module's ``__all__`` with a tensor/array parameter is tried here or by the test
    that owns its module (``embedded``'s training/evaluation scripts and the benchmarks are commands, not API)."""
    cases = _cases(tmp_path)
    missing = []
    for mod in _public_modules():
        if mod.__name__ != "latentlab.backend.records" and any(  # records are values users build: tried here
                mod.__name__ == m or mod.__name__.startswith(m + ".") for m in COVERED_ELSEWHERE):
            continue
        for name in getattr(mod, "__all__", []):
            fn = getattr(mod, name)
            if not inspect.isfunction(fn) or not _array_params(fn):
                continue
            key = f"{fn.__module__.removeprefix('latentlab.')}.{fn.__name__}"  # where it is defined (re-exports once)
            if key not in cases:
                missing.append(f"{mod.__name__}.{name}{_array_params(fn)}")
        for name in getattr(mod, "__all__", []):
            cls = getattr(mod, name)
            if not inspect.isclass(cls) or f"{cls.__module__}.{cls.__name__}" in NOT_INPUTS:
                continue
            for mname, member in vars(cls).items():
                fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                if (mname.startswith("_") and mname != "__init__") or not inspect.isfunction(fn) or not _array_params(fn):
                    continue
                key = f"{cls.__module__.removeprefix('latentlab.')}.{cls.__name__}.{mname}"
                if key not in cases:
                    missing.append(f"{key}{_array_params(fn)}")
    assert not missing, f"add to the contract table: {sorted(set(missing))}"
    assert len(cases) >= 40


# --- every kind of bad value, generated over the table ---------------------------------------------------------------

KINDS = ("nan", "+inf", "-inf", "int", "bool", "complex", "list", "other-library", "zero-size", "scalar", "extra-dim",
         "float16", "non-contiguous", "requires-grad", "none")
#: Harmless: the result equals the plain call's.
HARMLESS = ("non-contiguous", "requires-grad")


def _variant(kind: str, good):
    """A bad (or merely unusual) version of ``good`` (a tensor or a numpy array), in the same library unless the
    kind is the other library."""
    as_np = isinstance(good, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(good)) if as_np else good.clone()

    def back(x):
        return x.numpy() if as_np and x.dtype != torch.bfloat16 else x

    flat = t.flatten().clone()
    if kind in ("nan", "+inf", "-inf"):
        flat = flat.float() if not flat.is_floating_point() else flat
        flat[min(1, flat.numel() - 1)] = {"nan": float("nan"), "+inf": float("inf"), "-inf": -float("inf")}[kind]
        return back(flat.reshape(t.shape))
    if kind == "non-contiguous":
        return np.flip(np.flip(good).copy()) if as_np else t.transpose(0, -1).contiguous().transpose(0, -1)
    if kind == "requires-grad":
        return good.copy() if as_np else (t.requires_grad_(True) if t.is_floating_point() else t)
    return {
        "int": lambda: back((t * 100).round().to(torch.int64)),
        "bool": lambda: back(t > 0.3),
        "complex": lambda: back(t.to(torch.complex64)),
        "list": lambda: t.tolist(),
        "other-library": lambda: t if as_np else t.numpy(),
        "zero-size": lambda: back(t[:0]),
        "scalar": lambda: back(t.flatten()[0]),
        "extra-dim": lambda: back(t.unsqueeze(0)),
        "float16": lambda: back(t.half()),
        "none": lambda: None,
    }[kind]()


def _value(result):
    """What is compared between two calls: tensors/arrays/numbers as float64, a written file by its bytes."""
    if isinstance(result, Path):
        return result.read_bytes()
    if isinstance(result, (bytes, str, dict)):
        return result
    if isinstance(result, torch.Tensor):
        return result.detach().double()
    return torch.as_tensor(np.asarray(result, dtype=np.float64))


def _same(a, b, tol=1e-6):
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.allclose(a, b, atol=tol, rtol=tol, equal_nan=True)
    return a == b


def _run(case: Case, arrays: dict, request, folder: Path):
    extra = {k: request.getfixturevalue(v) for k, v in case.needs.items()}
    for p in folder.iterdir():
        p.unlink()
    torch.manual_seed(0)
    return case.call(**arrays, **extra)


def _named(err: Exception, arg: str) -> bool:
    """The message names the argument: `arg`, `arg[i]`, or `Owner.arg` (a record's field)."""
    import re

    return re.search(rf"`(\w+\.)?{re.escape(arg)}[`\[]", str(err)) is not None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fn", sorted(_cases(Path("."))))
def test_every_array_argument_handles_every_kind_of_bad_value(fn, kind, tmp_path, request):
    """Right result or a ValueError/TypeError naming the argument -- never another exception, a silent wrong result,
    a non-finite result, or (for writers) a file left behind after a refusal."""
    case = _cases(tmp_path)[fn]
    good = case.good()
    clean = _value(_run(case, good, request, tmp_path))
    for arg in good:
        arrays = case.good()
        arrays[arg] = _variant(kind, arrays[arg])
        if kind == "none" and arg in case.optional:
            continue  # None is the documented default there
        try:
            result = _run(case, arrays, request, tmp_path)
        except (ValueError, TypeError) as e:
            assert kind not in HARMLESS, f"{fn}({arg}={kind}) refused a valid input: {e}"
            assert _named(e, arg), f"{fn}({arg}={kind}): the message does not name `{arg}`: {e}"
            if case.writes:
                assert not list(tmp_path.iterdir()), f"{fn}({arg}={kind}) left {list(tmp_path.iterdir())}"
            continue
        got = _value(result)
        if kind in HARMLESS or kind in ("list", "other-library"):
            assert _same(got, clean), f"{fn}({arg}={kind}) gave a different result"
        elif kind in ("float16", "int"):
            # The same numbers as the plain dtype: the result must match that call (float16 computes in float32 or
            # is refused; integers are valid only where the table says so, e.g. PCM samples).
            assert kind == "float16" or case.ints or case.any_dtype, f"{fn}({arg}=int) was accepted"
            if not (case.any_dtype or case.hashes):
                ref = dict(arrays)
                ref[arg] = arrays[arg].astype(np.float32) if isinstance(arrays[arg], np.ndarray) else arrays[arg].float()
                assert _same(got, _value(_run(case, ref, request, tmp_path)), tol=1e-4 if kind == "int" else 2e-3), \
                    f"{fn}({arg}={kind}) != the same numbers as float32"
        else:
            assert kind in case.accepts or (case.any_dtype and kind in ("bool", "complex", "zero-size", "scalar",
                                                                        "extra-dim")), \
                f"{fn}({arg}={kind}) was accepted"
        if isinstance(got, torch.Tensor) and got.is_floating_point():
            assert torch.isfinite(got).all(), f"{fn}({arg}={kind}) returned NaN/Inf"


@pytest.mark.parametrize("fn", sorted(k for k, c in _cases(Path(".")).items() if len(c.good()) >= 2))
def test_mismatched_shapes_across_arguments_are_refused_by_name(fn, tmp_path, request):
    """Two array arguments that must agree, made to disagree (each in turn a tenth shorter along its last axis, at
    least one value): a ValueError naming one of them -- never a broadcast that silently computes something else."""
    case = _cases(tmp_path)[fn]
    for arg in case.good():
        arrays = case.good()
        t = arrays[arg]
        arrays[arg] = t[..., : t.shape[-1] - max(1, t.shape[-1] // 10)]
        with pytest.raises(ValueError) as e:
            _run(case, arrays, request, tmp_path)
        assert any(_named(e.value, a) for a in arrays), f"{fn}({arg} shorter): names no argument: {e.value}"


# --- Hypothesis: arrays of any dtype, shape and values ---------------------------------------------------------------

_DTYPES = st.sampled_from([np.float32, np.float64, np.float16, np.int16, np.int64, np.uint8, np.bool_, np.complex64])


@st.composite
def _arrays(draw):
    dtype = draw(_DTYPES)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
    elements = None
    if np.dtype(dtype).kind == "f":
        # Any magnitude an image, latent, sample or distance has (beyond ~1e19 squares overflow float32, as in torch:
        # not an input error this contract is about), plus NaN and infinities anywhere.
        width = np.dtype(dtype).itemsize * 8
        big = 6e4 if width == 16 else 1e6
        elements = st.one_of(st.floats(-big, big, width=width),
                             st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    arr = draw(hnp.arrays(dtype, shape, elements=elements))
    return arr if draw(st.booleans()) else torch.from_numpy(np.ascontiguousarray(arr))


#: The functions Hypothesis drives (the cheap ones; the writers and trainers are covered by the kinds above).
FUZZED = ("audio.onset_strength", "audio.onsets", "audio.frame_envelope", "metrics.consecutive_distances",
          "metrics.pixel_distance", "metrics.gini", "metrics.jump_ratio", "project.move", "project.orthogonalize",
          "seeds.variation_noise", "toy2d.forward_noise", "toy2d.sliced_wasserstein", "toy2d.straightness",
          "video.image_grid", "video.png_bytes", "backend.records.Conditioning.__init__",
          "backend.records.Conditioning.weighted_sum", "backend.records.PredictionMix.__init__",
          "backend.records.AttentionMix.__init__", "atlas.inverse.AtlasMap.transform", "toy2d.ToyModel.predict")


@pytest.mark.parametrize("fn", FUZZED)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_any_array_ends_in_a_result_or_a_named_error(fn, data, tmp_path, request):
    """The property: whatever array a user passes (any dtype, 0 to 4 dims, empty sides, NaN/Inf anywhere, numpy or
    torch), the call returns a finite result or raises ValueError/TypeError naming the argument it replaced."""
    case = _cases(tmp_path)[fn]
    arrays = case.good()
    arg = data.draw(st.sampled_from(sorted(arrays)))
    arrays[arg] = data.draw(_arrays())
    try:
        result = _run(case, arrays, request, tmp_path)
    except (ValueError, TypeError) as e:
        assert _named(e, arg), f"{fn}({arg}=...): the message does not name `{arg}`: {e}"
        return
    got = _value(result)
    if isinstance(got, torch.Tensor) and got.is_floating_point():
        assert torch.isfinite(got).all(), f"{fn} returned NaN/Inf for {arg}={arrays[arg]!r}"
