"""Round-to-nearest quantization: no calibration data, one pass over the selected layers.

>>> import torch.nn as nn
>>> from miaotui.quantize.config import QuantizeConfig
>>> m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
>>> rtn_quantize_(m, QuantizeConfig(scheme="w8"), progress=False)["quantized"]
2
"""

from __future__ import annotations

import torch
import torch.nn as nn

from miaotui.errors import MiaotuiError
from miaotui.experts import unfuse_experts_
from miaotui.modules import LINEAR_TYPES, find_linears, linear_weight, matches, set_module
from miaotui.progress import track
from miaotui.quantize.config import QuantizeConfig
from miaotui.quantize.fp8 import Fp8DynamicLinear
from miaotui.quantize.int3 import Int3WeightOnlyLinear
from miaotui.quantize.int4 import Int4WeightOnlyLinear
from miaotui.quantize.int8 import Int8WeightOnlyLinear
from miaotui.quantize.int8_dynamic import Int8DynamicLinear
from miaotui.quantize.packed import PackedLinear

LAYER_FOR_SCHEME = {
    "w8": Int8WeightOnlyLinear,
    "w8a8": Int8DynamicLinear,
    "fp8": Fp8DynamicLinear,
    "w4": Int4WeightOnlyLinear,
    "w3": Int3WeightOnlyLinear,
}


def check_selection(model: nn.Module, cfg: QuantizeConfig, layer_cls: type[PackedLinear]) -> None:
    """Refuse, before any work, a step that can do nothing: fp8 without FP8 hardware, a target pattern that names
    no linear layer, or selected layers none of which the scheme's kernels can take (e.g. a group size that
    divides no layer's input features). Layers some of which cannot take the scheme are skipped and reported instead."""
    cfg.check_device(next(model.parameters()).device)
    names = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES + (PackedLinear,))]
    for pattern in cfg.targets:
        if not any(matches(n, (pattern,)) for n in names):
            raise MiaotuiError(
                f"quantize: target pattern {pattern!r} matches no linear layer (they are named like "
                f"{', '.join(names[:3])})"
            )
    chosen = find_linears(model, cfg.targets, cfg.ignore)
    options = {"group_size": cfg.group_size, "symmetric": cfg.symmetric, "algorithm": cfg.algorithm}
    problems = [(n, layer_cls.unsupported(*linear_weight(m).shape, **options)) for n, m in chosen]
    if problems and all(p for _, p in problems):
        name, problem = problems[0]
        raise MiaotuiError(f"quantize: no selected layer can take {cfg.scheme}; e.g. layer {name}: {problem}")


@torch.no_grad()
def rtn_quantize_(model: nn.Module, cfg: QuantizeConfig, *, progress: bool | None = None) -> dict:
    """Replace each selected linear layer by its packed round-to-nearest version, in place."""
    layer_cls = LAYER_FOR_SCHEME[cfg.scheme]
    unfused, skipped = unfuse_experts_(model)
    check_selection(model, cfg, layer_cls)
    chosen = find_linears(model, cfg.targets, cfg.ignore)
    done = 0
    options = {"group_size": cfg.group_size, "symmetric": cfg.symmetric, "algorithm": cfg.algorithm}
    for name, module in track(chosen, f"quantizing ({cfg.scheme}, {cfg.algorithm})", enabled=progress):
        problem = layer_cls.unsupported(*linear_weight(module).shape, **options)
        if problem:
            skipped[name] = problem
            continue
        set_module(model, name, layer_cls.from_float(module, **options))
        done += 1
    return {"scheme": cfg.scheme, "algorithm": cfg.algorithm, "quantized": done, "skipped": skipped, **unfused}
