"""Save an optimized model as a folder (safetensors + JSON sidecar) and rebuild it exactly.

Folder layout: `model.safetensors` (every tensor, packed ones included), `miaotui.json` (format
version, recipe, structural module and packed layer specs, tied tensors), the Hugging Face `config.json` and
tokenizer files.

>>> import os
>>> from miaotui.loading import load_pretrained
>>> lm = load_pretrained(os.environ.get("MIAOTUI_DATA", "../shared/data") + "/ref-llama-16m")  # doctest: +SKIP
>>> save(lm, "/tmp/ref-copy", overwrite=True)  # doctest: +SKIP
>>> load_optimized("/tmp/ref-copy").kind  # doctest: +SKIP
'causal-lm'
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from miaotui.arch import kind_of
from miaotui.atomic import atomic_dir, write_text_atomic
from miaotui.errors import MiaotuiError
from miaotui.loading import (
    LoadedModel,
    build_arch,
    load_config,
    load_pretrained,
    load_tokenizer,
    model_class,
    pad_classifier,
    quiet_transformers,
    resolve_device,
    resolve_dtype,
)
from miaotui.lowrank import layer as _lowrank_layer  # noqa: F401  registers LowRankLinear
from miaotui.modules import STRUCTURAL_MODULES, build_structural, set_module
from miaotui.quantize import PackedLinear, build_layer
from miaotui.recipe import Recipe
from miaotui.sparsity import semi_structured as _sparse_layers  # noqa: F401  registers the sparse layer types

SIDECAR = "miaotui.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def is_optimized_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / SIDECAR).is_file()


def _named_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All parameters and buffers (non-persistent ones too), shared tensors stored once.

    Returns (name -> tensor, alias name -> stored name).
    """
    tensors, tied, seen = {}, {}, {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    return tensors, tied


def write_model(lm: LoadedModel, folder: Path, recipe: Recipe | None = None, summary: dict | None = None) -> dict:
    """Write the model files into an existing folder (the caller makes it atomic); returns the sidecar."""
    model = lm.model
    tensors, tied = _named_tensors(model)
    for name, m in model.named_modules():  # device-specific layouts are saved in their portable form
        if isinstance(m, PackedLinear):
            tensors.update({f"{name}.{k}": v.contiguous() for k, v in m.portable_tensors().items()})
    save_file({k: v.cpu() for k, v in tensors.items()}, str(folder / WEIGHTS), metadata={"format": "pt"})
    layers = {name: m.describe() for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    structural = tuple(STRUCTURAL_MODULES.values())
    modules = {name: m.describe() for name, m in model.named_modules() if isinstance(m, structural)}
    recipe_dict = recipe.to_dict() if recipe is not None else lm.recipe
    sidecar = {
        "format": "miaotui",
        "format_version": FORMAT_VERSION,
        "base_model": lm.meta.get("base_model", lm.source),
        "model_type": lm.arch.model_type,
        "kind": lm.kind,
        "architecture": type(model).__name__,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "recipe": recipe_dict,
        "summary": summary if summary is not None else lm.meta.get("summary"),
        "modules": modules,
        "layers": layers,
        "tied": tied,
    }
    with quiet_transformers():
        model.config.save_pretrained(folder)
        lm.tokenizer.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None and lm.kind == "causal-lm":
            model.generation_config.save_pretrained(folder)
    write_text_atomic(folder / SIDECAR, json.dumps(sidecar, indent=2))
    return sidecar


def save(lm: LoadedModel, out: str | os.PathLike, *, recipe: Recipe | None = None, overwrite: bool = False) -> Path:
    """Save to `out` atomically: a complete folder or none at all."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_model(lm, tmp, recipe)
    return Path(out)


def _read_sidecar(folder: Path) -> dict:
    try:
        meta = json.loads((folder / SIDECAR).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MiaotuiError(f"cannot read {folder / SIDECAR}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != "miaotui" or not isinstance(meta.get("format_version"), int):
        raise MiaotuiError(f"{folder / SIDECAR} is not a miaotui sidecar")
    if meta["format_version"] > FORMAT_VERSION:
        raise MiaotuiError(
            f"{folder} was saved by a newer miaotui (format {meta['format_version']}); upgrade miaotui to load it"
        )
    return meta


ALIGN = 64  # bytes: the AVX-512 paths of the CPU int8/int4 kernels read whole 64-byte lines


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, copied into freshly allocated memory when it starts off a 64-byte boundary.

    safetensors maps the file and hands out tensors at their offsets in it, which need not be aligned; the
    packed int8/int4 matmul kernels crash (AVX-512) on such weights.
    """
    return tensor if tensor.data_ptr() % ALIGN == 0 else tensor.clone()


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the parameter or buffer called `name`."""
    parent_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(parent_name) if parent_name else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = tensor
    else:
        raise MiaotuiError(f"checkpoint tensor {name} has no place in the model: the folder is inconsistent")


def load_optimized(
    folder: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "cpu",
) -> LoadedModel:
    """Rebuild a model saved by `save`/`optimize`: skeleton on the meta device, packed layers, tensors."""
    folder = Path(folder)
    meta = _read_sidecar(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise MiaotuiError(f"{folder} has no {WEIGHTS}: the optimized model is incomplete")
    dev = resolve_device(device)
    with quiet_transformers():
        config = load_config(str(folder))
    kind = kind_of(config)
    saved_dtype = resolve_dtype(meta.get("dtype"))
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise MiaotuiError(f"cannot read {weights}: {e}") from e
    with torch.device("meta"), quiet_transformers():
        model = model_class(config, kind).from_config(config, dtype=saved_dtype)
    try:  # structures first (outer before inner), then the packed layers, which may sit inside them
        for name, spec in meta.get("modules", {}).items():
            original = model.get_submodule(name)
            set_module(model, name, build_structural(spec, dtype=saved_dtype, device="meta", original=original))
        for name, spec in meta.get("layers", {}).items():
            set_module(model, name, build_layer(spec, dtype=saved_dtype, device="meta"))
    except (AttributeError, TypeError, ValueError) as e:
        raise MiaotuiError(f"{folder / SIDECAR} describes layers this model does not have: {e}") from e
    for name, tensor in state.items():
        _assign(model, name, _aligned(tensor))
    for alias, stored in meta.get("tied", {}).items():
        if stored not in state:
            raise MiaotuiError(f"{folder / SIDECAR} ties {alias} to {stored}, which the weights do not contain")
        _assign(
            model,
            alias,
            model.get_parameter(stored) if stored in dict(model.named_parameters()) else state[stored],
        )
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise MiaotuiError(f"{weights} lacks {len(left)} tensors the model needs (e.g. {left[0]})")
    with quiet_transformers():
        tokenizer = load_tokenizer(str(folder), kind)
    pad_classifier(model, tokenizer)
    model.eval().to(dev)
    if dtype not in (None, "auto"):
        model.to(resolve_dtype(dtype))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        arch=build_arch(model, kind, folder),
        source=str(folder),
        recipe=meta.get("recipe"),
        meta=meta,
    )


def load_model(
    source: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """A folder saved by miaotui (load_optimized), else a Hugging Face folder or hub id (load_pretrained).

    >>> import os
    >>> lm = load_model(os.environ.get("MIAOTUI_DATA", "../shared/data") + "/ref-llama-16m")  # doctest: +SKIP
    """
    if is_optimized_folder(source):
        return load_optimized(source, dtype=dtype, device=device)
    return load_pretrained(
        source, dtype=dtype, device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )
