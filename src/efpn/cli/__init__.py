"""The ``efpn`` command line: one module per command group."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import bench, config, data, export, study, train

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="efpn", description="Extended Feature Pyramid Network for small-object detection"
    )
    parser.add_argument("--version", action="version", version=f"efpn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in (bench, data, train, study, export, config):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # Bad input (data, recipe, options): one line. EFPN_DEBUG=1 shows the traceback.
        import os

        if os.environ.get("EFPN_DEBUG"):
            raise
        print(f"efpn: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `efpn ... | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        # the machine, not the input: an output that cannot be written, a full disk
        import os

        if os.environ.get("EFPN_DEBUG"):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"efpn: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
