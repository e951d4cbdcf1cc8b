"""Quality of every compression recipe on ref-llama-16m, one protocol, one table.

Protocol (GUIDE §3): WikiText-2 test, 512-token windows, the first 65,536 tokens, fp32 compute; each model is
compressed from its bf16 checkpoint as `miaotui optimize` does. Calibrated steps draw 128 windows of 512 tokens
from the calibration files, by default the model's own training text (Python documentation) mixed with the
WikiText-2 validation split (never the test split), three quarters of the windows written by the model itself
(miaotui's default; `--generated 0,0.75` runs each calibrated recipe both ways). Quality is deterministic, so the
numbers do not depend on machine load; the calibration time does.

    PYTHONPATH=. python benchmarks/bench_quality.py                             # every recipe below
    PYTHONPATH=. python benchmarks/bench_quality.py --recipes w4-rtn,w4-gptq --samples 16 --max-tokens 16384
    PYTHONPATH=. python benchmarks/bench_quality.py --calib ../shared/data/ref-llama-16m-calibration.txt --name py
    PYTHONPATH=. python benchmarks/bench_quality.py --calib ../shared/data/ref-llama-16m-calibration.txt \
        --generated 0,0.75 --recipes sparse50-magnitude,sparse50-wanda,sparse50-sparsegpt,sparse24-sparsegpt --name py
    PYTHONPATH=. python benchmarks/bench_quality.py --calib ../shared/data/ref-llama-16m-calibration.txt \
        --generated 0,0.75 --llmcompressor .venv-llmc/bin/python --name py-llmcompressor
    PYTHONPATH=. python benchmarks/bench_quality.py --model ref-moe --recipes w8,w4-rtn,w4-gptq,slim-experts50

`--llmcompressor PYTHON` adds llm-compressor's rows for the calibrated recipes it has (benchmarks/llmcompressor_peer.py
names them), compressed in its own venv from the same bf16 checkpoint with the library's defaults, calibrated on
the text windows alone (the windows miaotui's `generated 0` rows use), loaded back by transformers and scored by
the same evaluator in the same run.

`--exported` adds, for each recipe, the same model saved, exported to compressed-tensors (`miaotui export`) and
loaded back by transformers, scored by the same evaluator: what another runtime computes from the export, against
what miaotui's own kernels compute (for `w8a8`, activations quantized per token on both sides).

`--model ref-moe` builds the reference mixture of experts (`benchmarks/ref_moe.py`) first; `--model PATH` takes any
causal LM. Rows of a mixture of experts also say how many tokens reached each expert while calibrating.

Writes benchmarks/results/quality-<name>-cpu-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llmcompressor_peer  # noqa: E402
import torch  # noqa: E402
from results_io import write_results  # noqa: E402

import miaotui  # noqa: E402
from miaotui.bench import weight_bytes  # noqa: E402
from miaotui.calibration import Calibration  # noqa: E402
from miaotui.errors import MiaotuiError  # noqa: E402
from miaotui.evaluate import compare_causal, read_text, read_texts  # noqa: E402
from miaotui.quantize import QuantizeConfig, SmoothConfig  # noqa: E402
from miaotui.recipe import Recipe  # noqa: E402
from miaotui.sparsity import PruneConfig  # noqa: E402

DATA = Path(os.environ.get("MIAOTUI_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CALIB = [DATA / "ref-llama-16m-calibration.txt", DATA / "wikitext-2" / "wiki.valid.tokens"]
# variants that are not built-in recipes, for comparison rows
EXTRA = {
    "w3-rtn": Recipe(steps=(QuantizeConfig(scheme="w3", group_size=128),), name="w3-rtn"),
    "w4-gptq-act": Recipe(steps=(QuantizeConfig(scheme="w4", algorithm="gptq", act_order=True),), name="w4-gptq-act"),
    **{  # GPTQ's damping against the default 0.01
        f"w4-gptq-damp{d:g}": Recipe(
            steps=(QuantizeConfig(scheme="w4", algorithm="gptq", damp=d),), name=f"w4-gptq-damp{d:g}"
        )
        for d in (0.001, 0.1)
    },
    "sparse24-magnitude": Recipe(steps=(PruneConfig(pattern="2:4"),), name="sparse24-magnitude"),
    "sparse50-magnitude-swaps": Recipe(steps=(PruneConfig(swaps=200),), name="sparse50-magnitude-swaps"),
    "sparse24-wanda": Recipe(steps=(PruneConfig(method="wanda", pattern="2:4"),), name="sparse24-wanda"),
    "sparse24-wanda-swaps": Recipe(
        steps=(PruneConfig(method="wanda", pattern="2:4", swaps=200),), name="sparse24-wanda-swaps"
    ),
    "sparse50-w4-gptq": Recipe(
        steps=(
            PruneConfig(method="sparsegpt", layer="dense"),
            QuantizeConfig(scheme="w4", algorithm="gptq", group_size=128),
        ),
        name="sparse50-w4-gptq",
    ),
    "w8a8-smoothquant-gptq": Recipe(
        steps=(SmoothConfig(), QuantizeConfig(scheme="w8a8", algorithm="gptq")), name="w8a8-smoothquant-gptq"
    ),
    # the fp8 recipe on PyTorch's CPU reference kernels: the same codes and products as on FP8 tensor cores
    "fp8-emulated": Recipe(steps=(QuantizeConfig(scheme="fp8", emulate=True),), name="fp8-emulated"),
}
DEFAULT = (
    "w8,w8a8,w8a8-smoothquant,fp8-emulated,w4-rtn,w4-hqq,w4-gptq,w4-awq,w3-rtn,w3-gptq,"
    "sparse50-magnitude,sparse50-wanda,sparse50-wanda-swaps,sparse50-sparsegpt,sparse24-magnitude,sparse24-sparsegpt,sparse24-w4"
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=DEFAULT, help=f"comma-separated built-ins or {', '.join(EXTRA)}")
    p.add_argument("--calib", action="append", help="calibration file (repeat to mix; default: training + valid)")
    p.add_argument("--name", default="recipes", help="results file name part (default recipes)")
    p.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument(
        "--generated",
        default="0.75",
        help="fraction(s) of the calibration windows the model writes itself, comma-separated: each calibrated "
        "recipe runs once per fraction, side by side (default 0.75, miaotui's default)",
    )
    p.add_argument("--max-tokens", type=int, default=65536)
    p.add_argument("--model", default=str(DATA / "ref-llama-16m"), help="a causal LM folder, or ref-moe")
    p.add_argument(
        "--llmcompressor",
        metavar="PYTHON",
        help="also compress each calibrated recipe llm-compressor has with llm-compressor, run by this interpreter "
        "(its own venv: see llmcompressor_peer.py), calibrated on the text windows alone as its user would, and "
        "scored by the same evaluator",
    )
    p.add_argument(
        "--exported",
        action="store_true",
        help="also score each compressed model exported to compressed-tensors and loaded back by transformers",
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args()
    if a.llmcompressor and not Path(a.llmcompressor).is_file():
        p.error(f"--llmcompressor {a.llmcompressor}: no such interpreter (llmcompressor_peer.py says how to make one)")
    model, label = _model(a.model)
    torch.manual_seed(0)
    text = read_text(DATA / "wikitext-2-raw" / "wiki.test.raw")
    calib_files = a.calib or CALIB
    fractions = [float(f) for f in a.generated.split(",")]
    calibs = {f: Calibration(read_texts(calib_files), samples=a.samples, seqlen=512, generated=f) for f in fractions}
    base = miaotui.load(model)  # bf16, as saved
    ref = copy.deepcopy(base)
    ref.model.to(torch.float32)
    rows = {"bf16": {**weight_bytes(base)}}
    runs = []  # (row name, recipe, calibration)
    for name in a.recipes.split(","):
        recipe = EXTRA.get(name) or miaotui.get_recipe(name)
        calibrated = any(step.needs_calibration for step in recipe.steps)
        for f in fractions if calibrated else fractions[:1]:
            runs.append((f"{name} (generated {f:g})" if calibrated and len(fractions) > 1 else name, recipe, calibs[f]))
    for calib in calibs.values():  # the generated windows, sampled once from the original (not timed)
        calib.token_ids(base)
    for name, recipe, calib in runs:
        lm = copy.deepcopy(base)
        t0 = time.perf_counter()
        summaries = miaotui.apply_recipe(lm, recipe, progress=False, calibration=calib, teacher=ref)
        seconds = time.perf_counter() - t0
        experts = next((s["experts"] for s in summaries if isinstance(s.get("experts"), dict)), None)
        lm.model.to("cpu")  # packed layers return to their portable (on-disk) layout
        sizes = weight_bytes(lm)
        exported = _exported_row(lm, ref, text, a.max_tokens) if a.exported else None
        lm.model.to(torch.float32)
        r = compare_causal(lm, text, baseline=ref, seqlen=512, max_tokens=a.max_tokens)
        rows[name] = {**r, **sizes, "compress_seconds": seconds, **({"experts": experts} if experts else {})}
        print(name, f"{100 * (r['perplexity_ratio'] - 1):+.2f} %", f"KL {r['kl_mean']:.4f}", flush=True)
        if exported:
            rows[f"{name}, exported (transformers)"] = {**exported, "linear_bytes": None, "compress_seconds": seconds}
            print(f"{name} exported", exported.get("error") or f"KL {exported['kl_mean']:.4f}", flush=True)
    if a.llmcompressor:
        peer_calib = Calibration(read_texts(calib_files), samples=a.samples, seqlen=512, generated=0)
        recipes = [n for n in a.recipes.split(",") if n in llmcompressor_peer.NAMES]
        for name, r in _llmcompressor_rows(a.llmcompressor, model, base, ref, peer_calib, recipes, text, a.max_tokens):
            rows[name] = r
            print(
                name, r.get("error") or f"{100 * (r['perplexity_ratio'] - 1):+.2f} % KL {r['kl_mean']:.4f}", flush=True
            )
    sources = " + ".join(Path(f).name for f in calib_files)
    md = [
        f"# Recipe quality, {label} (WikiText-2 test, first {a.max_tokens:,} tokens, seqlen 512, fp32 compute)",
        "",
        f"Calibration: {a.samples} windows of 512 tokens from {sources}, the fraction `generated` of them written "
        "by the model itself. "
        f"Original perplexity {next(r['baseline_perplexity'] for r in rows.values() if 'perplexity' in r):.2f}.",
        "",
        "| recipe | perplexity | vs bf16 | mean KL | KL p99 | top-1 agreement | linear bytes on disk | compress s |",
        "|---|---|---|---|---|---|---|---|",
        f"| bf16 | | | | | | {rows['bf16']['linear_bytes']:,} | |",
    ]
    for name, r in list(rows.items())[1:]:
        if "error" in r:
            md.append(f"| {name} | failed: {r['error']} | | | | | | |")
            continue
        md.append(
            f"| {name} | {r['perplexity']:.2f} | {100 * (r['perplexity_ratio'] - 1):+.2f} % | {r['kl_mean']:.4f} "
            f"| {r.get('kl_p99', float('nan')):.3f} | {100 * r['top1_agreement']:.1f} % | {_bytes(r['linear_bytes'])} "
            f"| {r['compress_seconds']:.1f} |"
        )
    reached = {n: r["experts"] for n, r in rows.items() if "statistics_tokens_per_expert" in r.get("experts", {})}
    for name, e in reached.items():
        routed = e["routed_tokens_per_expert"]
        md.append(
            f"\n{name}: every one of the {e['experts']} experts calibrated on {e['statistics_tokens_per_expert']:,} "
            f"tokens; routed to each: min {routed['min']:,}, median {routed['median']:,}, max {routed['max']:,}."
        )
    if a.llmcompressor:
        version = subprocess.run(
            [a.llmcompressor, "-c", "import importlib.metadata as m; print(m.version('llmcompressor'))"],
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        md.append(
            f"\nllm-compressor {version} rows: its defaults for each method (llmcompressor_peer.py), calibrated on "
            "the text windows alone (the `generated 0` rows' windows), loaded back by transformers, same evaluator."
        )
    md += ["", f"`PYTHONPATH=. python benchmarks/bench_quality.py {' '.join(sys.argv[1:])}`".replace(" `", "`")]
    write_results(a.out, f"quality-{a.name}", "cpu", rows, md)


def _bytes(n: int | None) -> str:
    return "" if n is None else f"{n:,}"


def _exported_row(lm, ref, text, max_tokens) -> dict:
    """`lm` saved, exported to compressed-tensors and loaded back by transformers, scored against `ref`; a model
    the export refuses gives a row that says why."""
    import dataclasses
    import tempfile

    from transformers import AutoModelForCausalLM

    from miaotui.checkpoint import save

    with tempfile.TemporaryDirectory() as tmp:
        save(lm, Path(tmp) / "miaotui")
        try:
            miaotui.export(Path(tmp) / "miaotui", Path(tmp) / "ct")
        except MiaotuiError as e:
            return {"error": f"export refused: {e}"}
        peer = dataclasses.replace(
            ref, model=AutoModelForCausalLM.from_pretrained(Path(tmp) / "ct", dtype=torch.float32)
        )
        return compare_causal(peer, text, baseline=ref, seqlen=512, max_tokens=max_tokens)


def _llmcompressor_rows(python, model, base, ref, calib, recipes, text, max_tokens):
    """(row name, row) of llm-compressor's model for each recipe, compressed in its venv on `calib`'s windows
    and loaded back by transformers (compressed-tensors decompresses on load)."""
    import dataclasses
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        windows = Path(tmp) / "windows.pt"
        torch.save(calib.token_ids(base), windows)  # (W, S)
        for name in recipes:
            out = Path(tmp) / name
            script = Path(__file__).with_name("llmcompressor_peer.py")
            done = subprocess.run([python, str(script), str(model), str(windows), name, str(out)], capture_output=True)
            if done.returncode:  # a row it cannot make: said in the table, the others still run
                yield (
                    f"llm-compressor {name}",
                    {"error": (done.stderr.decode().strip().splitlines() or ["no message"])[-1]},
                )
                continue
            peer = dataclasses.replace(ref, model=AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
            r = compare_causal(peer, text, baseline=ref, seqlen=512, max_tokens=max_tokens)
            seconds = float((out / "seconds.txt").read_text())
            yield f"llm-compressor {name} (generated 0)", {**r, "linear_bytes": None, "compress_seconds": seconds}


def _model(name: str) -> tuple[Path, str]:
    """(folder, label): `ref-moe` is built into a temporary folder (benchmarks/ref_moe.py)."""
    if name != "ref-moe":
        return Path(name), Path(name).name
    import tempfile

    from ref_moe import build_ref_moe

    return build_ref_moe(Path(tempfile.mkdtemp()) / "ref-moe"), "the reference MoE (ref_moe.py, 8 experts, top-2)"


if __name__ == "__main__":
    main()
