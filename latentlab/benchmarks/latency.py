"""Interactive latency: the time from a slider move to a new image, as the widgets generate it.

Two measurements in the same process, threads pinned and reported:

- **previews**: one image end to end (prompt encoded -- a new prompt every time, so the text encoder runs --,
  denoised, decoded) at compute batch 1, for the full model (``embedded-shapes``, its 20 DDIM steps at guidance 4)
  and the few-step model (``embedded-shapes-fast`` at 1, 2 and 4 steps, no guidance branch), each two ways,
  interleaved: ``generate(..., batch_size=1)`` (the pipeline call) and ``generate_live`` as the widgets call it
  (the full model's final image exact; the few-step model's preview with ``preview=True``, decoded by its preview
  decoder, and at 2 steps also by the VAE's decoder): previews per second, p50 and p95, the speed-up over the full
  model's ``generate`` and of ``generate_live`` over ``generate``;
- **scrub a render**: the Interpolator's "render frame" slider over a finished morph, back and forth (a lookup of
  the frames the video encoder received);
- **compute batch**: the full model's image at compute batch 1 against the CPU default compute batch (16, padded:
  what a single image cost before the backend contract).

    python -m latentlab.benchmarks.latency --threads 2 --repeats 40
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _spelling(prompt: str, variant: int) -> str:
    """``prompt`` spelt so that no other measurement of the run has encoded it (the Lab caches encodings by text;
    trailing spaces change the cache key, not the tokens)."""
    return prompt + " " * variant


def _previews(lab, sampling, prompts, repeats: int, *, preview: bool, run: int) -> tuple[list[float], list[float]]:
    """Seconds per image of ``generate(batch_size=1)`` and of ``generate_live``, interleaved; every request encodes
    a prompt the lab has not seen: each variant of each ``run`` on the same lab gets its own spelling."""
    def plain(z, p):
        return lab.generate(z, lab.encode_prompt(p), sampling=sampling, batch_size=1)

    def live(z, p):
        return lab.generate_live(z, lab.encode_prompt(p), sampling=sampling, preview=preview)

    plain(lab.noise(0), prompts[0])  # warm (the live path traces its UNet here)
    live(lab.noise(0), prompts[0])
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats):
        prompt = prompts[1 + i % (len(prompts) - 1)]
        for k, fn in enumerate((plain, live)):
            t0 = time.perf_counter()
            fn(lab.noise(i + 1), _spelling(prompt, 2 * run + k + 1))
            times[k].append(time.perf_counter() - t0)
    return times


def _breakdown(lab, sampling, prompts, repeats: int, *, run: int) -> dict[str, float]:
    """Median ms of a preview's parts, each timed alone: a new prompt encoded, the latent denoised, decoded (by the
    VAE, and by the lab's preview decoder if it has one)."""
    lab.generate(lab.noise(0), lab.encode_prompt(prompts[0]), sampling=sampling, batch_size=1)  # warm
    parts: dict[str, list[float]] = {"encode prompt": [], "denoise": [], "decode (VAE)": []}
    decoder = lab.preview_decoder
    if decoder is not None:  # the preview's own decode: the live generator's (traced, bfloat16 where native) copy
        from latentlab.backend.live import LiveGenerator, preview_decode_dtype

        preview = LiveGenerator(lab, trace=True, decoder=decoder, decode_dtype=preview_decode_dtype(lab, decoder))
        preview._decode(lab.noise(0))  # warm (made and traced once)
        parts[f"decode (preview decoder, {type(decoder).__name__})"] = []
    for i in range(repeats):
        t0 = time.perf_counter()
        cond = lab.encode_prompt(_spelling(prompts[1 + i % (len(prompts) - 1)], 2 * run + 1))  # not cached
        t1 = time.perf_counter()
        z = lab.generate(lab.noise(i + 1), cond, sampling=sampling, batch_size=1, output_type="latent")
        t2 = time.perf_counter()
        lab.decode(z, batch_size=1)
        t3 = time.perf_counter()
        times = [t1 - t0, t2 - t1, t3 - t2]
        if decoder is not None:
            preview._decode(z)
            times.append(time.perf_counter() - t3)
        for name, dt in zip(parts, times):
            parts[name].append(dt)
    return {name: statistics.median(ts) * 1000 for name, ts in parts.items()}


def _scrub_render(lab, sampling, n_frames: int) -> float:
    """Render a morph in the Interpolator, then scrub its frames back and forth: frames shown per second."""
    import tempfile

    from latentlab.widgets import Interpolator

    with tempfile.TemporaryDirectory() as tmp:
        w = Interpolator(lab, ("a large red star on a blue background", 1), ("a small green ring on a black background",
                                                                           2), clip=None, sampling=sampling,
                         output_dir=tmp, preview=None)
        w.video_frames.value = n_frames
        w.render_video()
        w.wait()
        order = list(range(n_frames)) + list(range(n_frames - 1, -1, -1))
        order = order * max(1, 400 // len(order))
        t0 = time.perf_counter()
        for k in order:
            w.scrub.value = k
        return len(order) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentlab.benchmarks.latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--steps", type=int, help="the full model's denoising steps (default: its 20; smoke tests: fewer)")
    p.add_argument("--scrub-frames", type=int, default=48, help="frames of the render scrubbed back and forth")
    p.add_argument("--markdown", help="append Markdown tables to this file")
    args = p.parse_args(argv)
    import torch

    import latentlab as ll
    from latentlab import embedded
    from latentlab.embedded import world

    torch.set_num_threads(args.threads)
    # distinct prompts, so every preview runs the text encoder (the Lab caches a prompt's conditioning)
    prompts = [world.caption(*q) for q in world.all_prompts()][: args.repeats + 1]
    full = ll.Lab.default()
    s = full.sampling(num_inference_steps=args.steps)
    rows = [("embedded-shapes", s, "generate_live",
             _previews(full, s, prompts, args.repeats, preview=False, run=0))]
    if embedded.is_available("embedded-shapes-fast"):
        fast = ll.Lab.default("embedded-shapes-fast")
        for run, k in enumerate((1, 2, 4)):
            s = fast.sampling(num_inference_steps=k)
            rows.append(("embedded-shapes-fast", s, "generate_live(preview=True)",
                         _previews(fast, s, prompts, args.repeats, preview=True, run=run)))
            if k == 2 and fast.preview_decoder is not None:  # the same preview with the VAE's decoder, for the ratio
                vae = ll.Lab.default("embedded-shapes-fast").set_preview_decoder(None)
                rows.append(("embedded-shapes-fast", s, "generate_live(preview=True), the VAE's decoder",
                             _previews(vae, s, prompts, args.repeats, preview=True, run=run)))
    base = statistics.median(rows[0][3][0])
    print(f"previews: one image end to end (new prompt, denoise, decode) at compute batch 1, {args.threads} threads, "
          f"{args.repeats} repeats each way, interleaved:")
    table = []
    for name, s, live_name, (plain, live) in rows:
        for how, times in (("generate(batch_size=1)", plain), (live_name, live)):
            med, p95 = statistics.median(times), _percentile(times, 0.95)
            gain = statistics.median(plain) / med
            table.append((name, s.num_inference_steps, s.guidance_scale, how, 1 / med, med, p95, base / med, gain))
            print(f"  {name}, {s.num_inference_steps} steps, guidance {s.guidance_scale:g}, {how}: "
                  f"{1 / med:.1f} images/s, p50 {med * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, "
                  f"{base / med:.1f}x the full model's generate, {gain:.2f}x generate")

    parts = {}
    if len(rows) > 1:  # the few-step model loaded above
        parts = _breakdown(fast, fast.sampling(num_inference_steps=2), prompts, args.repeats, run=3)
        print("where a 2-step preview's time goes (each part timed alone, median): "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items()))

    scrub = _scrub_render(full, full.sampling(num_inference_steps=args.steps), args.scrub_frames)
    print(f"scrubbing a finished {args.scrub_frames}-frame render back and forth (a lookup of its own frames): "
          f"{scrub:.0f} frames/s, {scrub * statistics.median(rows[0][3][1]):.0f}x the full model's live rate")

    s = full.sampling(num_inference_steps=args.steps)
    cond = full.encode_prompt(prompts[0])
    batch_rows = []
    for name, batch in (("padded to the CPU compute batch (16)", None), ("compute batch 1 (widgets)", 1)):
        full.generate(full.noise(0), cond, sampling=s, batch_size=batch)  # warm
        times = []
        for seed in range(1, min(args.repeats, 15) + 1):
            t0 = time.perf_counter()
            full.generate(full.noise(seed), cond, sampling=s, batch_size=batch)
            times.append(time.perf_counter() - t0)
        batch_rows.append((name, statistics.median(times), min(times), max(times)))
    padded = batch_rows[0][1]
    print(f"compute batch: one image, full model, {args.threads} threads:")
    for name, med, lo, hi in batch_rows:
        print(f"  {name}: median {med * 1000:.0f} ms (min {lo * 1000:.0f}, max {hi * 1000:.0f}), "
              f"{padded / med:.2f}x faster than padded")
    if args.markdown:
        env = f"{args.threads} CPU threads ({platform.machine()}, torch {torch.__version__})"
        lines = [f"\n### Previews: one image end to end at compute batch 1, {env}, {args.repeats} repeats\n",
                 "| model | steps | guidance | how | images/s | p50 (ms) | p95 (ms) | speed-up vs full | vs generate |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {n} | {k} | {g:g} | {h} | {r:.1f} | {m * 1000:.1f} | {q * 1000:.1f} | {x:.1f}x | {y:.2f}x |"
                  for n, k, g, h, r, m, q, x, y in table]
        if parts:
            lines += [("\nWhere a 2-step preview's time goes (embedded-shapes-fast, each part timed alone, median; a "
                      "preview decodes with one of the two decoders):\n"), "| part | ms |", "| --- | --- |"]
            lines += [f"| {k} | {v:.1f} |" for k, v in parts.items()]
        lines += [(f"\nScrubbing a finished {args.scrub_frames}-frame render in the Interpolator (the frames the video "
                  f"encoder received, bit for bit): {scrub:.0f} frames/s ({env}).\n")]
        lines += [(f"\n### Interactive latency: one image, embedded model, {s.num_inference_steps} DDIM steps, "
                  f"guidance {s.guidance_scale:g}, {env}\n"),
                  "| how | median (ms) | min (ms) | max (ms) | speed-up vs padded |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {n} | {m * 1000:.0f} | {lo * 1000:.0f} | {hi * 1000:.0f} | {padded / m:.2f}x |"
                  for n, m, lo, hi in batch_rows]
        with open(args.markdown, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
