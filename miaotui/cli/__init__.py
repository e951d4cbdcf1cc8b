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
from miaotui.cli.interrupt import InterruptWatch, forget_handled_interrupt
from miaotui.errors import MiaotuiError

VERB_MODULES = (compress, measure, run, serve, autotune)


class Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    """Run one command; the exit status: 0 done, 1 internal error, 2 bad input, 130 interrupted (Ctrl-C).

    A Ctrl-C prints one line wherever it lands: while heavy modules import, while the arguments are parsed, while
    the command runs, or as the cause of another error.
    """
    with InterruptWatch() as watch:
        try:
            return _run(argv, watch)
        except KeyboardInterrupt:  # itself, or another error it caused (_run re-raises those as this)
            pass
    forget_handled_interrupt()
    print("miaotui: interrupted", file=sys.stderr)
    return 130


def _run(argv: list[str] | None, watch: InterruptWatch) -> int:
    debug = bool(os.environ.get("MIAOTUI_DEBUG"))
    if not debug:
        warnings.filterwarnings("ignore")
    try:
        with watch.held():  # building the parser imports torch (the engine's options)
            parser = build_parser()
        args = parser.parse_args(argv)
        args.func(args)
    except (MiaotuiError, ValueError) as e:
        if watch.interrupted(e):
            raise KeyboardInterrupt from e
        if debug:
            raise
        print(f"miaotui: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug or an environment problem: still one line, unless debugging
        if watch.interrupted(e):
            raise KeyboardInterrupt from e
        if debug:
            raise
        print(
            f"miaotui: internal error: {type(e).__name__}: {e} (set MIAOTUI_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0
