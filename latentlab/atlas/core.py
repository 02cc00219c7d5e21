"""The latent atlas: many generations over seeds x prompts, with everything needed to map and explain them.

One responsibility: collect, per item, the initial noise, the final latent, the CLIP image embedding of the
image, the CLIP text embedding of its prompt, a thumbnail and its provenance (seed, prompt, any attributes the
caller knows); save/load that in one safetensors file; and draw any 2-D projection of it with the thumbnails
(matplotlib, imported lazily). Projections themselves live in :mod:`latentlab.project`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentlab import _checks
from latentlab.backend import Backend
from latentlab.sampling import Sampling

__all__ = ["COLUMNS", "Atlas", "apply_direction", "build_atlas", "plot_atlas", "prompt_direction"]

#: The tensors of every atlas item, in file order.
COLUMNS = ("noise", "latents", "image_embeds", "prompt_embeds", "thumbnails")


@dataclass
class Atlas:
    """N generated items: ``noise`` and ``latents`` (N, C, h, w), ``image_embeds`` and ``prompt_embeds`` (N, D)
    from CLIP, ``thumbnails`` (N, 3, s, s) uint8, and ``items`` (one dict per item: seed, prompt, attributes)."""

    noise: torch.Tensor
    latents: torch.Tensor
    image_embeds: torch.Tensor
    prompt_embeds: torch.Tensor
    thumbnails: torch.Tensor
    items: list[dict]
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.items) if isinstance(self.items, list) else None
        if n is None or not all(isinstance(it, dict) for it in self.items):
            raise TypeError("`items` must be a list of dicts (one per item)")
        for name in ("noise", "latents", "image_embeds", "prompt_embeds", "thumbnails"):
            t = getattr(self, name)
            _checks.tensor(t, name, min_ndim=2, floating=name != "thumbnails", empty=name == "thumbnails")
            if len(t) != n:
                raise ValueError(f"`{name}` has {len(t)} rows but there are {n} items: the atlas is inconsistent")
        th = self.thumbnails
        if th.dtype != torch.uint8 or th.ndim != 4 or th.shape[1] != 3 or th.shape[2] != th.shape[3]:
            raise ValueError(f"`thumbnails` must be uint8 (N, 3, s, s), got {th.dtype} {tuple(th.shape)}")
        if self.latents.shape != self.noise.shape:
            raise ValueError(f"`latents` must have the shape of `noise` {tuple(self.noise.shape)} (each item's "
                             f"initial noise and final latent), got {tuple(self.latents.shape)}")
        if self.prompt_embeds.shape[1:] != self.image_embeds.shape[1:]:
            raise ValueError(f"`prompt_embeds` must have the width of `image_embeds` {tuple(self.image_embeds.shape[1:])}"
                             f" (one CLIP space), got {tuple(self.prompt_embeds.shape[1:])}")

    def __len__(self) -> int:
        return len(self.items)

    def labels(self, key: str) -> list:
        """The value of ``key`` for every item (e.g. ``"prompt"``, ``"seed"``, or an attribute like ``"colour"``)."""
        missing = [i for i, it in enumerate(self.items) if key not in it]
        if missing:
            raise KeyError(f"items have no {key!r} (first missing: item {missing[0]}); known: {sorted(self.items[0])}")
        return [it[key] for it in self.items]

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """One safetensors file: the tensors, and the items + provenance as JSON metadata (atomic; no silent
        overwrite)."""
        from latentlab import store

        tensors = {k: getattr(self, k) for k in COLUMNS}
        return store.save(path, tensors, provenance={**self.provenance, "items": self.items}, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Atlas:
        """Read an atlas written by :meth:`save` (never unpickles)."""
        from latentlab import store

        t, prov = store.load(path)
        items = prov.pop("items", None)
        if items is None:
            raise ValueError(f"{path} is not a latentlab atlas (no items in its provenance)")
        missing = [k for k in COLUMNS if k not in t]
        if missing:
            raise ValueError(f"{path} is not a complete latentlab atlas (no tensor(s) {missing})")
        try:
            return cls(t["noise"], t["latents"], t["image_embeds"], t["prompt_embeds"], t["thumbnails"], items, prov)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a consistent latentlab atlas: {e}") from None


def build_atlas(lab: Backend, prompts: Sequence[str], seeds: Sequence[int], *, clip=None,
                attributes: dict[str, dict] | None = None, thumbnail: int = 64, chunk: int = 64,
                sampling: Sampling | None = None, batch_size: int | None = None, progress: bool = True,
                **overrides) -> Atlas:
    """Generate every prompt at every seed (N = len(prompts) * len(seeds), prompt-major) and collect an atlas.

    ``clip`` defaults to the embedded CLIP; ``attributes`` maps a prompt to extra metadata for its items (e.g.
    ``{"a red star": {"colour": "red", "shape": "star"}}``). Work runs ``chunk`` items at a time; ``sampling`` and
    overrides (``num_inference_steps=``, ``guidance_scale=``, ...) are resolved once by the backend and recorded.

    Examples
    --------
    >>> from latentlab import Lab
    >>> atlas = build_atlas(Lab.default(), ["a red star", "a blue ring"], [1, 2, 3], progress=False)
    >>> len(atlas), atlas.latents.shape, atlas.image_embeds.shape, atlas.labels("prompt")[3]
    (6, torch.Size([6, 4, 8, 8]), torch.Size([6, 64]), 'a blue ring')
    """
    from latentlab.distributed import ranks

    prompts, seeds, sampling, clip = _check_request(lab, prompts, seeds, sampling, thumbnail, chunk, clip, overrides)
    pairs = [(p, s) for p in prompts for s in seeds]
    r = ranks()  # under a launcher, each process generates its share; every process gets the whole atlas
    noise, latents, image_embeds, thumbs = r.map_blocks(
        lambda idx: _collect(lab, [pairs[i] for i in idx], clip, sampling, batch_size, thumbnail, progress=False),
        len(pairs), block=r.block(len(pairs), chunk)) if r.world_size > 1 else _collect(
        lab, pairs, clip, sampling, batch_size, thumbnail, chunk=chunk, progress=progress)
    text = clip.embed_text(prompts)
    idx = torch.tensor([prompts.index(p) for p, _ in pairs])
    return Atlas(noise, latents, image_embeds, text[idx], thumbs, _items(pairs, attributes),
                 _provenance(lab, clip, sampling, batch_size))


def _check_request(lab, prompts, seeds, sampling, thumbnail, chunk, clip, overrides):
    """Validate an atlas request before any model work; resolve sampling and the default CLIP."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"`prompts` must be a list of strings (one item per prompt), got {type(prompts).__name__}")
    if isinstance(seeds, (str, int)) or not isinstance(seeds, Sequence):
        raise TypeError(f"`seeds` must be a list of ints, got {type(seeds).__name__}")
    prompts, seeds = list(prompts), list(seeds)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("`prompts` must be a non-empty list of strings")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise TypeError("`seeds` must be a non-empty list of ints")
    for s in seeds:
        _checks.seed(s, "seeds")
    sampling = lab.sampling(sampling, **overrides)
    _checks.positive_int(thumbnail, "thumbnail")
    _checks.positive_int(chunk, "chunk")
    if clip is None:
        from latentlab.clip import CLIP

        clip = CLIP.default()
    return prompts, seeds, sampling, clip


def _collect(lab, pairs, clip, sampling, batch_size, thumbnail, *, chunk: int = 64, progress: bool = True):
    """Generate (prompt, seed) ``pairs``: their noise, final latents, CLIP image embeddings and thumbnails."""
    from tqdm.auto import tqdm

    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("noise", "latents", "image_embeds", "thumbnails")}
    with tqdm(total=len(pairs), desc="atlas", unit="item", disable=not progress) as bar:
        for i in range(0, len(pairs), chunk):
            part = pairs[i : i + chunk]
            z = lab.noise([s for _, s in part])
            final = lab.generate(z, lab.encode_prompt([p for p, _ in part]), output_type="latent",
                                 sampling=sampling, batch_size=batch_size)
            images = lab.decode(final, batch_size=batch_size)
            out["noise"].append(z.float().cpu())
            out["latents"].append(final.float().cpu())
            out["image_embeds"].append(clip.embed_images(images).float().cpu())
            small = torch.nn.functional.interpolate(images, size=(thumbnail, thumbnail), mode="area")
            out["thumbnails"].append((small * 255).round().to(torch.uint8).cpu())
            bar.update(len(part))
    return tuple(torch.cat(v) for v in out.values())


def _items(pairs, attributes) -> list[dict]:
    attributes = attributes or {}
    return [{"prompt": p, "seed": s, **attributes.get(p, {})} for p, s in pairs]


def _provenance(lab, clip, sampling, batch_size) -> dict:
    from latentlab.store import versions

    return {"model": lab.model_id, "clip": clip.model_id, "versions": versions(), "sampling": sampling.to_dict(),
            "backend": lab.provenance(batch_size)}


def plot_atlas(atlas: Atlas, coords, *, color_by: str | None = "prompt", thumbnails: bool = True,
               zoom: float = 0.35, ax=None, title: str | None = None, xlabel: str = "component 1",
               ylabel: str = "component 2", min_separation: float = 0.08):
    """Scatter a 2-D projection of ``atlas`` (``coords``: (N, 2)), coloured by an item key, with thumbnails.

    Every point is drawn; a thumbnail only where it does not pile onto one already drawn (centres at least
    ``min_separation`` of the plot's span apart, greedily in item order; 0 draws them all). Returns the Figure.
    """
    import matplotlib

    if ax is None and "inline" not in matplotlib.get_backend().lower():
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    c = torch.as_tensor(coords, dtype=torch.float64)
    if c.ndim != 2 or c.shape != (len(atlas), 2):
        raise ValueError(f"`coords` must have shape ({len(atlas)}, 2), got {tuple(c.shape)}")
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 8))
    else:
        fig = ax.figure
    if color_by is not None:
        labels = atlas.labels(color_by)
        names = sorted(set(labels), key=str)
        from matplotlib.colors import is_color_like

        cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
        # Labels that are colour names ("red", "blue", ...) are drawn in that colour, not in a palette's.
        named = all(isinstance(n, str) and is_color_like(n) for n in names)
        for j, name in enumerate(names):
            idx = [i for i, v in enumerate(labels) if v == name]
            ax.scatter(c[idx, 0], c[idx, 1], s=18, color=name if named else cmap(j % cmap.N), label=str(name),
                       edgecolors="black", linewidths=0.5)
        if len(names) <= 20:
            ax.legend(title=color_by, fontsize="small", markerscale=1.5, loc="best")
    else:
        ax.scatter(c[:, 0], c[:, 1], s=10)
    if thumbnails:
        span = (c.max(0).values - c.min(0).values).clamp(min=1e-12)
        kept: list[torch.Tensor] = []
        for i in range(len(atlas)):
            u = (c[i] - c.min(0).values) / span
            if kept and min(float((u - k).norm()) for k in kept) < min_separation:
                continue
            kept.append(u)
            img = atlas.thumbnails[i].permute(1, 2, 0).numpy()
            ab = AnnotationBbox(OffsetImage(img, zoom=zoom), (float(c[i, 0]), float(c[i, 1])), frameon=False)
            ax.add_artist(ab)
    ax.set_title(title or f"{len(atlas)} items ({atlas.provenance.get('model', '?')})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def prompt_direction(lab, positive: str, negative: str):
    """The difference of two prompts' conditioning (``positive`` - ``negative``) as a
    :class:`~latentlab.backend.Conditioning`: a direction in the space the UNet is conditioned on, e.g.
    ``prompt_direction(lab, "a green star", "a red star")`` points from red to green."""
    from latentlab.backend import Conditioning

    a, b = lab.encode_prompt(positive), lab.encode_prompt(negative)
    return Conditioning.cat([a, b]).map(lambda t: t[:1] - t[1:])


def apply_direction(conditioning, direction, k: float | Sequence[float]):
    """``conditioning + k * direction`` (every field; one item per ``k`` when ``k`` is a sequence)."""
    from latentlab.backend import Conditioning

    if not isinstance(conditioning, Conditioning) or not isinstance(direction, Conditioning):
        raise TypeError("`conditioning` and `direction` must be Conditioning objects (from encode_prompt / "
                        "prompt_direction)")
    if len(conditioning) != 1 and not isinstance(k, (int, float)):
        raise ValueError("a sequence of `k` needs a single-item `conditioning`")
    ks = [float(k)] if isinstance(k, (int, float)) else [float(v) for v in k]
    n = len(conditioning)
    both = Conditioning.cat([conditioning, direction])
    return Conditioning.cat([both.map(lambda t, v=v: t[:n] + v * t[n:]) for v in ks])
