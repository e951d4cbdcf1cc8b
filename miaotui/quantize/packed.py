"""Packed low-bit layer types: a registry so saved models can be rebuilt layer by layer.

>>> sorted(PACKED_LAYERS)  # doctest: +SKIP
['int8_weight_only']
"""

from __future__ import annotations

import torch
import torch.nn as nn

PACKED_LAYERS: dict[str, type[PackedLinear]] = {}


def register_layer(cls: type[PackedLinear]) -> type[PackedLinear]:
    """Class decorator: make a packed layer type rebuildable from its `describe()` dict."""
    PACKED_LAYERS[cls.layer_type] = cls
    return cls


class PackedLinear(nn.Module):
    """Base of layers that replace nn.Linear/Conv1D with packed low-bit weights.

    Subclasses set `layer_type`, build empty buffers in `__init__(in_features, out_features, bias,
    dtype, device)` and fill them in a `from_float` classmethod.
    """

    layer_type = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def describe(self) -> dict:
        """Constructor arguments, as stored in the checkpoint sidecar."""
        return {
            "type": self.layer_type,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    @classmethod
    def unsupported(cls, out_features: int, in_features: int, **options) -> str | None:
        """Why a layer of this shape cannot use this type's kernels, or None when it can."""
        return None

    def portable_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to save in place of the runtime ones (by local name), for device-specific layouts."""
        return {}

    def take(self, dim: int, index: torch.Tensor) -> PackedLinear:
        """A new layer computing only output features `index` (dim 0) or reading only input features `index`
        (dim 1): the shard one rank holds under tensor parallelism. Raises ValueError when the piece has a shape
        this type's kernels cannot run (the message says why)."""
        raise ValueError(f"{self.layer_type} layers cannot be split into shards")

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def build_layer(spec: dict, dtype: torch.dtype, device=None) -> PackedLinear:
    """An empty packed layer from a sidecar entry, ready for `load_state_dict(assign=True)`."""
    kwargs = dict(spec)
    cls = PACKED_LAYERS.get(kwargs.pop("type", None))
    if cls is None:
        raise ValueError(f"unknown packed layer type {spec.get('type')!r}; known: {', '.join(sorted(PACKED_LAYERS))}")
    return cls(dtype=dtype, device=device, **kwargs)
