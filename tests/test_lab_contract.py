"""Generated contract of the backend's public methods (issue #26): every tensor and conditioning argument of every
:class:`latentlab.Lab` method, tried with every kind of bad value, ends in ``ValueError``/``TypeError`` naming the
argument -- raised before any model work (no denoiser or VAE call) -- and the harmless variants (float16, a
non-contiguous view, ``requires_grad``) give the same result as the plain tensor.

An inventory check fails when a public ``Lab`` method gains a tensor argument that the table below does not try.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from latentlab.backend import AttentionMix, Conditioning, Lab

#: Every public Lab method with tensor or conditioning arguments -> those arguments (the inventory).
METHODS = {
    "generate": ("latents", "conditioning"),
    "generate_live": ("latents", "conditioning"),
    "decode": ("latents",),
    "encode": ("images",),
    "img2img": ("latents", "conditioning"),
    "inpaint": ("latents", "conditioning", "mask", "image"),
    "invert": ("latents", "conditioning"),
    "trajectory": ("latents", "conditioning"),
    "check_request": ("latents", "conditioning"),
    "check_mix": ("latents",),
    "comfyui_latents": ("latents",),
}
#: Arguments that may be None (an optional input).
OPTIONAL = {("inpaint", "image")}

#: Bad tensors: name -> a function of a good tensor giving the bad one.
BAD_TENSORS = {
    "nan": lambda t: t.clone().fill_(float("nan")),
    "+inf": lambda t: t.clone().fill_(float("inf")),
    "-inf": lambda t: t.clone().fill_(-float("inf")),
    "empty-batch": lambda t: t[:0],
    "zero-size-dim": lambda t: t[..., :0],
    "rank-too-low": lambda t: t[0],
    "rank-too-high": lambda t: t.unsqueeze(0),
    "int64": lambda t: (t * 0).long(),
    "bool": lambda t: t > 0.5,
    "complex": lambda t: t.to(torch.complex64),
    "python-list": lambda t: t.tolist(),
    "numpy": lambda t: t.numpy(),
    "none": lambda t: None,
}

def _filled_in_place(c: Conditioning, value: float) -> Conditioning:
    out = c.map(torch.clone)
    out.prompt_embeds.fill_(value)
    return out


#: Bad conditioning values.
BAD_CONDITIONING = {
    "tensor-not-conditioning": lambda c: c.prompt_embeds,
    # Conditioning() refuses NaN and the wrong rank itself (test_surface_contract.py); a tensor filled with NaN in
    # place after the record was built is what only the Lab can still catch.
    "nan-embeds": lambda c: _filled_in_place(c, float("nan")),
    "wrong-width": lambda c: Conditioning(c.prompt_embeds[..., :-1]),
    "three-items-for-two": lambda c: Conditioning.cat([c, c[:1]]),
    "none": lambda c: None,
}


def _args(lab, method: str) -> dict:
    """Good arguments for ``method`` (two items, the tiny model's 16-pixel images)."""
    z = lab.noise([1, 2])
    c = lab.encode_prompt(["a red star", "a blue ring"])
    images = torch.rand(2, 3, 16, 16)
    return {"generate": {"latents": z, "conditioning": c},
            "generate_live": {"latents": z, "conditioning": c},
            "decode": {"latents": z},
            "encode": {"images": images},
            "img2img": {"latents": z, "conditioning": c, "strength": 0.5},
            "inpaint": {"latents": z, "conditioning": c, "mask": torch.ones(1, 1, 16, 16) * (torch.rand(16) > 0.5),
                        "image": images},
            "invert": {"latents": z, "conditioning": c},
            "trajectory": {"latents": z, "conditioning": c},
            "check_request": {"latents": z, "conditioning": c},
            "check_mix": {"latents": z, "mix": AttentionMix(c, c, torch.full((len(c),), 0.5))},
            "comfyui_latents": {"latents": z}}[method]


class ModelCalls:
    """Counts forward calls of the denoiser and the VAE (what "before any model work" means)."""

    def __init__(self, lab):
        self.n = 0
        mods = [lab.denoiser, lab.pipe.vae]
        self.handles = [m.register_forward_pre_hook(self._hook) for m in mods]
        self.handles += [lab.pipe.vae.decoder.register_forward_pre_hook(self._hook),
                         lab.pipe.vae.encoder.register_forward_pre_hook(self._hook)]

    def _hook(self, *_):
        self.n += 1

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def lab(tiny_sd_path):
    lab = Lab.from_pretrained(tiny_sd_path, device="cpu")
    lab.defaults = lab.defaults.replace(num_inference_steps=2, guidance_scale=3.0)
    return lab


def test_the_inventory_covers_every_tensor_argument_of_lab():
    found = {}
    for name, fn in inspect.getmembers(Lab, inspect.isfunction):
        if name.startswith("_"):
            continue
        params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
        tensor_args = tuple(p.name for p in params if any(k in str(p.annotation) for k in ("Tensor", "Conditioning")))
        if tensor_args:
            found[name] = tensor_args
    assert found == METHODS, "a Lab method's tensor arguments changed: extend METHODS (and the cases) to cover them"


CASES = [(m, arg, kind) for m, args in METHODS.items() for arg in args
         for kind in (BAD_CONDITIONING if arg == "conditioning" else BAD_TENSORS)
         if not (kind == "none" and (m, arg) in OPTIONAL)]


@pytest.mark.parametrize("method,arg,kind", CASES, ids=[f"{m}-{a}-{k}" for m, a, k in CASES])
def test_every_bad_argument_is_refused_by_name_before_model_work(lab, method, arg, kind):
    kwargs = _args(lab, method)
    bad = (BAD_CONDITIONING if arg == "conditioning" else BAD_TENSORS)[kind](kwargs[arg])
    if arg == "image" and method == "inpaint":
        kwargs["output_type"] = "pt"
    kwargs[arg] = bad
    calls = ModelCalls(lab)
    try:
        with pytest.raises((ValueError, TypeError)) as info:
            getattr(lab, method)(**kwargs)
    finally:
        calls.close()
    message = str(info.value)
    assert re.search(rf"`{arg}(\.|`|\[)", message) or (arg == "conditioning" and "`conditioning" in message), \
        f"{method}({arg}={kind}): the message does not name `{arg}`: {message}"
    assert calls.n == 0, f"{method}({arg}={kind}) reached the model ({calls.n} calls) before refusing: {message}"


HARMLESS = {
    "float16": lambda t: t.half(),
    "non-contiguous": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),
    "requires-grad": lambda t: t.clone().requires_grad_(True),
}


@pytest.mark.parametrize("kind", list(HARMLESS))
@pytest.mark.parametrize("method", ["generate", "decode", "encode"])
def test_harmless_tensor_variants_give_the_same_result(lab, method, kind):
    kwargs = _args(lab, method)
    arg = METHODS[method][0]
    if method == "generate":
        kwargs["output_type"] = "latent"
    plain = getattr(lab, method)(**kwargs)
    variant = HARMLESS[kind](kwargs[arg])
    assert kind != "non-contiguous" or not variant.is_contiguous()
    kwargs[arg] = variant
    out = getattr(lab, method)(**kwargs)
    assert not out.requires_grad
    tol = 2e-2 if kind == "float16" else 1e-6  # float16 inputs are rounded once, then computed in float32
    assert (out.float() - plain.float()).abs().max() <= tol, (method, kind)
