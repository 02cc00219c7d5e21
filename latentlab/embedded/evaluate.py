"""Automatic evaluation of the embedded model on the shapes world: no human judgement.

One responsibility: turn images back into attributes and score the model against the thresholds in its model card.

- Background colour: the median colour of the border pixels, nearest named colour.
- Shape colour: the pixels far (in RGB) from the background; their largest 4-connected blob; its median colour,
  nearest named colour.
- Shape: a small classifier on the blob's binary mask (64x64), trained on freshly rendered masks of the world (where
  labels are exact). Rendering is the ground truth; the classifier's own accuracy on rendered held-out images is
  reported beside every score so the evaluator's error is visible.
- Size: the blob's circumradius (largest distance from its centroid, every shape of the world has circumradius ~1
  in its own units), classified by the midpoints between the world's size ranges.
- VAE: PSNR of reconstructions of fresh 64x64 images (in [0, 1]); locality of the decoder (how much one half of
  the latent changes the other half of the image).
- Latent edits and paths (v2 targets): locality of inpainting, graded img2img, clean in-betweens of morphs.
- CLIP: zero-shot attributes of fresh images: the argmax over every caption of the world.

Run ``python -m latentlab.embedded.evaluate --help``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from latentlab import _checks
from latentlab.backend.engine import posterior_mean
from latentlab.embedded import world

_PALETTE = torch.tensor([world.COLOURS[c] for c in world.COLOUR_NAMES])


def nearest_colour(rgb: torch.Tensor) -> list[str]:
    """(N, 3) in [0, 1] -> nearest named colours."""
    d = torch.cdist(rgb.float(), _PALETTE)
    return [world.COLOUR_NAMES[i] for i in d.argmin(1).tolist()]


def _largest_blob(mask: torch.Tensor) -> torch.Tensor:
    """Largest 4-connected component of a (H, W) bool mask, by label propagation (tiny images: fast enough)."""
    h, w = mask.shape
    if not bool(mask.any()):
        return mask
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).view(h, w) * mask
    for _ in range(h * w):
        p = F.pad(labels, (1, 1, 1, 1))
        m = torch.stack([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]).amax(0) * mask
        if torch.equal(m, labels):
            break
        labels = m
    ids, counts = labels[mask].unique(return_counts=True)
    return labels == ids[counts.argmax()]


def segment(images: torch.Tensor) -> tuple[list[str], list[str], torch.Tensor]:
    """Background colour names, shape colour names and blob masks (N, 64, 64) of images in [0, 1]."""
    n = images.shape[0]
    border = torch.cat(
        [images[:, :, 0, :], images[:, :, -1, :], images[:, :, :, 0], images[:, :, :, -1]], dim=2
    )  # (N, 3, 4W)
    bg_rgb = border.median(dim=2).values
    bgs = nearest_colour(bg_rgb)
    masks, fgs = [], []
    for i in range(n):
        dist = (images[i] - bg_rgb[i].view(3, 1, 1)).norm(dim=0)
        blob = _largest_blob(dist > 0.35)
        masks.append(blob)
        if blob.sum() < 4:
            fgs.append("none")
        else:
            fgs.append(nearest_colour(images[i][:, blob].median(dim=1).values.view(1, 3))[0])
    return bgs, fgs, torch.stack(masks)


def normalise_masks(masks: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Crop each (H, W) mask to its bounding box, pad to a square and resize to ``size``: removes position and
    scale so the classifier only has to learn shape (and rotation)."""
    out = torch.zeros(len(masks), size, size)
    for i, m in enumerate(masks):
        ys, xs = m.nonzero(as_tuple=True)
        if len(ys) == 0:
            continue
        y0, y1, x0, x1 = ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1
        crop = m[y0:y1, x0:x1].float()
        side = max(crop.shape) + 2
        sq = torch.zeros(side, side)
        oy, ox = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
        sq[oy : oy + crop.shape[0], ox : ox + crop.shape[1]] = crop
        out[i] = F.interpolate(sq[None, None], size=(size, size), mode="area")[0, 0]
    return out


class ShapeNet(torch.nn.Module):
    """Shape from a binary mask, normalised for position and scale; trained in a minute or two on fresh renders."""

    def __init__(self):
        super().__init__()
        c = 32
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, c, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(c, 2 * c, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(2 * c, 2 * c, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(2 * c, len(world.SHAPES)),
        )

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return self.net(normalise_masks(masks).unsqueeze(1))


def _masks_and_labels(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    b = world.sample(n, seed=seed)
    _, _, masks = segment(b.images)
    labels = torch.tensor([world.SHAPES.index(a["shape"]) for a in b.attributes])
    return masks, labels


def train_shape_classifier(steps: int = 400, seed: int = 0) -> tuple[ShapeNet, float]:
    """Train the mask classifier on fresh renders; return it and its accuracy on 512 held-out renders.

    Trained on one thread (about a minute), so the same evaluator comes out whatever the machine's thread count
    (multi-threaded kernels round differently, and 400 steps of training amplify it into a different classifier:
    measured, about 1.5 points of shape accuracy between runs with 1 and 2 threads).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_shape_classifier(steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train_shape_classifier(steps: int, seed: int) -> tuple[ShapeNet, float]:
    torch.manual_seed(seed)
    net = ShapeNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(steps):
        masks, labels = _masks_and_labels(64, seed=10_000 + step)
        # Degrade masks a little (erode/dilate) so the classifier tolerates a generator's soft edges.
        if step % 2:
            masks = F.max_pool2d(masks.float().unsqueeze(1), 3, 1, 1).squeeze(1) > 0
        loss = F.cross_entropy(net(masks), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    masks, labels = _masks_and_labels(512, seed=999_999)
    with torch.no_grad():
        acc = (net(masks).argmax(1) == labels).float().mean().item()
    return net, acc


#: The evaluator's shape reader as shipped: ``train_shape_classifier()``'s weights (400 steps, seed 0, one thread).
SHAPE_CLASSIFIER = Path(__file__).parent / "evaluator" / "shape-classifier.safetensors"


@functools.cache
def shape_classifier() -> ShapeNet:
    """The evaluator's shape reader, ready in milliseconds: the shipped weights (:data:`SHAPE_CLASSIFIER`, written by
    ``python -m latentlab.embedded.evaluate --write-shape-classifier``), or trained now (about a minute) if they are
    missing. Notebooks and tests use this; ``main`` trains its own to report the evaluator's accuracy."""
    from latentlab import store

    if SHAPE_CLASSIFIER.is_file():
        net = ShapeNet()
        net.load_state_dict(store.load(SHAPE_CLASSIFIER)[0])
        return net.eval()
    return train_shape_classifier()[0]


def blob_radius(masks: torch.Tensor) -> torch.Tensor:
    """Circumradius (pixels) of each (H, W) blob: the largest distance from its centroid to a pixel centre, + 0.5."""
    out = torch.zeros(len(masks))
    for i, m in enumerate(masks):
        ys, xs = m.nonzero(as_tuple=True)
        if len(ys) == 0:
            continue
        cy, cx = ys.float().mean(), xs.float().mean()
        out[i] = ((ys.float() - cy) ** 2 + (xs.float() - cx) ** 2).sqrt().max() + 0.5
    return out


def size_names(radii: torch.Tensor) -> list[str]:
    """Size words from radii, split at the midpoints between the world's size ranges."""
    ranges = [world.SIZES[s] for s in world.SIZE_NAMES]
    cuts = [(ranges[i][1] + ranges[i + 1][0]) / 2 for i in range(len(ranges) - 1)]
    return [world.SIZE_NAMES[sum(float(r) > c for c in cuts)] for r in radii]


KEYS = ("background", "colour", "shape", "size")


@torch.no_grad()
def attributes(images: torch.Tensor, shape_net: ShapeNet) -> list[dict[str, str]]:
    bgs, fgs, masks = segment(images)
    shapes = [world.SHAPES[i] for i in shape_net(masks).argmax(1).tolist()]
    sizes = size_names(blob_radius(masks))
    return [{"background": b, "colour": f, "shape": s, "size": z} for b, f, s, z in zip(bgs, fgs, shapes, sizes)]


def score(predicted: list[dict[str, str]], truth: list[dict[str, str]]) -> dict[str, float]:
    """Accuracy of each attribute; ``all`` counts an image right only when all four (size included) are."""
    n = len(truth)
    out = {k: sum(p[k] == t[k] for p, t in zip(predicted, truth)) / n for k in KEYS}
    out["all"] = sum(all(p[k] == t[k] for k in KEYS) for p, t in zip(predicted, truth)) / n
    out["all_but_size"] = sum(all(p[k] == t[k] for k in KEYS[:3]) for p, t in zip(predicted, truth)) / n
    return out


def shape_by_size(predicted: list[dict[str, str]], truth: list[dict[str, str]]) -> dict[str, float]:
    """Shape accuracy for each size word (small shapes are the hard case)."""
    out = {}
    for size in world.SIZE_NAMES:
        pairs = [(p, t) for p, t in zip(predicted, truth) if t["size"] == size]
        if pairs:  # a size with no items has no accuracy (not 0 %)
            out[size] = sum(p["shape"] == t["shape"] for p, t in pairs) / len(pairs)
    return out


CHANCE = {
    "background": 1 / len(world.COLOUR_NAMES),
    "colour": 1 / (len(world.COLOUR_NAMES) - 1),
    "shape": 1 / len(world.SHAPES),
}
CHANCE["size"] = 1 / len(world.SIZE_NAMES)
CHANCE["all"] = CHANCE["background"] * CHANCE["colour"] * CHANCE["shape"] * CHANCE["size"]


@torch.no_grad()
def vae_psnr(vae, n: int = 256, seed: int = 123_456) -> float:
    """Mean PSNR (dB) of VAE reconstructions (posterior mean) of ``n`` fresh 64x64 images in [0, 1]."""
    imgs = world.sample(n, seed=seed).images
    dtype = next(vae.parameters()).dtype
    psnrs = []
    for i in range(0, n, 32):
        x = imgs[i : i + 32]
        z = posterior_mean(vae, (x * 2 - 1).to(dtype))
        rec = ((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)
        mse = ((rec - x) ** 2).mean(dim=(1, 2, 3))
        psnrs.append(10 * torch.log10(1.0 / mse.clamp(min=1e-10)))
    return torch.cat(psnrs).mean().item()


@torch.no_grad()
def vae_reconstruction_score(vae, shape_net: ShapeNet, n: int = 512, seed: int = 31_337) -> dict[str, float]:
    """Attributes read from VAE reconstructions of rendered held-out images: how well the VAE's encode/decode round
    trip keeps each attribute. A diagnostic, not a strict bound on generation (measured: the UNet's latents, which
    need not look like the encoder's, decode to medium shapes read right 99 % of the time against 94 % here)."""
    b = world.sample(n, seed=seed, prompts=world.held_out_prompts())
    recs = []
    for i in range(0, n, 64):
        z = posterior_mean(vae, b.images[i : i + 64] * 2 - 1)
        recs.append(((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1))
    pred = attributes(torch.cat(recs), shape_net)
    out = score(pred, b.attributes)
    out["shape_by_size"] = shape_by_size(pred, b.attributes)
    return out


@torch.no_grad()
def clip_zero_shot(model, tokenizer, n: int = 512, seed: int = 424_242) -> dict[str, float]:
    """Zero-shot attributes of fresh images (held-out prompts): argmax over all captions of the world."""
    prompts = world.all_prompts()
    caps = [world.caption(*p) for p in prompts]
    ids = tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    dtype = next(model.parameters()).dtype
    text = torch.cat([_features(model.get_text_features(input_ids=ids[i : i + 256])) for i in range(0, len(ids), 256)])
    text = F.normalize(text.float(), dim=-1)
    b = world.sample(n, seed=seed, prompts=world.held_out_prompts())
    img = _features(model.get_image_features(pixel_values=((b.images - 0.5) / 0.5).to(dtype)))
    best = (F.normalize(img.float(), dim=-1) @ text.T).argmax(1).tolist()
    pred = [world.attributes(prompts[i]) for i in best]
    out = score(pred, b.attributes)
    out["size"] = sum(p["size"] == t["size"] for p, t in zip(pred, b.attributes)) / n
    return out


def _features(out):
    # transformers 5 returns an output object (projected vector in .pooler_output); 4.x returned a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def generation(pipe, shape_net: ShapeNet, *, n: int = 256, steps: int = 20, guidance: float = 4.0, seed: int = 0,
               batch: int = 64) -> dict[str, float]:
    """Generate one image per held-out prompt (seed ``seed + i``) and score its attributes."""
    from latentlab.seeds import noise

    prompts = world.held_out_prompts()
    prompts = (prompts * math.ceil(n / len(prompts)))[:n]
    truth = [world.attributes(p) for p in prompts]
    caps = [world.caption(*p) for p in prompts]
    images = []
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer  # UNet model or the flow twin (SD3)
    shape = (1, denoiser.config.in_channels, denoiser.config.sample_size, denoiser.config.sample_size)
    for i in range(0, n, batch):
        seeds = [seed + j for j in range(i, min(n, i + batch))]
        latents = noise(seeds, (len(seeds), *shape[1:]))  # bit-identical to randn_tensor per item (tested)
        out = pipe(caps[i : i + batch], num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                   output_type="pt")
        images.append(out.images.float().cpu())
    pred = attributes(torch.cat(images), shape_net)
    out = score(pred, truth)
    out["shape_by_size"] = shape_by_size(pred, truth)
    return out


@torch.no_grad()
def decoder_locality(vae, n: int = 64, seed: int = 123, seam: int = 1) -> float:
    """RMS change (images in [0, 1]) of the left part of a decoded image when the right half of its latent is
    replaced by another image's, outside a ``seam`` latent pixels wide: 0 for a perfectly local decoder (the "right
    half" of :func:`decoder_locality_regions`)."""
    return decoder_locality_regions(vae, n, seed, seam, regions=("right half",))["right half"]


#: The edited regions of the locality measures (v3): quadrants, halves and a centred square, as fractions of the
#: latent grid (top, left, bottom, right).
LOCALITY_REGIONS: dict[str, tuple[float, float, float, float]] = {
    "top-left quadrant": (0, 0, 0.5, 0.5), "top-right quadrant": (0, 0.5, 0.5, 1),
    "bottom-left quadrant": (0.5, 0, 1, 0.5), "bottom-right quadrant": (0.5, 0.5, 1, 1),
    "left half": (0, 0, 1, 0.5), "right half": (0, 0.5, 1, 1), "top half": (0, 0, 0.5, 1), "bottom half": (0.5, 0, 1, 1),
    "centred square": (0.25, 0.25, 0.75, 0.75),
}


def region_masks(h: int, w: int, region: tuple[float, float, float, float], *, f: int = 8,
                 seam: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent mask (h, w) of an edited region and the pixel mask (h f, w f) of what must not change: everything
    farther than ``seam`` latent pixels from the region."""
    top, left, bottom, right = (round(v * d) for v, d in zip(region, (h, w, h, w)))
    lat = torch.zeros(h, w, dtype=torch.bool)
    lat[top:bottom, left:right] = True
    near = torch.zeros(h, w, dtype=torch.bool)
    near[max(0, top - seam) : bottom + seam, max(0, left - seam) : right + seam] = True
    keep = ~near.repeat_interleave(f, 0).repeat_interleave(f, 1)
    return lat, keep


@torch.no_grad()
def decoder_locality_regions(vae, n: int = 64, seed: int = 123, seam: int = 1,
                             regions: tuple[str, ...] = tuple(LOCALITY_REGIONS)) -> dict[str, float]:
    """Per region of :data:`LOCALITY_REGIONS`: the RMS change (images in [0, 1]) outside the region (and a ``seam``
    latent pixels wide around it) when the region's latents are replaced by another image's; ``"worst"`` is the
    largest. 0 for a perfectly local decoder."""
    x = world.sample(2 * n, seed=seed).images * 2 - 1
    z = posterior_mean(vae, x)
    za, zb = z[:n], z[n:]
    f = x.shape[-1] // z.shape[-1]
    da = vae.decode(za).sample
    out = {}
    for name in regions:
        lat, keep = region_masks(*z.shape[-2:], LOCALITY_REGIONS[name], f=f, seam=seam)
        dm = vae.decode(torch.where(lat, zb, za)).sample
        out[name] = float(((dm - da) / 2)[..., keep].pow(2).mean().sqrt())
    out["worst"] = max(out.values())
    return out


@torch.no_grad()
def inpaint_locality_regions(lab, n: int = 16, seed: int = 77, seam: int = 1) -> dict[str, float]:
    """Per region of :data:`LOCALITY_REGIONS`: latent inpainting (``Lab.inpaint``, the lesson's call, no pixel
    composite) of the region with the image's own prompt, RMS change outside the region (and a ``seam``) against
    the decoded original; ``"worst"`` is the largest."""
    b = world.sample(n, seed=seed, prompts=world.held_out_prompts())
    z0 = lab.encode(b.images)
    cond = lab.encode_prompt(b.captions)
    ref = lab.decode(z0)
    out = {}
    for name, region in LOCALITY_REGIONS.items():
        lat, keep = region_masks(*z0.shape[-2:], region, f=lab.vae_scale_factor, seam=seam)
        got = lab.inpaint(z0, cond, lat[None, None].float(), seed=list(range(n)))
        out[name] = float((got - ref)[..., keep].pow(2).mean().sqrt())
    out["worst"] = max(out.values())
    return out


@torch.no_grad()
def inpaint_locality(lab, n: int = 32, seed: int = 77, seam: int = 1) -> float:
    """RMS change of the unmasked half of images (outside a one-latent-pixel seam) after latent inpainting of the
    other half, against the decoded original (no pixel composite)."""
    b = world.sample(n, seed=seed, prompts=world.held_out_prompts())
    z0 = lab.encode(b.images)
    h = z0.shape[-1]
    mask = torch.zeros(1, 1, h, h)
    mask[..., h // 2 :] = 1
    cond = lab.encode_prompt(b.captions)
    out = lab.inpaint(z0, cond, mask, seed=list(range(n)))
    ref = lab.decode(z0)
    keep = (h // 2 - seam) * lab.vae_scale_factor
    return float((out - ref)[..., :keep].pow(2).mean().sqrt())


@torch.no_grad()
def graded_img2img(lab, shape_net: ShapeNet, *, n: int = 48, strengths=(0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0),
                   seed: int = 5) -> dict[str, float]:
    """Towards a prompt that differs in one attribute (the shape colour): the share of images that take the new
    colour at each strength. A model with a graded latent space rises slowly; v1 flipped by 0.1."""
    prompts = world.held_out_prompts()
    g = torch.Generator().manual_seed(seed)
    src, dst = [], []
    for i in torch.randperm(len(prompts), generator=g)[:n].tolist():
        size, colour, shape, bg = prompts[i]
        options = [c for c in world.COLOUR_NAMES if c not in (colour, bg)]
        new = options[int(torch.randint(len(options), (1,), generator=g))]
        src.append((size, colour, shape, bg))
        dst.append((size, new, shape, bg))
    images = world.render_prompts(src, seed=seed).images
    z0 = lab.encode(images)
    cond = lab.encode_prompt([world.caption(*p) for p in dst])
    out = {}
    for s in strengths:
        pred = attributes(lab.img2img(z0, cond, strength=s, seed=list(range(n))), shape_net)
        out[f"{s:g}"] = sum(p["colour"] == t[1] for p, t in zip(pred, dst)) / n
    return out


@torch.no_grad()
def clean_inbetweens(lab, shape_net: ShapeNet, *, pairs: int = 50, frames: int = 48, seed: int = 9,
                     background_tolerance: float = 0.2, prompt_path: str = "lerp") -> dict[str, float]:
    """Morphs between random held-out prompt pairs (slerp noise; the prompts lerped, or with ``prompt_path=
    "attention"`` both in every cross attention, :class:`~latentlab.backend.AttentionMix`, the morph's default on
    UNet models): the share of frames that show one connected shape on a uniform background, and the share whose
    background colour is near (RGB distance < ``background_tolerance``) one keyframe's background or the RGB blend
    of the two at that frame's t."""
    _checks.choice(prompt_path, "prompt_path", ("lerp", "attention"))
    prompts = world.held_out_prompts()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(prompts), (pairs, 2), generator=g).tolist()
    ts = torch.linspace(0, 1, frames)
    clean = near = total = 0
    for k, (i, j) in enumerate(idx):
        a, b = prompts[i], prompts[j]
        images = lab.generate(*_morph_inputs(lab, a, b, k, ts, prompt_path))
        for f, img in enumerate(images):
            border = torch.cat([img[:, 0, :], img[:, -1, :], img[:, :, 0], img[:, :, -1]], dim=1)
            bg = border.median(dim=1).values
            uniform = float((border - bg[:, None]).norm(dim=0).gt(0.15).float().mean()) < 0.1
            dist = (img - bg.view(3, 1, 1)).norm(dim=0) > 0.35
            blob = _largest_blob(dist)
            one_shape = bool(blob.sum() >= 4) and float(blob.sum()) >= 0.9 * float(dist.sum())
            clean += uniform and one_shape
            ba, bb = torch.tensor(world.COLOURS[a[3]]), torch.tensor(world.COLOURS[b[3]])
            t = float(ts[f])
            refs = torch.stack([ba, bb, ba + t * (bb - ba)])
            near += float((refs - bg).norm(dim=1).min()) < background_tolerance
            total += 1
    return {"one_clean_shape": clean / total, "background_near_keyframes_or_blend": near / total,
            "frames": total}


def read_morph(images: torch.Tensor, a: tuple[str, str, str, str], b: tuple[str, str, str, str],
               shape_net: ShapeNet, *, uniform_tolerance: float = 0.1) -> dict:
    """Read the frames ``(n, 3, 64, 64)`` of one morph from prompt ``a`` to prompt ``b`` (world prompt tuples).

    - ``clean``: per in-between frame (the endpoints excluded), whether it shows one shape on a uniform background
      whose background, colour and shape each read as ``a``'s or ``b``'s (no blob pair, no third shape or colour);
    - ``monotonic``: per attribute (background, colour, shape, size), whether the read values go from ``a``'s to
      ``b``'s in one change and never back (:func:`latentlab.metrics.monotonic`);
    - ``endpoints``: whether the first and last frames read all four attributes of ``a`` and ``b``.
    """
    from latentlab.metrics import monotonic

    ta, tb = world.attributes(a), world.attributes(b)
    read = attributes(images, shape_net)
    border = torch.cat([images[:, :, 0, :], images[:, :, -1, :], images[:, :, :, 0], images[:, :, :, -1]], dim=2)
    bg = border.median(dim=2).values
    clean = []
    for f in range(1, len(images) - 1):
        uniform = float((border[f] - bg[f][:, None]).norm(dim=0).gt(0.15).float().mean()) < uniform_tolerance
        dist = (images[f] - bg[f].view(3, 1, 1)).norm(dim=0) > 0.35
        blob = _largest_blob(dist)
        one_shape = bool(blob.sum() >= 4) and float(blob.sum()) >= 0.9 * float(dist.sum())
        known = all(read[f][k] in (ta[k], tb[k]) for k in ("background", "colour", "shape"))
        clean.append(uniform and one_shape and known)
    return {"clean": clean,
            "monotonic": {k: monotonic([r[k] for r in read], ta[k], tb[k]) for k in KEYS},
            "endpoints": [read[0] == ta, read[-1] == tb]}


def one_attribute_pairs(n: int, *, seed: int = 0) -> list[tuple[tuple[str, ...], tuple[str, ...], str]]:
    """``n`` pairs of held-out prompts that differ in exactly one attribute, as (a, b, attribute), the four
    attributes taking turns (background, colour, shape, size) so every kind of change is measured equally.
    Drawn with a seeded generator from every such pair among the held-out prompts (``b`` need not be held out
    when no held-out prompt differs from ``a`` in that attribute)."""
    g = torch.Generator().manual_seed(seed)
    held = world.held_out_prompts()
    valid = set(world.all_prompts())
    slot = {"size": 0, "colour": 1, "shape": 2, "background": 3}
    values = {"size": world.SIZE_NAMES, "colour": world.COLOUR_NAMES, "shape": world.SHAPES,
              "background": world.COLOUR_NAMES}
    held_set = set(held)
    out = []
    order = ("background", "colour", "shape", "size")
    while len(out) < n:
        attr = order[len(out) % 4]
        a = held[int(torch.randint(len(held), (1,), generator=g))]
        options = []
        for v in values[attr]:
            b = list(a)
            b[slot[attr]] = v
            b = tuple(b)
            if b != a and b in valid:
                options.append(b)
        if not options:
            continue
        preferred = [b for b in options if b in held_set] or options
        out.append((a, preferred[int(torch.randint(len(preferred), (1,), generator=g))], attr))
    return out


def _morph_inputs(lab, a, b, k: int, ts: torch.Tensor, prompt_path: str = "lerp"):
    from latentlab.backend import AttentionMix, Conditioning
    from latentlab.ops import lerp, slerp

    za, zb = lab.noise(2 * k), lab.noise(2 * k + 1)
    ca, cb = lab.encode_prompt(world.caption(*a)), lab.encode_prompt(world.caption(*b))
    if prompt_path == "attention":
        n = len(ts)
        cond = AttentionMix(Conditioning.cat([ca] * n), Conditioning.cat([cb] * n), ts.double())
    else:
        cond = Conditioning.cat([ca, cb]).map(lambda t: lerp(t[:1], t[1:], ts)[:, 0])
    return slerp(za, zb, ts)[:, 0], cond


@torch.no_grad()
def fast_model(fast, full, shape_net: ShapeNet, *, n: int = 256, steps=(1, 2, 4), seed: int = 0, pairs: int = 16,
               frames: int = 48, live_steps: int = 2) -> dict:
    """The few-step model against its teacher (both latentlab Labs, each with its documented sampling):

    - ``attributes``: per step count, the held-out attribute scores (as :func:`generation`, seeds ``seed + i``);
    - ``fidelity``: per step count, the share of images whose four attributes read the same as the full model's
      image for the same seed and prompt (what a preview promises: the final image will look like this);
    - ``live_preview``: the widgets' preview itself (``generate_live(..., preview=True)`` at ``live_steps`` steps, one
      item at a time, the decoder in bfloat16 where the CPU has it natively): its fidelity to the full model's
      image, and the share that reads the same as the batched images of the same step count;
    - ``path_coherence``: along ``pairs`` morphs of ``frames`` frames between held-out prompts (slerp noise, lerp
      prompt), the largest frame-to-frame RMS change (pixels in [0, 1]) of the fast model divided by the full
      model's on the same path: median, worst, and the share of paths at or under 2.
    """
    prompts = world.held_out_prompts()
    prompts = (prompts * math.ceil(n / len(prompts)))[:n]
    truth = [world.attributes(p) for p in prompts]
    from latentlab.backend import Conditioning

    def images(lab, k=None):
        out = []
        s = lab.sampling() if k is None else lab.sampling(num_inference_steps=k)
        for i in range(0, n, 64):
            c = Conditioning.cat([lab.encode_prompt(world.caption(*p)) for p in prompts[i:i + 64]])
            out.append(lab.generate(lab.noise(list(range(seed + i, seed + min(n, i + 64)))), c, sampling=s))
        return torch.cat(out)

    ref = attributes(images(full), shape_net)
    result: dict = {"full": score(ref, truth), "attributes": {}, "fidelity": {}}
    batched = {}
    for k in steps:
        pred = batched[k] = attributes(images(fast, k), shape_net)
        result["attributes"][k] = score(pred, truth) | {"shape_by_size": shape_by_size(pred, truth)}
        result["fidelity"][k] = sum(p == r for p, r in zip(pred, ref)) / n
    if live_steps in batched:
        s = fast.sampling(num_inference_steps=live_steps)
        live = attributes(torch.cat([fast.generate_live(fast.noise(seed + i), fast.encode_prompt(world.caption(*p)),
                                                        sampling=s, preview=True) for i, p in enumerate(prompts)]),
                          shape_net)
        result["live_preview"] = {"steps": live_steps, "fidelity": sum(p == r for p, r in zip(live, ref)) / n,
                                  "reads_as_batched": sum(p == r for p, r in zip(live, batched[live_steps])) / n}
    g = torch.Generator().manual_seed(seed + 4242)
    idx = torch.randint(len(world.held_out_prompts()), (pairs, 2), generator=g).tolist()
    ts = torch.linspace(0, 1, frames)
    ratios = []
    for k, (i, j) in enumerate(idx):
        a, b = world.held_out_prompts()[i], world.held_out_prompts()[j]
        jumps = []
        for lab in (fast, full):
            z, c = _morph_inputs(lab, a, b, k, ts)
            im = lab.generate(z, c)
            jumps.append(float((im[1:] - im[:-1]).pow(2).flatten(1).mean(1).sqrt().max()))
        ratios.append(jumps[0] / max(jumps[1], 1e-8))
    r = torch.tensor(ratios)
    result["path_coherence"] = {"median_ratio": float(r.median()), "worst_ratio": float(r.max()),
                                "share_at_most_2": float((r <= 2).float().mean()), "pairs": pairs, "frames": frames}
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentlab.embedded.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="diffusers folder (default: the embedded model)")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--v2", action="store_true", help="also measure the v2 targets: decoder and inpainting locality, "
                   "graded img2img, clean in-betweens (a few more minutes)")
    p.add_argument("--fast", action="store_true",
                   help="evaluate the few-step model (--model, default embedded-shapes-fast) against the default "
                        "model: attributes and preview fidelity at 1, 2 and 4 steps, and morph-path coherence")
    p.add_argument("--write-shape-classifier", action="store_true",
                   help=f"train the shape reader and write it to {SHAPE_CLASSIFIER.name} (shipped with latentlab)")
    args = p.parse_args(argv)
    if args.write_shape_classifier:
        from latentlab import store

        net, acc = train_shape_classifier()
        SHAPE_CLASSIFIER.parent.mkdir(exist_ok=True)
        store.save(SHAPE_CLASSIFIER, net.state_dict(), provenance={"steps": 400, "seed": 0, "threads": 1,
                                                                   "held_out_accuracy": acc}, overwrite=True)
        print(f"wrote {SHAPE_CLASSIFIER} (held-out accuracy {acc:.3f})")
        return
    torch.set_num_threads(args.threads)
    if args.fast:
        from latentlab.backend import Lab

        fast = Lab.default("embedded-shapes-fast") if args.model is None else Lab.from_pretrained(args.model)
        if args.model is not None:
            fast.defaults = fast.defaults.replace(num_inference_steps=4, guidance_scale=1.0)
        results = fast_model(fast, Lab.default(), shape_classifier(), n=args.n)
        results["settings"] = {"n": args.n, "threads": args.threads, "full": "embedded-shapes, 20 DDIM steps, "
                               "guidance 4", "fast": "DDIM trailing, guidance 1 (distilled)"}
        text = json.dumps(results, indent=2)
        print(text)
        if args.json:
            args.json.write_text(text + "\n")
        return
    from diffusers import DiffusionPipeline
    from transformers import CLIPModel, CLIPTokenizer

    from latentlab import embedded

    path = args.model or embedded.model_path()
    pipe = DiffusionPipeline.from_pretrained(path, dtype=torch.float32)  # the plain pipeline of either model
    pipe.set_progress_bar_config(disable=True)
    clip_home = path if (path / "clip").is_dir() else embedded.model_path()  # the flow twin shares the CLIP
    tok = CLIPTokenizer.from_pretrained(clip_home / "tokenizer")
    clip = CLIPModel.from_pretrained(clip_home / "clip", dtype=torch.float32)
    shape_net, evaluator_acc = train_shape_classifier()
    b = world.sample(512, seed=31_337, prompts=world.held_out_prompts())
    evaluator = score(attributes(b.images, shape_net), b.attributes)
    results = {
        "evaluator_on_rendered_images": evaluator,
        "evaluator_shape_classifier_accuracy": evaluator_acc,
        "vae_psnr_db": vae_psnr(pipe.vae.float()),
        "vae_reconstruction_attributes": vae_reconstruction_score(pipe.vae.float(), shape_net),
        "clip_zero_shot": clip_zero_shot(clip, tok),
        "generation": generation(pipe, shape_net, n=args.n, steps=args.steps, guidance=args.guidance),
        "settings": {"n": args.n, "steps": args.steps, "guidance_scale": args.guidance,
                     "scheduler": type(pipe.scheduler).__name__},
        "chance": CHANCE,
    }
    if args.v2:
        from latentlab.backend import Lab

        lab = Lab.from_pretrained(path, device="cpu")
        lab.defaults = lab.defaults.replace(num_inference_steps=args.steps, guidance_scale=args.guidance)
        regions = decoder_locality_regions(pipe.vae.float())
        results["decoder_locality_rms"] = regions["right half"]  # decoder_locality, computed once
        results["inpaint_locality_rms"] = inpaint_locality(lab)
        results["decoder_locality_regions_rms"] = regions
        results["inpaint_locality_regions_rms"] = inpaint_locality_regions(lab)
        results["graded_img2img_new_colour_share"] = graded_img2img(lab, shape_net)
        results["clean_inbetweens"] = clean_inbetweens(lab, shape_net)
        if lab.attention_mix_unsupported() is None:  # the morph's default prompt path on UNet models
            results["clean_inbetweens_attention"] = clean_inbetweens(lab, shape_net, prompt_path="attention")
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
