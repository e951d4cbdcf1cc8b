"""Calibration cost of GPTQ and AWQ: seconds and peak memory, on ref-llama-16m and a random ~1B Llama (CPU).

Each (model, recipe) runs in a fresh process, so its peak resident memory (Linux VmHWM) is its own. Calibration
runs block by block (one block's inputs captured, the block quantized, its outputs fed to the next), so the peak
should stay near the model plus one block's activations, whatever the depth. Writes
benchmarks/results/calibration-cpu-<date>.json and .md.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_calibration.py [--recipes w4-gptq,w4-awq] [--samples-1b 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from random_models import LLAMA_1B, random_llama  # noqa: E402
from results_io import write_results  # noqa: E402

DATA = Path(os.environ.get("MIAOTUI_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CALIB = [DATA / "ref-llama-16m-calibration.txt", DATA / "wikitext-2" / "wiki.valid.tokens"]
GIB = 2**30


def one(model: str, recipe: str, samples: int) -> dict:
    """Load `model`, calibrate `recipe` on `samples` windows of 512 tokens; seconds and peak RSS."""
    import miaotui
    from miaotui.bench import _reset_peak_rss, peak_rss
    from miaotui.calibration import Calibration
    from miaotui.evaluate import read_texts

    t0 = time.perf_counter()
    lm = random_llama(model, LLAMA_1B) if model == "random-llama-1b" else miaotui.load(DATA / model)
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in lm.model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    calib = Calibration(read_texts(CALIB), samples=samples, seqlen=512)
    calib.token_ids(lm)
    loading_peak = peak_rss()  # the random model is built in float32 first: its peak is above the bf16 weights
    _reset_peak_rss()
    t0 = time.perf_counter()
    miaotui.apply_recipe(lm, miaotui.get_recipe(recipe), progress=True, calibration=calib)
    return {
        "model": model,
        "recipe": recipe,
        "params": params,
        "model_bytes": model_bytes,
        "samples": samples,
        "load_s": load_s,
        "calibrate_s": time.perf_counter() - t0,
        "peak_rss_loading": loading_peak,
        "peak_rss_calibrating": peak_rss(),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="w4-gptq,w4-awq")
    p.add_argument("--samples-ref", type=int, default=128, help="calibration windows for ref-llama-16m")
    p.add_argument("--samples-1b", type=int, default=16, help="calibration windows for the random 1B Llama")
    p.add_argument("--models", default="ref-llama-16m,random-llama-1b")
    p.add_argument("--one", nargs=3, metavar=("MODEL", "RECIPE", "SAMPLES"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], int(a.one[2]))))
        return
    rows = []
    for model in a.models.split(","):
        samples = a.samples_1b if model == "random-llama-1b" else a.samples_ref
        for recipe in a.recipes.split(","):
            print(f"{model} {recipe} ({samples} x 512 tokens)", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--one", model, recipe, str(samples)]
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # a long run that is stopped keeps its rows
    write_results(a.out, "calibration", "cpu", {"rows": rows}, markdown(rows, sys.argv[1:]))


def markdown(rows: list[dict], argv: list[str]) -> list[str]:
    import miaotui

    md = [
        f"# Calibration cost on this CPU ({os.cpu_count()} cores), torch {torch.__version__}, miaotui "
        f"{miaotui.__version__}",
        "",
        "Each row is a fresh process; peak RSS is the process's high-water mark while calibrating (VmHWM, reset "
        "after loading). Calibration windows are 512 tokens of the training text mixed with WikiText-2 validation.",
        "",
        "| model | params | weights | recipe | windows | calibrate s | s per block | peak RSS loading | peak RSS "
        "calibrating | calibrating peak - weights |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    blocks = {"ref-llama-16m": 6, "random-llama-1b": 16}
    for r in rows:
        md.append(
            f"| {r['model']} | {r['params'] / 1e6:,.1f}M | {r['model_bytes'] / GIB:.2f} GiB | {r['recipe']} | "
            f"{r['samples']} | {r['calibrate_s']:.1f} | {r['calibrate_s'] / blocks.get(r['model'], 1):.1f} | "
            f"{r['peak_rss_loading'] / GIB:.2f} GiB | {r['peak_rss_calibrating'] / GIB:.2f} GiB | "
            f"{(r['peak_rss_calibrating'] - r['model_bytes']) / GIB:.2f} GiB |"
        )
    md += ["", f"`PYTHONPATH=. python benchmarks/bench_calibration.py {' '.join(argv)}`".replace(" `", "`")]
    return md


if __name__ == "__main__":
    main()
