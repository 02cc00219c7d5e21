"""How faithful the generative map is: does the image made for a click land where the user clicked?

An atlas of held-out prompts of the embedded world (not the demos' prompts), ``--prompts`` x ``--seeds`` items, is
mapped with PCA and UMAP of CLIP image embeddings and of final latents. For each map:

- **clicks**: ``--clicks`` seeded random points of the map's bounding box. The image made for each is embedded and
  projected with the same fitted map; reported: the median landing error (share of the map's diagonal) and the share
  of clicks where the image landed nearer the click than the nearest existing item -- for the plain inverse-distance
  blend of the nearest items (the explorer's former click, the baseline) and for :meth:`AtlasMap.generate`.
- **held out**: 10 % of the items are left out of the map's fit; an image is generated at each left-out item's map
  position and read by the evaluator: colour, background and shape right (as the left-out item's prompt says)?
- **path**: a straight stroke between two items' positions, keyframes along it, a morph rendered through the usual
  plan: the mean distance of its frames' projections from the stroke (share of the diagonal).

    python -m latentlab.benchmarks.map_fidelity --clicks 50 --threads 1 --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def _atlas(lab, n_prompts: int, seeds: list[int], seed: int):
    import torch

    from latentlab.atlas import build_atlas
    from latentlab.embedded import world

    g = torch.Generator().manual_seed(seed)
    held = world.held_out_prompts()
    chosen = [held[i] for i in torch.randperm(len(held), generator=g)[:n_prompts].tolist()]
    captions = [world.caption(*p) for p in chosen]
    attrs = {c: world.attributes(p) for c, p in zip(captions, chosen)}
    return build_atlas(lab, captions, seeds, attributes=attrs, progress=False)


def _subset(atlas, idx):
    from latentlab.atlas import Atlas

    return Atlas(atlas.noise[idx], atlas.latents[idx], atlas.image_embeds[idx], atlas.prompt_embeds[idx],
                 atlas.thumbnails[idx], [atlas.items[i] for i in idx], atlas.provenance)


def _landing_of(m, lab, noise, cond, point) -> float:
    """Where a plain generation of (noise, cond) lands, as an error share of the diagonal."""
    import torch

    _, landed = m.land(lab, noise, cond)
    return float((landed[0] - torch.as_tensor(point, dtype=torch.float32)).norm()) / m.diagonal_


def click_points(m, n: int, *, seed: int):
    """``n`` seeded random points of the map's bounding box (the clicks every measure here shares)."""
    import torch

    lo, hi = m.coords_.min(0).values, m.coords_.max(0).values
    return lo + (hi - lo) * torch.rand(n, 2, generator=torch.Generator().manual_seed(seed))


def clicks(lab, m, n: int, *, seed: int, candidates: int, refine: int, more: int = 0) -> dict:

    pts = click_points(m, n, seed=seed)
    base, search, near = [], [], []
    t0 = time.perf_counter()
    for p in pts.tolist():
        z, c, _ = m.blend_inputs(lab, p)
        base.append(_landing_of(m, lab, z, c, p))
    t_base = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in pts.tolist():
        _, landing = m.generate(lab, p, candidates=candidates, refine=refine, more=more)
        search.append(landing.error)
        near.append(landing.nearest_item)
    t_search = time.perf_counter() - t0
    return {"clicks": n,
            "baseline": {"median_error": statistics.median(base),
                         "beats_nearest": sum(b < q for b, q in zip(base, near)) / n, "seconds": t_base},
            "search": {"median_error": statistics.median(search),
                       "beats_nearest": sum(s < q for s, q in zip(search, near)) / n, "seconds": t_search}}


def reachable(m, n: int, *, seed: int, neighbours: int = 6, weights: int = 11) -> dict:
    """A bound without generation: for the same clicks as :func:`clicks`, the nearest landing that *any* vector
    mixing two of the click's ``neighbours`` nearest items' vectors (``weights`` steps from one to the other;
    re-normalised on the unit-norm CLIP spaces) gets from the map's own ``transform``. A click no such vector
    reaches is one no generated image is likely to reach either: on a UMAP map, whose out-of-sample transform pulls
    new points towards their neighbours' clusters, that is the space between clusters."""
    import torch

    pts = click_points(m, n, seed=seed)
    x = getattr(m.atlas, m.space).float().flatten(1)
    unit = m.space in ("image_embeds", "prompt_embeds")
    w = torch.linspace(0, 1, weights)
    best = []
    for p in pts:
        nn = (m.coords_ - p).norm(dim=1).argsort()[:neighbours].tolist()
        mixes = torch.cat([(1 - w)[:, None] * x[i] + w[:, None] * x[j] for i in nn for j in nn if i < j])
        if unit:
            mixes = torch.nn.functional.normalize(mixes, dim=-1)
        best.append(float((m.transform(mixes) - p).norm(dim=1).min()) / m.diagonal_)
    return {"clicks": n, "median_error": statistics.median(best),
            "share_within_0.05": sum(b <= 0.05 for b in best) / n}


def held_out(lab, atlas, space: str, method: str, *, share: float, seed: int, candidates: int, refine: int,
             more: int = 0) -> dict:
    import torch

    from latentlab.atlas import AtlasMap
    from latentlab.embedded import evaluate

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(atlas), generator=g).tolist()
    k = max(1, round(share * len(atlas)))
    out_idx, in_idx = sorted(perm[:k]), sorted(perm[k:])
    m = AtlasMap(_subset(atlas, in_idx), space=space, method=method)
    pts = m.transform(getattr(atlas, space)[out_idx].float())
    images = torch.cat([m.generate(lab, p.tolist(), candidates=candidates, refine=refine, more=more)[0] for p in pts])
    read = evaluate.attributes(images, evaluate.shape_classifier())
    truth = [{key: atlas.items[i][key] for key in ("background", "colour", "shape")} for i in out_idx]
    return {"held_out": k, **{key: sum(r[key] == t[key] for r, t in zip(read, truth)) / k
                              for key in ("background", "colour", "shape")}}


def path(lab, m, *, frames: int, keyframes: int, faithful: bool) -> dict:

    from latentlab.morph import Keyframe, Mix, MorphSettings, plan

    c = m.coords_
    i, j = int(c[:, 0].argmin()), int(c[:, 0].argmax())  # across the whole map
    stroke = [c[i].tolist(), c[j].tolist()]
    keys = tuple(Keyframe(mix=Mix(**b)) for b in m.path_blends(stroke, keyframes, lab=lab if faithful else None))
    settings = MorphSettings(keyframes=keys, n_frames=frames)
    p = plan(lab, settings)
    lat0, cond = p.inputs(0, frames)
    landed = m.land(lab, lat0, cond)[1].double()
    a, b = c[i].double(), c[j].double()
    ab = b - a
    s = ((landed - a) @ ab / (ab @ ab)).clamp(0, 1)
    d = (landed - (a + s[:, None] * ab)).norm(dim=1) / m.diagonal_
    return {"frames": frames, "keyframes": keyframes, "mean_distance": float(d.mean()), "max_distance": float(d.max())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentlab.benchmarks.map_fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13, 14])
    p.add_argument("--clicks", type=int, default=50)
    p.add_argument("--spaces", nargs="+", default=["image_embeds", "latents"])
    p.add_argument("--methods", nargs="+", default=["pca", "umap"])
    p.add_argument("--candidates", type=int, default=12)
    p.add_argument("--refine", type=int, default=2)
    p.add_argument("--more", type=int, default=2, help="further rounds while a click loses to the nearest item")
    p.add_argument("--held-out", type=float, default=0.1)
    p.add_argument("--path-frames", type=int, default=24)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    import torch

    from latentlab.atlas import AtlasMap
    from latentlab.backend import Lab

    torch.set_num_threads(args.threads)
    lab = Lab.default()
    atlas = _atlas(lab, args.prompts, args.seeds, args.seed)
    results = {}
    for space in args.spaces:
        for method in args.methods:
            t0 = time.perf_counter()
            m = AtlasMap(atlas, space=space, method=method)
            r = {}
            if args.clicks:
                r["reachable"] = reachable(m, args.clicks, seed=args.seed + 1)
                r["clicks"] = clicks(lab, m, args.clicks, seed=args.seed + 1, candidates=args.candidates,
                                     refine=args.refine, more=args.more)
            if args.held_out > 0:
                r["held_out"] = held_out(lab, atlas, space, method, share=args.held_out, seed=args.seed + 2,
                                         candidates=args.candidates, refine=args.refine, more=args.more)
            if args.path_frames:
                r["path"] = {"blend": path(lab, m, frames=args.path_frames, keyframes=5, faithful=False),
                             "search": path(lab, m, frames=args.path_frames, keyframes=5, faithful=True)}
            r["seconds"] = time.perf_counter() - t0
            results[f"{space}/{method}"] = r
            print(json.dumps({f"{space}/{method}": r}), flush=True)
    lines = [(f"### Generative map fidelity: atlas of {args.prompts} held-out prompts x {len(args.seeds)} seeds, "
             f"{args.clicks} seeded random clicks per map, {args.candidates} candidates + {args.refine} refinement "
             f"rounds (+ up to {args.more} while a click loses to the nearest item), embedded model, "
             f"{args.threads} CPU thread(s) ({platform.processor() or platform.machine()}, torch {torch.__version__})"),
             "",
             ("| map | median landing error, blend → search (share of diagonal) | clicks nearer than the nearest item, "
             "blend → search | held-out items regenerated: background / colour / shape | path: mean distance of "
             "frames from the stroke | s per click, blend → search | reachable by any mix of two neighbours' "
             "vectors: median error (share ≤ 0.05) |"),
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        c = r.get("clicks")
        h = r.get("held_out")
        held = f"{h['background']:.0%} / {h['colour']:.0%} / {h['shape']:.0%} (n={h['held_out']})" if h else "—"
        pa = (f"{r['path']['blend']['mean_distance']:.3f} → {r['path']['search']['mean_distance']:.3f}"
              if "path" in r else "—")
        b = r.get("reachable")
        bound = f"{b['median_error']:.3f} ({b['share_within_0.05']:.0%})" if b else "—"
        if c:
            lines.append(f"| {name} | {c['baseline']['median_error']:.3f} → {c['search']['median_error']:.3f} | "
                         f"{c['baseline']['beats_nearest']:.0%} → {c['search']['beats_nearest']:.0%} | {held} | {pa} | "
                         f"{c['baseline']['seconds'] / c['clicks']:.2f} → {c['search']['seconds'] / c['clicks']:.2f} | "
                         f"{bound} |")
        else:
            lines.append(f"| {name} | — | — | {held} | {pa} | — | {bound} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2) + "\n")
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
