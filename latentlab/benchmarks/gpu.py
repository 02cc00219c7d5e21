"""The GPU path, measured: a 20-step CFG morph on a Stable Diffusion 1.5-architecture pipeline with random weights.

No download: the pipeline is built from SD 1.5's configs (UNet 860 M parameters, VAE, a 12-layer CLIP text encoder)
with random weights, which time exactly like trained ones. The same frames are rendered twice in one process:

- **latentlab**: :func:`~latentlab.morph.render_morph` (batched denoising, streaming mp4), with the opt-in
  ``--compile`` / ``--channels-last`` of :meth:`Lab.optimize`;
- **baseline**: a plain per-frame diffusers loop, ``pipe(prompt_embeds=..., latents=...)`` once per frame (no video
  encoding, which favours the baseline).

FLOPs of one frame are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and
attention of the UNet at CFG batch 2 for every step, and the VAE decode); achieved TFLOP/s is FLOPs x frames/s and
model FLOP utilisation (MFU) divides it by the device's dense fp16/bf16 peak from :data:`PEAK_TFLOPS` (named by the
CUDA device; ``--peak-tflops`` overrides). At 512x512 a frame is about 34 TFLOP, so an H100/H200 (989 TFLOP/s dense
bf16) cannot exceed ~29 frames/s.

    python -m latentlab.benchmarks.gpu                          # on a GPU: SD 1.5 size, 512x512, 32 frames
    python -m latentlab.benchmarks.gpu --size tiny --frames 4   # the CPU smoke run CI does (seconds)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

#: Dense (no sparsity) fp16/bf16 tensor-core peak in TFLOP/s, by a substring of ``torch.cuda.get_device_name``.
PEAK_TFLOPS = {
    "H200": 989.4, "H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0, "GH200": 989.4,
    "B200": 2250.0, "A100": 312.0, "L40S": 362.1, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
    "RTX 4090": 165.2, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0,
}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # most specific first ("H100 SXM" before "H100")
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def build_pipeline(size: str, device: torch.device, dtype: torch.dtype):
    """An SD 1.5-architecture ``StableDiffusionPipeline`` (``size="sd15"``) or a miniature of it (``"tiny"``),
    random weights (seeded), the embedded model's CLIP tokenizer (same BPE vocabulary as SD's)."""
    from latentlab._quiet import quiet_transformers_image_processor_warning

    quiet_transformers_image_processor_warning()
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from latentlab import embedded

    torch.manual_seed(0)
    if size == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                                            projection_dim=768, hidden_act="quick_gelu"))
    elif size == "tiny":
        unet = UNet2DConditionModel(sample_size=8, cross_attention_dim=32, attention_head_dim=4,
                                    block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        vae = AutoencoderKL(block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=64, norm_num_groups=8)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=77, vocab_size=49408,
                                            projection_dim=32))
    else:
        raise ValueError(f"`size` must be 'sd15' or 'tiny', got {size!r}")
    vae.register_to_config(scaling_factor=0.18215)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    tok = CLIPTokenizer.from_pretrained(embedded.model_path() / "tokenizer")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" -- there are none
    try:
        pipe.to(device, dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def frame_flops(lab, latents, cond, sampling) -> int:
    """FLOPs of generating one frame (denoising loop with CFG + VAE decode), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    lab.negative_conditioning(sampling.negative_prompt)  # encoded once per render (cached), not per frame
    counter = FlopCounterMode(display=False)
    with counter:
        lab.generate(latents[:1], cond[:1], sampling=sampling, batch_size=1)
    return counter.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(*, size: str = "sd15", frames: int = 32, steps: int = 20, guidance: float = 7.5, batch: int | None = None,
        compile: bool = False, channels_last: bool = False, dtype: str | None = None,
        peak: float | None = None) -> dict:
    from latentlab.backend import Lab
    from latentlab.morph import Keyframe, MorphSettings, plan, render_morph
    from latentlab.sampling import Sampling

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        dtype or ("fp16" if device.type == "cuda" else "fp32")]
    pipe = build_pipeline(size, device, dt)
    lab = Lab(pipe=pipe, model_id=f"{size}-architecture-random-weights")
    lab.optimize(channels_last=channels_last, compile=compile)
    sampling = lab.sampling(Sampling(num_inference_steps=steps, guidance_scale=guidance))
    # one conditioning per frame, as the plain pipeline it is compared with takes (prediction mixing doubles both)
    settings = MorphSettings(keyframes=(Keyframe("a photo of a cat", 1), Keyframe("a photo of a dog", 2)),
                             n_frames=frames, sampling=sampling, prompt_interpolation="lerp")
    p = plan(lab, settings)
    lat, cond = p.inputs(0, frames)
    flops = frame_flops(lab, lat, cond, sampling)
    neg = lab.negative_conditioning("")

    # Warm-up (kernels, allocator, compilation) on both paths, untimed.
    lab.generate(lat[: lab.compute_batch(batch) or frames], cond[: lab.compute_batch(batch) or frames],
                 sampling=sampling, batch_size=batch)
    pipe(prompt_embeds=cond.prompt_embeds[:1], negative_prompt_embeds=neg.prompt_embeds, latents=lat[:1],
         num_inference_steps=steps, guidance_scale=guidance, output_type="np")

    _sync(device)
    t0 = time.perf_counter()
    for i in range(frames):
        pipe(prompt_embeds=cond.prompt_embeds[i : i + 1], negative_prompt_embeds=neg.prompt_embeds,
             latents=lat[i : i + 1], num_inference_steps=steps, guidance_scale=guidance, output_type="np")
    _sync(device)
    loop_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        _sync(device)
        t0 = time.perf_counter()
        render_morph(lab, settings, Path(tmp) / "m.mp4", batch_size=batch, progress=False)
        _sync(device)
        render_s = time.perf_counter() - t0

    peak = peak or peak_tflops(device)
    fps_ll, fps_loop = frames / render_s, frames / loop_s
    achieved = flops * fps_ll / 1e12
    cpu = platform.processor() or platform.machine()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu})",
        "torch_threads": torch.get_num_threads(), "size": size, "dtype": str(dt).replace("torch.", ""),
        "resolution": lab.default_size()[0], "frames": frames, "steps": steps, "guidance_scale": guidance,
        "compute_batch": lab.compute_batch(batch), "optimizations": lab.provenance().get("optimizations", []),
        "tflop_per_frame": flops / 1e12,
        "latentlab_frames_per_s": fps_ll, "loop_frames_per_s": fps_loop, "speedup_vs_loop": fps_ll / fps_loop,
        "achieved_tflops": achieved, "loop_achieved_tflops": flops * fps_loop / 1e12,
        "peak_tflops": peak, "mfu": achieved / peak if peak else None,
        "loop_mfu": flops * fps_loop / 1e12 / peak if peak else None,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m latentlab.benchmarks.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("sd15", "tiny"), default="sd15")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch", type=int, help="compute batch (default: the backend's: all at once on a GPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (Lab.optimize)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--dtype", choices=("fp16", "bf16", "fp32"))
    ap.add_argument("--peak-tflops", type=float, help="the device's dense peak, when it is not in the table")
    ap.add_argument("--threads", type=int, help="torch threads on CPU (reported either way)")
    ap.add_argument("--json", type=Path, help="also write the result as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(size=args.size, frames=args.frames, steps=args.steps, guidance=args.guidance, batch=args.batch,
            compile=args.compile, channels_last=args.channels_last, dtype=args.dtype, peak=args.peak_tflops)
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (no peak known for this device)"
    loop_mfu = f"{r['loop_mfu']:.1%}" if r["loop_mfu"] is not None else "n/a"
    print(f"device: {r['device']} ({r['dtype']}, {r['torch_threads']} torch threads); {r['size']} at "
          f"{r['resolution']}x{r['resolution']}, {r['frames']} frames x {r['steps']} steps, CFG {r['guidance_scale']}")
    print(f"FLOPs per frame: {r['tflop_per_frame'] * 1e3:.4g} GFLOP (torch flop counter)")
    print(f"latentlab render : {r['latentlab_frames_per_s']:8.3f} frames/s  {r['achieved_tflops']:8.2f} TFLOP/s  "
          f"MFU {mfu}  (compute batch {r['compute_batch']}, optimizations {r['optimizations'] or 'none'})")
    print(f"per-frame loop   : {r['loop_frames_per_s']:8.3f} frames/s  {r['loop_achieved_tflops']:8.2f} TFLOP/s  "
          f"MFU {loop_mfu}")
    print(f"ratio latentlab / per-frame loop: {r['speedup_vs_loop']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
