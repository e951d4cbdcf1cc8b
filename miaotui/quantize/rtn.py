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
from miaotui.quantize.int8 import K_MULTIPLE, Int8WeightOnlyLinear
from miaotui.quantize.int8_dynamic import Int8DynamicLinear

LAYER_FOR_SCHEME = {"w8": Int8WeightOnlyLinear, "w8a8": Int8DynamicLinear}


@torch.no_grad()
def rtn_quantize_(model: nn.Module, cfg: QuantizeConfig, *, progress: bool | None = None) -> dict:
    """Replace each selected linear layer by its packed round-to-nearest version, in place."""
    layer_cls = LAYER_FOR_SCHEME[cfg.scheme]
    chosen = find_linears(model, cfg.targets, cfg.ignore)
    skipped = {}
    done = 0
    for name, module in track(chosen, f"quantizing ({cfg.scheme}, {cfg.algorithm})", enabled=progress):
        in_features = linear_weight(module).shape[1]
        if in_features % K_MULTIPLE:
            skipped[name] = f"in_features {in_features} is not a multiple of {K_MULTIPLE}"
            continue
        set_module(model, name, layer_cls.from_float(module))
        done += 1
    return {"scheme": cfg.scheme, "algorithm": cfg.algorithm, "quantized": done, "skipped": skipped}
