"""Low-rank factorization: replace a linear layer by two thin ones (plain and activation-aware SVD).

Names load on first use, so reading recipes does not import torch.

>>> from miaotui.lowrank import FactorizeConfig
>>> FactorizeConfig(method="svd", ratio=0.7).method
'svd'
"""

import importlib

_WHERE = {
    "FactorizeConfig": "miaotui.lowrank.config",
    "LowRankLinear": "miaotui.lowrank.layer",
    "factorize_": "miaotui.lowrank.factorize",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'miaotui.lowrank' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
