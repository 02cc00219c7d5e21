"""Interactive latency: the time from a slider move to a new image, as the widgets generate it.

One image on the embedded model with the model's default sampling (20 DDIM steps, guidance 4), warm (model loaded,
prompt encoded, first call done), measured two ways in the same process: at compute batch 1 (what the widgets do)
and at the CPU default compute batch (16, padded: what a single image cost before the backend contract). Prints
the median of ``--repeats`` and the ratio; threads are pinned and reported.

    python -m latentlab.benchmarks.latency --threads 2 --repeats 15
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentlab.benchmarks.latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--markdown", help="append a Markdown table to this file")
    args = p.parse_args(argv)
    import torch

    import latentlab as ll

    torch.set_num_threads(args.threads)
    lab = ll.Lab.default()
    s = lab.sampling(num_inference_steps=args.steps)
    cond = lab.encode_prompt("a large red star on a blue background")
    rows = []
    for name, batch in (("padded to the CPU compute batch (16)", None), ("compute batch 1 (widgets)", 1)):
        lab.generate(lab.noise(0), cond, sampling=s, batch_size=batch)  # warm
        times = []
        for seed in range(1, args.repeats + 1):
            t0 = time.perf_counter()
            lab.generate(lab.noise(seed), cond, sampling=s, batch_size=batch)
            times.append(time.perf_counter() - t0)
        rows.append((name, statistics.median(times), min(times), max(times)))
    base = rows[0][1]
    print(f"one image, {s.num_inference_steps} steps, guidance {s.guidance_scale:g}, {args.threads} threads:")
    for name, med, lo, hi in rows:
        print(f"  {name}: median {med * 1000:.0f} ms (min {lo * 1000:.0f}, max {hi * 1000:.0f}), "
              f"{base / med:.2f}x faster than padded")
    if args.markdown:
        lines = [(f"\n### Interactive latency: one image, embedded model, {s.num_inference_steps} DDIM steps, "
                  f"guidance {s.guidance_scale:g}, {args.threads} CPU threads ({platform.machine()}, torch "
                  f"{torch.__version__}), median of {args.repeats}\n"),
                 "| how | median (ms) | min (ms) | max (ms) | speed-up vs padded |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {n} | {m * 1000:.0f} | {lo * 1000:.0f} | {hi * 1000:.0f} | {base / m:.2f}x |"
                  for n, m, lo, hi in rows]
        with open(args.markdown, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
