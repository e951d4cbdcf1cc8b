"""Decode speed of w8 and w4 against bf16 on a random Llama of about 0.4B parameters, in one run, on one device.

Weights are random (they do not change speed); the same engine runs every variant, interleaved over repeats
(median reported). Batch 1, greedy, 128-token prompt, 128 new tokens. Writes
benchmarks/results/quantize-speed-<device>-<date>.json and .md; on CUDA also the % of the bandwidth roofline.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_quantize_speed.py [--device cuda] [--recipes w8,w4-rtn]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from random_models import LLAMA_0_4B, random_llama  # noqa: E402
from results_io import write_results  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--recipes", default="w8,w4-rtn")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args()

    import miaotui
    from miaotui.bench import bench_models, copy_bandwidth, decode_bytes_per_token, weight_bytes

    base = random_llama("random-llama-0.4b", LLAMA_0_4B, "bfloat16", a.device)
    models = {"bf16": base}
    for recipe in a.recipes.split(","):
        lm = copy.deepcopy(base)
        miaotui.apply_recipe(lm, miaotui.get_recipe(recipe), progress=False)
        models[recipe] = lm
    r = bench_models(models, prompt_len=128, new_tokens=128, batch_size=1, repeats=a.repeats)
    env = r["environment"]
    ref = r["models"]["bf16"]["decode_tokens_per_s"]
    roofline = copy_bandwidth(base.device) if base.device.type == "cuda" else None
    md = [
        f"# w8 / w4 decode vs bf16, random Llama 0.4B ({env['date'][:10]})",
        "",
        f"Device {env['device']} ({env['device_name']}), {env['threads']} threads, torch {env['torch']}, "
        f"transformers {env['transformers']}. miaotui engine, greedy, batch 1, 128-token prompt, 128 new tokens, "
        f"median of {a.repeats} interleaved repeats.",
        "",
        "| variant | linear weights | decode tok/s | vs bf16 | prefill tok/s | % of roofline |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in r["models"].items():
        tok_s = m["decode_tokens_per_s"]
        pct = f"{100 * tok_s * decode_bytes_per_token(models[name]) / roofline:.1f} %" if roofline else "-"
        md.append(
            f"| {name} | {weight_bytes(models[name])['linear_bytes'] / 2**20:,.0f} MiB | {tok_s:.1f} | "
            f"{tok_s / ref:.2f}x | {m['prefill_tokens_per_s']:.0f} | {pct} |"
        )
    md += ["", f"`PYTHONPATH=. python benchmarks/bench_quantize_speed.py {' '.join(sys.argv[1:])}`".replace(" `", "`")]
    device = "cuda" if a.device.startswith("cuda") else "cpu"
    write_results(a.out, "quantize-speed", device, r, md)


if __name__ == "__main__":
    main()
