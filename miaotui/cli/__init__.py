"""The `miaotui` command: one subcommand per verb, a thin layer over miaotui.api.

Each module here registers its subcommands (``register(sub)``) with ``func`` set to the handler.
Run `miaotui --help` or `miaotui COMMAND --help`.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from miaotui.cli import autotune, compress, measure, run, serve
from miaotui.cli.common import EPILOG

VERB_MODULES = (compress, measure, run, serve, autotune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="miaotui",
        description="Make language models fast: compress a Hugging Face model, measure what it cost in quality "
        "and bought in speed, run and serve it.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in VERB_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(os.environ.get("MIAOTUI_DEBUG"))
    if not debug:
        warnings.filterwarnings("ignore")
    from miaotui.errors import MiaotuiError

    try:
        args.func(args)
    except (MiaotuiError, ValueError) as e:
        if debug:
            raise
        print(f"miaotui: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("miaotui: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an environment problem: still one line, unless debugging
        if debug:
            raise
        print(
            f"miaotui: internal error: {type(e).__name__}: {e} (set MIAOTUI_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0
