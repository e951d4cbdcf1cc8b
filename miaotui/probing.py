"""Probe a block with real activations: record what its layers receive, and how that changes when one layer's
output is changed. The structure discovery of folding and slimming rests on these few tools.

>>> import torch, torch.nn as nn
>>> block = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2))
>>> x = torch.randn(3, 4)
>>> base = record_inputs(block, x, {"1": block[1]})
>>> s = torch.tensor([1.0, 2.0, 3.0, 4.0])
>>> with edited_output(block[0], lambda y: y * s):
...     new = record_inputs(block, x, {"1": block[1]})
>>> channel_ratios(base["1"], new["1"])
tensor([1., 2., 3., 4.])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
    return x if isinstance(x, torch.Tensor) else None


@torch.no_grad()
def record_inputs(call: Callable, x: torch.Tensor, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Run call(x) once; the input each module received: name -> (tokens, K) float32 (the last call's)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def grab(module, args, kwargs):
            t = _first_input(args, kwargs)
            if t is not None:
                seen[name] = t.detach().reshape(-1, t.shape[-1]).float().clone()

        return grab

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        call(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@contextlib.contextmanager
def edited_output(module: nn.Module, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While inside, `module`'s output tensor y is replaced by edit(y)."""

    def hook(mod, args, out):
        return edit(out) if isinstance(out, torch.Tensor) else out

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def channel_ratios(base: torch.Tensor, new: torch.Tensor, tol: float = 1e-4) -> torch.Tensor | None:
    """r (K,) with new ~ base * r on every token, or None when new is not a per-channel multiple of base.

    base, new: (tokens, K). Channels that are zero on every token get NaN (any ratio fits them).
    """
    if base.shape != new.shape:
        return None
    b2 = base.square().sum(0)  # (K,)
    r = (new * base).sum(0) / b2.clamp(min=1e-30)  # least squares per channel
    err = (new - base * r).norm() / new.norm().clamp(min=1e-30)
    if not bool(err < tol):
        return None
    return torch.where(b2 > 0, r, torch.full_like(r, float("nan")))


def changed_channels(base: torch.Tensor, new: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Indices of the channels (last dim) where new differs from base on some token: (n,) int64."""
    scale = base.abs().amax().clamp(min=1e-30)
    return ((new - base).abs().amax(0) > tol * scale).nonzero().flatten()
