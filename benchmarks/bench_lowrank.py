"""Low-rank factorization of ref-llama-16m: plain vs activation-aware SVD at several ratios, quality and speed.

For each method and ratio: factorize a copy of the model (fp32), measure perplexity, KL and top-1 agreement against
the dense model (WikiText-2 test, seqlen 512), count the parameters; optionally quantize the asvd factors afterwards
(`--compose w8,w4` at `--compose-ratio`; for w4, ranks in multiples of its group, 32). Then time every variant
against the dense model in the same run, interleaved (`miaotui.bench.bench_models`).
Writes benchmarks/results/lowrank-<device>-<date>.json and .md.

    .venv/bin/python benchmarks/bench_lowrank.py [--ratios 0.9,0.8,0.7,0.6] [--methods svd,asvd] [--device cpu]
    .venv/bin/python benchmarks/bench_lowrank.py --ratios 0.8 --max-tokens 2048 --calib-samples 4 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

from results_io import write_results

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MIAOTUI_DATA", REPO.parent / "shared" / "data"))


def _params(lm) -> int:
    import miaotui

    return miaotui.info(lm)["parameters"]  # packed low-bit weights counted as weights


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="svd,asvd")
    p.add_argument("--ratios", default="0.9,0.8,0.7,0.6", help="fraction of each linear layer's weights kept")
    p.add_argument("--allocation", default="layer", choices=("layer", "global"))
    p.add_argument("--compose", default="", help="quantize the asvd factors afterwards: w8 and/or w4 (group 32)")
    p.add_argument("--compose-ratio", type=float, default=0.8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--speed-dtype", default="bfloat16", help="dtype of the timed models (quality is fp32)")
    p.add_argument("--max-tokens", type=int, default=65536, help="perplexity tokens (WikiText-2 test)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args()

    import torch

    import miaotui
    from miaotui.calibration import Calibration
    from miaotui.evaluate import read_text
    from miaotui.lowrank import FactorizeConfig, factorize_
    from miaotui.quantize import QuantizeConfig, quantize_

    base = miaotui.load(DATA / "ref-llama-16m", dtype="float32", device=a.device)
    text = read_text(DATA / "wikitext-2-raw" / "wiki.test.raw")
    calibration = Calibration(read_text(DATA / "ref-llama-16m-calibration.txt"), a.calib_samples, a.calib_seqlen)
    ids = calibration.token_ids(base)
    compose = {"w8": QuantizeConfig(scheme="w8"), "w4": QuantizeConfig(scheme="w4", group_size=32)}
    variants, rows = {}, []
    for method in a.methods.split(","):
        for ratio in map(float, a.ratios.split(",")):
            cfg = FactorizeConfig(method=method, ratio=ratio, allocation=a.allocation)
            print(f"{method} {ratio}", file=sys.stderr)
            lm = copy.deepcopy(base)
            variants[f"{method} {ratio}"] = (lm, factorize_(lm, cfg, ids if cfg.needs_calibration else None))
    for scheme in filter(None, a.compose.split(",")):  # w4 g32 quantizes the r -> out factor: ranks in 32s
        multiple = compose[scheme].group_size if compose[scheme].scheme == "w4" else 8
        cfg = FactorizeConfig(ratio=a.compose_ratio, allocation=a.allocation, rank_multiple=multiple)
        lm = copy.deepcopy(base)
        summary = factorize_(lm, cfg, ids)
        quantize_(lm.model, compose[scheme], progress=False)
        variants[f"asvd {a.compose_ratio} + {scheme}"] = (lm, summary)
    reports = {}
    for name, (lm, summary) in variants.items():
        print(f"evaluating {name}", file=sys.stderr)
        q = miaotui.compare_causal(lm, text, baseline=base, seqlen=512, max_tokens=a.max_tokens)
        reports[name] = {"summary": summary, "quality": q, "parameters": _params(lm)}
        rows.append(
            f"| {name} | {summary['kept_ratio']:.3f} | {_params(lm) / 1e6:.2f}M | {q['perplexity']:.2f} "
            f"({100 * (q['perplexity_ratio'] - 1):+.1f} %) | {q['kl_mean']:.3f} | {100 * q['top1_agreement']:.1f} % |"
        )
    dtype = getattr(torch, a.speed_dtype)
    timed = {"dense": base, **{name: lm for name, (lm, _) in variants.items()}}
    for lm in timed.values():
        lm.model.to(dtype)
    speed = miaotui.bench_models(timed, repeats=a.repeats, new_tokens=a.new_tokens)
    dense = speed["models"]["dense"]
    speed_rows = [
        f"| {name} | {r['decode_tokens_per_s']:.0f} ({r['decode_tokens_per_s'] / dense['decode_tokens_per_s']:.2f}x) "
        f"| {r['prefill_tokens_per_s']:.0f} ({r['prefill_tokens_per_s'] / dense['prefill_tokens_per_s']:.2f}x) |"
        for name, r in speed["models"].items()
    ]
    env, base_ppl = speed["environment"], next(iter(reports.values()))["quality"]["baseline_perplexity"]
    md = [
        "# Low-rank factorization of ref-llama-16m",
        "",
        f"Quality: WikiText-2 test, first {a.max_tokens} tokens, seqlen 512, fp32; dense perplexity {base_ppl:.2f}, "
        f"{_params(base) / 1e6:.2f}M parameters. asvd calibrates on {a.calib_samples} x {a.calib_seqlen} tokens "
        f"of ref-llama-16m-calibration.txt; ratio = fraction of each linear layer's weights kept "
        f"(allocation {a.allocation}; lm_head and embeddings untouched).",
        "",
        "| variant | linear weights kept | parameters | perplexity | KL | top-1 |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Speed: {env['device']} ({env['device_name']}), {env['threads']} threads, {a.speed_dtype}, median of "
        f"{a.repeats} interleaved repeats; decode = greedy, batch 1, 128-token prompt, {a.new_tokens} new tokens.",
        "",
        "| variant | decode tok/s (vs dense) | prefill tok/s (vs dense) |",
        "|---|---|---|",
        *speed_rows,
        "",
        f"Command: `.venv/bin/python benchmarks/bench_lowrank.py {' '.join(sys.argv[1:])}`",
    ]
    device = "cuda" if a.device.startswith("cuda") else "cpu"
    write_results(a.out, "lowrank", device, {"environment": env, "speed": speed, "runs": reports}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
