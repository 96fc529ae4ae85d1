"""``sfd-fast``: command-line entry point. It only parses arguments and builds configs.

Each command group lives in its own module with ``add_parsers(sub)``; every subcommand sets
``handler=run(args) -> exit code`` as its parser default, so this module only assembles and dispatches.
"""

from __future__ import annotations

import argparse
import sys

from ..core.dispatch import BackendUnavailable
from . import compare, demo, evaluate, serve, text_to_image, train
from .args import check_device

# Order of the subcommands in --help: the story first, then the tools around it.
GROUPS = (demo, train, text_to_image, evaluate, compare, serve)


def _version() -> str:
    """The installed distribution's version (pyproject.toml's, when run from a source tree without install)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sfd_fast")
    except PackageNotFoundError:
        import sfd_fast

        return getattr(sfd_fast, "__version__", "unknown (not installed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfd-fast", description=(
        "Score Forgetting Distillation: distil a class-conditional diffusion model into a one-step "
        "generator that no longer generates the forgotten classes."))
    parser.add_argument("--version", action="version", version=f"sfd-fast {_version()}",
                        help="show the installed sfd_fast version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Text-to-image `distill --pipeline DIR` takes prompts, not class indices: its own parser.
    if argv[:1] == ["distill"] and any(a == "--pipeline" or a.startswith("--pipeline=") for a in argv):
        return text_to_image.run_distill(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "device", None) is not None:
            check_device(args.device)
        return args.handler(args)
    except (ValueError, FileNotFoundError, BackendUnavailable) as exc:
        print(f"sfd-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
