"""The CPU w8a8 layer (per-token activation scales, full-range weights) on miaotui's kernel (fp32 and bf16 inputs) and
on fbgemm's path (where the kernel does not run), against one activation scale per call with weights in [-63, 63]
(fbgemm's `linear_dynamic` as PyTorch's dynamic quantization uses it, and as this layer ran before) and bf16
`F.linear`: median µs per call, interleaved, and the SQNR against fp32 on inputs whose tokens differ in magnitude
(x 1 to 4, one outlier channel x 8), at ref-llama-16m, MiniLM and Llama-8B-like shapes.

    .venv/bin/python benchmarks/bench_w8a8.py [--ms 1,8,128,512,2048]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from results_io import write_results

from miaotui.quantize import Int8DynamicLinear, cpu_kernels
from miaotui.quantize.int8_dynamic import has_vnni

SHAPES = [(1024, 384), (384, 1024), (1536, 384), (384, 1536), (4096, 1024)]  # (N, K)


def per_call(lin: torch.nn.Linear):
    """One activation scale per call, weights in [-63, 63], as the layer computed before: x (M, K) -> (M, N)."""
    w = lin.weight.detach().float()
    scale = w.abs().amax(1) / 63
    q = torch.round(w / scale[:, None]).clamp(-63, 63).to(torch.int8)
    with warnings.catch_warnings():  # quantized tensor types are deprecated; fbgemm's kernels are not
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(q), dtype=torch.long), 0)
    packed = torch.ops.quantized.linear_prepack(qw, None)

    def forward(x: torch.Tensor) -> torch.Tensor:  # the layer's forward as it was
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]).float().contiguous(), packed, False)
        return y.to(x.dtype).reshape(*x.shape[:-1], len(q))

    return forward


def timings(layer, fbgemm, old, x: torch.Tensor, wb: torch.Tensor, rounds: int) -> dict:
    """Median µs per call of the variants, interleaved: each round times every one."""
    xb = x.bfloat16()
    calls = {
        "kernel": lambda: layer(x),
        "kernel_bf16": lambda: layer(xb),
        "fbgemm_per_token": lambda: fbgemm(x),
        "per_call": lambda: old(x),
        "bf16": lambda: F.linear(xb, wb),
    }
    times = {name: [] for name in calls}
    reps = max(3, min(200, int(2e8 // (x.numel() * len(wb)))))  # calls per timing: about 2e8 multiply-adds
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in calls.items():
                fn()
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                times[name].append((time.perf_counter() - t0) / reps * 1e6)
    return {f"{name}_us": statistics.median(t) for name, t in times.items()}


def sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    return 10 * torch.log10(ref.pow(2).sum() / (y.float() - ref).pow(2).sum()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ms", default="1,8,128,512,2048")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args()
    torch.manual_seed(0)
    if not cpu_kernels.w8a8_fits():
        raise SystemExit("miaotui's w8a8 kernel does not run here (it needs AVX-512 VNNI and BF16, a C++ compiler)")
    rows = []
    for n, k in SHAPES:
        lin = torch.nn.Linear(k, n, bias=False)
        layer, old, wb = Int8DynamicLinear.from_float(lin), per_call(lin), lin.weight.detach().bfloat16()
        fbgemm = Int8DynamicLinear.from_float(lin)
        with cpu_kernels.switched_off():
            fbgemm(torch.randn(1, k))  # decides on its first call: fbgemm's path from now on
        for m in map(int, a.ms.split(",")):
            x = torch.randn(m, k) * (1 + 3 * torch.rand(m, 1))
            x[:, 7] *= 8
            r = {"N": n, "K": k, "M": m, **timings(layer, fbgemm, old, x, wb, a.rounds)}
            with torch.no_grad():
                ref = x @ lin.weight.detach().t()
                r["kernel_sqnr_db"], r["fbgemm_per_token_sqnr_db"] = sqnr(ref, layer(x)), sqnr(ref, fbgemm(x))
                r["per_call_sqnr_db"] = sqnr(ref, old(x))
            rows.append(r)
            print(r, flush=True)
    md = [
        f"# CPU w8a8: miaotui's kernel and fbgemm's per-token path vs one scale per call ({torch.get_num_threads()} "
        f"threads, AVX-512 VNNI {'yes' if has_vnni() else 'no'})",
        "",
        f"torch {torch.__version__}; median µs per call over {a.rounds} interleaved rounds, fp32 inputs unless said; "
        "SQNR against fp32. Per-call: the layer's kernel before (fbgemm, one activation scale per call, weights in "
        "[-63, 63]).",
        "",
        "| N x K | M | kernel µs | kernel / per-call | kernel bf16 µs | fbgemm per-token µs | per-call µs | bf16 "
        "F.linear µs | SQNR kernel / fbgemm per-token / per-call dB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['N']}x{r['K']} | {r['M']} | {r['kernel_us']:.0f} | {r['kernel_us'] / r['per_call_us']:.2f}x | "
            f"{r['kernel_bf16_us']:.0f} | {r['fbgemm_per_token_us']:.0f} | {r['per_call_us']:.0f} | "
            f"{r['bf16_us']:.0f} | {r['kernel_sqnr_db']:.1f} / {r['fbgemm_per_token_sqnr_db']:.1f} / "
            f"{r['per_call_sqnr_db']:.1f} |"
        )
    md += ["", "`.venv/bin/python benchmarks/bench_w8a8.py`"]
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "vnni": has_vnni()}
    write_results(a.out, "w8a8", "cpu", {"environment": env, "rows": rows}, md)


if __name__ == "__main__":
    main()
