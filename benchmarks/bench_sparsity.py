"""2:4 sparsity on CUDA against dense bf16, in the same run: single linear layers and end-to-end prefill.

CUDA section (needs an Ampere-or-newer GPU): for Llama-3.2-1B and Llama-3-8B layer shapes (N, K) and
M = 1 .. 4096 tokens, median time of bf16 `F.linear` with the dense weight, and with the same 2:4-pruned weight
compressed by `to_sparse_semi_structured` (cuSPARSELt, and CUTLASS); then a prefill forward of a random-weight
Llama model of each shape (batch 1), dense vs every block linear replaced by miaotui's 2:4 layer.

CPU section (--cpu): a pruned layer computes with its dense weight, so it takes exactly as long as the
original; the table shows it (dense vs 50 %-pruned dense weight vs miaotui's SparseLinear) rather than claim
a speedup that does not exist.

    .venv/bin/python benchmarks/bench_sparsity.py                  # CUDA: layers + prefill
    .venv/bin/python benchmarks/bench_sparsity.py --cpu            # CPU: honest no-speedup table
    .venv/bin/python benchmarks/bench_sparsity.py --shapes 1b --ms 1,256 --prefill 512 --layers 2  # smoke

Writes benchmarks/results/sparsity-<device>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from results_io import write_results

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (hidden, intermediate, kv heads x head dim, layers) and the block linears' (N, K)
MODELS = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, layers=16),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, layers=32),
}
CPU_SHAPES = [(384, 384), (1024, 384), (384, 1024), (2048, 2048)]


def layer_shapes(cfg: dict) -> list[tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    return [(h, h), (kv, h), (i, h), (h, i)]  # q/o, k/v, gate/up, down


def median_time(fn, device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median seconds per call after warm-up (CUDA: events around each call, so launch overhead counts)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prune24(w: torch.Tensor) -> torch.Tensor:
    """Magnitude 2:4 pruning of w (N, K) (speed does not depend on which weights are kept)."""
    from miaotui.sparsity.magnitude import magnitude_prune

    return magnitude_prune(w, None, 0.5, (2, 4))[0].to(w.dtype)


def bench_layers(shapes, ms, device, reps) -> list[dict]:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    rows = []
    for n, k in shapes:
        w = prune24(torch.randn(n, k, device=device, dtype=torch.bfloat16))
        backends = {}
        for name, cutlass in (("cusparselt", False), ("cutlass", True)):
            SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
            try:
                backends[name] = to_sparse_semi_structured(w)
            except (RuntimeError, ValueError) as e:  # a backend missing from this build
                print(f"  {name} unavailable: {str(e).splitlines()[0]}", file=sys.stderr)
        SparseSemiStructuredTensor._FORCE_CUTLASS = False
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ref = F.linear(x, w)
            row = {"N": n, "K": k, "M": m, "dense_us": median_time(lambda x=x, w=w: F.linear(x, w), device, reps) * 1e6}
            for name, ws in backends.items():
                cos = F.cosine_similarity(F.linear(x, ws).float().flatten(), ref.float().flatten(), 0).item()
                if cos < 0.999:
                    raise RuntimeError(f"{name} 2:4 result disagrees with dense at {n}x{k}, M={m}: cosine {cos}")
                t = median_time(lambda x=x, ws=ws: F.linear(x, ws), device, reps)
                row[f"{name}_us"], row[f"{name}_speedup"] = t * 1e6, row["dense_us"] / (t * 1e6)
            rows.append(row)
            print(f"  {n}x{k} M={m}: " + ", ".join(f"{k_}={v:.3g}" for k_, v in row.items() if "_" in k_))
    return rows


def bench_prefill(key: str, prompts, layers, device, reps) -> list[dict]:
    """Prefill (one forward of a batch-1 prompt) of a random Llama of this shape: dense vs 2:4 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from miaotui.modules import find_linears, set_module
    from miaotui.sparsity import SemiStructuredSparseLinear

    cfg = dict(MODELS[key])
    n_layers = layers or cfg.pop("layers")
    cfg.pop("layers", None)
    config = LlamaConfig(**cfg, num_hidden_layers=n_layers, vocab_size=32000, max_position_embeddings=8192)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    for _, m in find_linears(model, ignore=("lm_head",)):
        m.weight.data = prune24(m.weight.data)
    dense_model = model
    sparse_model = copy.deepcopy(model)
    for name, m in find_linears(sparse_model, ignore=("lm_head",)):
        set_module(sparse_model, name, SemiStructuredSparseLinear.from_float(m))
    rows = []
    with torch.no_grad():
        for t in prompts:
            ids = torch.randint(0, 32000, (1, t), device=device)
            a = dense_model(input_ids=ids, use_cache=False).logits.float()
            b = sparse_model(input_ids=ids, use_cache=False).logits.float()
            cos = F.cosine_similarity(a.flatten(), b.flatten(), 0).item()
            times = {"dense": [], "2:4": []}
            for _ in range(reps):  # interleaved
                for label, mdl in (("dense", dense_model), ("2:4", sparse_model)):
                    call = lambda mdl=mdl, ids=ids: mdl(input_ids=ids, use_cache=False)
                    times[label].append(median_time(call, device, 1, warmup=1))
            dense_ms, sparse_ms = (statistics.median(times[k_]) * 1e3 for k_ in ("dense", "2:4"))
            rows.append(
                {
                    "model": key,
                    "layers": n_layers,
                    "prompt": t,
                    "dense_ms": dense_ms,
                    "sparse24_ms": sparse_ms,
                    "speedup": dense_ms / sparse_ms,
                    "logits_cosine": cos,
                }
            )
            print(f"  prefill {key} ({n_layers} layers) T={t}: dense {dense_ms:.2f} ms, 2:4 {sparse_ms:.2f} ms")
    del dense_model, sparse_model, model
    torch.cuda.empty_cache()
    return rows


def bench_cpu(reps: int) -> list[dict]:
    """Dense vs 50 %-pruned dense weights vs SparseLinear on CPU, bf16 and fp32, M = 1 and 512."""
    from miaotui.sparsity import PruneConfig, prune_

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for n, k in CPU_SHAPES:
            lin = nn.Linear(k, n, bias=False).to(dtype)
            holder = nn.ModuleDict({"l": nn.Linear(k, n, bias=False).to(dtype)})
            holder["l"].weight.data.copy_(lin.weight.data)
            prune_(holder, PruneConfig(sparsity=0.5), progress=False)
            pruned_w = holder["l"].dense_weight()
            for m in (1, 512):
                x = torch.randn(m, k, dtype=dtype)
                variants = {
                    "dense": lambda x=x, w=lin.weight: F.linear(x, w),
                    "pruned_dense": lambda x=x, w=pruned_w: F.linear(x, w),
                    "sparse_layer": lambda x=x, layer=holder["l"]: layer(x),
                }
                t = {name: [] for name in variants}
                for _ in range(5):  # interleaved rounds
                    for name, fn in variants.items():
                        t[name].append(median_time(fn, torch.device("cpu"), reps))
                row = {"dtype": str(dtype).removeprefix("torch."), "N": n, "K": k, "M": m}
                row.update({f"{name}_us": statistics.median(v) * 1e6 for name, v in t.items()})
                row["sparse_layer_speedup"] = row["dense_us"] / row["sparse_layer_us"]
                rows.append(row)
                print(f"  cpu {row['dtype']} {n}x{k} M={m}: speedup {row['sparse_layer_speedup']:.2f}x")
    return rows


def markdown(data: dict) -> list[str]:
    md = [f"# 2:4 sparsity benchmark ({data['device']}, {data['date']})", "", f"torch {data['torch']}", ""]
    if data.get("layers"):
        md += [
            "## Single linear, bf16 (speedup > 1 is faster than dense)",
            "",
            "| N x K | M | dense µs | cuSPARSELt µs | speedup | CUTLASS µs | speedup |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in data["layers"]:
            cells = [
                f"{r.get(f'{b}_us', float('nan')):.1f} | {r.get(f'{b}_speedup', float('nan')):.2f}x"
                for b in ("cusparselt", "cutlass")
            ]
            md.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['dense_us']:.1f} | {cells[0]} | {cells[1]} |")
    if data.get("prefill"):
        md += [
            "",
            "## Prefill, batch 1, random-weight Llama (same run)",
            "",
            "| model | layers | prompt | dense ms | 2:4 ms | speedup | logits cosine |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in data["prefill"]:
            md.append(
                f"| {r['model']} | {r['layers']} | {r['prompt']} | {r['dense_ms']:.2f} | {r['sparse24_ms']:.2f} | "
                f"{r['speedup']:.2f}x | {r['logits_cosine']:.4f} |"
            )
    if data.get("cpu"):
        md += [
            "",
            "## CPU: pruned weights compute densely (no speedup expected)",
            "",
            "| dtype | N x K | M | dense µs | pruned dense µs | SparseLinear µs | speedup |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in data["cpu"]:
            md.append(
                f"| {r['dtype']} | {r['N']}x{r['K']} | {r['M']} | {r['dense_us']:.1f} | {r['pruned_dense_us']:.1f} | "
                f"{r['sparse_layer_us']:.1f} | {r['sparse_layer_speedup']:.2f}x |"
            )
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run the CPU section instead (no GPU needed)")
    p.add_argument("--shapes", default="1b,8b", help="comma list of 1b, 8b")
    p.add_argument("--ms", default="1,16,64,256,1024,4096", help="tokens per matmul (M)")
    p.add_argument("--prefill", default="512,2048", help="prompt lengths for end-to-end prefill; empty to skip")
    p.add_argument("--layers", type=int, default=0, help="blocks of the prefill models (0: the real count)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    keys = [s for s in args.shapes.split(",") if s]
    if any(k not in MODELS for k in keys):
        p.error(f"--shapes: choose from {', '.join(MODELS)}")
    data = {"date": datetime.date.today().isoformat(), "torch": torch.__version__}
    if args.cpu:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        data.update(device=f"cpu ({torch.get_num_threads()} threads)", cpu=bench_cpu(args.reps))
        write_results(args.out, "sparsity", "cpu", data, markdown(data))
        return 0
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        print(
            "bench_sparsity: the 2:4 section needs a CUDA GPU with compute capability 8.0 or newer (none found). "
            "Run with --cpu for the CPU section: there a pruned model computes densely and is exactly as fast.",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda")
    data["device"] = torch.cuda.get_device_name()
    data["layers"] = bench_layers(
        [s for k in keys for s in layer_shapes(MODELS[k])], [int(m) for m in args.ms.split(",")], device, args.reps
    )
    prompts = [int(t) for t in args.prefill.split(",") if t]
    data["prefill"] = [r for k in keys for r in bench_prefill(k, prompts, args.layers, device, 5)] if prompts else []
    write_results(args.out, "sparsity", "cuda", data, markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
