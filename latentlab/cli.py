"""The ``latentlab`` command line: a thin layer over the library (nothing in latentlab imports it).

Exit codes: 0 success, 1 a render failed, 2 bad usage or bad input (reported before any model work),
3 the embedded model or another required resource is missing.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

import latentlab
from latentlab import distributed, embedded

EXIT_FAILED, EXIT_USAGE, EXIT_MISSING = 1, 2, 3

MORPH_EXAMPLES = """examples:
  latentlab morph "a large red circle on a blue background" "a small yellow star on a black background" -o morph.mp4
  latentlab morph "a red star" "a blue ring" --pacing even -o even.mp4     # frames change by about the same amount
  latentlab morph "a red ring" "a green cross" --seeds 7 --noise-easing smoothstep --upscale 8 -o m.mp4
  latentlab morph "a large red ring on a white background" "a large blue star on a white background" \
      --images ring.png none -o from-image.mp4                           # start from an image (DDIM inversion)
  latentlab morph "a cat" "a dog" --model runwayml/stable-diffusion-v1-5 --steps 25 -o cat-dog.mp4   # on a GPU
A killed render resumes when run again (finished frames are cached beside the output until it completes).
"""

WALK_EXAMPLES = """examples:
  latentlab walk "a large red star on a blue background" --seeds 1 2 3 4 --frames 96 -o walk.mp4
  latentlab walk "a small green ring on a white background" --seeds 5 6 --seconds 6 -o walk.gif
A walk is a seamless loop through the seeds' noise at a fixed prompt (a C1-smooth spherical spline by default).
"""

GRID_EXAMPLES = """examples:
  latentlab grid "a large red star on a blue background" "a large red ring on a blue background" --seeds 1 2 3 4 -o grid.png
Rows are prompts, columns are seeds; a JSON manifest is written beside the image.
"""

FRAME_EXAMPLES = """examples:
  latentlab frame morph.mp4.json 12 -o frame12.png
  latentlab frame morph.mp4.json 0 --upscale 8 -o first.png
Re-creates one frame of a rendered video from its manifest (same model, seeds, path positions and settings).
"""


class _Exit(Exception):
    """A CLI failure: one line on stderr and an exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


#: Input errors: reported before any model work with exit code 2.
_INPUT_ERRORS = (ValueError, TypeError, FileExistsError, FileNotFoundError, IsADirectoryError, PermissionError,
                 NotADirectoryError)


def _embedded_name(model: str | None) -> str | None:
    """The embedded model ``--model`` names (None: the default one), or None for any other model."""
    if model is None:
        return embedded.DEFAULT
    return None if Path(model).exists() else embedded.resolve(model)


def _embedded_missing(model: str | None) -> None:
    name = _embedded_name(model)
    if name is not None and not embedded.is_available(name):
        try:
            embedded.model_path(name)
        except FileNotFoundError as e:
            raise _Exit(EXIT_MISSING, f"nothing to render with: {e}") from None


def _model_facts(model: str | None) -> dict | None:
    """A local model's family, native image size and size factor from its config files (no weights loaded)."""
    from latentlab.backend.families import folder_facts

    name = _embedded_name(model)
    if name is not None:
        return folder_facts(embedded.model_path(name)) if embedded.is_available(name) else None
    return folder_facts(Path(model))


def _frame_size(args: argparse.Namespace) -> tuple[int, int] | None:
    """The size of the frames this command will render, checked against the model's size factor before it loads:
    ``--height``/``--width`` (each defaulting to the model's native size), or the native size."""
    from latentlab.backend.engine import check_size

    facts = _model_facts(args.model)
    native = facts["size"] if facts and facts["size"] else None
    h = args.height if args.height is not None else (native[0] if native else None)
    w = args.width if args.width is not None else (native[1] if native else None)
    for name, v in (("--height", args.height), ("--width", args.width)):
        if v is not None and (isinstance(v, bool) or v <= 0):
            raise ValueError(f"{name} must be a positive number of pixels, got {v}")
    if facts is not None and (args.height is not None or args.width is not None):
        try:
            check_size(h or facts["size_multiple"], w or facts["size_multiple"], facts["size_multiple"])
        except ValueError as e:
            raise ValueError(f"{str(e).replace('`height`', '--height').replace('`width`', '--width')} "
                             f"(this {facts['family']} model's images are multiples of {facts['size_multiple']})"
                             ) from None
    return (h, w) if h is not None and w is not None else None


def _cmd_info(args: argparse.Namespace) -> int:
    import os
    import platform

    import torch

    from latentlab.store import versions

    v = versions()
    for name in ("latentlab", "torch", "diffusers", "transformers", "python"):
        print(f"{name}: {v.get(name, 'not installed')}")
    print(f"platform: {platform.platform()}")
    mps = getattr(torch.backends, "mps", None)
    cuda = torch.cuda.is_available()
    print(f"CUDA available: {cuda}" + (f" ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})" if cuda else ""))
    print(f"MPS available: {bool(mps and mps.is_available())}")
    device = "cuda" if cuda else "cpu"
    print(f"default device: {device}; default dtype: {'torch.float16' if cuda else 'torch.float32'}")
    print(f"torch threads: {torch.get_num_threads()} (of {os.cpu_count()} CPUs; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')})")
    from latentlab.backend.families import onnx_unet

    print("ONNX Runtime (--onnx): " + (f"{onnx_unet.version()}; exports cached in {onnx_unet.cache_folder()}"
                                       if onnx_unet.available() else 'not installed (pip install "latentlab[onnx]")'))
    from latentlab.backend.families import FAMILIES

    print("model families: " + "; ".join(f"{f.family} ({', '.join(p for p in f.pipelines if 'Img2Img' not in p)})"
                                         for f in FAMILIES))
    for name in embedded.NAMES:
        where = embedded.model_path(name) if embedded.is_available(name) else "not trained yet"
        print(f"embedded model {name}{' (default)' if name == embedded.DEFAULT else ''}: {where}")
    if embedded.is_available() and args.fingerprint:
        from latentlab.backend import Lab

        print(f"embedded model fingerprint: {Lab.default().provenance()['model_fingerprint']}")
    return 0


def _sampling_from_args(args: argparse.Namespace):
    from latentlab.sampling import Sampling

    return Sampling(num_inference_steps=args.steps, guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
                    scheduler=args.scheduler)


def _settings_from_args(args: argparse.Namespace):
    from latentlab import _checks
    from latentlab.morph import Keyframe, MorphSettings, frames_for_duration

    prompts, seeds = list(args.prompts), list(args.seeds or [])
    for sd in seeds:
        _checks.seed(sd, "--seeds")
    if args.command == "walk":
        if len(prompts) != 1 or len(seeds) < 2:
            raise ValueError(f"a walk needs one prompt and at least two --seeds, got {len(prompts)} prompt(s) and "
                             f"{len(seeds)} seed(s)")
        args.loop = True
        args.noise_interp = args.noise_interp or ("spline" if len(seeds) > 2 else "slerp")
    n = max(len(prompts), len(seeds))
    if len(prompts) > 1 and len(seeds) > 1 and len(prompts) != len(seeds):
        raise ValueError(f"give one prompt, one seed, or as many seeds as prompts: got {len(prompts)} prompts and "
                         f"{len(seeds)} seeds")
    if n < 2:
        raise ValueError("a morph needs two keyframes: give two prompts, or one prompt and two --seeds")
    images = list(args.images or []) if args.command == "morph" else []
    if images and len(images) != n:
        raise ValueError(f"--images must give one image (or 'none') per keyframe: {n} keyframes, got {len(images)}")
    images = [None if im is None or im.lower() == "none" else im for im in images] or [None] * n
    keys = tuple(
        Keyframe(prompt=prompts[i] if i < len(prompts) else None, seed=seeds[i] if i < len(seeds) else None,
                 image=images[i])
        for i in range(n)
    )
    if args.seconds is not None and args.frames is not None:
        raise ValueError("give --frames or --seconds, not both")
    track = None
    if args.audio is not None:
        from latentlab.morph.music import analyse

        # With no --seconds/--frames the video lasts as long as the selected audio.
        track, n_frames = analyse(args.audio, fps=args.fps, offset=args.audio_offset, seconds=args.seconds,
                                  n_frames=args.frames, pacing=args.audio_pacing)
    elif args.audio_offset or args.audio_pacing != "envelope":
        raise ValueError("--audio-offset and --audio-pacing need --audio FILE")
    elif args.seconds is not None:
        n_frames = frames_for_duration(args.seconds, args.fps)
    else:
        n_frames = args.frames if args.frames is not None else (96 if args.command == "walk" else 48)
    return MorphSettings(
        keyframes=keys, n_frames=n_frames, fps=args.fps, loop=args.loop,
        noise_interpolation=args.noise_interp, noise_easing=args.noise_easing,
        prompt_interpolation=args.prompt_interp, prompt_easing=args.prompt_easing,
        sampling=_sampling_from_args(args), pacing=args.pacing, height=args.height, width=args.width,
        keyframe_times=None if args.at is None else tuple(args.at), audio=track,
    )


def _load_lab(model: str | None):
    from latentlab.backend import Lab

    try:
        return Lab.default() if model is None else Lab.from_pretrained(model)
    except (FileNotFoundError, OSError, TypeError) as e:
        raise _Exit(EXIT_MISSING, str(e)) from None


def _lab_for_manifest(data: dict, model: str | None):
    """The model a manifest names (the embedded one by its name), or ``model`` instead when given; on ONNX Runtime
    when the manifest's render ran on it (and it is installed)."""
    model = model or (None if data["model"] == "latentlab/embedded-shapes" else data["model"])
    _embedded_missing(model)
    lab = _load_lab(model)
    if any(o.startswith("onnxruntime") for o in data.get("backend", {}).get("optimizations", [])):
        from latentlab.backend.families import onnx_unet as onnx

        if onnx.available():
            lab.optimize(onnx=True)
    return lab


def _check_onnx(args: argparse.Namespace) -> None:
    """``--onnx`` needs ONNX Runtime: say so before any model work."""
    if getattr(args, "onnx", False):
        from latentlab.backend.families import onnx_unet as onnx

        if not onnx.available():
            raise _Exit(EXIT_MISSING, '--onnx needs ONNX Runtime: pip install "latentlab[onnx]"')


def _cmd_morph(args: argparse.Namespace) -> int:
    """``morph`` and ``walk``: keyframes -> video + manifest."""
    from latentlab.morph import check_render, manifest_path, render_morph

    out = Path(args.output)
    settings = _settings_from_args(args)
    upscale = args.upscale if args.upscale is not None else (4 if _embedded_name(args.model) else 1)
    if args.pacing_clip is not None:
        if args.pacing != "even":
            raise ValueError("--pacing-clip measures the change for --pacing even; add --pacing even")
        clip = Path(args.pacing_clip).expanduser()
        looks_local = clip.exists() or args.pacing_clip.startswith((".", "/", "~")) or args.pacing_clip.count("/") > 1
        if args.pacing_clip != "embedded" and looks_local:
            from latentlab.clip import check_clip_folder

            check_clip_folder(clip, "--pacing-clip")
    _embedded_missing(args.model)
    check_render(settings, out, overwrite=args.overwrite, upscale=upscale, batch_size=args.batch_size,
                 frame_size=_frame_size(args))
    _check_onnx(args)
    lab = _load_lab(args.model)
    if getattr(args, "onnx", False):
        lab.optimize(onnx=True)
    distance = None
    if args.pacing == "even" and args.pacing_clip:
        from latentlab.clip import CLIP
        from latentlab.morph import clip_distance

        distance = clip_distance(CLIP.default() if args.pacing_clip == "embedded"
                                 else CLIP.from_pretrained(args.pacing_clip))
    try:
        render_morph(lab, settings, out, batch_size=args.batch_size, upscale=upscale, overwrite=args.overwrite,
                     distance=distance, keep_cache=args.keep_cache, workers=args.workers)
    except KeyboardInterrupt:
        raise _Exit(EXIT_FAILED, "interrupted; run the same command again to resume") from None
    if not distributed.ranks().is_main:
        return 0  # rank 0 wrote the video and says so
    print(f"wrote {out} ({settings.n_frames} frames at {settings.fps:g} fps) and {manifest_path(out)}")
    return 0


def _cmd_grid(args: argparse.Namespace) -> int:
    from latentlab import _checks
    from latentlab._files import check_output
    from latentlab.morph import manifest_path
    from latentlab.morph.manifest import write_manifest
    from latentlab.store import versions
    from latentlab.video import IMAGE_FORMATS, image_grid, write_image

    out = Path(args.output)
    if not args.prompts:
        raise ValueError("give at least one prompt")
    seeds = list(args.seeds or [0])
    for s in seeds:
        if not 0 <= s < 2**64:
            raise ValueError(f"--seeds must be in [0, 2**64), got {s}")
    sampling = _sampling_from_args(args)
    from latentlab.sampling import check_prompt

    for i, p in enumerate(args.prompts):
        check_prompt(p, f"prompt {i + 1}")
    upscale = args.upscale if args.upscale is not None else (2 if _embedded_name(args.model) else 1)
    _checks.positive_int(upscale, "--upscale")
    if args.batch_size is not None:
        _checks.positive_int(args.batch_size, "--batch-size")
    check_output(out, "--output", overwrite=args.overwrite, suffixes=IMAGE_FORMATS)
    man = manifest_path(out)
    if man.exists() and not args.overwrite:
        raise FileExistsError(f"{man} exists; pass --overwrite to replace it")
    size = _frame_size(args)
    if size is not None:
        h = (size[0] + 2) * len(args.prompts) * upscale
        w = (size[1] + 2) * len(seeds) * upscale
        if max(h, w) > 32768:
            raise ValueError(f"the grid would be {w}x{h} pixels (~{3 * h * w / 2**30:.1f} GiB): use fewer "
                             "prompts/seeds or a smaller --upscale")
    _embedded_missing(args.model)
    lab = _load_lab(args.model)
    s = lab.sampling(sampling)
    prompts = [p for p in args.prompts for _ in seeds]
    z = lab.noise([sd for _ in args.prompts for sd in seeds], height=args.height, width=args.width)
    cond = lab.encode_prompt(prompts)
    r = distributed.ranks()  # under a launcher, each process generates its share and rank 0 writes the grid
    # A compute batch larger than the grid would only pad every call with copies: bounded by what the work needs.
    batch = None if args.batch_size is None else min(args.batch_size, len(prompts))
    images = r.map_blocks(lambda idx: lab.generate(z[idx], cond[idx], sampling=s, batch_size=batch),
                          len(prompts), block=r.block(len(prompts), lab.compute_batch(batch) or len(prompts)))
    with r.together(failed=f"rank 0 could not write {out}"):  # the other ranks wait for it, then all leave
        if not r.is_main:
            return 0
        write_image(out, image_grid(images, len(seeds)), upscale=upscale, overwrite=args.overwrite)
        write_manifest(man, {
            "image": out.name, "model": lab.model_id, "rows_prompts": list(args.prompts), "columns_seeds": seeds,
            "height": z.shape[2] * lab.vae_scale_factor, "width": z.shape[3] * lab.vae_scale_factor,
            "sampling": s.to_dict(), "backend": lab.provenance(batch), "upscale": upscale,
            "versions": versions(),
        })
    print(f"wrote {out} ({len(args.prompts)} prompts x {len(seeds)} seeds) and {man}")
    return 0


def _cmd_frame(args: argparse.Namespace) -> int:
    from latentlab import _checks
    from latentlab._files import check_output
    from latentlab.morph import read_manifest, render_frame
    from latentlab.video import IMAGE_FORMATS, write_image

    out = Path(args.output)
    data = read_manifest(args.manifest)
    n = data["settings"]["n_frames"]
    if not 0 <= args.index < n:
        raise ValueError(f"INDEX must be in [0, {n}), got {args.index}")
    check_output(out, "--output", overwrite=args.overwrite, suffixes=IMAGE_FORMATS)
    upscale = args.upscale if args.upscale is not None else data.get("upscale", 1)
    if args.upscale is None and (isinstance(upscale, bool) or not isinstance(upscale, int) or upscale < 1):
        raise ValueError(f"{args.manifest} has an invalid `upscale` ({upscale!r}); give --upscale")
    _checks.positive_int(upscale, "--upscale")
    lab = _lab_for_manifest(data, args.model)
    image = render_frame(lab, data, args.index)
    write_image(out, image, upscale=upscale, overwrite=args.overwrite)
    print(f"wrote {out} (frame {args.index} of {data['video']})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """``export``: a rendered morph's per-frame noise and conditioning for ComfyUI, its keyframes for Deforum."""
    from latentlab import exports
    from latentlab._files import check_output
    from latentlab.backend import AttentionMix, PredictionMix
    from latentlab.morph import manifest_settings, plan, read_manifest
    from latentlab.sampling import Sampling

    data = read_manifest(args.manifest)
    folder = Path(args.output)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--output must be a folder, got the file {folder}")
    names = {"noise": folder / "noise.latent", "cond": folder / "conditioning.safetensors",
             "deforum": folder / "deforum.json"}
    for path in names.values():
        if path.exists():
            check_output(path, "--output", overwrite=args.overwrite)
    settings = manifest_settings(data)
    lab = _lab_for_manifest(data, None)
    folder.mkdir(parents=True, exist_ok=True)
    p = plan(lab, settings, frames=data["frames"])
    lat, cond = p.inputs(0, settings.n_frames)
    exports.write_comfyui_latent(lab.comfyui_latents(lat), names["noise"], scaling_factor=lab.vae_scaling_factor,
                                 shift_factor=lab.vae_shift_factor,
                                 overwrite=args.overwrite)
    wrote = [names["noise"]]
    if isinstance(cond, (PredictionMix, AttentionMix)):
        how = ("mixes two prompts' predictions in every frame (prompt interpolation 'mix')"
               if isinstance(cond, PredictionMix) else
               "shares every text attention between two prompts (prompt interpolation 'attention')")
        print(f"{names['cond'].name} not written: this morph {how}, which no single conditioning per frame "
              "reproduces; render with --prompt-interp lerp for one", file=sys.stderr)
    else:
        exports.write_comfyui_conditioning(cond, names["cond"], overwrite=args.overwrite)
        wrote.append(names["cond"])
    if all(k.image is None and k.mix is None for k in settings.keyframes):
        exports.write_deforum_schedule(settings, names["deforum"], sampling=Sampling.from_dict(data["sampling"]),
                                       overwrite=args.overwrite)
        wrote.append(names["deforum"])
    print(f"wrote {', '.join(str(w) for w in wrote)} ({settings.n_frames} frames)")
    return 0


def _workers_arg(text: str):
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {text!r}")
    return n


def _render_options(m: argparse.ArgumentParser, *, walk: bool = False) -> None:
    from latentlab.morph import PACINGS
    from latentlab.morph.settings import AUDIO_PACINGS, PROMPT_METHODS
    from latentlab.paths import EASINGS, METHODS

    m.add_argument("-o", "--output", default="walk.mp4" if walk else "morph.mp4",
                   help="output .mp4 or .gif (default: %(default)s)")
    m.add_argument("--frames", type=int, help=f"exact number of frames (default: {96 if walk else 48})")
    m.add_argument("--seconds", type=float, help="duration instead of --frames: frames = round(seconds * fps)")
    m.add_argument("--fps", type=float, default=12.0, help="frames per second, 0.01 to 240 (default: %(default)s)")
    if not walk:
        m.add_argument("--loop", action="store_true", help="return to the first keyframe (seamless loop)")
    m.add_argument("--noise-interp", choices=METHODS, default=None if walk else "slerp",
                   help="noise path (default: " + ("spline for 3+ seeds, else slerp)" if walk else "%(default)s)"))
    m.add_argument("--noise-easing", choices=EASINGS, default="linear")
    m.add_argument("--prompt-interp", choices=PROMPT_METHODS, default="auto",
                   help="prompt path (default: %(default)s: 'attention' for SD-family UNet models, else 'lerp'): "
                        "lerp/slerp interpolate the prompt encodings; 'mix' "
                        "denoises every frame with both keyframes' prompts and mixes the predictions (fewer third "
                        "colours or shapes between prompts one attribute apart, about twice the work); 'attention' "
                        "lets every text attention see both prompts' tokens, shared by the frame's weight (AID; "
                        "SD 1.x/2.x, SDXL at the cost of lerp; SD3 and Flux.1, whose text tokens run through every "
                        "block, at more)")
    m.add_argument("--prompt-easing", choices=EASINGS, default="linear")
    m.add_argument("--pacing", choices=PACINGS, default="none",
                   help="'even': re-time from a cheap preview so consecutive frames change by about the same amount")
    m.add_argument("--at", type=float, nargs="+", metavar="SECONDS",
                   help="the time of each keyframe in seconds (one per keyframe, increasing, inside the video)")
    m.add_argument("--audio", metavar="FILE", help="a music track (mp3, wav, flac, m4a/aac, ogg) that paces the "
                   "morph and is muxed into the mp4 (AAC); without --seconds/--frames the video lasts as long as it")
    m.add_argument("--audio-offset", type=float, default=0.0, metavar="SECONDS",
                   help="where in the track to start (default: 0)")
    m.add_argument("--audio-pacing", choices=AUDIO_PACINGS, default="envelope",
                   help="'envelope': the path moves faster where the music is loud/percussive; 'beats': keyframes "
                        "land on beats; 'none': the audio is only added (default: %(default)s)")
    m.add_argument("--pacing-clip", metavar="CLIP", nargs="?", const="embedded",
                   help="measure the pacing change with CLIP image embeddings (the embedded CLIP, or a transformers "
                        "CLIP id/folder) instead of pixels")
    _generation_options(m)
    m.add_argument("--batch-size", type=int,
                   help="frames the denoiser sees per call (default: 16 on CPU, all at once on a GPU)")
    m.add_argument("--upscale", type=int, help="integer upscaling of frames (default: 4 for the embedded model)")
    m.add_argument("--keep-cache", action="store_true", help="keep the per-frame cache after a successful render")
    m.add_argument("--workers", type=_workers_arg, default="auto", metavar="N|auto",
                   help="single-thread worker processes for a CPU render (default: auto, one per available core; "
                        "1: this process, torch's threads)")
    m.add_argument("--onnx", action="store_true",
                   help="run the UNet's steps on ONNX Runtime (CPU, SD-style UNets; pip install \"latentlab[onnx]\"): "
                        "a request 1.2x faster, a render with workers ~1.07x; frames within float rounding of torch's, "
                        "recorded in the manifest")
    m.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _generation_options(m: argparse.ArgumentParser) -> None:
    from latentlab.sampling import SCHEDULERS

    m.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    m.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    m.add_argument("--negative-prompt")
    m.add_argument("--scheduler", choices=SCHEDULERS, metavar="NAME",
                   help="a diffusers scheduler class (default: the model's); one of " + ", ".join(SCHEDULERS))
    m.add_argument("--model", help="diffusers model id or folder, or an embedded model's name: "
                   f"{', '.join(embedded.NAMES)} (default: {embedded.DEFAULT})")
    m.add_argument("--width", type=int, help="image width in pixels (default: the model's; a multiple of its size "
                   "factor: 8 for SD, 16 for Flux)")
    m.add_argument("--height", type=int, help="image height in pixels (default: the model's)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2), like every other input error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="latentlab", description="Explore the latent space of diffusion models.")
    p.add_argument("--version", action="version", version=f"latentlab {latentlab.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what a bug report needs: versions, device, threads, the default model")
    info.add_argument("--fingerprint", action="store_true", help="also load the embedded model and print its "
                      "fingerprint (a few seconds)")
    info.set_defaults(func=_cmd_info)
    fmt = argparse.RawDescriptionHelpFormatter
    m = sub.add_parser("morph", help="render a morph (or seed walk) video between keyframes",
                       description="Render a morph between keyframe prompts and/or seeds to mp4 or gif, with a "
                                   "JSON manifest beside it that can re-create any frame.",
                       epilog=MORPH_EXAMPLES, formatter_class=fmt)
    m.add_argument("prompts", nargs="*", help="keyframe prompts (one prompt + several --seeds is a seed walk)")
    m.add_argument("--seeds", type=int, nargs="+", help="keyframe seeds (default 0; missing ones carry over)")
    m.add_argument("--images", nargs="+", metavar="IMAGE",
                   help="keyframe images, one per keyframe ('none' to skip one): each is encoded and DDIM-inverted "
                        "with its keyframe's prompt, and that noise becomes the keyframe's point on the noise path")
    _render_options(m)
    m.set_defaults(func=_cmd_morph)
    w = sub.add_parser("walk", help="render a seamless looping walk through seeds at one prompt",
                       description="Render a looping walk through the noise of several seeds at a fixed prompt.",
                       epilog=WALK_EXAMPLES, formatter_class=fmt)
    w.add_argument("prompts", nargs=1, metavar="prompt")
    w.add_argument("--seeds", type=int, nargs="+", required=True, help="the seeds to walk through (2 or more)")
    _render_options(w, walk=True)
    w.set_defaults(func=_cmd_morph)
    g = sub.add_parser("grid", help="an image grid: prompts (rows) x seeds (columns)",
                       description="Generate every prompt at every seed and tile them into one image.",
                       epilog=GRID_EXAMPLES, formatter_class=fmt)
    g.add_argument("prompts", nargs="+")
    g.add_argument("--seeds", type=int, nargs="+", help="column seeds (default: 0)")
    g.add_argument("-o", "--output", default="grid.png", help="output .png/.jpg/.webp (default: %(default)s)")
    g.add_argument("--upscale", type=int, help="integer upscaling (default: 2 for the embedded model)")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--batch-size", type=int, help="images the denoiser sees per call (default: 16 on CPU)")
    _generation_options(g)
    g.set_defaults(func=_cmd_grid)
    f = sub.add_parser("frame", help="re-render one frame of a video from its manifest",
                       description="Re-create frame INDEX of a rendered morph or walk from the JSON manifest "
                                   "beside it.", epilog=FRAME_EXAMPLES, formatter_class=fmt)
    f.add_argument("manifest", help="the video's manifest (e.g. morph.mp4.json)")
    f.add_argument("index", type=int)
    f.add_argument("-o", "--output", default="frame.png", help="output .png/.jpg/.webp (default: %(default)s)")
    f.add_argument("--upscale", type=int, help="integer upscaling (default: the video's)")
    f.add_argument("--model", help="use this model instead of the one named in the manifest")
    f.add_argument("--overwrite", action="store_true")
    f.set_defaults(func=_cmd_frame)

    e = sub.add_parser("export", help="export a rendered morph to ComfyUI (noise, conditioning) and Deforum",
                       description="Write the per-frame initial noise (ComfyUI .latent), the per-frame conditioning "
                                   "and a Deforum keyframe schedule of a rendered morph, from its manifest.",
                       epilog="examples:\n  latentlab export morph.mp4.json -o morph-export/\n", formatter_class=fmt)
    e.add_argument("manifest", help="the video's manifest (e.g. morph.mp4.json)")
    e.add_argument("-o", "--output", default="export", help="output folder (default: %(default)s)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=_cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command; every failure ends in one line on stderr and the documented exit code."""
    args = build_parser().parse_args(argv)
    from latentlab._files import disk_full_hint
    from latentlab.morph import RenderLocked
    from latentlab.morph.workers import WorkerFailed

    try:
        if distributed.launched():
            distributed.ranks()  # join the process group (and pin this process's GPU) before any model loads
        return args.func(args)
    except _Exit as e:
        msg, code = str(e), e.code
    except RenderLocked as e:
        msg, code = str(e), EXIT_FAILED
    except WorkerFailed as e:
        msg, code = f"{e}; finished frames are kept: run the same command again to resume", EXIT_FAILED
    except _INPUT_ERRORS as e:
        msg, code = str(e), EXIT_USAGE
    except KeyboardInterrupt:
        msg, code = "interrupted", EXIT_FAILED
    except OSError as e:  # disk full mid-render (the message says what to free), or another system error
        msg, code = (e.strerror if e.errno == errno.ENOSPC and e.strerror else
                     disk_full_hint(e, Path.cwd()) or f"{type(e).__name__}: {e}"), EXIT_FAILED
    print(f"latentlab {args.command}: error: {' '.join(msg.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
