"""Model families: one adapter per diffusers pipeline family, and the lookup from a loaded pipeline to its adapter.

| family | pipelines | latents above the backend | guidance |
| --- | --- | --- | --- |
| ``sd`` | ``StableDiffusionPipeline`` (SD 1.x/2.x, Turbo) | (b, 4, h, w) | CFG |
| ``sdxl`` | ``StableDiffusionXLPipeline`` (SDXL, SDXL Turbo) | (b, 4, h, w) | CFG |
| ``sd3`` | ``StableDiffusion3Pipeline`` (SD3, SD3.5; T5 optional) | (b, 16, h, w) | CFG |
| ``flux`` | ``FluxPipeline`` (Flux.1 dev and schnell) | (b, 16, h, w); packed 2x2 only inside | embedded / true CFG |
| ``chroma`` | ``ChromaPipeline`` | (b, 16, h, w); packed 2x2 only inside; text attention mask | CFG |
| ``lumina2`` | ``Lumina2Pipeline`` | (b, 16, h, w); patched 2x2 inside the transformer; text attention mask | CFG (renormalised) |
| ``qwenimage`` | ``QwenImagePipeline`` | (b, 16, h, w); one video frame and 2x2 packing only inside; text mask | true CFG (renormalised) |
| ``flux2`` | ``Flux2Pipeline`` (Flux.2 dev), ``Flux2KleinPipeline`` (klein) | (b, 32, h, w); patchified, normalised and packed only inside | embedded / CFG |
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentlab.backend.families.base import Family
from latentlab.backend.families.chroma import ChromaFamily
from latentlab.backend.families.flux import FluxFamily
from latentlab.backend.families.flux2 import Flux2Family
from latentlab.backend.families.lumina2 import Lumina2Family
from latentlab.backend.families.qwenimage import QwenImageFamily
from latentlab.backend.families.sd3 import SD3Family
from latentlab.backend.families.unet import SDXLFamily, UNetFamily

__all__ = ["FAMILIES", "Family", "adapter_for", "folder_facts", "supported_pipelines"]

#: Every family latentlab speaks, in lookup order.
FAMILIES: tuple[type[Family], ...] = (UNetFamily, SDXLFamily, SD3Family, FluxFamily, Flux2Family, ChromaFamily,
                                     Lumina2Family, QwenImageFamily)


def supported_pipelines() -> tuple[str, ...]:
    """The diffusers pipeline class names :class:`latentlab.Lab` loads."""
    return tuple(name for fam in FAMILIES for name in fam.pipelines)


def folder_facts(folder: str | Path) -> dict | None:
    """What a diffusers folder's config files say without loading weights: its ``family``, native image ``size``
    (height, width) and the ``size_multiple`` image sizes must respect; None when it is not a readable folder or
    not a supported pipeline (loading then reports why)."""
    import json

    folder = Path(folder)
    try:
        name = json.loads((folder / "model_index.json").read_text())["_class_name"]
        vae = json.loads((folder / "vae" / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    fam = next((f for f in FAMILIES if name in f.pipelines), None)
    if fam is None:
        return None
    return fam().facts_from_configs(folder, fam.vae_factor_from_config(vae))


def adapter_for(pipe: Any) -> Family:
    """The adapter of ``pipe``'s family; ``TypeError`` naming the class and what is supported otherwise."""
    for fam in FAMILIES:
        if fam.matches(pipe):
            return fam()
    raise TypeError(f"latentlab does not support {type(pipe).__name__} models; supported pipelines: "
                    f"{', '.join(supported_pipelines())}")
