"""The quantization verb, `quantize_(model, cfg)`, dispatching on the config's algorithm.

Importing this module registers every packed layer type and algorithm; `miaotui.quantize` re-exports it.

>>> import torch.nn as nn
>>> m = nn.Sequential(nn.Linear(32, 32))
>>> quantize_(m, QuantizeConfig(scheme="w8"), progress=False)["quantized"]
1
>>> type(m[0]).__name__
'Int8WeightOnlyLinear'
"""

from __future__ import annotations

import torch.nn as nn

from miaotui.quantize.config import QuantizeConfig, SmoothConfig  # noqa: F401  (re-exported)
from miaotui.quantize.fp8 import Fp8DynamicLinear  # noqa: F401
from miaotui.quantize.int3 import Int3WeightOnlyLinear  # noqa: F401
from miaotui.quantize.int4 import Int4WeightOnlyLinear  # noqa: F401  (re-exported)
from miaotui.quantize.int8 import Int8WeightOnlyLinear  # noqa: F401
from miaotui.quantize.int8_dynamic import Int8DynamicLinear  # noqa: F401
from miaotui.quantize.packed import PACKED_LAYERS, PackedLinear, build_layer  # noqa: F401
from miaotui.quantize.rtn import rtn_quantize_

ALGORITHMS = {"rtn": rtn_quantize_, "hqq": rtn_quantize_}  # layer by layer, no calibration


def quantize_(model: nn.Module, cfg: QuantizeConfig, *, progress: bool | None = None) -> dict:
    """Quantize `model` in place as `cfg` says; returns a summary (layers quantized, skipped and why).

    Calibrated algorithms (gptq) need the tokenizer and data: apply them as recipe steps
    (`QuantizeConfig.apply(lm, calibration=...)`).
    """
    if cfg.algorithm not in ALGORITHMS:
        raise ValueError(f"quantize_: algorithm {cfg.algorithm!r} needs calibration; use it in a recipe step")
    return ALGORITHMS[cfg.algorithm](model, cfg, progress=progress)
