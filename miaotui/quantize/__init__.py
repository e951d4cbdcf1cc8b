"""Quantization: one verb, `quantize_(model, cfg)`, and the packed layer types it creates.

Names load on first use, so reading recipes or `miaotui --help` does not import torch.

>>> from miaotui.quantize import QuantizeConfig, quantize_
>>> QuantizeConfig(scheme="w8").scheme
'w8'
"""

__all__ = [
    "PACKED_LAYERS",
    "Fp8DynamicLinear",
    "Int3WeightOnlyLinear",
    "Int4WeightOnlyLinear",
    "Int8DynamicLinear",
    "Int8WeightOnlyLinear",
    "PackedLinear",
    "QuantizeConfig",
    "SmoothConfig",
    "build_layer",
    "quantize_",
]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'miaotui.quantize' has no attribute {name!r}")
    import importlib

    dispatch = importlib.import_module("miaotui.quantize.dispatch")  # registers every layer type and algorithm
    return getattr(dispatch, name)
