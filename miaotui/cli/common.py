"""Options and printing shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable

EPILOG = "Errors are printed as one line; set MIAOTUI_DEBUG=1 to see tracebacks."


def positive(text: str, minimum: int = 1) -> int:
    """argparse type: an integer >= 1 (or >= `minimum`)."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def number(minimum: float, maximum: float = math.inf, *, above: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number >= `minimum` (> it when `above`) and <= `maximum`; inf and nan are refused.

    >>> number(0)("0.7"), number(0, 1, above=True)("1")
    (0.7, 1.0)
    >>> number(0)("inf")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected a finite number >= 0, got 'inf'
    """
    low = f"{'>' if above else '>='} {minimum:g}"
    what = f"a finite number {low}" if maximum == math.inf else f"a number {low} and <= {maximum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > minimum if above else value >= minimum) and value <= maximum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = "number"  # what argparse names in its own messages
    return parse


_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]?)(i?b)?\s*", re.IGNORECASE)


def memory_size(text: str) -> int:
    """argparse type: bytes, with an optional unit K, M, G (binary: KiB, MiB, GiB alike), e.g. ``512MiB``, ``2G``.

    >>> memory_size("1.5GiB"), memory_size("64k"), memory_size("1000")
    (1610612736, 65536, 1000)
    """
    match = _SIZE.fullmatch(text)
    value = float(match[1]) * 1024 ** " kmg".index(match[2].lower() or " ") if match else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size such as 512MiB or 2GiB, got {text!r}")
    return int(value)


def batch_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers, e.g. ``1,4,16``."""
    try:
        return [positive(x) for x in text.split(",") if x.strip()]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None


def add_quality_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quality protocol")
    g.add_argument("--ppl", metavar="TEXTFILE", help="text for perplexity (default: built-in sample)")
    g.add_argument("--seqlen", type=positive, help="perplexity window in tokens (default min(2048, context))")
    g.add_argument("--stride", type=positive, help="start a window every N tokens, scoring only new ones")
    g.add_argument("--max-tokens", type=positive, help="evaluate only the first N tokens")
    g.add_argument("--sentences", metavar="FILE", help="encoders: sentences, one a line (default: built-in set)")
    g.add_argument("--classify", metavar="FILE", help="labelled .csv (text,label) or .jsonl: accuracy")
    g.add_argument("--labels", help="causal LMs: comma-separated candidate labels (default: the file's)")
    g.add_argument("--template", help="causal LMs: prompt with {text}; the label follows after a space")


def add_calib_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calib",
        metavar="TEXTFILE",
        action="append",
        help="calibration text for calibrated recipes (e.g. w4-gptq); repeat to mix files (windows drawn in "
        "proportion to their lengths): text like what the model will see calibrates best",
    )
    add_calib_generated(p)
    p.add_argument("--calib-samples", type=positive, default=128, help="calibration windows (default 128)")
    p.add_argument("--calib-seqlen", type=positive, default=512, help="tokens per calibration window (default 512)")


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {value:g}")
    return value


CALIB_GENERATED = 0.75  # miaotui.calibration.DEFAULT_GENERATED, without importing torch to build the parser


def add_calib_generated(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calib-generated",
        type=fraction,
        default=CALIB_GENERATED,
        metavar="FRACTION",
        help="of the calibration windows, the fraction the model writes itself, sampled from its own distribution "
        f"(default {CALIB_GENERATED:g}): statistics from text unlike what the model will see mislead calibrated "
        "methods; 0 = the --calib text alone; 1 = no text needed (encoders always calibrate on text)",
    )


def calib_kwargs(a: argparse.Namespace) -> dict:
    return {
        "calib_path": a.calib,
        "calib_samples": a.calib_samples,
        "calib_seqlen": a.calib_seqlen,
        "calib_generated": a.calib_generated,
    }


def add_load_options(p: argparse.ArgumentParser, dtype: str = "auto") -> None:
    p.add_argument(
        "--dtype",
        default=dtype,
        help=f"compute dtype: auto (the checkpoint's), float32, bfloat16, float16 (default {dtype})",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickle checkpoints (*.bin) with weights_only=True when no safetensors exist",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the checkpoint")


def add_parallel_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism (one process per rank; under torchrun, the launched ranks)")
    g.add_argument("--tp", type=positive, default=1, help="tensor-parallel ranks: heads and MLP split (default 1)")
    g.add_argument("--pp", type=positive, default=1, help="pipeline stages of contiguous blocks (default 1)")
    g.add_argument(
        "--dist-timeout",
        type=number(0, above=True),
        default=120.0,
        help="seconds before a stalled rank fails the run (default 120)",
    )


def parallel_config(a: argparse.Namespace):
    """The ParallelConfig of --tp/--pp/--dist-timeout, or None for a single process."""
    if a.tp * a.pp == 1:
        return None
    from miaotui.api import ParallelConfig

    return ParallelConfig(tp=a.tp, pp=a.pp, timeout_s=a.dist_timeout)


def add_engine_options(p: argparse.ArgumentParser, compile_default: bool = False) -> None:
    """Options of the engine that runs a causal LM (generate, serve); `compile_default`: compiled unless
    --no-compile."""
    from miaotui.engine.cache import KV_DTYPES

    if compile_default:
        p.add_argument(
            "--compile",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="compile the decode step for the batch sizes the scheduler runs, before the server is ready "
            "(default on; --no-compile: an eager engine, a fast start)",
        )
    else:
        p.add_argument("--compile", action="store_true", help="compile the decode step (slow start, fast steps)")
    p.add_argument("--kv-cache", default="auto", choices=KV_DTYPES, help="KV cache storage dtype")


def add_bench_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speed protocol")
    g.add_argument("--prompt-len", type=positive, default=128, help="causal LM prompt tokens (default 128)")
    g.add_argument("--new-tokens", type=positive, default=64, help="causal LM generated tokens (default 64)")
    g.add_argument("--batch", type=positive, default=1, help="causal LM batch size (default 1)")
    g.add_argument("--seqlen-encoder", type=positive, default=128, help="encoder input tokens (default 128)")
    g.add_argument("--encoder-batch", type=positive, default=32, help="encoder throughput batch (default 32)")
    g.add_argument("--repeats", type=positive, default=5, help="timed repeats, median reported (default 5)")
    g.add_argument("--compile", action="store_true", help="compile the engine's decode step (causal LMs)")


def bench_kwargs(a: argparse.Namespace) -> dict:
    return {
        "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens,
        "batch_size": a.batch,
        "seqlen": a.seqlen_encoder,
        "encoder_batch": a.encoder_batch,
        "repeats": a.repeats,
        "compile": a.compile,
    }


def load_kwargs(a: argparse.Namespace) -> dict:
    return {
        "dtype": a.dtype,
        "device": a.device,
        "allow_pickle": a.allow_pickle,
        "trust_remote_code": a.trust_remote_code,
    }


def load(a: argparse.Namespace, source: str):
    """Load ``source`` with the command's load options (see add_load_options)."""
    from miaotui.api import load as load_model

    return load_model(source, **load_kwargs(a))


def print_report(report: dict, as_json: bool, footer: str) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from miaotui.report import markdown

    print(markdown(report))
    print(footer)


def print_fields(data: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        print(f"{key:>22}: {value}")
