"""Pruning: one verb, `prune_(lm, cfg)`, unstructured and N:M (2:4) sparsity, and the sparse layer types.

Names load on first use, so reading recipes or `miaotui --help` does not import torch.

>>> from miaotui.sparsity import PruneConfig
>>> PruneConfig(method="sparsegpt", pattern="2:4").nm
(2, 4)
"""

__all__ = ["PruneConfig", "SemiStructuredSparseLinear", "SparseLinear", "prune_"]

_HOMES = {
    "PruneConfig": "miaotui.sparsity.config",
    "SemiStructuredSparseLinear": "miaotui.sparsity.semi_structured",
    "SparseLinear": "miaotui.sparsity.layer",
    "prune_": "miaotui.sparsity.prune",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'miaotui.sparsity' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)
