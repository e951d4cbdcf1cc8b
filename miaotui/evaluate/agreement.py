"""Streaming distribution of per-token KL divergence in bounded memory: a fixed histogram in log space.

KL values from 1e-12 to 1e4 fall into bins of 1/100 decade (quantiles within 2.3 %, the bin's width); values
below go to an underflow bin that reports 0, the maximum is kept exactly. Memory: 1,600 counters, whatever
the number of tokens.

>>> import torch
>>> h = LogHistogram()
>>> h.add(torch.tensor([0.0, 0.01, 0.1, 1.0]))
>>> h.count, h.max
(4, 1.0)
>>> round(h.quantile(0.5), 3), round(h.quantile(1.0), 3)
(0.01, 1.0)
"""

from __future__ import annotations

import math

import torch

LOW, HIGH = -12.0, 4.0  # log10 range of the histogram
BINS_PER_DECADE = 100


class LogHistogram:
    """Counts of non-negative values in log10-spaced bins, with exact count, sum and maximum."""

    def __init__(self) -> None:
        self.bins = int((HIGH - LOW) * BINS_PER_DECADE)
        self.counts = torch.zeros(self.bins + 1, dtype=torch.int64)  # [0]: underflow (values < 1e-12)
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, values: torch.Tensor) -> None:
        """Add a batch of values (any shape; negatives from rounding count as 0)."""
        v = values.detach().reshape(-1).double().clamp(min=0).cpu()  # (N,)
        if v.numel() == 0:
            return
        logv = torch.log10(v.clamp(min=1e-300))  # (N,)
        idx = ((logv - LOW) * BINS_PER_DECADE).floor().long() + 1  # (N,) bin 1 starts at 10**LOW
        idx = torch.where(logv < LOW, torch.zeros_like(idx), idx.clamp(max=self.bins))
        self.counts += torch.bincount(idx, minlength=self.bins + 1)
        self.count += v.numel()
        self.total += v.sum().item()
        self.max = max(self.max, v.max().item())

    def quantile(self, q: float) -> float:
        """The q-quantile (0 <= q <= 1): the geometric centre of the bin holding it, capped at the maximum."""
        if not 0 <= q <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        if self.count == 0:
            return math.nan
        rank = max(1, math.ceil(q * self.count))
        i = int(torch.searchsorted(self.counts.cumsum(0), torch.tensor(rank)).item())
        if i == 0:
            return 0.0
        centre = 10 ** (LOW + (i - 0.5) / BINS_PER_DECADE)
        return min(centre, self.max)

    def summary(self, prefix: str = "kl") -> dict:
        """Median, 90th, 99th percentile and maximum, keyed `{prefix}_p50` ... `{prefix}_max`."""
        return {
            f"{prefix}_p50": self.quantile(0.5),
            f"{prefix}_p90": self.quantile(0.9),
            f"{prefix}_p99": self.quantile(0.99),
            f"{prefix}_max": self.max,
        }
