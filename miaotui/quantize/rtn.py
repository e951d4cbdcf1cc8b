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

from miaotui.modules import find_linears, linear_weight, set_module
from miaotui.progress import track
from miaotui.quantize.config import QuantizeConfig
from miaotui.quantize.int3 import Int3WeightOnlyLinear
from miaotui.quantize.int4 import Int4WeightOnlyLinear
from miaotui.quantize.int8 import Int8WeightOnlyLinear
from miaotui.quantize.int8_dynamic import Int8DynamicLinear

LAYER_FOR_SCHEME = {
    "w8": Int8WeightOnlyLinear,
    "w8a8": Int8DynamicLinear,
    "w4": Int4WeightOnlyLinear,
    "w3": Int3WeightOnlyLinear,
}


@torch.no_grad()
def rtn_quantize_(model: nn.Module, cfg: QuantizeConfig, *, progress: bool | None = None) -> dict:
    """Replace each selected linear layer by its packed round-to-nearest version, in place."""
    layer_cls = LAYER_FOR_SCHEME[cfg.scheme]
    chosen = find_linears(model, cfg.targets, cfg.ignore)
    skipped = {}
    done = 0
    options = {"group_size": cfg.group_size, "symmetric": cfg.symmetric}
    for name, module in track(chosen, f"quantizing ({cfg.scheme}, {cfg.algorithm})", enabled=progress):
        problem = layer_cls.unsupported(*linear_weight(module).shape, **options)
        if problem:
            skipped[name] = problem
            continue
        set_module(model, name, layer_cls.from_float(module, **options))
        done += 1
    return {"scheme": cfg.scheme, "algorithm": cfg.algorithm, "quantized": done, "skipped": skipped}
