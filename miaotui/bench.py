"""Latency, throughput and memory, measured the same way for every model.

Causal LMs: prefill (time to first token) and greedy decode on miaotui's engine (static KV cache) at a given
batch size.
Encoders: forward latency at batch 1 and throughput at a larger batch. Several models are measured
interleaved (A B A B ...) and summarised by the median, so a noisy machine hurts them alike.

>>> import miaotui
>>> lm = miaotui.load("path/to/model")  # doctest: +SKIP
>>> r = bench_models({"original": lm}, prompt_len=128, new_tokens=64)  # doctest: +SKIP
>>> r["models"]["original"]["decode_tokens_per_s"]  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import functools
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import transformers

from miaotui.arch import CAUSAL_LM
from miaotui.engine.runner import ModelRunner
from miaotui.experts import expert_modules, experts_per_token, fused_experts, num_experts
from miaotui.loading import LoadedModel
from miaotui.modules import find_linears, tensor_bytes
from miaotui.quantize import PackedLinear


def environment(device: torch.device) -> dict:
    """Where and with what a measurement ran."""
    env = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
    }
    return env


def weight_bytes(lm: LoadedModel) -> dict:
    """Bytes of all tensors and of the linear layers (float or packed, experts included) but the output head."""
    model = lm.model
    linears = [m for _, m in find_linears(model)] + [m for m in model.modules() if isinstance(m, PackedLinear)]
    head = model.get_output_embeddings() if lm.kind == CAUSAL_LM else None
    linear = sum(tensor_bytes(m) for m in linears if m is not head)
    linear += sum(tensor_bytes(m) for _, m in fused_experts(model))  # experts as 3-D weights are linear layers too
    return {"total_bytes": tensor_bytes(model), "linear_bytes": linear}


def experts_info(model: nn.Module) -> dict:
    """Mixture of experts: {"modules", "experts" (each), "per_token" (routed to), "bytes" (all experts),
    "active_bytes" (those one token reads)}, or {} for a dense model."""
    modules = [m for _, m in expert_modules(model)]
    if not modules:
        return {}
    per_token = experts_per_token(model)
    total = sum(tensor_bytes(m) for m in modules)
    experts = num_experts(modules[0])
    return {
        "modules": len(modules),
        "experts": experts,
        "per_token": per_token,
        "bytes": total,
        "active_bytes": int(total * min(1.0, per_token / experts)),
    }


def decode_bytes_per_token(lm: LoadedModel, experts: dict | None = None) -> int:
    """Bytes one batch-1 decode step must read: every tensor, but only one row of an untied input embedding table,
    and of a mixture of experts only the experts a token is routed to (`experts_info`)."""
    model = lm.model
    total = tensor_bytes(model)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if emb is not None and getattr(head, "weight", None) is not emb.weight:  # untied (or a quantized head)
        total -= tensor_bytes(emb) - emb.weight[0].numel() * emb.weight.element_size()
    experts = experts_info(model) if experts is None else experts
    return total - experts.get("bytes", 0) + experts.get("active_bytes", 0)


@functools.cache
def copy_bandwidth(device: torch.device) -> float:
    """Measured device memory bandwidth in bytes/s (a large copy, bytes read + written)."""
    n = 1 << 28
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    _sync(device)
    return 2 * n * 10 / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of `fn()`, synchronised on CUDA before and after."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def median_time(fn: Callable[[], object], device: torch.device, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of `fn()` over `repeats` calls after `warmup` (synchronised on CUDA).

    >>> median_time(lambda: sum(range(100)), torch.device("cpu"), repeats=3) > 0
    True
    """
    for _ in range(warmup):
        fn()
    return _median([timed(fn, device) for _ in range(repeats)])


@torch.no_grad()
def _decode_once(runner: ModelRunner, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens - 1 steps): greedy on the engine's static cache."""
    dev = runner.device
    _sync(dev)
    t0 = time.perf_counter()
    token = runner.extend(torch.arange(len(prompt)), prompt.tolist()).argmax(-1)  # (B,)
    _sync(dev)
    t1 = time.perf_counter()
    pos = torch.full_like(token, prompt.shape[1])
    for step in range(new_tokens - 1):
        token = runner.decode(token, pos + step).argmax(-1)
    _sync(dev)
    return t1 - t0, time.perf_counter() - t1


def _reset_peak_rss() -> None:
    """Start a new peak-RSS interval (Linux: clear the VmHWM high-water mark; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak resident memory of this process in bytes since the last reset (VmHWM), else since it started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _spread(xs: list[float]) -> float:
    """Relative spread (max - min) / median of repeated timings."""
    m = statistics.median(xs)
    return (max(xs) - min(xs)) / m if m else 0.0


def bench_models(
    models: dict[str, LoadedModel],
    *,
    prompt_len: int = 128,
    new_tokens: int = 64,
    batch_size: int = 1,
    seqlen: int = 128,
    encoder_batch: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    compile: bool = False,
    runners: dict[str, ModelRunner] | None = None,
    engine_options: dict[str, dict] | None = None,
) -> dict:
    """Benchmark several models of the same kind, interleaved; returns per-model results + environment.

    Causal LMs run on miaotui's engine (static KV cache; `compile` compiles its decode step). `runners` gives
    ready engine runners by model name (e.g. rank 0 of a parallel run, `miaotui.engine.launch.start_parallel`);
    they must hold batch_size rows of prompt_len + new_tokens positions.
    engine_options: per model name, ModelRunner options that override the defaults (compile, kv_dtype).
    """
    if not models:
        raise ValueError("bench_models needs at least one model")
    first = next(iter(models.values()))
    if prompt_len < 1 or new_tokens < 2 or batch_size < 1 or seqlen < 1 or encoder_batch < 1 or repeats < 1:
        raise ValueError("benchmark sizes must be positive (and new_tokens at least 2)")
    gen = torch.Generator().manual_seed(seed)
    vocab = first.config.vocab_size
    causal = first.kind == CAUSAL_LM
    context = first.context_length
    if context is not None and causal and prompt_len + new_tokens > context:
        raise ValueError(f"prompt {prompt_len} + new tokens {new_tokens} exceed the model's context of {context}")
    if context is not None and not causal and seqlen > context:
        raise ValueError(f"seqlen {seqlen} exceeds the model's context of {context}")
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    peaks: dict[str, int] = {}
    runners = {
        name: (runners or {}).get(name)
        or ModelRunner(
            lm,
            max_batch=batch_size,
            max_len=prompt_len + new_tokens,
            **{"compile": compile, **(engine_options or {}).get(name, {})},
        )
        for name, lm in models.items()
        if causal
    }
    rss: dict[str, int] = {}

    def measure(name: str, lm: LoadedModel, record: bool) -> None:
        dev = lm.device
        if causal:
            prompt = torch.randint(3, vocab, (batch_size, prompt_len), generator=gen).to(dev)
            prefill, decode = _decode_once(runners[name], prompt, new_tokens)
            values = {"prefill_s": prefill, "decode_step_s": decode / (new_tokens - 1)}
        else:
            one = {"input_ids": torch.randint(3, vocab, (1, seqlen), generator=gen).to(dev)}
            many = {"input_ids": torch.randint(3, vocab, (encoder_batch, seqlen), generator=gen).to(dev)}
            with torch.no_grad():
                values = {
                    "latency_b1_s": timed(lambda: lm.model(**one), dev),
                    "latency_batch_s": timed(lambda: lm.model(**many), dev),
                }
        if record:
            for key, v in values.items():
                samples[name].setdefault(key, []).append(v)

    for _ in range(warmup):
        for name, lm in models.items():
            measure(name, lm, record=False)
    for _ in range(repeats):
        for name, lm in models.items():
            if lm.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(lm.device)
            _reset_peak_rss()
            measure(name, lm, record=True)
            rss[name] = max(rss.get(name, 0), peak_rss())
            if lm.device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(lm.device))

    results = {}
    for name, lm in models.items():
        s = samples[name]
        r: dict = {"dtype": str(lm.dtype).removeprefix("torch."), **weight_bytes(lm)}
        if causal:
            step = _median(s["decode_step_s"])
            r.update(
                prefill_ms=_median(s["prefill_s"]) * 1e3,
                ttft_ms=_median(s["prefill_s"]) * 1e3,
                time_per_token_ms=step * 1e3,
                decode_tokens_per_s=batch_size / step,
                prefill_tokens_per_s=batch_size * prompt_len / _median(s["prefill_s"]),
                spread=_spread(s["decode_step_s"]),
            )
        else:
            r.update(
                latency_b1_ms=_median(s["latency_b1_s"]) * 1e3,
                latency_batch_ms=_median(s["latency_batch_s"]) * 1e3,
                throughput_seq_per_s=encoder_batch / _median(s["latency_batch_s"]),
                spread=_spread(s["latency_b1_s"]),
            )
        r["peak_rss_bytes"] = rss[name]  # the whole process (every model loaded) while this one ran
        if name in peaks:
            r["peak_cuda_bytes"] = peaks[name]
        if causal:
            r["kv_cache_bytes"] = runners[name].kv_cache_bytes()
            if runners[name].compile_seconds is not None:
                r["compile_s"] = runners[name].compile_seconds
        if causal and lm.device.type == "cuda":  # batch-1 decode is bound by memory bandwidth there
            per_token = decode_bytes_per_token(lm)
            roofline = copy_bandwidth(lm.device) / per_token
            r.update(
                decode_bytes_per_token=per_token,
                roofline_tokens_per_s=roofline,
                roofline_pct=100 * r["decode_tokens_per_s"] / batch_size / roofline,
            )
        results[name] = r
    protocol = (
        {"prompt_len": prompt_len, "new_tokens": new_tokens, "batch_size": batch_size}
        if causal
        else {"seqlen": seqlen, "batch_size": encoder_batch}
    )
    protocol.update(repeats=repeats, warmup=warmup, statistic="median, interleaved")
    if causal:
        protocol["engine"] = "miaotui static cache" + (", compiled decode" if compile else "")
    env = environment(first.device)
    env["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"kind": first.kind, "protocol": protocol, "environment": env, "models": results}


def bench_sweep(models: dict[str, LoadedModel], batch_sizes: list[int], **options) -> dict:
    """bench_models at each batch size (causal LMs: the decode batch; encoders: the throughput batch).

    Returns the first run's protocol and environment, and per model a list of points with the batch size,
    throughput (tokens/s or sequences/s) and peak memory.

    >>> import miaotui
    >>> lm = miaotui.load("path/to/model")  # doctest: +SKIP
    >>> bench_sweep({"m": lm}, [1, 4], new_tokens=16)["models"]["m"][1]["throughput"]  # doctest: +SKIP
    """
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be positive integers, got {batch_sizes}")
    causal = next(iter(models.values())).kind == CAUSAL_LM
    key, metric = ("batch_size", "decode_tokens_per_s") if causal else ("encoder_batch", "throughput_seq_per_s")
    out: dict = {"models": {name: [] for name in models}, "batch_sizes": list(batch_sizes)}
    for b in batch_sizes:
        run = bench_models(models, **{**options, key: b})
        out.setdefault("kind", run["kind"])
        out.setdefault("protocol", {k: v for k, v in run["protocol"].items() if k != "batch_size"})
        out.setdefault("environment", run["environment"])
        for name, r in run["models"].items():
            point = {"batch_size": b, "throughput": r[metric], "unit": "tokens/s" if causal else "sequences/s"}
            point.update({k: r[k] for k in ("peak_rss_bytes", "peak_cuda_bytes") if k in r})
            out["models"][name].append(point)
    return out
