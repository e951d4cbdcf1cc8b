"""miaotui's compressed-tensors exports in vLLM's CPU build: does each load, and does it generate miaotui's text?

ref-llama-16m is compressed with each recipe, saved, exported (`miaotui export`), and the export is run by vLLM
(offline `LLM.generate`, in its own virtual environment, see bench_serve.py's --help) on 16 WikiText-2 prompts of
64 tokens, 32 greedy new tokens each (ignore_eos). The same prompts run on miaotui's engine from the optimized
folder (GPTQ calibrated on 128 x 512 tokens of the calibration text). Reported per recipe: whether vLLM
loaded it (else the root cause it logged), the share of prompts whose 32 tokens are identical, and the mean number of
leading tokens that agree.

    .venv/bin/python benchmarks/bench_vllm_export.py [--recipes w8,w8a8,w4-rtn,w4-gptq]
        [--vllm-python .venv-vllm/bin/python]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_serve import DATA, REPO, vllm_available, vllm_env, wiki_lines
from results_io import write_results

VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
path, prompts, n = sys.argv[1], json.loads(open(sys.argv[2]).read()), int(sys.argv[3])
llm = LLM(model=path, dtype="bfloat16", max_model_len=256, max_num_seqs=16)
params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


def prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    return [tokenizer(ln)["input_ids"][:length] for ln in wiki_lines(count)]


def run_vllm(python: str, path: Path, ids: list[list[int]], new: int, tmp: Path) -> tuple[list | None, str]:
    """vLLM's greedy tokens for each prompt, or None and the last error line."""
    (tmp / "prompts.json").write_text(json.dumps(ids))
    args = [python, "-c", VLLM_SCRIPT, str(path), str(tmp / "prompts.json"), str(new)]
    done = subprocess.run(args, capture_output=True, text=True, env=vllm_env(kv_cache_gib=1), timeout=900)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:]), ""
    log = (done.stdout + done.stderr).splitlines()  # vLLM's engine process logs to either
    causes = [ln for ln in log if "cannot implement due to" in ln] or [ln for ln in log if "Error: " in ln]
    return None, (causes[0] if causes else log[-1]).split("] ")[-1].strip()[:300]


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    def prefix(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    return {
        "identical": sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours),
        "mean_leading_tokens_equal": statistics.fmean(prefix(a, b) for a, b in zip(ours, theirs, strict=True)),
    }


def main() -> None:
    import torch

    import miaotui
    from miaotui.api import Engine, SamplingParams
    from miaotui.calibration import Calibration

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="w8,w8a8,w4-rtn,w4-gptq")
    p.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args()
    why = vllm_available(a.vllm_python)
    if why is not None:
        raise SystemExit(f"vLLM cannot run: {why} (see benchmarks/bench_serve.py --help to install it)")
    base = DATA / "ref-llama-16m"
    calibration = Calibration((DATA / "ref-llama-16m-calibration.txt").read_text(), samples=128, seqlen=512)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for recipe in a.recipes.split(","):
            lm = miaotui.load(base, dtype="bfloat16")
            ids = prompts(lm.tokenizer, 16, 64)
            miaotui.apply_recipe(lm, miaotui.get_recipe(recipe), progress=False, calibration=calibration)
            miaotui.save(lm, tmp / recipe)
            engine = Engine(miaotui.load(tmp / recipe), max_batch=16, max_len=128)
            ours = [c.token_ids for c in engine.generate(ids, SamplingParams(max_tokens=a.new_tokens, ignore_eos=True))]
            summary = miaotui.export(tmp / recipe, tmp / f"{recipe}-ct")
            theirs, error = run_vllm(a.vllm_python, tmp / f"{recipe}-ct", ids, a.new_tokens, tmp)
            rows[recipe] = {"export_says": summary["vllm"], "loaded": theirs is not None, "error": error}
            if theirs is not None:
                rows[recipe].update(agreement(ours, theirs))
            print(recipe, rows[recipe], file=sys.stderr, flush=True)
    md = [
        "# miaotui's compressed-tensors exports in vLLM's CPU build (ref-llama-16m, bf16)",
        "",
        f"torch {torch.__version__}; 16 WikiText-2 prompts of 64 tokens, {a.new_tokens} greedy new tokens; miaotui's "
        "engine on the optimized folder against vLLM on its export.",
        "",
        "| recipe | vLLM CPU loads it | prompts with identical tokens | mean leading tokens equal | export says |",
        "|---|---|---|---|---|",
    ]
    for recipe, r in rows.items():
        if r["loaded"]:
            md.append(
                f"| {recipe} | yes | {100 * r['identical']:.0f} % | {r['mean_leading_tokens_equal']:.1f} "
                f"of {a.new_tokens} | {r['export_says']} |"
            )
        else:
            md.append(f"| {recipe} | no: {r['error']} | | | {r['export_says']} |")
    md += ["", f"`.venv/bin/python benchmarks/bench_vllm_export.py {' '.join(sys.argv[1:])}`"]
    write_results(a.out, "vllm-export", "cpu", {"rows": rows, "args": vars(a)}, md)


if __name__ == "__main__":
    main()
