"""miaotui's public Python API.

>>> import miaotui
>>> miaotui.get_recipe("w8").name
'w8'
"""

from __future__ import annotations

import os

import torch

from miaotui.arch import SUPPORTED
from miaotui.bench import bench_models, weight_bytes
from miaotui.checkpoint import is_optimized_folder, load_optimized, save
from miaotui.evaluate import compare_causal, embedding_similarity, perplexity
from miaotui.loading import LoadedModel, load_pretrained
from miaotui.lowrank import FactorizeConfig, factorize_
from miaotui.modules import find_linears
from miaotui.pipeline import apply_recipe, default_model, optimize
from miaotui.quantize import PackedLinear, QuantizeConfig, quantize_
from miaotui.recipe import BUILTIN_RECIPES, Recipe, get_recipe, load_recipe

__all__ = [
    "BUILTIN_RECIPES",
    "FactorizeConfig",
    "SUPPORTED",
    "LoadedModel",
    "QuantizeConfig",
    "Recipe",
    "apply_recipe",
    "bench_models",
    "compare_causal",
    "default_model",
    "embedding_similarity",
    "factorize_",
    "get_recipe",
    "info",
    "load",
    "load_recipe",
    "optimize",
    "perplexity",
    "quantize_",
    "save",
]


def load(
    source: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a Hugging Face model (folder or hub id) or a folder saved by miaotui.

    >>> import os
    >>> lm = load(os.environ.get("MIAOTUI_DATA", "../shared/data") + "/ref-llama-16m")  # doctest: +SKIP
    """
    if is_optimized_folder(source):
        return load_optimized(source, dtype=dtype, device=device)
    return load_pretrained(
        source, dtype=dtype, device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )


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
        "recipe": (lm.recipe or {}).get("name"),
        "base_model": lm.meta.get("base_model"),
    }
