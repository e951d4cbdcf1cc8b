"""Structured slimming of ref-llama-16m at several ratios: quality before and after recovery, parameters, speed.

Each variant is slimmed from the same original (importance from the calibration text), measured against it
(perplexity, KL, top-1 on WikiText-2 test), distilled from it on the calibration text and measured again. Then
the original and every variant decode interleaved in one run: tokens/s ratios are against that same run.

    .venv/bin/python benchmarks/bench_slim.py [--variants mlp25,depth1] [--device cuda] [--max-tokens 65536]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
from pathlib import Path

from results_io import write_results

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MIAOTUI_DATA", REPO.parent / "shared" / "data"))
VARIANTS = {  # name -> slim step fields
    "mlp12.5": {"mlp": 0.125},
    "mlp25": {"mlp": 0.25},
    "mlp50": {"mlp": 0.5},
    "heads-1/3": {"heads": 0.34},  # one query head of three in each KV group
    "depth1": {"blocks": 1},
    "depth2": {"blocks": 2},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="speed dtype (quality is always fp32)")
    p.add_argument("--max-tokens", type=int, default=65536, help="perplexity tokens (WikiText-2 test)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows of 512 tokens")
    p.add_argument("--distill-steps", type=int, default=200, help="0: no recovery")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args()
    names = a.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    import miaotui
    from miaotui.calibration import Calibration
    from miaotui.evaluate import read_text
    from miaotui.loading import resolve_dtype
    from miaotui.recovery import DistillConfig
    from miaotui.sparsity.structured import SlimConfig

    base = miaotui.load(DATA / "ref-llama-16m", dtype="float32", device=a.device)
    wiki = read_text(DATA / "wikitext-2-raw" / "wiki.test.raw")
    calib = Calibration(read_text(DATA / "ref-llama-16m-calibration.txt"), samples=a.calib_samples, seqlen=512)

    def quality(lm) -> dict:
        q = miaotui.compare_causal(lm, wiki, baseline=base, seqlen=512, max_tokens=a.max_tokens)
        return {k: q[k] for k in ("perplexity", "baseline_perplexity", "perplexity_ratio", "kl_mean", "top1_agreement")}

    runs, models = {}, {"dense": base}
    for i, name in enumerate(names):
        print(f"[{i + 1}/{len(names)}] {name}", file=sys.stderr)
        lm = copy.deepcopy(base)
        slim = miaotui.apply_recipe(lm, miaotui.Recipe((SlimConfig(**VARIANTS[name]),)), calibration=calib)[0]
        run = {"slim": slim, "before": quality(lm)}
        if a.distill_steps:
            recovery = DistillConfig(steps=a.distill_steps)
            run["distill"] = miaotui.apply_recipe(lm, miaotui.Recipe((recovery,)), calibration=calib, teacher=base)[0]
            run["after"] = quality(lm)
        runs[name], models[name] = run, lm
    for lm in models.values():
        lm.model.to(resolve_dtype(a.dtype))
    speed = miaotui.bench_models(models, new_tokens=a.new_tokens, repeats=a.repeats)
    dense = speed["models"]["dense"]

    def q(r: dict) -> str:
        return f"{r['perplexity']:.2f} ({100 * (r['perplexity_ratio'] - 1):+.1f} %) | {r['kl_mean']:.3f} | " + (
            f"{100 * r['top1_agreement']:.1f} %"
        )

    rows = []
    for name, run in runs.items():
        s = speed["models"][name]
        params = run["slim"]["parameters"]
        after = q(run["after"]) if "after" in run else "- | - | -"
        rows.append(
            f"| {name} | {params[1] / 1e6:.2f}M ({params[1] / params[0]:.2f}x) | {q(run['before'])} | {after} | "
            f"{s['decode_tokens_per_s'] / dense['decode_tokens_per_s']:.2f}x | "
            f"{s['prefill_tokens_per_s'] / dense['prefill_tokens_per_s']:.2f}x |"
        )
    env = speed["environment"]
    md = [
        f"# Structured slimming of ref-llama-16m ({datetime.date.today().isoformat()})",
        "",
        f"Device {env['device']} ({env['device_name']}), {env['threads']} threads, torch {env['torch']}, "
        f"transformers {env['transformers']}. Quality: WikiText-2 test, first {a.max_tokens} tokens, seqlen 512, fp32; "
        f"dense perplexity {next(iter(runs.values()))['before']['baseline_perplexity']:.2f}. Importance from "
        f"{a.calib_samples} x 512 calibration tokens; recovery: {a.distill_steps} distillation steps "
        f"({DistillConfig().batch} x {DistillConfig().seqlen} tokens each). Speed: {a.dtype}, greedy decode, batch 1, "
        f"128-token prompt, {a.new_tokens} new tokens, median of {a.repeats} interleaved repeats; dense decode "
        f"{dense['decode_tokens_per_s']:.0f} tok/s.",
        "",
        "| variant | parameters | ppl slimmed | KL | top-1 | ppl recovered | KL | top-1 | decode vs dense | prefill |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Command: `{' '.join(['.venv/bin/python benchmarks/bench_slim.py', *sys.argv[1:]])}`",
    ]
    device = "cuda" if a.device.startswith("cuda") else "cpu"
    write_results(a.out, "slim", device, {"environment": env, "runs": runs, "speed": speed}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
