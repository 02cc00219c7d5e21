"""CLIP text and image embeddings: the embedded shapes CLIP by default, or any transformers ``CLIPModel``.

One responsibility: map prompts and images (tensors in [0, 1]) to unit-length vectors in CLIP's joint space
(Radford et al. 2021), for projections, atlases, perceptual pacing and zero-shot labels. It owns transformers'
CLIP classes (``backend`` owns the diffusers pipelines; the two are siblings and never import each other), and it
never loads pickles (``use_safetensors=True``).

Image preprocessing is done in torch (no torchvision, no PIL): resize the shortest side to the model's input size
(bicubic, antialiased), centre-crop, normalise with the checkpoint's ``preprocessor_config.json`` mean/std —
what ``CLIPImageProcessor`` does, on tensors and batches.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from latentlab import _checks
from latentlab._quiet import no_progress_bars

__all__ = ["CLIP", "check_clip_folder"]

# OpenAI CLIP's normalisation: the default when a checkpoint has no preprocessor_config.json.
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def check_clip_folder(folder: str | Path, name: str = "model_id_or_path", *, tokenizer: bool = True) -> Path:
    """Everything that can be known about a local CLIP folder before loading it: a ``config.json`` that is a
    transformers CLIP model's, safetensors weights (latentlab never loads pickles) and, unless ``tokenizer=False``,
    the tokenizer's files. Raises FileNotFoundError/ValueError naming ``name`` and the folder.

    >>> check_clip_folder("/nonexistent", "--pacing-clip")
    Traceback (most recent call last):
    ...
    FileNotFoundError: `--pacing-clip` does not exist: /nonexistent
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"`{name}` does not exist: {folder}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"`{name}` is not a CLIP folder (no config.json): {folder}")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"`{name}`: {folder / 'config.json'} is not valid JSON ({e})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != "clip":
        raise ValueError(f"`{name}` is not a CLIP model: {folder / 'config.json'} has model_type {kind!r}, not 'clip'")
    if not any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise FileNotFoundError(f"`{name}` has no safetensors weights (model.safetensors) in {folder}: latentlab "
                                "loads only safetensors, never pickled .bin files")
    if tokenizer and not ((folder / "tokenizer.json").is_file()
                          or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
        raise FileNotFoundError(f"`{name}` has no tokenizer (tokenizer.json, or vocab.json and merges.txt) in {folder}")
    return folder


def _import_transformers():
    from latentlab._quiet import quiet_transformers_image_processor_warning

    quiet_transformers_image_processor_warning()
    import transformers

    return transformers


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns an output object (projected vector in .pooler_output); 4.x returned a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class CLIP:
    """A CLIP model and its tokenizer and image preprocessing.

    Examples
    --------
    >>> clip = CLIP.default()
    >>> text = clip.embed_text(["a red star", "a blue ring"])
    >>> text.shape, round(float(text.norm(dim=1)[0]), 4)
    (torch.Size([2, 64]), 1.0)
    >>> from latentlab.embedded import world
    >>> images = world.sample(4, seed=0).images
    >>> clip.embed_images(images).shape
    torch.Size([4, 64])
    >>> clip.similarity(images, ["a red star", "a blue ring"]).shape
    torch.Size([4, 2])
    """

    def __init__(self, model: Any, tokenizer: Any, *, image_mean: Sequence[float], image_std: Sequence[float],
                 image_size: int, model_id: str):
        self.model, self.tokenizer, self.model_id = model.eval(), tokenizer, model_id
        self.image_size = int(image_size)
        self.image_mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.image_std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return f"CLIP(model_id={self.model_id!r}, image_size={self.image_size}, dim={self.dim})"

    @classmethod
    def default(cls, *, device: str | torch.device = "cpu") -> CLIP:
        """The embedded shapes CLIP (64x64 images, 64-d embeddings; see the embedded model card)."""
        from latentlab import embedded

        root = embedded.model_path()
        clip = cls.from_pretrained(root / "clip", tokenizer=root / "tokenizer", device=device, dtype=torch.float32)
        clip.model_id = "latentlab/embedded-shapes/clip"
        return clip

    @classmethod
    def from_pretrained(cls, model_id_or_path: str | Path, *, tokenizer: str | Path | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> CLIP:
        """Load a transformers ``CLIPModel`` (e.g. ``"openai/clip-vit-large-patch14"``) with its tokenizer
        (from ``tokenizer``, default the same folder/id) and preprocessing settings. Safetensors only."""
        if isinstance(model_id_or_path, Path) or Path(str(model_id_or_path)).expanduser().exists():
            check_clip_folder(model_id_or_path, tokenizer=tokenizer is None)
        transformers = _import_transformers()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        with no_progress_bars(transformers.utils.logging):
            model = transformers.CLIPModel.from_pretrained(str(model_id_or_path), dtype=dtype, use_safetensors=True)
        tok = transformers.CLIPTokenizer.from_pretrained(str(tokenizer or model_id_or_path))
        mean, std = _OPENAI_MEAN, _OPENAI_STD
        size = model.config.vision_config.image_size
        cfg = Path(str(model_id_or_path)) / "preprocessor_config.json"
        if not cfg.is_file() and not Path(str(model_id_or_path)).exists():
            try:  # a hub id: the processor config is a small JSON file next to the weights
                from huggingface_hub import hf_hub_download

                cfg = Path(hf_hub_download(str(model_id_or_path), "preprocessor_config.json"))
            except Exception:  # noqa: BLE001 - fall back to OpenAI's statistics, which most CLIPs use
                cfg = None
        if cfg is not None and cfg.is_file():
            pre = json.loads(cfg.read_text())
            mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
        return cls(model.to(device), tok, image_mean=mean, image_std=std, image_size=size,
                   model_id=str(model_id_or_path))

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images (batch, 3, H, W) in [0, 1] -> normalised model input (batch, 3, S, S)."""
        _checks.tensor(images, "images", min_ndim=4)
        if images.shape[1] != 3:
            raise ValueError(f"`images` must have 3 channels (batch, 3, H, W), got shape {tuple(images.shape)}")
        x = images.float()
        h, w = x.shape[2:]
        s = self.image_size
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[:, :, top : top + s, left : left + s].clamp(0, 1)
        return (x - self.image_mean) / self.image_std

    @torch.no_grad()
    def embed_text(self, prompt: str | Sequence[str]) -> torch.Tensor:
        """Unit-length text embeddings (batch, dim), float32 on the CPU."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("`prompt` must be a string or a non-empty list of strings")
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        out = _features(self.model.get_text_features(input_ids=ids)).float().cpu()
        return torch.nn.functional.normalize(out, dim=-1)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
        """Unit-length image embeddings (batch, dim) of images (batch, 3, H, W) in [0, 1], float32 on the CPU."""
        x = self.preprocess(images)
        _checks.positive_int(batch_size, "batch_size")
        dtype = next(self.model.parameters()).dtype
        outs = [_features(self.model.get_image_features(pixel_values=x[i : i + batch_size].to(self.device, dtype)))
                for i in range(0, len(x), batch_size)]
        return torch.nn.functional.normalize(torch.cat(outs).float().cpu(), dim=-1)

    def similarity(self, images: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor:
        """Cosine similarity (n_images, n_prompts)."""
        return self.embed_images(images) @ self.embed_text(prompts).T

    def zero_shot(self, images: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
        """Probabilities (n_images, n_labels) over the given captions, with the model's learned temperature."""
        scale = float(self.model.logit_scale.detach().exp())
        return (scale * self.similarity(images, list(labels))).softmax(dim=-1)
