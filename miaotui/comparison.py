"""Compare several models (original Hugging Face folders and optimized ones) under one protocol, in one report.

The first model is the baseline: every other is measured against it (perplexity ratio, KL, top-1 agreement
for causal LMs; embedding cosine and neighbour overlap for encoders), and all are benchmarked interleaved in
the same run. `recipes` adds the baseline compressed by each recipe in memory, so one command compares an
original with its compressed variants. Everything is loaded and checked before the long work; the output
folder appears only complete.

>>> import os
>>> data = os.environ.get("MIAOTUI_DATA", "../shared/data")
>>> r = compare([f"{data}/ref-llama-16m", "ref-w8"], "cmp", text_path=f"{data}/wikitext-2-raw/wiki.test.raw",
...             seqlen=512)  # doctest: +SKIP
>>> r["quality"]["models"]["ref-w8"]["kl_p99"]  # doctest: +SKIP
>>> r = compare([f"{data}/ref-llama-16m"], "cmp2", recipes=["w8", "w4-gptq"],
...             calib_path=f"{data}/ref-llama-16m-calibration.txt")  # doctest: +SKIP
>>> list(r["models"])  # doctest: +SKIP
['ref-llama-16m', 'w8', 'w4-gptq']
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from miaotui.arch import CAUSAL_LM
from miaotui.atomic import atomic_dir, check_out_dir
from miaotui.bench import bench_models, bench_sweep, weight_bytes
from miaotui.calibration import DEFAULT_GENERATED, Calibration
from miaotui.checkpoint import load_model
from miaotui.errors import MiaotuiError
from miaotui.evaluate import (
    classify,
    embedding_similarity,
    read_calibration,
    read_labelled,
    read_sentences,
    read_text,
    sample_sentences,
    score_windows,
    token_windows,
)
from miaotui.evaluate.classify import DEFAULT_TEMPLATE
from miaotui.evaluate.similarity import sample_text
from miaotui.loading import LoadedModel
from miaotui.pipeline import apply_recipe
from miaotui.progress import track
from miaotui.recipe import Recipe, get_recipe
from miaotui.report import write_report


def _unique(name: str, taken) -> str:
    """`name`, or name-2, name-3, ... if it is taken."""
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    return out


def _names(sources: list[str]) -> list[str]:
    names: list[str] = []
    for src in sources:
        names.append(_unique(Path(src).name or str(src), names))
    return names


def load_all(sources: list[str], **load_options) -> dict[str, LoadedModel]:
    """Load every model, naming the one that fails; all must be of one kind (and one vocabulary for LMs)."""
    if not sources:
        raise MiaotuiError("compare needs at least one model")
    models = {}
    for i, (name, src) in enumerate(zip(_names(sources), sources, strict=True), start=1):
        try:
            models[name] = load_model(src, **load_options)
        except MiaotuiError as e:
            raise MiaotuiError(f"model {i} ({src}) failed to load: {e}") from e
    base_name, base = next(iter(models.items()))
    for name, lm in models.items():
        if lm.kind != base.kind:
            raise MiaotuiError(f"cannot compare {name} (a {lm.kind}) with the baseline {base_name} (a {base.kind})")
        if lm.kind == CAUSAL_LM and lm.config.vocab_size != base.config.vocab_size:
            raise MiaotuiError(
                f"{name} has a vocabulary of {lm.config.vocab_size}, the baseline {base.config.vocab_size}"
            )
    return models


def compress_variants(
    models: dict[str, LoadedModel],
    sources: list[str],
    recipes: list[Recipe],
    calibration: Calibration | None,
    progress: bool | None,
) -> None:
    """Add the baseline compressed by each recipe (in memory) to `models`, and its source to `sources`."""
    base_name, base = next(iter(models.items()))
    for recipe in track(recipes, "compressing", enabled=progress if len(recipes) > 1 else False):
        lm = copy.deepcopy(base)
        apply_recipe(lm, recipe, progress=progress, calibration=calibration, teacher=base)
        models[_unique(recipe.name, models)] = lm
        sources.append(f"{sources[0]} + recipe {recipe.name}")


def _quality(
    models: dict[str, LoadedModel],
    text: str,
    text_name: str,
    sentences: list[str],
    window_opts: dict,
    progress: bool | None,
) -> dict:
    """Quality of every model against the first, in fp32 compute (the models are converted in place)."""
    base_name, base = next(iter(models.items()))
    for lm in models.values():
        lm.model.to(torch.float32)
    out: dict = {"models": {}}
    if base.kind == CAUSAL_LM:
        stride = window_opts.get("stride")
        windows = token_windows(base, text, window_opts.get("seqlen"), window_opts.get("max_tokens"), stride)
        for name, lm in track(list(models.items()), "quality", enabled=progress):
            other = None if name == base_name else base
            out["models"][name] = score_windows(lm, windows, baseline=other, stride=stride)
        first = out["models"][base_name]
        out["protocol"] = {"text": text_name, "compute": "float32"}
        out["protocol"].update({k: first[k] for k in ("seqlen", "stride", "windows", "tokens", "predicted_tokens")})
    else:
        for name, lm in track(list(models.items()), "quality", enabled=progress):
            out["models"][name] = embedding_similarity(lm, base, sentences)
        out["protocol"] = {"sentences": len(sentences), "compute": "float32"}
    return out


def compare(
    sources: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    recipes: list[str | Recipe] | None = None,
    calib_path: str | os.PathLike | list[str | os.PathLike] | None = None,
    calib_samples: int = 128,
    calib_seqlen: int = 512,
    calib_generated: float = DEFAULT_GENERATED,
    text_path: str | os.PathLike | None = None,
    seqlen: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = 65536,
    sentences_path: str | os.PathLike | None = None,
    classify_path: str | os.PathLike | None = None,
    labels: list[str] | None = None,
    template: str = DEFAULT_TEMPLATE,
    dtype: str = "auto",
    device: str = "cpu",
    bench: bool = True,
    bench_options: dict | None = None,
    batch_sizes: list[int] | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool | None = None,
) -> dict:
    """Evaluate and benchmark `sources` (the first is the baseline) and the baseline compressed by each of
    `recipes` (built-in names, recipe files or Recipes; `calib_path` for calibrated ones); write
    report.json/md/html to `out`."""
    check_out_dir(out, overwrite)
    sources = [str(s) for s in sources]
    recipes = [get_recipe(r) for r in recipes or []]  # unknown names and bad files fail before any loading
    needs_calib = [r.name for r in recipes if any(step.needs_calibration for step in r.steps)]
    calibration = read_calibration(calib_path, calib_samples, calib_seqlen, calib_generated)
    if needs_calib and calibration is None:
        raise MiaotuiError(
            f"recipe {needs_calib[0]} calibrates on data: pass --calib TEXTFILE"
            " (or --calib-generated 1: text the model writes itself)"
        )
    text = read_text(text_path) if text_path is not None else sample_text()
    sentences = read_sentences(sentences_path) if sentences_path is not None else sample_sentences()
    examples = read_labelled(classify_path) if classify_path is not None else None
    models = load_all(
        sources, dtype=dtype, device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )
    base_name, base = next(iter(models.items()))
    if base.kind == CAUSAL_LM:  # fail on a bad text/seqlen/stride before any long work
        token_windows(base, text, seqlen, max_tokens, stride)
    if calibration is not None:
        # fail on a short calibration text before any long work; generated windows from the uncompressed model
        calibration.token_ids(base, progress=progress)
    compress_variants(models, sources, recipes, calibration, progress)
    report: dict = {"report_type": "compare", "kind": base.kind, "baseline": base_name, "notes": []}
    report["models"] = {
        name: {
            "source": src,
            "recipe": (lm.recipe or {}).get("name"),
            "dtype": str(lm.dtype).removeprefix("torch."),
            **weight_bytes(lm),
        }
        for (name, lm), src in zip(models.items(), sources, strict=True)
    }
    if bench:
        report["speed"] = bench_models(models, **(bench_options or {}))
        if batch_sizes:
            report["sweep"] = bench_sweep(models, batch_sizes, **(bench_options or {}))
    text_name = Path(text_path).name if text_path is not None else "built-in sample text"
    window_opts = {"seqlen": seqlen, "stride": stride, "max_tokens": max_tokens}
    report["quality"] = _quality(models, text, text_name, sentences, window_opts, progress)
    if examples is not None:
        report["classification"] = {"file": Path(classify_path).name, "models": {}}
        for name, lm in track(list(models.items()), "classification", enabled=progress):
            r = classify(lm, examples, labels=labels, template=template, progress=False)
            report["classification"]["models"][name] = {k: r[k] for k in ("accuracy", "correct", "examples")}
    if text_path is None and base.kind == CAUSAL_LM:
        report["notes"].append("perplexity on the short built-in sample; pass --ppl TEXTFILE for a real measure")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_report(report, tmp)
    report["out"] = str(out)
    return report
