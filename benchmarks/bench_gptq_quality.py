"""Quality of low-bit weight recipes on ref-llama-16m: RTN vs GPTQ, with and without activation order.

Protocol (GUIDE §3): WikiText-2 test, 512-token windows, the first 65,536 tokens, fp32 compute; the model is
quantized from its bf16 checkpoint as `miaotui optimize` does, GPTQ calibrated on 128 windows of 512 tokens from
the training text. Quality is deterministic, so these numbers do not depend on machine load.

    PYTHONPATH=. python benchmarks/bench_gptq_quality.py [--configs w3-rtn,w3-gptq,w3-gptq-act] [--samples 128]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from results_io import write_results  # noqa: E402

import miaotui  # noqa: E402
from miaotui.bench import weight_bytes  # noqa: E402
from miaotui.calibration import Calibration  # noqa: E402
from miaotui.evaluate import compare_causal, read_text  # noqa: E402
from miaotui.quantize import QuantizeConfig  # noqa: E402
from miaotui.recipe import Recipe  # noqa: E402

DATA = Path(os.environ.get("MIAOTUI_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CONFIGS = {
    "w4-rtn": dict(scheme="w4"),
    "w4-gptq": dict(scheme="w4", algorithm="gptq"),
    "w4-gptq-act": dict(scheme="w4", algorithm="gptq", act_order=True),
    "w3-rtn": dict(scheme="w3"),
    "w3-gptq": dict(scheme="w3", algorithm="gptq"),
    "w3-gptq-act": dict(scheme="w3", algorithm="gptq", act_order=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--max-tokens", type=int, default=65536)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args()
    torch.manual_seed(0)
    text = read_text(DATA / "wikitext-2-raw" / "wiki.test.raw")
    calib = Calibration((DATA / "ref-llama-16m-calibration.txt").read_text(), samples=a.samples, seqlen=512)
    base = miaotui.load(DATA / "ref-llama-16m")  # bf16, as saved
    base32 = copy.deepcopy(base).model.to(torch.float32)
    ref = copy.deepcopy(base)
    ref.model = base32
    rows = {"bf16": {**weight_bytes(base)}}
    for name in a.configs.split(","):
        lm = copy.deepcopy(base)
        recipe = Recipe(steps=(QuantizeConfig(group_size=128, **CONFIGS[name]),), name=name)
        miaotui.apply_recipe(lm, recipe, progress=False, calibration=calib)
        lm.model.to("cpu")  # packed layers return to their portable (on-disk) layout
        sizes = weight_bytes(lm)
        lm.model.to(torch.float32)
        r = compare_causal(lm, text, baseline=ref, seqlen=512, max_tokens=a.max_tokens)
        rows[name] = {**r, **sizes}
        print(name, {k: r[k] for k in ("perplexity", "baseline_perplexity", "perplexity_ratio", "kl_mean")}, flush=True)
    md = [
        f"# GPTQ / RTN quality, ref-llama-16m (WikiText-2 test, {a.max_tokens} tokens, seqlen 512, fp32 compute; "
        f"GPTQ calibration {a.samples} x 512 tokens)",
        "",
        "| recipe | perplexity | vs bf16 | mean KL | top-1 agreement | linear bytes on disk |",
        "|---|---|---|---|---|---|",
    ]
    md.append(f"| bf16 | {rows['bf16']['linear_bytes']:,} bytes of linear layers | | | | |")
    for name, r in list(rows.items())[1:]:
        md.append(
            f"| {name} | {r['perplexity']:.2f} | {100 * (r['perplexity_ratio'] - 1):+.2f} % | {r['kl_mean']:.4f} "
            f"| {100 * r['top1_agreement']:.1f} % | {r['linear_bytes']:,} |"
        )
    write_results(a.out, "quality-gptq", "cpu", rows, md)


if __name__ == "__main__":
    main()
