"""Subcommands that make and ship optimized models: optimize, export, info, recipes."""

from __future__ import annotations

import argparse
import json

from miaotui.cli.common import (
    EPILOG,
    add_bench_options,
    add_calib_options,
    add_load_options,
    bench_kwargs,
    calib_kwargs,
    load,
    load_kwargs,
    positive,
    print_fields,
    print_report,
)


def _auto_text() -> str:
    from miaotui.recipe import AUTO_RECIPE

    return ", ".join(f"{r} for {k.replace('causal-lm', 'causal LM')}s" for k, r in AUTO_RECIPE.items())


def register(sub) -> None:
    from miaotui.recipe import BUILTIN_RECIPES

    p = sub.add_parser(
        "optimize",
        help="compress a model with a recipe, measure it against the original, save it",
        description="Load MODEL, apply the recipe, measure quality (perplexity / KL / top-1 for "
        "causal LMs, embedding cosine for encoders) and speed of original and optimized model in "
        "the same run, and write the model with report.md and report.json to --out.",
        epilog=EPILOG,
    )
    p.add_argument("model", nargs="?", help="model folder or hub id (default: the built-in all-MiniLM-L6-v2)")
    p.add_argument(
        "--recipe",
        default="auto",
        help=f"built-in recipe ({', '.join(BUILTIN_RECIPES)}), a recipe .yaml/.json file, or auto: "
        + _auto_text()
        + " (default auto)",
    )
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--ppl", metavar="TEXTFILE", help="text for perplexity of causal LMs (default: built-in sample)")
    p.add_argument("--seqlen", type=positive, help="perplexity window (default min(2048, context))")
    p.add_argument("--max-tokens", type=positive, default=65536, help="perplexity tokens (default 65536)")
    add_calib_options(p)
    p.add_argument("--no-bench", action="store_true", help="skip the speed measurement")
    p.add_argument("--tp", type=positive, help="refuse a result the engine cannot split over N tensor-parallel ranks")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_load_options(p)
    add_bench_options(p)
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser(
        "export",
        help="export an optimized folder for other runtimes (compressed-tensors or plain: transformers, vLLM)",
        description="Write the packed codes of an optimized folder in the compressed-tensors format, or (--dense) "
        "a pruned model as a plain Hugging Face folder: transformers.AutoModelForCausalLM.from_pretrained(OUT) "
        "and `vllm serve OUT` load either.",
        epilog=EPILOG,
    )
    p.add_argument("model", help="a folder written by miaotui optimize")
    p.add_argument(
        "--format", help="export format: compressed-tensors (default: quantized models) or dense (same as --dense)"
    )
    p.add_argument(
        "--dense",
        action="store_true",
        help="write a plain Hugging Face folder of float weights (a pruned model's zeros kept as zeros, no "
        "sidecar); refuses quantized models (their codes are not dequantized: export those as compressed-tensors)",
    )
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--tp", type=positive, help="check that vLLM can split the model over N GPUs")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="architecture, parameters, dtype, bytes and recipe of a model", epilog=EPILOG)
    p.add_argument("model", help="model folder (plain or optimized) or hub id")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_load_options(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("recipes", help="list the built-in recipes", epilog=EPILOG)
    p.add_argument("--show", metavar="NAME", help="print one recipe as YAML (a starting point for your own)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_recipes)


def cmd_optimize(a: argparse.Namespace) -> None:
    from miaotui.api import optimize

    report = optimize(
        a.model,
        a.recipe,
        a.out,
        text_path=a.ppl,
        **calib_kwargs(a),
        seqlen=a.seqlen,
        max_tokens=a.max_tokens,
        bench=not a.no_bench,
        bench_options=bench_kwargs(a),
        overwrite=a.overwrite,
        tp=a.tp,
        **load_kwargs(a),
    )
    print_report(report, a.json, f"saved to {a.out} (report.md, report.html, report.json, model files)")


def cmd_export(a: argparse.Namespace) -> None:
    from miaotui.api import export
    from miaotui.errors import MiaotuiError

    if a.dense and a.format not in (None, "dense"):
        raise MiaotuiError(f"--dense writes a plain Hugging Face folder; it does not combine with --format {a.format}")
    fmt = "dense" if a.dense else a.format or "compressed-tensors"
    print_fields(export(a.model, a.out, format=fmt, tp=a.tp, overwrite=a.overwrite), a.json)


def cmd_info(a: argparse.Namespace) -> None:
    from miaotui.api import info

    print_fields(info(load(a, a.model)), a.json)


def cmd_recipes(a: argparse.Namespace) -> None:
    from miaotui.recipe import BUILTIN_RECIPES, get_recipe

    if a.show:
        print(get_recipe(a.show).to_yaml(), end="")
        return
    if a.json:
        print(json.dumps({n: get_recipe(n).to_dict() for n in BUILTIN_RECIPES}, indent=2))
        return
    width = max(map(len, BUILTIN_RECIPES))
    for name, data in BUILTIN_RECIPES.items():
        print(f"{name:<{width}}  {data['description']}")
    print(f"{'auto':<{width}}  what optimize uses by default: " + _auto_text())
