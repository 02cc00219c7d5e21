"""The ``latentlab`` command line: a thin layer over the library (nothing in latentlab imports it).

Exit codes: 0 success, 1 a render failed, 2 bad usage or bad input (reported before any model work),
3 the embedded model or another required resource is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import latentlab
from latentlab import embedded

EXIT_FAILED, EXIT_USAGE, EXIT_MISSING = 1, 2, 3

MORPH_EXAMPLES = """examples:
  latentlab morph "a large red circle on a blue background" "a small yellow star on a black background" -o morph.mp4
  latentlab morph "a red star" --seeds 1 2 3 4 --loop --frames 96 -o walk.gif     # a looping seed walk
  latentlab morph "a red ring" "a green cross" --seeds 7 --noise-easing smoothstep --upscale 8 -o m.mp4
  latentlab morph "a cat" "a dog" --model runwayml/stable-diffusion-v1-5 --steps 25 -o cat-dog.mp4   # on a GPU
"""


def _cmd_info(args: argparse.Namespace) -> int:
    print(f"latentlab {latentlab.__version__}")
    if embedded.is_available():
        print(f"embedded default model: {embedded.model_path()}")
    else:
        print("embedded default model: not trained yet")
    return 0


def _settings_from_args(args: argparse.Namespace):
    from latentlab.morph import Keyframe, MorphSettings, frames_for_duration

    prompts, seeds = list(args.prompts), list(args.seeds or [])
    n = max(len(prompts), len(seeds))
    if len(prompts) > 1 and len(seeds) > 1 and len(prompts) != len(seeds):
        raise ValueError(f"give one prompt, one seed, or as many seeds as prompts: got {len(prompts)} prompts and "
                         f"{len(seeds)} seeds")
    if n < 2:
        raise ValueError("a morph needs two keyframes: give two prompts, or one prompt and two --seeds")
    keys = tuple(
        Keyframe(prompt=prompts[i] if i < len(prompts) else None, seed=seeds[i] if i < len(seeds) else None)
        for i in range(n)
    )
    n_frames = frames_for_duration(args.seconds, args.fps) if args.seconds else args.frames
    return MorphSettings(
        keyframes=keys, n_frames=n_frames, fps=args.fps, loop=args.loop,
        noise_interpolation=args.noise_interp, noise_easing=args.noise_easing,
        prompt_interpolation=args.prompt_interp, prompt_easing=args.prompt_easing,
        num_inference_steps=args.steps, guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
    )


def _load_lab(model: str | None):
    from latentlab.backend import Lab

    return Lab.default() if model is None else Lab.from_pretrained(model)


def _cmd_morph(args: argparse.Namespace) -> int:
    from latentlab.morph import manifest_path, render_morph

    out = Path(args.output)
    try:
        settings = _settings_from_args(args)
        if out.suffix.lower() not in (".mp4", ".gif"):
            raise ValueError(f"--output must end in .mp4 or .gif, got {out.name!r}")
        for p in (out, manifest_path(out)):
            if p.exists() and not args.overwrite:
                raise FileExistsError(f"{p} exists; pass --overwrite to replace it")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"the folder of --output does not exist: {out.parent}")
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as e:
        print(f"latentlab morph: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.model is None and not embedded.is_available():
        print("latentlab: the embedded default model is not trained yet, so there is nothing to render a morph "
              "with.\nIt is built by `python -m latentlab.embedded.train` (see latentlab/embedded/MODEL_CARD.md).",
              file=sys.stderr)
        return EXIT_MISSING
    lab = _load_lab(args.model)
    upscale = args.upscale if args.upscale is not None else (4 if args.model is None else 1)
    try:
        render_morph(lab, settings, out, batch_size=args.batch_size, upscale=upscale, overwrite=args.overwrite)
    except (ValueError, TypeError) as e:
        print(f"latentlab morph: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {out} ({settings.n_frames} frames at {settings.fps:g} fps) and {manifest_path(out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from latentlab.paths import EASINGS, METHODS

    p = argparse.ArgumentParser(prog="latentlab", description="Explore the latent space of diffusion models.")
    p.add_argument("--version", action="version", version=f"latentlab {latentlab.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions and where the embedded model is")
    info.set_defaults(func=_cmd_info)
    m = sub.add_parser("morph", help="render a morph (or seed walk) video between keyframes",
                       description="Render a morph between keyframe prompts and/or seeds to mp4 or gif, with a "
                                   "JSON manifest beside it that can re-create any frame.",
                       epilog=MORPH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("prompts", nargs="*", help="keyframe prompts (one prompt + several --seeds is a seed walk)")
    m.add_argument("--seeds", type=int, nargs="+", help="keyframe seeds (default 0; missing ones carry over)")
    m.add_argument("-o", "--output", default="morph.mp4", help="output .mp4 or .gif (default: %(default)s)")
    m.add_argument("--frames", type=int, default=48, help="exact number of frames (default: %(default)s)")
    m.add_argument("--seconds", type=float, help="duration instead of --frames: frames = round(seconds * fps)")
    m.add_argument("--fps", type=float, default=12.0, help="frames per second (default: %(default)s)")
    m.add_argument("--loop", action="store_true", help="return to the first keyframe (seamless loop)")
    m.add_argument("--noise-interp", choices=METHODS, default="slerp", help="noise path (default: %(default)s)")
    m.add_argument("--noise-easing", choices=EASINGS, default="linear")
    m.add_argument("--prompt-interp", choices=METHODS, default="lerp", help="prompt path (default: %(default)s)")
    m.add_argument("--prompt-easing", choices=EASINGS, default="linear")
    m.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    m.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    m.add_argument("--negative-prompt")
    m.add_argument("--batch-size", type=int, default=16, help="frames denoised together (default: %(default)s)")
    m.add_argument("--upscale", type=int, help="integer upscaling of frames (default: 4 for the embedded model)")
    m.add_argument("--model", help="diffusers model id or folder (default: the embedded model)")
    m.add_argument("--overwrite", action="store_true", help="replace existing output files")
    m.set_defaults(func=_cmd_morph)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
