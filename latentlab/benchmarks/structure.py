"""How much of the shapes world's structure 2-D projections recover (issue #6): k-NN accuracy of the known attributes
in PCA and UMAP projections of CLIP image embeddings, final latents and (as a control) the initial noise, with
trustworthiness. Not a timing benchmark: a measurement on the embedded model, with chance levels beside it.

    python -m latentlab.benchmarks.structure --prompts 64 --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import random

from latentlab.embedded import evaluate, world

#: k-NN chance levels: the evaluator's, plus size.
CHANCE = {k: evaluate.CHANCE[k] for k in ("colour", "background", "shape", "size")}


def measure(n_prompts: int, seeds: list[int]) -> dict[str, dict[str, float]]:
    import latentlab as ll
    from latentlab.atlas import build_atlas
    from latentlab.project import PCA, UMAP, knn_accuracy, trustworthiness

    lab = ll.Lab.default()
    prompts = random.Random(0).sample(world.held_out_prompts(), n_prompts)
    attrs = {world.caption(*p): world.attributes(p) for p in prompts}
    atlas = build_atlas(lab, list(attrs), seeds, attributes=attrs, progress=False)
    res = {}
    for space in ("image_embeds", "latents", "noise"):
        x = getattr(atlas, space).flatten(1)
        for name, proj in (("PCA", PCA(2)), ("UMAP", UMAP(n_neighbors=15, random_state=0))):
            e = proj.fit_transform(x)
            r = {k: knn_accuracy(e, atlas.labels(k)) for k in CHANCE}
            r["trustworthiness"] = trustworthiness(x, e)
            res[f"{space} / {name}"] = r
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentlab.benchmarks.structure", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts (of 256)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    res = measure(args.prompts, args.seeds)
    print("| space / projection | " + " | ".join(CHANCE) + " | trustworthiness |")
    print("| --- " * (len(CHANCE) + 2) + "|")
    print("| chance | " + " | ".join(f"{v:.0%}" for v in CHANCE.values()) + " | – |")
    for k, r in res.items():
        print(f"| {k} | " + " | ".join(f"{r[a]:.0%}" for a in CHANCE) + f" | {r['trustworthiness']:.2f} |")


if __name__ == "__main__":
    main()
