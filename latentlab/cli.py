"""The ``latentlab`` command line: a thin layer over the library (nothing in latentlab imports it).

Exit codes: 0 success, 2 bad usage (argparse), 3 the embedded model or another required resource is missing.
"""

from __future__ import annotations

import argparse
import sys

import latentlab
from latentlab import embedded

EXIT_MISSING = 3


def _cmd_info(args: argparse.Namespace) -> int:
    print(f"latentlab {latentlab.__version__}")
    if embedded.is_available():
        print(f"embedded default model: {embedded.model_path()}")
    else:
        print("embedded default model: not trained yet")
    return 0


def _cmd_morph(args: argparse.Namespace) -> int:
    if not embedded.is_available():
        print(
            "latentlab: the embedded default model is not trained yet, so there is nothing to render a morph with.\n"
            "It is built by `python -m latentlab.embedded.train` (issue #3); morph rendering follows in issue #5.",
            file=sys.stderr,
        )
        return EXIT_MISSING
    print("latentlab: morph rendering is not implemented yet (issue #5).", file=sys.stderr)
    return EXIT_MISSING


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentlab", description="Explore the latent space of diffusion models.")
    p.add_argument("--version", action="version", version=f"latentlab {latentlab.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions and where the embedded model is")
    info.set_defaults(func=_cmd_info)
    morph = sub.add_parser(
        "morph",
        help="render a morph video between prompts",
        epilog='example: latentlab morph "a red circle" "a blue star" -o morph.mp4',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    morph.add_argument("prompts", nargs="*", help="keyframe prompts")
    morph.add_argument("-o", "--output", default="morph.mp4")
    morph.set_defaults(func=_cmd_morph)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
