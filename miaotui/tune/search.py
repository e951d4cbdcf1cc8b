"""autotune: the fastest model under a quality budget, found by measurement.

Cheap signals first (engine options on the original, a kernel speed model, per-layer sensitivity on calibration
text), then candidates (the original, built-in recipes, each fast option on every layer, per-layer mixes) are
built, timed on the engine interleaved with the original, and evaluated on held-out text by successive halving
(the fastest half of those within budget go on to twice the tokens). The winner is the fastest candidate within
budget at the last round in a final interleaved benchmark, which includes the built-ins that got there.

>>> import os
>>> data = os.environ.get("MIAOTUI_DATA", "../shared/data")
>>> r = autotune(f"{data}/ref-llama-16m", "tuned", config=AutotuneConfig(objective="prefill"),
...              text_path=f"{data}/wikitext-2-raw/wiki.test.raw")  # doctest: +SKIP
>>> r["winner"]["name"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from miaotui.arch import CAUSAL_LM
from miaotui.atomic import atomic_dir, check_out_dir, write_text_atomic
from miaotui.bench import bench_models, weight_bytes
from miaotui.calibration import Calibration
from miaotui.checkpoint import write_model
from miaotui.errors import MiaotuiError
from miaotui.evaluate import read_text, read_texts, score_windows, token_windows
from miaotui.evaluate.similarity import sample_text
from miaotui.loading import LoadedModel, load_pretrained
from miaotui.pipeline import apply_recipe
from miaotui.progress import track
from miaotui.quantize.fp8 import require_hardware
from miaotui.report import write_report
from miaotui.report_html import pareto_front
from miaotui.tune.candidates import Candidate, initial_candidates, mixed_recipes
from miaotui.tune.config import AutotuneConfig
from miaotui.tune.log import MeasurementLog
from miaotui.tune.signals import (
    bench_protocol,
    objective_speed,
    screen_engine,
    screen_speculative,
    sensitivity,
    speed_model,
)


class _Search:
    def __init__(self, base: LoadedModel, cfg: AutotuneConfig, log: MeasurementLog, calibration, started: float):
        self.base, self.cfg, self.log, self.calibration, self.started = base, cfg, log, calibration, started
        self.base32 = copy.deepcopy(base)
        self.base32.model.to(torch.float32)
        self.models: dict[str, LoadedModel] = {}
        self.engine: dict = {}  # ModelRunner options (kv_dtype, compile) every candidate is timed with
        self.speculative: dict = {}  # Engine draft options, screened on the original model
        self.notes: list[str] = []

    def over_budget(self) -> bool:
        budget = self.cfg.time_budget_s
        return budget is not None and time.monotonic() - self.started > budget

    def model(self, c: Candidate) -> LoadedModel:
        if c.recipe is None:
            return self.base
        if c.name not in self.models:
            torch.manual_seed(self.cfg.seed)
            lm = copy.deepcopy(self.base)
            apply_recipe(lm, c.recipe, progress=False, calibration=self.calibration, teacher=self.base)
            self.models[c.name] = lm
        return self.models[c.name]

    def bench(self, cands: list[Candidate], stage: str, repeats: int) -> dict:
        names = [c.name for c in cands]

        def run():
            models = {c.name: self.model(c) for c in cands}
            opts = dict.fromkeys(models, self.engine)
            return bench_models(models, engine_options=opts, **bench_protocol(self.cfg, repeats), seed=self.cfg.seed)

        return self.log.measure(["speed", stage, [c.key for c in cands], names], run)

    def quality(self, c: Candidate, windows: torch.Tensor) -> dict:
        def run():
            lm = copy.deepcopy(self.model(c))
            lm.model.to(torch.float32)
            return score_windows(lm, windows, baseline=self.base32)

        return self.log.measure(["quality", c.key, windows.numel()], run)


def _halving(s: _Search, alive: list[Candidate], windows: torch.Tensor) -> list[Candidate]:
    """Successive halving on held-out tokens; returns the candidates within budget at the last round run."""
    cfg, rounds = s.cfg, s.cfg.rounds()
    for r, tokens in enumerate(rounds):
        if s.over_budget():
            s.notes.append(f"time budget reached: stopped before round {r + 1} ({tokens} held-out tokens)")
            break
        last = r == len(rounds) - 1
        slack = 0.0 if last else cfg.max_ppl_increase / 2 ** (r + 1)  # early rounds: few tokens, some slack
        passed = []
        for c in track(alive, f"held-out round {r + 1}/{len(rounds)} ({tokens} tokens)", enabled=None):
            if c.recipe is None:
                passed.append(c)
                continue
            q = s.quality(c, windows[: tokens // cfg.seqlen])
            c.quality = q
            c.rounds.append({"tokens": q["tokens"], "perplexity_ratio": q["perplexity_ratio"], "kl_mean": q["kl_mean"]})
            relaxed = AutotuneConfig(**{**_fields(cfg), "max_ppl_increase": cfg.max_ppl_increase + slack})
            ok, why = relaxed.meets(q)
            if ok:
                passed.append(c)
            else:
                c.reject(f"over budget on {q['tokens']} held-out tokens: {why}")
        passed.sort(key=lambda c: -c.speed)
        keep = passed if last else passed[: max(2, math.ceil(len(passed) / 2))]
        for c in passed[len(keep) :]:
            if c.recipe is None:  # the original stays: the fallback and the reference of the final benchmark
                keep.append(c)
            else:
                c.reject(f"dropped after round {r + 1}: slower than the {len(keep)} fastest within budget")
        alive = keep
    return alive


def _fields(cfg: AutotuneConfig) -> dict:
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


def _search(s: _Search, text_windows: torch.Tensor, calib_windows: torch.Tensor) -> tuple[list[Candidate], dict]:
    cfg, log = s.cfg, s.log
    s.engine, engine_rows = screen_engine(s.base, cfg, log)
    s.speculative, speculative_rows = screen_speculative(s.base, s.engine, cfg, log, text_windows)
    options = cfg.space.options()
    speed = speed_model(s.base, options, cfg, log)
    fast = [o for o in options if speed[o.name]["kept"]]
    sens = {}
    for o in fast:
        if s.over_budget():
            s.notes.append(f"time budget reached: no sensitivity for {o.name}")
            break
        sens[o.name] = sensitivity(s.base32, o, calib_windows, log)
    cands = initial_candidates(cfg.space, s.calibration is not None, speed)
    keys = {c.key for c in cands}
    speedups = {o: speed[o]["speedup"] for o in sens}
    for name, recipe in mixed_recipes(sens, speedups, cfg.space.keep_fractions, cfg.space.algorithm):
        c = Candidate(name, recipe, "mixed", predicted_speedup=None)
        if c.key not in keys:
            cands.append(c)
            keys.add(c.key)
    for c in cands:
        if c.origin == "uniform" and c.name in sens:
            c.predicted_kl = sum(sens[c.name].values())
    pending = [c for c in cands if c.status == "pending"]
    for c in track(pending, "building candidates", enabled=None):
        try:
            s.model(c)
        except (ValueError, MiaotuiError) as e:
            c.reject(f"recipe failed: {e}")
    pending = [c for c in pending if c.status == "pending"]
    screen = s.bench(pending, "screen", cfg.repeats)
    for c in pending:
        c.speed = objective_speed(screen["models"][c.name], cfg.objective, cfg)
    original = pending[0]
    alive = [original]
    for c in pending[1:]:
        if c.speed <= original.speed:
            c.reject(f"slower than the original on the engine ({c.speed / original.speed:.2f}x)")
        else:
            alive.append(c)
    finalists = _halving(s, alive, text_windows)
    final = s.bench(finalists, "final", cfg.final_repeats)
    for c in finalists:
        c.final_speed = objective_speed(final["models"][c.name], cfg.objective, cfg)
        c.status = "passed"
    winner = max(finalists, key=lambda c: c.final_speed)
    winner.status = "winner"
    signals = {
        "engine": engine_rows,
        "engine_chosen": s.engine,
        "speculative": speculative_rows,
        "speed_model": speed,
        "sensitivity": sens,
    }
    return cands, {"final_bench": final, "screen_bench": screen, "signals": signals}


def _why(winner: Candidate, cands: list[Candidate], cfg: AutotuneConfig) -> str:
    metric = {"decode": "decode tokens/s", "prefill": "prefill tokens/s", "throughput": "tokens/s"}[cfg.objective]
    original = next(c for c in cands if c.recipe is None)
    if winner.recipe is None:
        return (
            f"the original model is the answer: no candidate was both within +{100 * cfg.max_ppl_increase:g} % "
            f"perplexity and faster in {metric} (see the rejected candidates)"
        )
    others = [c for c in cands if c.status == "passed"]
    q = winner.quality
    text = (
        f"{winner.name} is the fastest candidate within budget: {winner.final_speed:.1f} {metric}, "
        f"{winner.final_speed / original.final_speed:.2f}x the original in the same final benchmark, at "
        f"{100 * (q['perplexity_ratio'] - 1):+.2f} % perplexity on {q['tokens']} held-out tokens"
    )
    if others:
        runner_up = max((c for c in others if c.recipe is not None), key=lambda c: c.final_speed, default=None)
        if runner_up is not None:
            text += f"; next: {runner_up.name} at {runner_up.final_speed:.1f}"
    return text


def _why_speculative(rows: dict) -> str:
    chosen = next((name for name, row in rows.items() if row.get("kept") and name != "off"), None)
    if chosen is None:
        return ""
    row = rows[chosen]
    return (
        f"; the engine drafts with {chosen} (prompt lookup): {row['speedup']:.2f}x on the original model from "
        f"held-out prompts, {100 * row['acceptance_rate']:.0f} % of drafts accepted"
    )


def autotune(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: AutotuneConfig | None = None,
    text_path: str | os.PathLike | None = None,
    calib_path: str | os.PathLike | list[str | os.PathLike] | None = None,
    log_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """Search for the fastest recipe within the budget of `config`; write recipe.yaml, the model and reports.

    Measurements go to `log_path` (default OUT.partial/log.jsonl) as they are made: run the same command
    again to resume an interrupted search without measuring anything twice.
    """
    cfg = config or AutotuneConfig()
    check_out_dir(out, overwrite)
    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    if cfg.space.uses_fp8:
        require_hardware(cfg.device)  # before loading anything
    base = load_pretrained(
        str(model), dtype=cfg.dtype, device=cfg.device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )
    if base.kind != CAUSAL_LM:
        raise MiaotuiError(f"autotune searches causal LMs; {model} is an {base.kind} (use optimize with w8a8)")
    text = read_text(text_path) if text_path is not None else sample_text()
    windows = token_windows(base, text, cfg.seqlen, cfg.max_tokens)  # (W, seqlen); fails early on short text
    if windows.numel() < cfg.max_tokens:
        raise MiaotuiError(
            f"the held-out text has {windows.numel()} tokens in windows; max_tokens needs {cfg.max_tokens}"
        )
    calib_text = read_texts(calib_path) if calib_path is not None else sample_text()
    calibration = (
        Calibration(calib_text, cfg.calib_samples, cfg.seqlen, cfg.seed, cfg.calib_generated) if calib_path else None
    )
    if calibration is not None:  # fail on a short calibration text before any long work; sample the generated part
        calibration.token_ids(base)
    sens_len = min(cfg.sensitivity_tokens, cfg.seqlen)
    calib_windows = token_windows(base, calib_text, sens_len, max(sens_len, cfg.sensitivity_tokens))
    work = Path(log_path) if log_path is not None else Path(f"{out}.partial") / "log.jsonl"
    header = {
        "model": str(model),
        "config": cfg.to_dict(),
        "text": str(text_path),
        "calib": [str(p) for p in calib_path] if isinstance(calib_path, list | tuple) else str(calib_path),
    }
    log = MeasurementLog(work, header)
    s = _Search(base, cfg, log, calibration, started)
    if log.resumed:
        s.notes.append(f"resumed from {work}: {log.resumed} measurements reused")
    if text_path is None:
        s.notes.append("held-out quality on the short built-in sample; pass --ppl TEXTFILE for a real measure")
    if calib_path is None:
        s.notes.append("sensitivity measured on the built-in sample text; pass --calib TEXTFILE for your domain")
    cands, extra = _search(s, windows, calib_windows)
    winner = next(c for c in cands if c.status == "winner")
    report = _report(s, cands, winner, extra, str(model), text_path)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        lm = s.model(winner)
        if winner.recipe is not None:
            recipe = winner.recipe.__class__(
                steps=winner.recipe.steps, name="autotune", description=f"autotune winner: {winner.name}"
            )
            write_text_atomic(tmp / "recipe.yaml", recipe.to_yaml())
            write_model(lm, tmp, recipe, summary=[])
        else:
            write_model(lm, tmp, None, summary=[])
        write_text_atomic(tmp / "engine.json", json.dumps({**s.engine, **s.speculative}, indent=2))
        shutil.copyfile(work, tmp / "autotune_log.jsonl")
        write_report(report, tmp)
    if log_path is None:
        shutil.rmtree(work.parent, ignore_errors=True)
    report["out"] = str(out)
    return report


def _report(s: _Search, cands: list[Candidate], winner: Candidate, extra: dict, model: str, text_path) -> dict:
    cfg = s.cfg
    measured = [c for c in cands if c.speed is not None]
    quality_models = {c.name: c.quality for c in measured if c.quality}
    scored = [c for c in measured if c.quality or c.recipe is None]
    points = [(c.speed, c.quality.get("perplexity_ratio", 1.0)) for c in scored]
    report = {
        "report_type": "autotune",
        "kind": CAUSAL_LM,
        "model": model,
        "baseline": "original",
        "config": cfg.to_dict(),
        "winner": {"name": winner.name, "recipe": None if winner.recipe is None else winner.recipe.to_dict()},
        "why": _why(winner, cands, cfg) + _why_speculative(extra["signals"]["speculative"]),
        "engine": {**s.engine, **s.speculative},
        "candidates": {c.name: c.row() for c in cands},
        "models": {
            c.name: {"source": c.origin, "recipe": c.name, **weight_bytes(s.model(c))}
            for c in measured
            if c.recipe is None or c.name in s.models
        },
        "quality": {
            "models": quality_models,
            "protocol": {"text": Path(text_path).name if text_path else "built-in sample text", "compute": "float32"},
        },
        "speed": extra["final_bench"],
        "screen": extra["screen_bench"],
        "signals": extra["signals"],
        "pareto": [scored[i].name for i in pareto_front(points)],
        "elapsed_s": time.monotonic() - s.started,
        "notes": s.notes,
    }
    return report
