"""Find and replace the linear layers of any supported model (nn.Linear and GPT-2's Conv1D alike).

>>> import torch.nn as nn
>>> m = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
>>> [name for name, _ in find_linears(m, ignore=("2",))]
['0']
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from miaotui.experts import ExpertLinears, routing_layers

LINEAR_TYPES = (nn.Linear, Conv1D)
# A matmul of at most this many rows (batch-1 or -2 decode) runs faster on the CPU as inductor's fused
# multiply-sum (a vectorized GEMV reading each weight once) than as a library matmul. Measured on 2 AVX-512 cores,
# 28 linear layers of a 0.4B Llama's shapes: 45 against 19 GB/s in fp32 and 46 against 27 GB/s in bf16 at one
# row, 30 against 10 and 32 against 27 GB/s at two; slower from four rows on. Compiled CPU decode steps use it.
GEMV_ROWS = 2
# Module types that change a model's structure (e.g. one linear layer made of two thin ones): checkpoints record
# each one's `describe()` dict and rebuild it with `cls(dtype=..., device=..., **spec)` before loading tensors.
STRUCTURAL_MODULES: dict[str, type[nn.Module]] = {ExpertLinears.structure_type: ExpertLinears}


def register_structural(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make a module type (with `structure_type` and `describe()`) rebuildable from checkpoints."""
    STRUCTURAL_MODULES[cls.structure_type] = cls
    return cls


def build_structural(spec: dict, dtype: torch.dtype, device=None, original: nn.Module | None = None) -> nn.Module:
    """An empty structural module from its `describe()` dict, its tensors to be assigned afterwards; a type with
    `adopt` (experts) takes what it needs from the `original` module it replaces."""
    kwargs = dict(spec)
    cls = STRUCTURAL_MODULES.get(kwargs.pop("type", None))
    if cls is None:
        known = ", ".join(sorted(STRUCTURAL_MODULES)) or "none"
        raise ValueError(f"unknown structural module type {spec.get('type')!r}; known: {known}")
    new = cls(dtype=dtype, device=device, **kwargs)
    if hasattr(new, "adopt") and original is not None:
        new.adopt(original)
    return new


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True when a module name matches any glob pattern, whole or as its last dotted component(s)."""
    return any(fnmatchcase(name, p) or fnmatchcase(name, f"*.{p}") for p in patterns)


def find_linears(
    model: nn.Module, targets: Iterable[str] = ("*",), ignore: Iterable[str] = ()
) -> list[tuple[str, nn.Module]]:
    """Linear layers (by qualified name) selected by `targets` and not excluded by `ignore` glob patterns.

    Routers of mixture-of-experts blocks are never selected: they stay in full precision (`routing_layers`).
    """
    targets, ignore = tuple(targets), tuple(ignore)
    routers = routing_layers(model)
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, LINEAR_TYPES)
        and matches(name, targets)
        and not matches(name, ignore)
        and name not in routers
    ]


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the layer's own layout."""
    w = module.weight
    return w.t() if isinstance(module, Conv1D) else w  # Conv1D stores (in, out)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers of a module, each shared tensor counted once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.data_ptr(), t.numel()) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
