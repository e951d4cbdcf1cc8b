"""The autotune subcommand: the fastest model under a quality budget, found by measurement."""

from __future__ import annotations

import argparse

from miaotui.cli.common import EPILOG, add_calib_generated, positive, print_report


def _list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def register(sub) -> None:
    p = sub.add_parser(
        "autotune",
        help="search recipes and engine options for the fastest model within a quality budget",
        description="Measure cheap signals first (kernel speed at the model's layer shapes on the target device, "
        "per-layer sensitivity on calibration text, engine options on the original), then build the promising "
        "candidates and the built-in recipes, time them on the engine interleaved with the original, and evaluate "
        "them on held-out text by successive halving. Writes the winner's recipe.yaml, the model, engine.json and "
        "report.md/html/json to --out. Measurements are logged to OUT.partial/log.jsonl: run the same command "
        "again to resume.",
        epilog=EPILOG,
    )
    p.add_argument("model", help="causal LM folder or hub id")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--max-ppl-increase", default="2%", help="perplexity budget on held-out text, e.g. 2%% or 0.02")
    p.add_argument("--max-kl", type=float, help="also cap the mean KL to the original per token")
    p.add_argument("--objective", default="decode", help="decode, prefill or throughput (default decode)")
    p.add_argument("--batch", type=positive, default=1, help="sequences per batch (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="auto", help="weights/compute dtype: auto (the checkpoint's), float32, bfloat16")
    p.add_argument("--time-budget", help="stop searching after this long, e.g. 30m (default: no limit)")
    p.add_argument("--ppl", metavar="TEXTFILE", help="held-out text for quality (default: built-in sample)")
    p.add_argument(
        "--calib",
        metavar="TEXTFILE",
        action="append",
        help="calibration text (repeat to mix files): sensitivity, GPTQ/AWQ",
    )
    add_calib_generated(p)
    p.add_argument(
        "--options", type=_list, help="layer options, comma-separated (default w8,w8a8,w4g128,w4g32,sparse50)"
    )
    p.add_argument("--builtins", type=_list, help="built-in recipes measured alongside, comma-separated")
    p.add_argument("--algorithm", default="rtn", help="rtn, or gptq/awq with --calib (default rtn)")
    p.add_argument("--kv-dtypes", type=_list, help="KV-cache dtypes to try on the engine, e.g. auto,int8")
    p.add_argument("--try-compile", action="store_true", help="also try the compiled decode step")
    p.add_argument(
        "--speculative",
        type=_list,
        help="speculative choices to time on held-out prompts, e.g. off,ngram,ngram8 (default off)",
    )
    p.add_argument("--tokens", type=positive, default=1024, help="held-out tokens of the first round (default 1024)")
    p.add_argument("--max-tokens", type=positive, default=4096, help="held-out tokens of the last round (default 4096)")
    p.add_argument("--seqlen", type=positive, default=512, help="perplexity window (default 512)")
    p.add_argument("--prompt-len", type=positive, default=64, help="benchmark prompt tokens (default 64)")
    p.add_argument("--new-tokens", type=positive, default=32, help="benchmark generated tokens (default 32)")
    p.add_argument("--repeats", type=positive, default=3, help="screening benchmark repeats (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and calibration windows (default 0)")
    p.add_argument("--log", metavar="FILE", help="measurement log (default OUT.partial/log.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_autotune)


def cmd_autotune(a: argparse.Namespace) -> None:
    from miaotui.api import AutotuneConfig, SearchSpace, autotune
    from miaotui.tune import parse_budget, parse_duration

    space = {"algorithm": a.algorithm}
    if a.options is not None:
        space["layer_options"] = a.options
    if a.builtins is not None:
        space["builtins"] = a.builtins
    if a.kv_dtypes is not None:
        space["kv_dtypes"] = a.kv_dtypes
    if a.speculative is not None:
        space["speculative"] = a.speculative
    if a.try_compile:
        space["compile"] = (False, True)
    cfg = AutotuneConfig(
        max_ppl_increase=parse_budget(a.max_ppl_increase),
        max_kl=a.max_kl,
        objective=a.objective,
        batch=a.batch,
        device=a.device,
        dtype=a.dtype,
        time_budget_s=parse_duration(a.time_budget) if a.time_budget else None,
        seed=a.seed,
        calib_generated=a.calib_generated,
        seqlen=a.seqlen,
        tokens=a.tokens,
        max_tokens=a.max_tokens,
        prompt_len=a.prompt_len,
        new_tokens=a.new_tokens,
        repeats=a.repeats,
        space=SearchSpace(**space),
    )
    report = autotune(
        a.model, a.out, config=cfg, text_path=a.ppl, calib_path=a.calib, log_path=a.log, overwrite=a.overwrite
    )
    print_report(report, a.json, f"saved to {a.out} (recipe.yaml, engine.json, model files, report.md/html/json)")
