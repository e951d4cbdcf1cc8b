"""Cheap signals before any full evaluation: a speed model from kernel micro-benchmarks, engine options timed on
the original model (speculative decoding on held-out text prompts), and per-layer sensitivity on calibration text.

Speed model: each layer option is applied (data-free: rtn, magnitude, svd) to a lone linear layer of every shape
the model has, and timed against the float layer on the target device and dtype at the objective's row counts
(decode: M = batch; prefill: M = batch x prompt; throughput: both, weighted by the steps of one generation).
An option whose layers are not faster in sum is dropped before any calibration is spent on it.

>>> objective_rows("throughput", batch=2, prompt_len=64, new_tokens=32)
{2: 31, 128: 1}
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import Counter

import torch
import torch.nn as nn

from miaotui.bench import bench_models, median_time
from miaotui.engine.generate import Engine
from miaotui.engine.sampling import SamplingParams
from miaotui.evaluate import score_windows
from miaotui.experts import expert_modules, expert_shapes, experts_per_token
from miaotui.loading import LoadedModel
from miaotui.lowrank import factorize_
from miaotui.modules import find_linears, linear_weight
from miaotui.progress import track
from miaotui.quantize import quantize_
from miaotui.quantize.config import DEFAULT_IGNORE
from miaotui.sparsity import prune_
from miaotui.tune.config import AutotuneConfig, LayerOption, speculative_options
from miaotui.tune.log import MeasurementLog

VERBS = {"quantize": quantize_, "prune": prune_, "factorize": factorize_}
SPEED_KEYS = {
    "decode": "decode_tokens_per_s",
    "prefill": "prefill_tokens_per_s",
    "throughput": "throughput_tokens_per_s",
}


def objective_rows(objective: str, batch: int, prompt_len: int, new_tokens: int) -> dict[int, int]:
    """{rows M of one linear call: how many such calls one generation makes} for the objective."""
    if objective == "decode":
        return {batch: 1}
    if objective == "prefill":
        return {batch * prompt_len: 1}
    return {batch: new_tokens - 1, batch * prompt_len: 1}


def objective_speed(result: dict, objective: str, cfg: AutotuneConfig) -> float:
    """The objective's figure (higher is better) from one model's bench_models result."""
    if objective == "throughput":
        seconds = result["prefill_ms"] / 1e3 + (cfg.new_tokens - 1) * result["time_per_token_ms"] / 1e3
        return cfg.batch * (cfg.prompt_len + cfg.new_tokens) / seconds
    return result[SPEED_KEYS[objective]]


def apply_option(module: nn.Module, option: LayerOption, targets=("*",), ignore=()) -> None:
    """Apply the data-free variant of `option` in place to the matching linear layers of `module`."""
    for step in option.steps(tuple(targets), tuple(ignore)):
        VERBS[step.step_type](module, step, progress=False)


def layer_shapes(lm: LoadedModel) -> Counter:
    """(out, in) shape -> how many of the linear layers a recipe would touch one token runs through (lm_head and
    classifiers excluded). Of a mixture of experts, only the experts a token is routed to count."""
    experts = expert_modules(lm.model)
    inside = {id(m) for _, e in experts for m in e.modules()}
    shapes = Counter(
        tuple(linear_weight(m).shape) for _, m in find_linears(lm.model, ignore=DEFAULT_IGNORE) if id(m) not in inside
    )
    per_token = experts_per_token(lm.model) if experts else 0
    for _, module in experts:
        for shape in expert_shapes(module):
            shapes[shape] += per_token
    return shapes


@torch.no_grad()
def _kernel_us(option: LayerOption | None, n: int, k: int, m: int, dtype, device) -> float:
    gen = torch.Generator().manual_seed(0)
    layer = nn.Sequential(nn.Linear(k, n, bias=False))
    layer[0].weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
    layer = layer.to(device=device, dtype=dtype)
    if option is not None:
        apply_option(layer, option)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)  # (M, K)
    return median_time(lambda: layer(x), torch.device(device)) * 1e6


def speed_model(lm: LoadedModel, options: list[LayerOption], cfg: AutotuneConfig, log: MeasurementLog) -> dict:
    """Per option: predicted linear-layer time vs float, per shape and in sum, and whether it is kept.

    Returns {option name: {"speedup", "kept", "reason", "shapes": {"NxK": speedup}}}; "float" is the reference.
    """
    rows = objective_rows(cfg.objective, cfg.batch, cfg.prompt_len, cfg.new_tokens)
    shapes = layer_shapes(lm)
    dtype, device = lm.dtype, str(lm.device)

    def total(option: LayerOption | None) -> tuple[float, dict]:
        per_shape, whole = {}, 0.0
        for (n, k), count in shapes.items():
            us = 0.0
            for m, calls in rows.items():
                key = ["kernel", option.name if option else "float", n, k, m, str(dtype), device]
                us += calls * log.measure(key, lambda n=n, k=k, m=m: _kernel_us(option, n, k, m, dtype, device))
            per_shape[f"{n}x{k}"] = us
            whole += count * us
        return whole, per_shape

    float_total, float_shapes = total(None)
    out = {}
    where = f"{device} ({str(dtype).removeprefix('torch.')}) at M={'/'.join(map(str, rows))}"
    for option in track(options, "speed model", enabled=None):
        t, per_shape = total(option)
        speedup = float_total / t
        kept = speedup >= cfg.min_kernel_speedup
        out[option.name] = {
            "speedup": speedup,
            "kept": kept,
            "reason": "" if kept else f"its layers run {speedup:.2f}x the float layers' speed on {where}",
            "shapes": {s: float_shapes[s] / us for s, us in per_shape.items()},
        }
    return out


def screen_engine(base: LoadedModel, cfg: AutotuneConfig, log: MeasurementLog) -> tuple[dict, dict]:
    """Time the original model under every engine option combination; keep the fastest if it beats the default.

    Returns (chosen ModelRunner options, {combination name: {"speed", "kept"}}).
    """
    combos = {
        f"kv={kv},compile={c}": {"kv_dtype": kv, "compile": c} for kv in cfg.space.kv_dtypes for c in cfg.space.compile
    }
    default = {"kv_dtype": "auto", "compile": False}
    combos.setdefault("kv=auto,compile=False", default)
    if len(combos) == 1:
        return default, {}

    def run():
        r = bench_models(
            dict.fromkeys(combos, base), engine_options=combos, **bench_protocol(cfg, cfg.repeats), seed=cfg.seed
        )
        return {name: objective_speed(m, cfg.objective, cfg) for name, m in r["models"].items()}

    speeds = log.measure(["engine", sorted(combos)], run)
    best = max(speeds, key=speeds.get)
    if speeds[best] <= 1.02 * speeds["kv=auto,compile=False"]:
        best = "kv=auto,compile=False"
    return combos[best], {name: {"speed": s, "kept": name == best} for name, s in speeds.items()}


def screen_speculative(
    base: LoadedModel, runner_options: dict, cfg: AutotuneConfig, log: MeasurementLog, windows: torch.Tensor
) -> tuple[dict, dict]:
    """Time greedy generation from real-text prompts under each speculative choice on the original model.

    Prompts are the first `prompt_len` tokens of `batch` held-out windows (prompt lookup needs real text: on
    random tokens it never drafts). Returns (chosen Engine options, {choice: {"speed", "speedup",
    "acceptance_rate", "kept"}}); "off" unless a choice is more than 2 % faster in the objective's tokens/s.
    """
    choices = {name: speculative_options(name) for name in cfg.space.speculative}
    choices.setdefault("off", {})
    if len(choices) == 1:
        return {}, {}
    if cfg.objective == "prefill":
        return {}, {n: {"kept": n == "off", "reason": "speculative decoding does not change prefill"} for n in choices}
    prompts = [windows[i % len(windows), : cfg.prompt_len].tolist() for i in range(cfg.batch)]  # batch x prompt_len
    params = SamplingParams(max_tokens=cfg.new_tokens, ignore_eos=True)
    counted = cfg.batch * (cfg.new_tokens + (cfg.prompt_len if cfg.objective == "throughput" else 0))

    def run() -> dict:
        engines = {
            name: Engine(base, max_batch=cfg.batch, max_len=cfg.prompt_len + cfg.new_tokens, **runner_options, **opts)
            for name, opts in choices.items()
        }
        times: dict[str, list[float]] = {name: [] for name in choices}
        for r in range(cfg.repeats + 1):  # the first round warms up (and compiles)
            for name, engine in engines.items():
                t0 = time.perf_counter()
                engine.generate(prompts, params)
                if r:
                    times[name].append(time.perf_counter() - t0)
        out = {}
        for name, engine in engines.items():
            stats = engine.speculative_stats or {}
            out[name] = {"speed": counted / statistics.median(times[name]), **stats}
        return out

    key = ["speculative", sorted(choices), sorted(runner_options.items()), cfg.objective, prompts]
    rows = log.measure(key, run)
    off = rows["off"]["speed"]
    best = max(rows, key=lambda n: rows[n]["speed"])
    if rows[best]["speed"] <= 1.02 * off:
        best = "off"
    for name, row in rows.items():
        row |= {"speedup": row["speed"] / off, "kept": name == best}
    return choices[best], rows


def bench_protocol(cfg: AutotuneConfig, repeats: int) -> dict:
    return {"prompt_len": cfg.prompt_len, "new_tokens": cfg.new_tokens, "batch_size": cfg.batch, "repeats": repeats}


def sensitivity(
    base32: LoadedModel, option: LayerOption, windows: torch.Tensor, log: MeasurementLog
) -> dict[str, float]:
    """Mean KL(original || model) per token on calibration windows when only that layer takes `option`."""
    work = copy.deepcopy(base32)
    names = [n for n, _ in find_linears(work.model, ignore=DEFAULT_IGNORE)]
    out = {}
    for name in track(names, f"sensitivity {option.name}", enabled=None):

        def one(name=name) -> float:
            parent_name, _, child = name.rpartition(".")
            parent = work.model.get_submodule(parent_name)
            saved = copy.deepcopy(getattr(parent, child))
            apply_option(work.model, option, targets=(name,))
            try:
                return score_windows(work, windows, baseline=base32)["kl_mean"]
            finally:
                setattr(parent, child, saved)

        out[name] = log.measure(["sensitivity", option.name, name, windows.numel()], one)
    return out
