"""Morph quality of every interpolation mode, side by side, on held-out prompt pairs of the embedded world.

Each mode renders the same morphs through latentlab's own morph code path (``MorphSettings`` -> ``plan`` ->
``Lab.generate``, what ``render_morph`` encodes): ``--pairs`` pairs of held-out prompts that differ in one
attribute (background, colour, shape, size taking turns; ``--differ any`` for random pairs), pair ``k`` at seed
``k``, ``--frames`` frames each. Per mode it reports the literature's path measures (:mod:`latentlab.metrics`:
PPL, PDV, smoothness 1 - Gini, the largest frame-to-frame change over the mean one) with two distances, RMS pixels
and the embedded CLIP image encoder's ``1 - cos``, and what only a synthetic world can read
(:func:`latentlab.embedded.evaluate.read_morph`): clean in-betweens, monotonic attribute change, endpoint fidelity.
The first mode (the default) is the baseline of the PDV and PPL ratios.

    python -m latentlab.benchmarks.morph_modes --pairs 100 --frames 17 --threads 1 --markdown BENCHMARKS.md

Seeded and deterministic for a given thread count; the threads used are printed and recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

#: name -> MorphSettings overrides. The first is the default morph (the baseline of the ratios).
MODES: dict[str, dict] = {
    "default": {},
    "prompt lerp (the default before attention)": {"prompt_interpolation": "lerp"},
    "prediction mix": {"prompt_interpolation": "mix"},
    "attention (AID fused)": {"prompt_interpolation": "attention"},
    "attention + pacing even (pixels)": {"prompt_interpolation": "attention", "pacing": "even"},
    "attention + pacing even, 2 refinement rounds (pixels)": {"prompt_interpolation": "attention", "pacing": "even",
                                                              "pacing_refine": 2},
    "prompt slerp": {"prompt_interpolation": "slerp"},
    "smoothstep easing": {"prompt_easing": "smoothstep", "noise_easing": "smoothstep"},
    "pacing even (pixels)": {"pacing": "even"},
    "pacing even (CLIP)": {"pacing": "even", "_distance": "clip"},
}


def _settings(a: str, b: str, seed: int, frames: int, overrides: dict):
    from latentlab.morph import Keyframe, MorphSettings

    kw = {k: v for k, v in overrides.items() if not k.startswith("_")}
    return MorphSettings(keyframes=(Keyframe(a, seed), Keyframe(b)), n_frames=frames, **kw)


def measure(lab, modes: dict[str, dict], pairs: list, *, frames: int = 17, clip=None, shape_net=None,
            progress: bool = True) -> dict[str, dict]:
    """Per mode: mean path measures (pixels and CLIP), clean/monotonic/endpoint shares and the seconds taken."""
    import torch
    from tqdm.auto import tqdm

    from latentlab.embedded import evaluate, world
    from latentlab.metrics import consecutive_distances, distance_variance, jump_ratio, path_length, smoothness
    from latentlab.morph import clip_distance, plan

    clip_d = clip_distance(clip) if clip is not None else None
    shape_net = shape_net or evaluate.shape_classifier()
    out = {}
    for name, overrides in modes.items():
        t0 = time.perf_counter()
        rows = []
        for k, (a, b, attr) in enumerate(tqdm(pairs, desc=name, disable=not progress)):
            s = _settings(world.caption(*a), world.caption(*b), k, frames, overrides)
            distance = clip_d if overrides.get("_distance") == "clip" else None
            p = plan(lab, s, distance=distance)
            lat, cond = p.inputs(0, frames)
            with torch.no_grad():
                images = lab.generate(lat, cond, sampling=lab.sampling(s.sampling)).float().cpu()
            row = {"attribute": attr, **evaluate.read_morph(images, a, b, shape_net)}
            for label, dist in (("pixels", None), ("clip", clip_d)):
                if label == "clip" and dist is None:
                    continue
                d = consecutive_distances(images, distance=dist)
                row[label] = {"ppl": path_length(d), "pdv": distance_variance(d), "smoothness": smoothness(d),
                              "jump": jump_ratio(d)}
            rows.append(row)
        out[name] = summarise(rows) | {"seconds": time.perf_counter() - t0}
    return out


def summarise(rows: list[dict]) -> dict:
    """Shares and means over the morphs of one mode."""
    clean = [c for r in rows for c in r["clean"]]
    res = {
        "morphs": len(rows),
        "clean": sum(clean) / max(1, len(clean)),
        "clean_morphs": sum(all(r["clean"]) for r in rows) / len(rows),
        "monotonic": sum(all(r["monotonic"].values()) for r in rows) / len(rows),
        "endpoints": sum(e for r in rows for e in r["endpoints"]) / (2 * len(rows)),
        "clean_by_attribute": {},
    }
    for attr in sorted({r["attribute"] for r in rows}):
        c = [x for r in rows if r["attribute"] == attr for x in r["clean"]]
        res["clean_by_attribute"][attr] = sum(c) / max(1, len(c))
    for label in ("pixels", "clip"):
        if label not in rows[0]:
            continue
        vals = [r[label] for r in rows]
        res[label] = {
            "ppl": statistics.fmean(v["ppl"] for v in vals),
            "pdv": statistics.fmean(v["pdv"] for v in vals),
            "smoothness": statistics.fmean(v["smoothness"] for v in vals),
            "jump_median": statistics.median(v["jump"] for v in vals),
            "jump_at_most_1_5": sum(v["jump"] <= 1.5 for v in vals) / len(vals),
        }
    return res


def table(results: dict[str, dict], *, title: str) -> str:
    """A Markdown table; PDV and PPL as ratios to the first mode (the default) measured in the same run."""
    base = next(iter(results.values()))
    lines = [title, "",
             ("| mode | clean in-betweens | monotonic morphs | endpoints right | 1 - Gini (pixels / CLIP) | "
             "max ÷ mean change, median (pixels) | morphs with max ≤ 1.5× mean | PDV vs default (pixels / CLIP) | "
             "PPL vs default (pixels / CLIP) | seconds |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        px = r["pixels"]

        def both(fn, r=r):
            return " / ".join(fn(r, label) for label in ("pixels", "clip") if label in r)

        def ratio(r, label, key):
            b = base[label][key]
            return f"{r[label][key] / b - 1:+.0%}" if b else "n/a"

        lines.append(
            f"| {name} | {r['clean']:.1%} | {r['monotonic']:.1%} | {r['endpoints']:.1%} | "
            f"{both(lambda r, lb: format(r[lb]['smoothness'], '.3f'))} | {px['jump_median']:.2f} | "
            f"{px['jump_at_most_1_5']:.0%} | {both(lambda r, lb: ratio(r, lb, 'pdv'))} | "
            f"{both(lambda r, lb: ratio(r, lb, 'ppl'))} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentlab.benchmarks.morph_modes", description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--differ", choices=["one", "any"], default="one",
                   help="pairs that differ in one attribute (default) or random held-out pairs")
    p.add_argument("--modes", nargs="+", choices=list(MODES), help="a subset of the modes (default: all)")
    p.add_argument("--model", default="embedded-shapes", help="an embedded model name or a diffusers folder")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0, help="seed of the pair draw")
    p.add_argument("--no-clip", action="store_true", help="pixels only (skip the CLIP distance)")
    p.add_argument("--json", type=Path, help="write the raw results here")
    p.add_argument("--markdown", type=Path, help="append the table to this file")
    args = p.parse_args(argv)
    import torch

    from latentlab.backend import Lab
    from latentlab.clip import CLIP
    from latentlab.embedded import evaluate, world

    torch.set_num_threads(args.threads)
    lab = Lab.from_pretrained(args.model)
    if args.differ == "one":
        pairs = evaluate.one_attribute_pairs(args.pairs, seed=args.seed)
    else:
        g = torch.Generator().manual_seed(args.seed)
        held = world.held_out_prompts()
        pairs = [(held[i], held[j], "any") for i, j in torch.randint(len(held), (args.pairs, 2), generator=g).tolist()]
    modes = {m: MODES[m] for m in (args.modes or MODES)}
    if args.modes and "default" not in args.modes:
        modes = {"default": MODES["default"], **modes}
    clip = None if args.no_clip else CLIP.default()
    results = measure(lab, modes, pairs, frames=args.frames, clip=clip)
    title = (f"### Morph modes: {args.pairs} held-out prompt pairs ({'one attribute apart' if args.differ == 'one' else 'random'}) "
             f"x {args.frames} frames, {args.model}, {lab.defaults.num_inference_steps} steps, guidance "
             f"{lab.defaults.guidance_scale:g}, {args.threads} CPU thread(s) "
             f"({platform.processor() or platform.machine()}, torch {torch.__version__})")
    text = table(results, title=title)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json), "markdown": str(args.markdown)},
                                         "results": results}, indent=2, default=str) + "\n")
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
