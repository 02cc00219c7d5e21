"""The generative map: a 2-D map of an atlas, and the way back from any point of it to an image that lands there.

One responsibility: given a click on a PCA or UMAP map of an atlas space (CLIP image embeddings, CLIP text
embeddings of the prompts, final latents or initial noise), make the image whose own embedding, projected with the
*same* fitted map, lands as near the click as possible -- and say where it really landed. A blend of the nearest items (inverse-distance weights) is a guess:
measured on the embedded model, its image lands a median 0.14 of the map's diagonal away from the click, and
nearer than the nearest existing item only 23 % of the time. So :meth:`AtlasMap.generate` searches:

1. **Candidates**: several constructions from the ``k`` nearest items -- inverse-distance blends of their noise
   (spherical) and conditioning (linear) at several sharpnesses, the nearest items themselves, blended
   conditioning over a nearest item's own noise, and on a PCA map of noise the exact in-plane move
   (:func:`latentlab.project.inverse_pca`). All are generated in one batch, embedded and projected.
2. **Refinement**: the landings of the candidates give a local linear model from blend weights to map position
   (least squares); the weights it predicts for the click, and mixes of them with the best candidate's, are
   generated and measured too.
3. **Pick**: the candidate that landed nearest the click. The result carries where it landed and the error as a
   share of the map's diagonal, so a user sees the truth (and the nearest existing item's distance beside it).

This is inverse projection by search in the model's own input space (noise, conditioning weights) with the
forward map as the judge, as in inverse-projection research (iLAMP, NNInv) but verified per click.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from latentlab import _checks
from latentlab.backend import AttentionMix, Backend, Conditioning, PredictionMix
from latentlab.ops import blend

__all__ = ["METHODS", "SPACES", "AtlasMap", "Landing", "check_map_request"]

_FRESH = 1_000_000_007  # first seed of the fresh-noise candidates (far from any seed range people use for atlases)

#: The atlas spaces a map can be drawn of (and generated back from).
SPACES: tuple[str, ...] = ("image_embeds", "noise", "latents", "prompt_embeds")
METHODS: tuple[str, ...] = ("pca", "umap")


def check_map_request(atlas, space: str, method: str) -> None:
    """Refuse, by name, what no map can be drawn of: not an Atlas, fewer than 3 items, an unknown space or method."""
    from latentlab.atlas.core import Atlas

    if not isinstance(atlas, Atlas):
        raise TypeError(f"`atlas` must be a latentlab.atlas.Atlas, got {type(atlas).__name__}")
    if len(atlas) < 3:
        raise ValueError(f"`atlas` must have at least 3 items to draw a map, got {len(atlas)}")
    _checks.choice(space, "space", SPACES)
    _checks.choice(method, "method", METHODS)


@dataclass(frozen=True)
class Landing:
    """Where an image generated for a map ``point`` really landed.

    ``error`` and ``nearest_item`` are distances as a share of the map's diagonal: from the click to the image's
    own projected position, and from the click to the nearest existing atlas item. ``how`` records the chosen
    candidate's construction (items, weights, noise), enough to re-create it.
    """

    point: tuple[float, float]
    landed: tuple[float, float]
    error: float
    nearest_item: float
    candidates: int
    how: dict = field(default_factory=dict)

    @property
    def beats_nearest_item(self) -> bool:
        return self.error < self.nearest_item


class AtlasMap:
    """A 2-D map (PCA or UMAP) of one space of an :class:`~latentlab.atlas.Atlas`, fitted once, and the way back.

    Parameters
    ----------
    atlas : Atlas
        The items (their ``space`` vectors are what the map is fitted on).
    space : {"image_embeds", "noise", "latents", "prompt_embeds"}
        ``prompt_embeds``: a map of the prompts' CLIP text embeddings. An image has no text embedding of its own, so
        its CLIP image embedding is carried to the text side by a ridge regression fitted on the atlas's own
        (image, prompt) pairs (centred, penalty ``1e-3 * N``), then normalised: the items sit at their prompts'
        points, and a generated image is judged by where its own picture reads. Measured on a 30-prompt x 4-seed
        atlas of the embedded world, held-out items' images then land a median 0.059 of the diagonal from their
        prompt's point (0.075-0.13 for prompts the regression never saw), against 0.147 (0.11-0.15) for the plain
        modality-gap shift (mean text - mean image; Liang et al. 2022, "Mind the Gap").
    method : {"pca", "umap"}
    clip : CLIP, optional
        The image encoder of ``image_embeds`` (default: the embedded CLIP, what ``build_atlas`` uses by default).
    random_state : int
        Seed of the projection (UMAP's layout, PCA's randomized solver).

    Attributes
    ----------
    coords_ : (N, 2) tensor
        The items' map coordinates.
    diagonal_ : float
        The length of the diagonal of the items' bounding box (the unit of every error).

    Examples
    --------
    >>> from latentlab import Lab
    >>> from latentlab.atlas import build_atlas
    >>> lab = Lab.default()
    >>> atlas = build_atlas(lab, ["a red star", "a blue ring"], [1, 2, 3], progress=False)
    >>> m = AtlasMap(atlas, space="image_embeds")
    >>> image, landing = m.generate(lab, m.coords_[:2].mean(0).tolist(), candidates=4, refine=0)
    >>> image.shape, landing.candidates, landing.error >= 0
    (torch.Size([1, 3, 64, 64]), 4, True)
    """

    def __init__(self, atlas, *, space: str = "image_embeds", method: str = "pca", clip=None,
                 random_state: int = 0):
        from latentlab.project import PCA, UMAP

        check_map_request(atlas, space, method)
        self.atlas, self.space, self.method, self._clip = atlas, space, method, clip
        x = getattr(atlas, space).float().flatten(1)
        if method == "pca":
            self.projector_ = PCA(2, random_state=random_state).fit(x)
            coords = self.projector_.transform(x)
        else:
            self.projector_ = UMAP(n_neighbors=min(15, len(x) - 1), random_state=random_state).fit(x)
            coords = self.projector_.embedding_
        self.coords_ = coords.float()
        self.to_text_ = None
        if space == "prompt_embeds":
            self.to_text_ = _ridge(atlas.image_embeds, atlas.prompt_embeds)
        self.diagonal_ = float((self.coords_.max(0).values - self.coords_.min(0).values).norm()) or 1.0

    @property
    def clip(self):
        if self._clip is None:
            from latentlab.clip import CLIP

            self._clip = CLIP.default()
        return self._clip

    def transform(self, vectors: torch.Tensor) -> torch.Tensor:
        """Map coordinates (n, 2) of new vectors of this map's space."""
        _checks.tensor(vectors, "vectors", min_ndim=2)
        dim = getattr(self.atlas, self.space)[0].numel()
        if vectors[0].numel() != dim:
            raise ValueError(f"`vectors` must hold items of {dim} values (this map's {self.space} space), got items "
                             f"of shape {tuple(vectors.shape[1:])}")
        return self.projector_.transform(vectors.float().flatten(1)).float()

    def embed(self, noise: torch.Tensor, latents: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The vectors of this map's space for generated items (their initial noise, final latents, images); only
        the one this map's space needs may be given (the others may be None)."""
        if self.space == "noise":
            return _checks.tensor(noise, "noise", min_ndim=2).float().flatten(1)
        if self.space == "latents":
            return _checks.tensor(latents, "latents", min_ndim=2).float().flatten(1)
        _checks.tensor(images, "images", ndim=4, what="(N, 3, H, W) images")
        vectors = self.clip.embed_images(images).float()
        if self.space == "prompt_embeds":  # into the text side of CLIP's space (see the class notes)
            mi, w, mt = self.to_text_
            vectors = torch.nn.functional.normalize((vectors - mi) @ w + mt, dim=-1)
        return vectors

    def nearest_item_distance(self, point) -> float:
        """Distance from ``point`` to the nearest atlas item, as a share of the map's diagonal."""
        return float((self.coords_ - _point(point)).norm(dim=1).min()) / self.diagonal_

    # --- candidates ----------------------------------------------------------------------------------------

    def blend_inputs(self, lab: Backend, point, *, k: int = 8, power: float = 2.0):
        """One guess (the explorer's former click): the ``k`` nearest items' noise blended spherically and their
        conditioning linearly, with inverse-distance weights. Returns ``(noise (1, C, h, w), conditioning, how)``."""
        from latentlab.project import knn_weights

        idx, w = knn_weights(self.coords_, _point(point).tolist(), k=k, power=power)
        return self._noise(lab, idx, [w]), self._conditioning(lab, idx, [w]), {"items": idx.tolist(), "weights": _r(w)}

    def _noise(self, lab, idx, specs) -> torch.Tensor:
        """Initial noise per candidate: a spherical blend of the items' noise (weights), or a fresh seed's (int)."""
        noise = self.atlas.noise[idx].float()
        shape = tuple(noise.shape[-3:])
        out = []
        for spec in specs:
            if isinstance(spec, torch.Tensor) and spec.ndim > 1:  # ready noise (the in-plane PCA move)
                out.append(spec.float().reshape(1, *shape))
            elif isinstance(spec, int):
                out.append(lab.noise(spec, height=shape[1] * lab.vae_scale_factor, width=shape[2] * lab.vae_scale_factor
                                     ).float().cpu())
            else:
                out.append(blend(noise.unsqueeze(1), spec.to(torch.float32)))
        return torch.cat(out)

    def _conditioning(self, lab, idx, weights) -> Conditioning:
        enc = lab.encode_prompt([str(self.atlas.items[i]["prompt"]) for i in idx.tolist()])
        return Conditioning.cat([enc.weighted_sum(w.to(torch.float64)) for w in weights])

    def _candidates(self, point, k: int, n: int, seed: int):
        """Up to ``n`` (conditioning weights, noise weights or a fresh seed, label) over the ``k`` nearest items,
        most promising first (the plain inverse-distance blend always first)."""
        from latentlab.project import knn_weights

        idx, _ = knn_weights(self.coords_, point.tolist(), k=k)
        d = (self.coords_[idx] - point).norm(dim=1).double().clamp_min(1e-9)

        def inv(p, m=None):
            m = len(idx) if m is None else m
            w = torch.zeros(len(idx), dtype=torch.float64)
            w[:m] = d[:m].pow(-p)
            return w / w.sum()

        def one(j):
            w = torch.zeros(len(idx), dtype=torch.float64)
            w[min(j, len(idx) - 1)] = 1.0
            return w

        fresh = [_FRESH + 16 * seed + j for j in range(4)]  # new noise: other layouts of the same content
        out = [(inv(2), inv(2), "blend"), (one(0), one(0), "nearest item"), (inv(2), one(0), "nearest noise"),
               (inv(4), inv(4), "sharp blend"), (inv(4), fresh[0], "sharp blend, new noise"),
               (one(0), fresh[1], "nearest prompt, new noise"), (inv(2, 3), inv(2, 3), "3-nearest blend"),
               (inv(1), fresh[2], "soft blend, new noise"), (inv(1), inv(1), "soft blend"),
               (inv(2), one(1), "2nd-nearest noise"), (one(1), one(1), "2nd-nearest item"),
               (one(0), fresh[3], "nearest prompt, new noise")]
        if self.space == "noise" and self.method == "pca":
            from latentlab.project import inverse_pca

            z = inverse_pca(self.projector_, point.tolist(), self.atlas.noise.float(), self.coords_)
            out.insert(0, (inv(2), z, "nearest item moved in the PCA plane, on the Gaussian shell"))
        return idx, out[:n]

    def path_blends(self, points, n_keyframes: int = 5, *, k: int = 8, lab: Backend | None = None,
                    candidates: int = 12, refine: int = 2, sampling=None) -> list[dict]:
        """``n_keyframes`` points evenly spaced by arc length along a drawn path ``points`` [(x, y), ...], each as
        the fields of a :class:`~latentlab.morph.Mix` (``seeds``, ``seed_weights``, ``prompts``, ``prompt_weights``)
        that re-creates it from a manifest: ``Keyframe(mix=Mix(**blend))`` (the morph layer sits beside this one,
        so the caller builds the keyframes).

        Without ``lab``: the ``k`` nearest items blended with inverse-distance weights (a guess). With ``lab``: the
        candidate :meth:`generate` finds for each point (the one whose image lands nearest it), as a Mix of the
        items' prompts and of their noise or a fresh seed's (the in-plane PCA move, which no Mix can express, falls
        back to the blend)."""
        from latentlab.project import knn_weights

        if not isinstance(points, (list, tuple)) or len(points) < 2:
            raise ValueError("draw a path of at least two points")
        n_keyframes = _checks.positive_int(n_keyframes, "n_keyframes", minimum=2)
        p = torch.stack([_point(q).double() for q in points])
        seg = (p[1:] - p[:-1]).norm(dim=1)
        cum = torch.cat([torch.zeros(1, dtype=torch.float64), seg.cumsum(0)])
        if float(cum[-1]) == 0:
            raise ValueError("the path has no length")
        keys = []
        for s in torch.linspace(0, float(cum[-1]), n_keyframes).tolist():
            j = min(int(torch.searchsorted(cum, torch.tensor(s, dtype=torch.float64), right=True)) - 1, len(seg) - 1)
            f = 0.0 if seg[j] == 0 else (s - float(cum[j])) / float(seg[j])
            q = (p[j] + f * (p[j + 1] - p[j])).tolist()
            idx, w = knn_weights(self.coords_, q, k=k)
            items = [self.atlas.items[i] for i in idx.tolist()]
            seeds, prompts = tuple(int(it["seed"]) for it in items), tuple(str(it["prompt"]) for it in items)
            ws = tuple(round(float(v), 6) for v in w)
            sw, pw = ws, ws
            if lab is not None:
                _, landing = self.generate(lab, q, k=k, candidates=candidates, refine=refine, sampling=sampling)
                how = landing.how
                pw = tuple(round(float(v), 6) for v in how["prompt_weights"])
                if isinstance(how["noise"], int):  # a fresh seed's noise
                    seeds, sw = (how["noise"],), (1.0,)
                elif isinstance(how["noise"], list):  # the items' noise, blended with the search's weights
                    sw = tuple(round(float(v), 6) for v in how["noise"])
            keys.append({"seeds": seeds, "seed_weights": sw, "prompts": prompts, "prompt_weights": pw})
        return keys

    # --- the search ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, lab: Backend, point, *, k: int = 8, candidates: int = 12, refine: int = 2, more: int = 2,
                 seed: int = 0, slack: float = 0.0, sampling=None) -> tuple[torch.Tensor, Landing]:
        """The image (1, 3, H, W) whose own embedding lands nearest ``point`` among the candidates, and its
        :class:`Landing`. ``candidates`` first guesses, then ``refine`` rounds of four more from the local linear
        model (0: none, and no further rounds), then up to ``more`` further rounds while the nearest landing is
        still further from the click than the nearest existing item (a click "show the nearest item" would win);
        every candidate is one image, each round generated as one batch. ``seed`` picks the fresh noise some
        candidates try (recorded in the landing's ``how``). Among the candidates landing within
        ``slack`` (share of the diagonal) of the nearest landing, the one most like the click's neighbourhood in
        the full space is shown; the default 0 shows the nearest landing (on 24 held-out items of a CLIP-PCA map,
        slack 0.01 and 0.03 read the same background and colour as 0 and landed further: no measured gain)."""
        pt = _point(point)
        k = _checks.positive_int(k, "k", minimum=1)
        n = _checks.positive_int(candidates, "candidates", minimum=1)
        refine = _checks.positive_int(refine, "refine", minimum=0)
        more = _checks.positive_int(more, "more", minimum=0)
        slack = _checks.real(slack, "slack", low=0.0)
        idx, cands = self._candidates(pt, k, n, _checks.seed(seed, "seed"))
        tried = self._try(lab, idx, cands, sampling)
        nearest_item = self.nearest_item_distance(pt)
        for r in range(refine + more if refine and len(cands) >= 3 else 0):
            # the same arithmetic as Landing.beats_nearest_item (a < b * D and a / D < b can round apart)
            if r >= refine and float((tried["landed"] - pt).norm(dim=1).min()) / self.diagonal_ < nearest_item:
                break
            new = self._refined(pt, cands, tried)
            if not new:
                break
            extra = self._try(lab, idx, new, sampling)
            cands = cands + new
            tried = {key: torch.cat([tried[key], extra[key]]) for key in tried}
        err = (tried["landed"] - pt).norm(dim=1)
        best = self._pick(pt, idx, err, tried["vectors"], slack)
        cw, nw, label = cands[best]
        how = {"items": idx.tolist(), "prompt_weights": _r(cw),
               "noise": nw if isinstance(nw, int) else "in-plane move" if nw.ndim > 1 else _r(nw),
               "construction": label,
               "seeds": [int(self.atlas.items[i]["seed"]) for i in idx.tolist()]}
        landing = Landing(tuple(map(float, pt)), tuple(map(float, tried["landed"][best])),
                          float(err[best]) / self.diagonal_, nearest_item, len(cands), how)
        return tried["images"][best : best + 1], landing

    def land(self, lab: Backend, noise: torch.Tensor, conditioning: Conditioning | PredictionMix | AttentionMix, *,
             sampling=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate ``(noise, conditioning)`` as one batch and say where each image lands on this map: ``(images
        (n, 3, H, W), map points (n, 2))`` -- each image embedded and projected with the map's own fit."""
        _checks.tensor(noise, "noise", min_ndim=4)
        if not isinstance(conditioning, (Conditioning, PredictionMix, AttentionMix)):
            raise TypeError(f"`conditioning` must be a latentlab Conditioning (lab.encode_prompt(...)), PredictionMix "
                            f"or AttentionMix, got {type(conditioning).__name__}")
        expected = tuple(self.atlas.noise.shape[1:])
        if tuple(noise.shape[1:]) != expected:
            raise ValueError(f"`noise` must have items of this atlas's shape {expected}, got {tuple(noise.shape[1:])}")
        out = self._land(lab, noise, conditioning, sampling)
        return out["images"], out["landed"]

    def _land(self, lab, noise, cond, sampling) -> dict:
        latents = lab.generate(noise, cond, sampling=lab.sampling(sampling), output_type="latent")
        images = lab.decode(latents)
        vectors = self.embed(noise, latents, images)
        return {"images": images, "landed": self.transform(vectors), "vectors": vectors.float()}

    def _try(self, lab, idx, cands, sampling) -> dict:
        return self._land(lab, self._noise(lab, idx, [c[1] for c in cands]),
                          self._conditioning(lab, idx, [c[0] for c in cands]), sampling)

    def _pick(self, pt, idx, err, vectors, slack: float) -> int:
        """The candidate to show: among those that land within ``slack`` (a share of the diagonal) of the nearest
        landing, the one whose full embedding is nearest what the click's neighbourhood holds (the inverse-distance
        mean of the nearest items' embeddings). A 2-D map forgets most of the space, so many different images land
        on one point; this keeps the landing and picks the one that belongs there."""
        from latentlab.project import knn_weights

        ok = err <= err.min() + slack * self.diagonal_
        if int(ok.sum()) == 1 or slack == 0:
            return int(err.argmin())
        _, w = knn_weights(self.coords_, pt.tolist(), k=len(idx))
        target = (w.float()[:, None] * getattr(self.atlas, self.space)[idx].float().flatten(1)).sum(0)
        d = (vectors - target).norm(dim=1)
        d[~ok] = float("inf")
        return int(d.argmin())

    def _refined(self, pt, cands, tried) -> list:
        """One refinement round: the weights a least-squares linear model (from the candidates' conditioning
        weights to where they landed; weights on the simplex, so the model is affine) predicts for the click --
        the least change from the best candidate's weights that the model says lands on the click, clipped to the
        simplex -- with the best candidate's noise and with blended noise, and two steps part of the way."""
        W = torch.stack([c[0] for c in cands])  # (n, k) float64
        Y = tried["landed"].double()  # (n, 2)
        # (k, 2): Y ~ W @ A, the least-norm fit. W is rank-deficient by construction (candidates share weights), and
        # LAPACK's default rank-revealing QR (gelsy) judged its rank differently from call to call on the same input
        # (a flaky map): the SVD pseudo-inverse with an explicit cut-off decides it the same way every time.
        A = torch.linalg.pinv(W, rtol=1e-8) @ Y
        best = int((Y - pt.double()).norm(dim=1).argmin())
        w0 = W[best]
        C = torch.cat([A.T, torch.ones(1, W.shape[1], dtype=torch.float64)])  # (3, k): position and sum(w)
        r = torch.cat([pt.double(), torch.ones(1, dtype=torch.float64)]) - C @ w0
        step = torch.linalg.pinv(C, rtol=1e-8) @ r  # the least change that the model says lands on the click
        out = []
        for a, label in ((1.0, "fitted"), (0.5, "half-way to fitted"), (0.25, "quarter-way to fitted")):
            w = (w0 + a * step).clamp_min(0)
            if float(w.sum()) <= 0:
                continue
            w = w / w.sum()
            out.append((w, cands[best][1], f"{label}, best noise"))
            if a == 1.0:
                out.append((w, w, f"{label}, blended noise"))
        return out


def _point(point) -> torch.Tensor:
    pt = torch.as_tensor(point, dtype=torch.float32).flatten()
    if pt.shape != (2,) or not bool(torch.isfinite(pt).all()):
        raise ValueError(f"`point` must be two finite numbers (x, y), got {point!r}")
    return pt


def _ridge(images: torch.Tensor, texts: torch.Tensor, penalty: float = 1e-3):
    """``(image mean, W, text mean)`` of the centred ridge regression from unit image embeddings to unit text
    embeddings (penalty ``penalty * N``), in float64 for the solve."""
    n = torch.nn.functional.normalize
    x, y = n(images.double().flatten(1), dim=-1), n(texts.double().flatten(1), dim=-1)
    mi, mt = x.mean(0), y.mean(0)
    xc, yc = x - mi, y - mt
    w = torch.linalg.solve(xc.T @ xc + penalty * len(x) * torch.eye(x.shape[1], dtype=torch.float64), xc.T @ yc)
    return mi.float(), w.float(), mt.float()


def _r(w: torch.Tensor) -> list[float]:
    return [round(float(v), 4) for v in w]
