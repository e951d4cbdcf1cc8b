"""The factorize step of a recipe: which method, how much to keep, which layers.

Exactly one budget: `ratio` (fraction of each layer's weights kept; the default 0.8 when none is given),
`energy` (fraction of the squared singular values kept) or `rank` (one rank for every layer).

>>> FactorizeConfig(method="svd").ratio
0.8
>>> FactorizeConfig(energy=0.9).ratio is None
True
>>> FactorizeConfig(ratio=1.5)
Traceback (most recent call last):
...
ValueError: factorize: ratio must be in (0, 1] (the fraction of each layer's weights kept), got 1.5
"""

from __future__ import annotations

from dataclasses import dataclass

from miaotui.recipe import StepConfig, register_step

METHODS = ("svd", "asvd")  # plain truncated SVD; activation-aware SVD (SVD-LLM whitening, needs calibration text)
ALLOCATIONS = ("layer", "global")  # the budget per layer, or over all selected layers by their spectra
DEFAULT_RATIO = 0.8
DEFAULT_IGNORE = ("lm_head", "score", "classifier")


def _fraction(name: str, value, meaning: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1):
        raise ValueError(f"factorize: {name} must be in (0, 1] ({meaning}), got {value!r}")


@register_step("factorize")
@dataclass(frozen=True)
class FactorizeConfig(StepConfig):
    """Replace the linear layers matched by `targets` minus `ignore` by two thin ones (LowRankLinear).

    Ranks are rounded to a multiple of `rank_multiple` (8 suits the int8 kernels; use the int4 group size to
    compose with w4). Layers whose factors would not be smaller than the dense weight are left dense and
    reported, unless `skip_larger` is false.
    """

    method: str = "asvd"
    ratio: float | None = None
    energy: float | None = None
    rank: int | None = None
    allocation: str = "layer"
    rank_multiple: int = 8
    skip_larger: bool = True
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = DEFAULT_IGNORE

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"factorize: method {self.method!r} is not supported; choose one of {', '.join(METHODS)}")
        given = [n for n in ("ratio", "energy", "rank") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"factorize: give one of ratio, energy, rank, not {' and '.join(given)}")
        if not given:
            object.__setattr__(self, "ratio", DEFAULT_RATIO)
        _fraction("ratio", self.ratio, "the fraction of each layer's weights kept")
        _fraction("energy", self.energy, "the fraction of the squared singular values kept")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"factorize: rank must be a positive integer, got {self.rank!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(
                f"factorize: allocation {self.allocation!r} is not supported; choose one of {', '.join(ALLOCATIONS)}"
            )
        if self.allocation == "global" and self.ratio is None:
            raise ValueError("factorize: allocation global shares a total ratio; give ratio, not energy or rank")
        m = self.rank_multiple
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"factorize: rank_multiple must be a positive integer, got {m!r}")
        if not isinstance(self.skip_larger, bool):
            raise ValueError(f"factorize: skip_larger must be true or false, got {self.skip_larger!r}")
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(p, str) and p for p in value):
                raise ValueError(f"factorize: {name} must be a list of non-empty glob patterns, got {value!r}")
        if not self.targets:
            raise ValueError("factorize: targets must name at least one pattern (use '*' for all layers)")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "asvd"

    def apply(self, lm, *, calibration=None, teacher=None, progress: bool | None = None) -> dict:
        from miaotui.lowrank.factorize import factorize_

        if self.needs_calibration and calibration is None:
            raise ValueError("factorize: method asvd needs calibration text (--calib FILE)")
        ids = calibration.token_ids(lm) if self.needs_calibration else None
        return factorize_(lm, self, ids, progress=progress)
