"""The embedded default model: a miniature Stable Diffusion trained on a procedural shapes world.

One responsibility: say where the shipped model is. The model is a standard diffusers folder inside the installed
package (``latentlab/embedded/model``), so it is found after a non-editable ``pip install .`` too; see
``MODEL_CARD.md`` beside this file for what it is, how well it works and how to retrain it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["clip_path", "is_available", "model_path"]

_MODEL = Path(__file__).resolve().parent / "model"


def model_path() -> Path:
    """The diffusers folder of the embedded model (``StableDiffusionPipeline.from_pretrained`` loads it).

    Raises
    ------
    FileNotFoundError
        If the model has not been trained and packaged into this installation.
    """
    if not is_available():
        raise FileNotFoundError(
            f"the embedded default model is not trained yet: no model_index.json in {_MODEL}. "
            "Train it with `python -m latentlab.embedded.train` (see latentlab/embedded/MODEL_CARD.md)"
        )
    return _MODEL


def clip_path() -> Path:
    """The folder of the embedded CLIP model (``transformers.CLIPModel.from_pretrained``); tokenizer in
    ``model_path() / "tokenizer"``."""
    return model_path() / "clip"


def is_available() -> bool:
    return (_MODEL / "model_index.json").is_file()
