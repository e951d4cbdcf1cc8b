"""The prune step of a recipe: which method, how sparse, which pattern, which layers, how they are stored.

>>> PruneConfig(method="wanda", sparsity=0.5).needs_calibration
True
>>> PruneConfig(pattern="2:4").nm
(2, 4)
>>> PruneConfig(swaps=100).needs_calibration  # magnitude masks refined on calibration inputs
True
>>> PruneConfig(sparsity=1.0)
Traceback (most recent call last):
...
ValueError: prune: sparsity must be in [0, 1), got 1.0
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from miaotui.recipe import StepConfig, register_step

METHODS = ("magnitude", "wanda", "sparsegpt")  # magnitude needs no data; wanda and sparsegpt calibrate
RATIOS = ("uniform", "owl")  # the same ratio everywhere, or outlier-weighted per block (unstructured only)
# how pruned layers are kept: auto = semi_structured for 2:4 where the kernels take the shape, else bitmask;
# bitmask = dense in memory, bitmask + nonzero values on disk; semi_structured = 2:4 kernels on CUDA;
# dense = plain linear layers with zeros, for a later quantize step to take over
LAYERS = ("auto", "bitmask", "semi_structured", "dense")
DEFAULT_IGNORE = ("lm_head", "score", "classifier")


@register_step("prune")
@dataclass(frozen=True)
class PruneConfig(StepConfig):
    """Prune the linear layers matched by `targets` (glob patterns on module names) minus `ignore`.

    pattern: "unstructured" or "N:M" (keep N of every M consecutive input weights; sparsity must be 1 - N/M).
    Pruned layers compute densely on CPU: sparsity saves no time there (only disk space); 2:4 layers use
    PyTorch's semi-structured sparse kernels on CUDA.
    """

    method: str = "magnitude"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    ratios: str = "uniform"
    owl_threshold: float = 5.0  # owl: a score is an outlier above this many times the block's mean score
    owl_lambda: float = 0.08  # owl: block ratios spread over [sparsity - 2*lambda, sparsity + 2*lambda] at most
    # sparsegpt: Hessian dampening, as a fraction of the mean of its diagonal. The paper's 0.01 is best when the
    # calibration text resembles the text the model will see; larger values (0.1 to 1) trust the calibration
    # Hessian less, which helps when the calibration text is off-domain
    damp: float = 0.01
    # magnitude, wanda: after the method's mask, up to this many rounds of pruned/kept swaps per output row that
    # lower the layer's reconstruction error on the calibration inputs (`miaotui.sparsity.swaps`); 0 = off
    swaps: int = 0
    layer: str = "auto"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = DEFAULT_IGNORE

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"prune: method {self.method!r} is not supported; choose one of {', '.join(METHODS)}")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, int | float):
            raise ValueError(f"prune: sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"prune: sparsity must be in [0, 1), got {self.sparsity!r}")
        nm = self.nm  # validates the pattern
        if nm is not None and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(
                f"prune: pattern {self.pattern} keeps {nm[0]} of every {nm[1]} weights, sparsity "
                f"{1 - nm[0] / nm[1]:g}; set sparsity to that (got {self.sparsity:g})"
            )
        if self.ratios not in RATIOS:
            raise ValueError(f"prune: ratios {self.ratios!r} is not supported; choose one of {', '.join(RATIOS)}")
        if self.ratios == "owl":
            if nm is not None:
                raise ValueError("prune: owl ratios vary the sparsity per block; they need pattern unstructured")
            if not self.owl_threshold > 0:
                raise ValueError(f"prune: owl_threshold must be positive, got {self.owl_threshold!r}")
            if not (self.owl_lambda >= 0 and 2 * self.owl_lambda <= self.sparsity < 1 - 2 * self.owl_lambda):
                raise ValueError(
                    f"prune: owl_lambda {self.owl_lambda!r} would push block ratios outside [0, 1) around "
                    f"sparsity {self.sparsity:g}; need 0 <= 2 * owl_lambda <= sparsity < 1 - 2 * owl_lambda"
                )
        if isinstance(self.damp, bool) or not isinstance(self.damp, int | float) or not self.damp > 0:
            raise ValueError(f"prune: damp must be a positive number, got {self.damp!r}")
        if isinstance(self.swaps, bool) or not isinstance(self.swaps, int) or self.swaps < 0:
            raise ValueError(f"prune: swaps must be a whole number >= 0 (rounds per row; 0 = off), got {self.swaps!r}")
        if self.swaps and self.method == "sparsegpt":
            raise ValueError(
                "prune: swaps refine the masks of methods that keep the surviving weights (magnitude, wanda); "
                "sparsegpt changes them as it prunes"
            )
        if self.layer not in LAYERS:
            raise ValueError(f"prune: layer {self.layer!r} is not supported; choose one of {', '.join(LAYERS)}")
        if self.layer == "semi_structured" and nm != (2, 4):
            raise ValueError(f"prune: layer semi_structured needs pattern 2:4, got {self.pattern!r}")
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(p, str) and p for p in value):
                raise ValueError(f"prune: {name} must be a list of non-empty glob patterns, got {value!r}")
        if not self.targets:
            raise ValueError("prune: targets must name at least one pattern (use '*' for all layers)")

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for an N:M pattern, None for unstructured."""
        if self.pattern == "unstructured":
            return None
        match = re.fullmatch(r"(\d+):(\d+)", str(self.pattern))
        if not match:
            raise ValueError(
                f"prune: pattern {self.pattern!r} is not supported; use 'unstructured' or 'N:M' (e.g. 2:4)"
            )
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise ValueError(f"prune: pattern {self.pattern}: need 0 < N < M (keep N of every M weights)")
        return n, m

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude" or self.ratios == "owl" or self.swaps > 0

    def apply(self, lm, *, calibration=None, teacher=None, progress: bool | None = None) -> dict:
        from miaotui.sparsity.prune import prune_

        return prune_(lm, self, calibration=calibration, progress=progress)
