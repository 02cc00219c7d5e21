"""Generated contract of the widget constructors (issue #26): every parameter of every widget in
``latentlab.widgets.__all__``, given each bad value of its kind, raises ``ValueError``/``TypeError`` at construction
naming the parameter -- not a traitlets error, an AttributeError deep inside, or an error shown later in the widget.

The bad values come from the parameter's annotation (and a few names); an inventory check fails when a widget gains
a parameter that no rule covers.
"""

from __future__ import annotations

import inspect

import pytest
from fakes import FakeBackend, FakeCLIP

import latentlab.widgets as W

#: Bad values per annotation (as written in the signatures).
BY_ANNOTATION = {
    "int": [-1, 2.5, "3", True, None],
    "float": [float("nan"), float("inf"), -1.0, "x", None],
    "str": [3, None, ""],
    "tuple[str, int]": ["a", ("a",), ("a", -1), (3, 1), ("a", 1.5), ("", 1), None],
    "Sampling | None": ["fast", {"num_inference_steps": 2}],
    "str | Path": [3, None],
    "dict | None": [3, ["x"]],
    "Sequence[str] | None": [3, [3], "name"],
    "object": [3],
    "str | object": ["nope", 3],
    "bool": [1, "yes", None],
}
#: Bad values per parameter name, where the annotation says too little.
BY_NAME = {
    "lab": [3, "model"],
    "atlas": [3, "atlas.safetensors"],
    "clip": [3, "clip"],
    "space": ["nope", 3],
    "method": ["nope", 3],
    "color_by": [3],
}
#: Parameters that take any int from 0 (seeds).
SEEDS = {"seed", "first_seed"}
#: Explainer widgets take real Labs (trajectories, tokens).
NEEDS_LAB = {"TimestepScrubber", "TokenView", "TrajectoryMap"}


def _widgets():
    return [(name, getattr(W, name)) for name in W.__all__ if inspect.isclass(getattr(W, name))]


def _bad_values(param) -> list:
    if param.name in BY_NAME:
        return BY_NAME[param.name]
    ann = str(param.annotation).strip("'")
    values = BY_ANNOTATION.get(ann)
    if values is None:
        return None
    if param.name in SEEDS:
        return [-1, 2.5, "3", True, None]
    return values


def test_every_widget_parameter_has_bad_values():
    missing = [f"{name}.{p.name}: {p.annotation}" for name, cls in _widgets()
               for p in inspect.signature(cls.__init__).parameters.values()
               if p.name != "self" and _bad_values(p) is None]
    assert not missing, f"no bad values for: {missing} (extend BY_ANNOTATION or BY_NAME)"


@pytest.fixture(scope="module")
def good(tiny_sd_path):
    from latentlab.atlas import build_atlas
    from latentlab.backend import Lab

    fake = FakeBackend()
    lab = Lab.from_pretrained(tiny_sd_path, device="cpu")
    lab.defaults = lab.defaults.replace(num_inference_steps=2)
    atlas = build_atlas(fake, ["a red star", "a blue ring"], [1, 2], clip=FakeCLIP(), thumbnail=16, progress=False)
    return {"fake": fake, "lab": lab, "a": ("a red star", 1), "b": ("a blue ring", 2), "c": ("a green ring", 3),
            "prompt": "a red star", "prompt_a": "a red star", "prompt_b": "a blue ring", "seed": 1, "atlas": atlas,
            "data": "moons"}


CASES = [(name, p.name, i) for name, cls in _widgets() for p in inspect.signature(cls.__init__).parameters.values()
         if p.name != "self" and _bad_values(p) for i in range(len(_bad_values(p)))]


@pytest.mark.parametrize("widget,param,i", CASES, ids=[f"{w}-{p}-{i}" for w, p, i in CASES])
def test_every_bad_constructor_argument_is_refused_by_name(good, widget, param, i, tmp_path):
    cls = getattr(W, widget)
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    kwargs = {p.name: (good["lab"] if widget in NEEDS_LAB else good["fake"]) if p.name == "lab" else good[p.name]
              for p in params if p.default is inspect.Parameter.empty}
    if "output_dir" in {p.name for p in params}:
        kwargs["output_dir"] = tmp_path
    bad = _bad_values(next(p for p in params if p.name == param))[i]
    kwargs[param] = bad
    with pytest.raises((ValueError, TypeError)) as info:
        w = cls(**kwargs)
        if hasattr(w, "wait"):
            w.wait()
    assert f"`{param}" in str(info.value), f"{widget}({param}={bad!r}): {type(info.value).__name__}: {info.value}"
