"""The explainer widgets and the toy lab, measured: how soon the timestep scrubber shows a new prompt, how fast a
scrub is once decoded, and how long the toy lab's two models take to train.

- **scrubber on screen**: from a new prompt (the slider at step 0) to the x_t / x0 pair on screen -- drawn as soon
  as the trajectory reaches the slider's step; **every step ready**: the whole trajectory computed (one call at
  compute batch 1) and the slider's pair drawn; medians over ``--repeats`` new prompts, per model; against the
  naive explainer in the same run (the same trajectory, then every step's images decoded before anything is shown);
- **scrub**: one step change once the images are decoded (a lookup), steps per second;
- **toy lab**: training both 2-D models (3,000 steps each, batch 256) on one thread.

Threads are pinned and reported; a busy machine slows everything, which is why the ratios are printed.

    python -m latentlab.benchmarks.explainers --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

PROMPTS = ["a large red star on a blue background", "a small green ring on a black background",
           "a medium yellow square on a purple background", "a large white cross on a red background",
           "a small blue triangle on a white background", "a medium orange circle on a green background"]


def _scrubber(lab, repeats: int, steps: int | None) -> dict:
    import torch

    from latentlab.widgets import TimestepScrubber

    s = lab.sampling(num_inference_steps=steps)
    w = TimestepScrubber(lab, PROMPTS[0], 0, sampling=s)
    w.wait()
    ready, done, naive, lookups = [], [], [], []
    for i in range(repeats):
        w.step.value = 0
        w.wait()
        w.ready_seconds = w.done_seconds = None
        w.prompt.value = PROMPTS[(i + 1) % len(PROMPTS)] + " " * (i // len(PROMPTS))  # a new prompt each time
        while w.done_seconds is None:  # set when the new trajectory is complete (None while it runs)
            time.sleep(0.002)
        ready.append(w.ready_seconds)
        done.append(w.done_seconds)
        w.wait()
        t0 = time.perf_counter()
        for k in range(w.runs[0].n + 1):
            w.step.value = k
            w.wait()
        lookups.append((w.runs[0].n + 1) / (time.perf_counter() - t0))
        # naive: the same trajectory, then all images decoded before the first is shown
        t0 = time.perf_counter()
        cond = lab.encode_prompt(PROMPTS[(i + 1) % len(PROMPTS)] + " naive" * (i + 1))
        traj = lab.trajectory(lab.noise(i), cond, sampling=s, batch_size=1)
        n = traj.latents.shape[0]
        lab.decode(torch.cat([lab.noise(i), traj.latents[:, 0], traj.x0[:, 0], traj.latents[-1:, 0]]),
                   batch_size=2 * (n + 1))
        naive.append(time.perf_counter() - t0)
    return {"steps": s.num_inference_steps, "ready": statistics.median(ready), "done": statistics.median(done),
            "naive": statistics.median(naive), "lookups": statistics.median(lookups)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentlab.benchmarks.explainers",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, help="denoising steps (default: each model's)")
    p.add_argument("--toy-steps", type=int, default=3000)
    p.add_argument("--models", nargs="+", default=["embedded-shapes", "embedded-shapes-flow"])
    p.add_argument("--markdown", help="append a Markdown table to this file")
    args = p.parse_args(argv)
    import torch

    import latentlab as ll
    from latentlab import toy2d

    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        r = _scrubber(ll.Lab.default(name), args.repeats, args.steps)
        rows.append((name, r))
        print(f"scrubber on {name} ({r['steps']} steps, {args.threads} threads): on screen in {r['ready']:.2f} s, "
              f"every step ready in {r['done']:.2f} s (naive, everything decoded first: {r['naive']:.2f} s; on "
              f"screen {r['naive'] / r['ready']:.1f}x sooner), scrub {r['lookups']:.0f} steps/s once decoded")
    torch.set_num_threads(1)
    data = toy2d.sample("moons", 4096, seed=0)
    t0 = time.perf_counter()
    for kind in toy2d.KINDS:
        toy2d.train(data, kind, steps=args.toy_steps, seed=0)
    toy = time.perf_counter() - t0
    print(f"toy lab: both 2-D models, {args.toy_steps} steps each, trained in {toy:.1f} s on 1 thread")
    if args.markdown:
        lines = [(f"\n### Explainers: scrubber and toy lab ({args.threads} CPU threads for the scrubber, 1 for the toy "
                  f"lab; {platform.machine()}, torch {torch.__version__}), median of {args.repeats}\n"),
                 ("| model | steps | on screen (s) | every step ready (s) | naive: all decoded first (s) | on screen "
                  "sooner | scrub (steps/s) |"), "|" + " --- |" * 7]
        lines += [f"| {n} | {r['steps']} | {r['ready']:.2f} | {r['done']:.2f} | {r['naive']:.2f} | "
                  f"{r['naive'] / r['ready']:.1f}x | {r['lookups']:.0f} |" for n, r in rows]
        lines.append(f"\nToy lab: both 2-D models, {args.toy_steps} steps each: {toy:.1f} s on one thread.")
        with open(args.markdown, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
