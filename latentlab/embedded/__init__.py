"""The embedded models: miniature diffusion models trained on a procedural shapes world, shipped inside latentlab.

One responsibility: say where the shipped models are, by name. Each is a standard diffusers folder inside the
installed package, so it is found after a non-editable ``pip install .`` too:

- ``"embedded-shapes"`` (the default): a miniature Stable Diffusion (UNet, ``latentlab/embedded/model``);
- ``"embedded-shapes-flow"``: its flow-matching twin, a small SD3-layout transformer on the same VAE and world
  (``latentlab/embedded/model-flow``);
- ``"embedded-shapes-fast"``: a few-step model distilled from the default one (1-4 deterministic DDIM steps, no
  classifier-free guidance: guidance 4 is distilled in) on the default model's VAE, for live previews
  (``latentlab/embedded/model-fast``).

A preview decoder (a diffusers ``AutoencoderTiny`` distilled from their shared VAE, ``latentlab/embedded/preview-decoder``)
is set by ``Lab.default`` once one is packaged: :func:`preview_decoder_available`. ``MODEL_CARD.md`` beside this file
says what they are, how well they work and how to retrain them.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT", "NAMES", "SAMPLING", "clip_path", "is_available", "model_path", "preview_decoder_available",
           "preview_decoder_path", "resolve"]

_HERE = Path(__file__).resolve().parent
_MODEL = _HERE / "model"
_PREVIEW = _HERE / "preview-decoder"
#: The embedded models by name, and their folders.
_FOLDERS = {"embedded-shapes": _MODEL, "embedded-shapes-flow": _HERE / "model-flow",
            "embedded-shapes-fast": _HERE / "model-fast"}
NAMES: tuple[str, ...] = tuple(_FOLDERS)
DEFAULT = "embedded-shapes"
#: Each model's documented sampling: (num_inference_steps, guidance_scale). The fast model needs no unconditional
#: branch (guidance 1 turns it off): its teacher's guidance 4 is distilled into it.
SAMPLING: dict[str, tuple[int, float]] = {"embedded-shapes": (20, 4.0), "embedded-shapes-flow": (20, 4.0),
                                          "embedded-shapes-fast": (4, 1.0)}
_RECIPES = {"embedded-shapes": "python -m latentlab.embedded.train",
            "embedded-shapes-flow": "python -m latentlab.embedded.train_flow",
            "embedded-shapes-fast": "python -m latentlab.embedded.train_fast"}


def resolve(model: object) -> str | None:
    """The embedded model name ``model`` means ("embedded-shapes", "latentlab/embedded-shapes", ...), else None.

    >>> resolve("latentlab/embedded-shapes-flow"), resolve("./my-model")
    ('embedded-shapes-flow', None)
    """
    if not isinstance(model, str):
        return None
    name = model.removeprefix("latentlab/")
    return name if name in _FOLDERS else None


def model_path(name: str = DEFAULT) -> Path:
    """The diffusers folder of the embedded model ``name`` (``DiffusionPipeline.from_pretrained`` loads it).

    Raises
    ------
    ValueError
        If ``name`` is not one of :data:`NAMES`.
    FileNotFoundError
        If the model has not been trained and packaged into this installation.
    """
    key = resolve(name)
    if key is None:
        raise ValueError(f"`name` must be one of {', '.join(NAMES)}, got {name!r}")
    if not is_available(key):
        raise FileNotFoundError(
            f"the embedded model {key} is not trained yet: no model_index.json in {_FOLDERS[key]}. "
            f"Train it with `{_RECIPES[key]}` (see latentlab/embedded/MODEL_CARD.md)"
        )
    return _FOLDERS[key]


def preview_decoder_path() -> Path:
    """The folder of the embedded models' preview decoder: a diffusers ``AutoencoderTiny`` distilled from their shared
    VAE (``Lab.default`` sets it: :meth:`latentlab.Lab.set_preview_decoder`).

    Raises
    ------
    FileNotFoundError
        If it has not been trained and packaged into this installation.
    """
    if not preview_decoder_available():
        raise FileNotFoundError(f"the embedded preview decoder is not trained yet: no config.json in {_PREVIEW}. Train "
                                f"it with `{_RECIPES['embedded-shapes-fast']} tiny` (see latentlab/embedded/MODEL_CARD.md)")
    return _PREVIEW


def preview_decoder_available() -> bool:
    return (_PREVIEW / "config.json").is_file()


def clip_path() -> Path:
    """The folder of the embedded CLIP model (``transformers.CLIPModel.from_pretrained``); tokenizer in
    ``model_path() / "tokenizer"``."""
    return model_path() / "clip"


def is_available(name: str = DEFAULT) -> bool:
    key = resolve(name)
    return key is not None and (_FOLDERS[key] / "model_index.json").is_file()
