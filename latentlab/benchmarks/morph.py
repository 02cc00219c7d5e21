"""Morph rendering throughput: latentlab's batched, streaming render vs a plain per-frame diffusers loop.

Both render the same N-frame morph (same model, same per-frame latents and prompt embeddings, same steps and
guidance) to an mp4. The baseline is what people write by hand: one ``pipe(...)`` call per frame, frames handed to
imageio-ffmpeg. Each variant runs in its own subprocess so its peak memory (max RSS) is its own; the parent prints
frames/s, the ratio to the baseline and peak memory, and can append a Markdown table (``--markdown``).

    python -m latentlab.benchmarks.morph --frames 192 --threads 2

192 frames by default: at 48 the fastest variants finish in about 4 s and run-to-run noise is a large part of the
ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ("a large red circle on a blue background", "a small yellow star on a black background")


def _settings(n_frames: int):
    from latentlab.morph import Keyframe, MorphSettings

    # batching is measured on one conditioning per frame (the figures in CPU_BATCH_SIZE's note)
    return MorphSettings(keyframes=(Keyframe(PROMPTS[0], 1), Keyframe(PROMPTS[1], 2)), n_frames=n_frames,
                         prompt_interpolation="lerp")


def _variant(name: str, n_frames: int, batch: int | None, out_dir: Path) -> dict:
    import torch

    from latentlab.backend import Lab
    from latentlab.morph import plan, render_morph

    lab = Lab.default()
    settings = _settings(n_frames)
    t0 = time.perf_counter()
    if name == "diffusers-loop":
        import imageio_ffmpeg
        import numpy as np

        p = plan(lab, settings)
        lat, cond = p.inputs(0, n_frames)
        neg = lab.negative_conditioning("")
        pipe = lab.pipe
        w = imageio_ffmpeg.write_frames(str(out_dir / "baseline.mp4"), (64, 64), fps=12, codec="libx264",
                                        pix_fmt_out="yuv420p", macro_block_size=1, ffmpeg_log_level="error")
        w.send(None)
        for i in range(n_frames):
            img = pipe(prompt_embeds=cond.prompt_embeds[i : i + 1], negative_prompt_embeds=neg.prompt_embeds,
                       latents=lat[i : i + 1], num_inference_steps=lab.defaults.num_inference_steps,
                       guidance_scale=lab.defaults.guidance_scale, output_type="np").images[0]
            w.send(np.ascontiguousarray((img * 255).round().astype("uint8")))
        w.close()
    else:
        render_morph(lab, settings, out_dir / f"latentlab-{batch}.mp4", batch_size=batch, progress=False)
    seconds = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": name, "batch": batch, "frames": n_frames, "seconds": seconds, "fps": n_frames / seconds,
            "peak_rss_mib": peak_kib / 1024, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentlab.benchmarks.morph", description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=192)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32],
                   help="latentlab compute batch sizes to try (Lab.batch_size)")
    p.add_argument("--markdown", type=Path, help="append the results as a Markdown table to this file")
    p.add_argument("--_variant", help=argparse.SUPPRESS)
    p.add_argument("--_batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._variant:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(_variant(args._variant, args.frames, args._batch, args._out)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("diffusers-loop", None)] + [("latentlab", b) for b in args.batches]
        for name, batch in runs:
            cmd = [sys.executable, "-m", "latentlab.benchmarks.morph", "--frames", str(args.frames), "--threads",
                   str(args.threads), "--_variant", name, "--_out", tmp]
            if batch:
                cmd += ["--_batch", str(batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(out))
            r = results[-1]
            print(f"{name:>15} batch={batch!s:>4}: {r['fps']:7.2f} frames/s  ({r['seconds']:.1f} s)  "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    base = results[0]["fps"]
    print(f"\nratio to the per-frame diffusers loop ({args.frames} frames, {args.threads} threads):")
    for r in results[1:]:
        print(f"  latentlab batch={r['batch']}: {r['fps'] / base:.2f}x")
    if args.markdown:
        import torch

        lines = [(f"\n### Morph render, {args.frames} frames, embedded model, {args.threads} CPU threads "
                  f"({platform.processor() or platform.machine()}, torch {torch.__version__})\n"),
                 "| variant | compute batch | frames/s | ratio | peak RSS (MiB) |", "| --- | --- | --- | --- | --- |"]
        for r in results:
            lines.append(f"| {r['variant']} | {r['batch'] or 1} | {r['fps']:.2f} | {r['fps'] / base:.2f}x | "
                         f"{r['peak_rss_mib']:.0f} |")
        with args.markdown.open("a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
