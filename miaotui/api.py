"""miaotui's public Python API.

>>> import miaotui
>>> miaotui.get_recipe("w8").name
'w8'
"""

from __future__ import annotations

import os

from miaotui.bench import bench_models, bench_sweep, experts_info, weight_bytes
from miaotui.checkpoint import load_model, save
from miaotui.comparison import compare
from miaotui.engine.generate import Completion, Engine
from miaotui.engine.launch import start_parallel
from miaotui.engine.parallel import ParallelConfig
from miaotui.engine.sampling import SamplingParams
from miaotui.errors import MiaotuiError
from miaotui.evaluate import classify, compare_causal, embedding_similarity, perplexity, read_labelled
from miaotui.exporting import FORMATS, export_compressed_tensors, export_dense
from miaotui.loading import LoadedModel
from miaotui.lowrank import FactorizeConfig, factorize_
from miaotui.modules import find_linears
from miaotui.pipeline import apply_recipe, default_model, optimize
from miaotui.quantize import PackedLinear, QuantizeConfig, quantize_
from miaotui.recipe import BUILTIN_RECIPES, Recipe, get_recipe, load_recipe
from miaotui.report import read_report, render_folder
from miaotui.sparsity import PruneConfig, prune_
from miaotui.tune import AutotuneConfig, SearchSpace, autotune

__all__ = [
    "AutotuneConfig",
    "BUILTIN_RECIPES",
    "Completion",
    "Engine",
    "ParallelConfig",
    "SamplingParams",
    "FactorizeConfig",
    "LoadedModel",
    "QuantizeConfig",
    "Recipe",
    "apply_recipe",
    "autotune",
    "bench_models",
    "bench_sweep",
    "classify",
    "compare",
    "compare_causal",
    "default_model",
    "embedding_similarity",
    "export",
    "factorize_",
    "get_recipe",
    "info",
    "load",
    "load_recipe",
    "optimize",
    "perplexity",
    "PruneConfig",
    "prune_",
    "quantize_",
    "read_labelled",
    "read_report",
    "start_parallel",
    "render_folder",
    "save",
    "SearchSpace",
]


load = load_model  # miaotui.load: a folder saved by miaotui, else any Hugging Face model (folder or hub id)


def export(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "compressed-tensors",
    tp: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Export a miaotui-optimized folder for other runtimes: compressed-tensors (the packed codes) or dense (a plain
    Hugging Face folder of float weights, for pruned models); transformers and vLLM load both.

    >>> export("ref-w4", "ref-w4-ct", tp=2)  # doctest: +SKIP
    >>> export("ref-sparse50", "ref-sparse50-hf", format="dense")  # doctest: +SKIP
    """
    if format not in FORMATS:
        raise MiaotuiError(f"export format {format!r} is not supported; choose one of {', '.join(FORMATS)}")
    if format == "dense":
        return export_dense(folder, out, tp=tp, overwrite=overwrite)
    return export_compressed_tensors(folder, out, tp=tp, overwrite=overwrite)


def info(lm: LoadedModel) -> dict:
    """Architecture, parameter count, dtype, bytes and applied recipe of a loaded model."""
    model = lm.model
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    params = sum(p.numel() for p in model.parameters()) + sum(m.weight_numel for m in packed)
    layer_types: dict[str, int] = {}
    for m in packed:
        layer_types[m.layer_type] = layer_types.get(m.layer_type, 0) + 1
    if find_linears(model):
        layer_types["float_linear"] = len(find_linears(model))
    return {
        "source": lm.source,
        "architecture": type(model).__name__,
        "model_type": lm.arch.model_type,
        "kind": lm.kind,
        "parameters": params,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "context_length": lm.context_length,
        **weight_bytes(lm),
        "linear_layers": layer_types,
        **({"experts": experts_info(model)} if lm.kind == "causal-lm" and experts_info(model) else {}),
        "recipe": (lm.recipe or {}).get("name"),
        "base_model": lm.meta.get("base_model"),
    }
