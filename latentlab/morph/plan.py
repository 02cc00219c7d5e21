"""Morph plans: where every frame lies on the noise path and on the prompt path, optionally paced evenly.

The noise path and the prompt path are independent: each has its own interpolation and easing over the same
frames. Pacing ``"even"`` previews each segment cheaply and re-times it so that frames change by about the same
amount (:func:`latentlab.paths.retime`).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentlab.backend import AttentionMix, Backend, Conditioning, PredictionMix
from latentlab.metrics import embedding_distance, pixel_distance
from latentlab.morph.settings import MorphSettings
from latentlab.ops import blend
from latentlab.paths import ease, path_at, retime, schedule, schedule_at

__all__ = ["IMAGE_KEYFRAME_MIN_PSNR", "MIX_RECORDS", "Plan", "clip_distance", "file_digest", "pixel_distance", "plan"]

log = logging.getLogger(__name__)

#: The prompt paths that denoise each in-between with both keyframes' prompts, and the record each makes per frame.
MIX_RECORDS: dict[str, type] = {"mix": PredictionMix, "attention": AttentionMix}

#: Below this inversion round-trip PSNR (dB) an image keyframe gets a warning: the frame no longer looks like it.
IMAGE_KEYFRAME_MIN_PSNR = 20.0


@dataclass(frozen=True)
class Plan:
    """Where every frame of a morph lies on the noise path and on the prompt path, plus the keyframes.

    Inputs are computed per slice (:meth:`inputs`), so a 1,000-frame render never holds 1,000 latents or prompt
    embeddings at once.
    """

    settings: MorphSettings
    keys: list[torch.Tensor]
    conds: list[Conditioning]
    frames: list[dict] = field(default_factory=list)
    image_keyframes: list[dict] = field(default_factory=list)
    #: The prompt path this plan runs: ``settings.prompt_interpolation`` with ``"auto"`` resolved for the model.
    prompt_method: str = ""

    def __post_init__(self):
        if not self.prompt_method:
            if self.settings.prompt_interpolation == "auto":
                raise ValueError("a Plan of prompt interpolation 'auto' needs its resolved `prompt_method` "
                                 "(made by latentlab.morph.plan)")
            object.__setattr__(self, "prompt_method", self.settings.prompt_interpolation)

    def inputs(self, start: int, stop: int) -> tuple[torch.Tensor, Conditioning | PredictionMix | AttentionMix]:
        """Initial latents (n, C, h, w) and conditioning (n items) of frames ``start:stop``: a
        :class:`~latentlab.backend.PredictionMix` (prompt interpolation ``"mix"``) or an
        :class:`~latentlab.backend.AttentionMix` (``"attention"``) of each frame's two keyframe prompts."""
        fr = self.frames[start:stop]
        s = self.settings
        lat = path_at(self.keys, [f["noise_segment"] for f in fr], [f["noise_t"] for f in fr],
                      method=s.noise_interpolation, loop=s.loop)[:, 0]
        if self.prompt_method in MIX_RECORDS and self.mixes:
            k = len(self.conds)
            seg = [f["prompt_segment"] for f in fr]
            a = Conditioning.cat([self.conds[i] for i in seg])
            b = Conditioning.cat([self.conds[(i + 1) % k] for i in seg])
            return lat, MIX_RECORDS[self.prompt_method](a, b, torch.tensor([float(f["prompt_t"]) for f in fr], dtype=torch.float64))
        method = "lerp" if self.prompt_method in MIX_RECORDS else self.prompt_method  # one prompt: no mix
        cond = Conditioning.cat(self.conds).map(
            lambda t: path_at([x.float().cpu().unsqueeze(0) for x in t], [f["prompt_segment"] for f in fr],
                              [f["prompt_t"] for f in fr], method=method, loop=s.loop)[:, 0].to(t.dtype)
        )
        return lat, cond

    @property
    def mixes(self) -> bool:
        """Whether prompt interpolation ``"mix"`` or ``"attention"`` has anything to mix: some keyframe's conditioning differs from the
        next one's. Decided for the whole morph (never per slice), so a frame is computed the same way however the
        frames are batched, cached or re-created."""
        k = len(self.conds)
        pairs = range(k if self.settings.loop else k - 1)
        return any(not _same(self.conds[i], self.conds[(i + 1) % k]) for i in pairs)

    @property
    def latents(self) -> torch.Tensor:
        return self.inputs(0, len(self.frames))[0]

    @property
    def conditioning(self) -> Conditioning | PredictionMix | AttentionMix:
        return self.inputs(0, len(self.frames))[1]


def _same(a: Conditioning, b: Conditioning) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in ((a.prompt_embeds, b.prompt_embeds), (a.pooled_prompt_embeds, b.pooled_prompt_embeds),
                            (a.attention_mask, b.attention_mask)))


def clip_distance(clip) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A distance from a :class:`latentlab.clip.CLIP`: ``1 - cos`` of the image embeddings."""
    return embedding_distance(clip.embed_images, name=f"clip:{clip.model_id}")


def plan(lab: Backend, settings: MorphSettings, *, distance=None, frames: list[dict] | None = None) -> Plan:
    """Where every frame lies on both paths (cheap unless ``settings.pacing == "even"``).

    With ``frames`` (a manifest's per-frame records) those positions are used as they are: that is how a single
    frame is re-created without re-running the pacing previews.

    Pacing ``"even"``: every segment is previewed at ``pacing_samples + 1`` evenly spaced points (both paths
    linear, ``pacing_steps`` denoising steps), the change between consecutive previews is measured with
    ``distance`` (default :func:`pixel_distance`; :func:`clip_distance` for a perceptual one), then
    ``pacing_refine`` rounds (default 0) bisect where the change concentrates (a preview at the midpoint of every
    interval that changes more than 1.5x its segment's mean, at most ``pacing_samples // 2`` a segment a round: a
    jump is located to 1/32 of the segment instead of 1/8), and the segment is re-timed with
    :func:`latentlab.paths.retime` on all its previews so that frames change by about the same amount. Easing composes
    on top: a frame's ``t`` is ``retime(ease(raw))``, so easing still shapes the (now perceptual) speed and frames
    still land exactly on the keyframes.

    Refinement is a trade, measured on the embedded model (30 held-out one-attribute pairs x 17 frames, attention
    in-betweens, BENCHMARKS.md): two rounds took smoothness 1 - Gini 0.538 -> 0.584 and the largest step 4.23 ->
    3.42x the mean, but the frames it places inside a jump are half-way images (clean in-betweens 78.4 -> 74.9 %,
    monotonic morphs 30 -> 23 %) at 1.5x the one-shot pacing's time -- for the smoothest morph, not the cleanest.
    """
    method = settings.prompt_interpolation
    if method == "attention" and (why := lab.attention_mix_unsupported()) is not None:
        raise ValueError(f"`prompt_interpolation` 'attention' (AttentionMix) {why}: use 'mix' or 'lerp'")
    if method == "auto":
        method = lab.default_prompt_interpolation()
    prompts, seeds = settings.resolved()
    shape = (1, *lab.latent_shape(height=settings.height, width=settings.width))
    keys = [_seed_noise(lab, s, settings) for s in seeds]
    conds = [lab.encode_prompt(p) for p in prompts]
    images = []
    for i, k in enumerate(settings.keyframes):
        if k.mix is not None:
            keys[i], conds[i] = _mix_key(lab, k.mix, settings)
        if k.image is not None:
            keys[i], note = _image_key(lab, k.image, conds[i], shape, settings)
            images.append({"keyframe": i, **note})
    if frames is not None:
        if len(frames) != settings.n_frames:
            raise ValueError(f"`frames` must have {settings.n_frames} records, got {len(frames)}")
        return Plan(settings, keys, conds, [dict(f) for f in frames], images, method)
    from latentlab.morph.music import frame_positions

    k = len(prompts)
    positions = frame_positions(settings)  # keyframes placed in time (--at), beats or the music's envelope
    if positions is None:
        ns = schedule(k, settings.n_frames, loop=settings.loop, easing=settings.noise_easing)
        ps = schedule(k, settings.n_frames, loop=settings.loop, easing=settings.prompt_easing)
    else:
        ns = schedule_at(positions, k, loop=settings.loop, easing=settings.noise_easing)
        ps = schedule_at(positions, k, loop=settings.loop, easing=settings.prompt_easing)
    records = [
        {"index": i, "noise_segment": ns.segment[i], "noise_t": ns.t[i], "prompt_segment": ps.segment[i],
         "prompt_t": ps.t[i]}
        for i in range(settings.n_frames)
    ]
    if settings.pacing == "even":
        records = _pace(lab, settings, keys, conds, records, ns, ps, distance or pixel_distance, method)
    return Plan(settings, keys, conds, records, images, method)


def _image_key(lab: Backend, path: str, cond: Conditioning, shape, settings: MorphSettings):
    """An image keyframe's noise: load, fit to the model's size (centre crop, area resize), encode, DDIM-invert
    at the morph's steps and guidance."""
    from latentlab.video import read_image

    f = lab.vae_scale_factor
    h, w = shape[2] * f, shape[3] * f
    img = read_image(path)
    ih, iw = img.shape[2:]
    scale = max(h / ih, w / iw)
    nh, nw = max(h, round(ih * scale)), max(w, round(iw * scale))
    img = torch.nn.functional.interpolate(img, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - h) // 2, (nw - w) // 2
    img = img[:, :, top : top + h, left : left + w].clamp(0, 1)
    s = lab.sampling(settings.sampling)
    inv = lab.invert(lab.encode(img), cond, sampling=s)
    psnr = float(inv.psnr[0])
    log.info("image keyframe %s: inversion round trip %.1f dB", path, psnr)
    if psnr < IMAGE_KEYFRAME_MIN_PSNR:
        warnings.warn(f"image keyframe {path}: the morph reproduces it at only {psnr:.1f} dB "
                      f"(guidance_scale={s.guidance_scale:g}, {s.num_inference_steps} steps); DDIM inversion drifts "
                      "under classifier-free guidance: a lower guidance_scale (1-4) or more steps keeps the image",
                      RuntimeWarning, stacklevel=3)
    note = {"image": path, "sha256": file_digest(path), "inversion_psnr_db": round(psnr, 2)}
    return inv.noise.to(torch.float32), note


def _seed_noise(lab: Backend, seed: int, settings: MorphSettings) -> torch.Tensor:
    """A keyframe seed's noise: the model's own initial noise for that seed (float32 on the CPU, (1, C, h, w))."""
    return lab.noise(seed, height=settings.height, width=settings.width, dtype=torch.float32).cpu()


def _mix_key(lab: Backend, mix, settings) -> tuple[torch.Tensor, Conditioning]:
    """A :class:`~latentlab.morph.settings.Mix` keyframe's noise (spherical blend) and conditioning (weighted
    mean of the prompt encodings)."""
    z = blend([_seed_noise(lab, s, settings) for s in mix.seeds], list(mix.seed_weights))
    total = sum(mix.prompt_weights)
    w = torch.tensor([x / total for x in mix.prompt_weights])
    enc = Conditioning.cat([lab.encode_prompt(p) for p in mix.prompts])
    return z, enc.weighted_sum(w)


def file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _pace(lab: Backend, settings: MorphSettings, keys, conds, records, ns, ps, distance, method: str):
    n_seg = ns.n_segments
    m = settings.pacing_samples
    s = lab.sampling(settings.sampling)
    steps = settings.pacing_steps or max(2, s.num_inference_steps // 2)
    sampling = s.replace(num_inference_steps=steps)

    def preview(points):  # [(segment, t)] -> images, one batch
        probe = Plan(settings, keys, conds, [
            {"noise_segment": a, "noise_t": t, "prompt_segment": a, "prompt_t": t} for a, t in points
        ], prompt_method=method)
        lat, cond = probe.inputs(0, len(points))
        return lab.generate(lat, cond, sampling=sampling)

    grids = [[j / m for j in range(m + 1)] for _ in range(n_seg)]
    first = preview([(a, t) for a in range(n_seg) for t in grids[a]])
    images = [list(first[a * (m + 1) : (a + 1) * (m + 1)]) for a in range(n_seg)]

    def changes(a):
        x = torch.stack(images[a])
        return distance(x[:-1], x[1:]).double()

    n_previews = len(first)
    for _ in range(settings.pacing_refine):
        # Bisect where the change concentrates: the intervals that change more than 1.5x their segment's mean
        # (largest first, at most m // 2 a segment a round) get a preview at their midpoint, all in one batch.
        new = []
        for a in range(n_seg):
            d = changes(a)
            big = [i for i in torch.argsort(d, descending=True).tolist() if d[i] > 1.5 * d.mean()][: max(1, m // 2)]
            new += [(a, i, (grids[a][i] + grids[a][i + 1]) / 2) for i in big]
        if not new:
            break
        out = preview([(a, t) for a, _, t in new])
        n_previews += len(new)
        for (a, i, t), img in sorted(zip(new, out), key=lambda z: (z[0][0], -z[0][1])):  # right to left
            grids[a].insert(i + 1, t)
            images[a].insert(i + 1, img)
    log.info("pacing: previewed %d points at %d steps", n_previews, steps)
    per_seg = [changes(a) for a in range(n_seg)]
    out = []
    for r in records:
        r = dict(r)
        raw_n = ns.position[r["index"]] - ns.segment[r["index"]]
        raw_p = ps.position[r["index"]] - ps.segment[r["index"]]
        r["noise_t"] = float(retime(grids[r["noise_segment"]], per_seg[r["noise_segment"]],
                                    ease(raw_n, settings.noise_easing))[0])
        r["prompt_t"] = float(retime(grids[r["prompt_segment"]], per_seg[r["prompt_segment"]],
                                     ease(raw_p, settings.prompt_easing))[0])
        out.append(r)
    return out
