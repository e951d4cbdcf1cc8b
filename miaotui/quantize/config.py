"""The quantization step of a recipe: which scheme, which algorithm, which layers.

>>> QuantizeConfig(scheme="w8").algorithm
'rtn'
>>> QuantizeConfig(scheme="w5")
Traceback (most recent call last):
...
ValueError: quantize: scheme 'w5' is not supported; choose one of w8, w8a8, w4, w3 (weights of 8, 4 or 3 bits)
"""

from __future__ import annotations

from dataclasses import dataclass

from miaotui.recipe import StepConfig, register_step

# w8: int8 weight-only per output channel (memory-bound decode);
# w8a8: int8 weights per channel x int8 activations quantized per call (compute-bound: encoders, prefill);
# w4: int4 weight-only, per group of `group_size` input channels, two weights per byte;
# w3: int3 weight-only, groups as w4, eight weights in three bytes (runs on the int4 kernels)
SCHEMES = ("w8", "w8a8", "w4", "w3")
GROUPED_SCHEMES = ("w4", "w3")
GROUP_SIZES = (32, 64, 128, 256)
ALGORITHMS = ("rtn", "gptq")  # round-to-nearest; GPTQ (needs calibration text)
DEFAULT_IGNORE = ("lm_head", "score", "classifier")


@register_step("quantize")
@dataclass(frozen=True)
class QuantizeConfig(StepConfig):
    """Quantize the linear layers matched by `targets` (glob patterns on module names) minus `ignore`.

    Layers already replaced by an earlier step are left alone, so several quantize steps with different
    `targets` give per-layer schemes.
    """

    scheme: str = "w8"
    algorithm: str = "rtn"
    group_size: int = 128  # w4/w3 only: input channels sharing one scale and zero
    symmetric: bool = False  # w4/w3 only: zero fixed at the middle code (no zero point)
    act_order: bool = False  # gptq only: columns in decreasing Hessian-diagonal order (groups fixed beforehand)
    damp: float = 0.01  # gptq only: added to the Hessian diagonal, as a fraction of its mean
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = DEFAULT_IGNORE

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(
                f"quantize: scheme {self.scheme!r} is not supported; choose one of {', '.join(SCHEMES)} "
                "(weights of 8, 4 or 3 bits)"
            )
        if self.algorithm == "gptq" and self.scheme not in ("w3", "w4", "w8"):
            raise ValueError(f"quantize: algorithm gptq supports the schemes w3, w4, w8, not {self.scheme!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"quantize: algorithm {self.algorithm!r} is not supported; choose one of {', '.join(ALGORITHMS)}"
            )
        if self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"quantize: group_size {self.group_size!r} is not supported; choose one of "
                + ", ".join(map(str, GROUP_SIZES))
            )
        for name in ("symmetric", "act_order"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"quantize: {name} must be true or false, got {getattr(self, name)!r}")
        if self.act_order and self.algorithm != "gptq":
            raise ValueError("quantize: act_order orders GPTQ's columns; it needs algorithm gptq")
        if isinstance(self.damp, bool) or not isinstance(self.damp, int | float) or not 0 < self.damp <= 1:
            raise ValueError(f"quantize: damp must be a fraction in (0, 1] (typical 0.01 to 0.1), got {self.damp!r}")
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(p, str) and p for p in value):
                raise ValueError(f"quantize: {name} must be a list of non-empty glob patterns, got {value!r}")
        if not self.targets:
            raise ValueError("quantize: targets must name at least one pattern (use '*' for all layers)")

    @property
    def needs_calibration(self) -> bool:
        return self.algorithm == "gptq"

    def apply(self, lm, *, calibration=None, teacher=None, progress: bool | None = None) -> dict:
        if self.needs_calibration:
            from miaotui.quantize.gptq import gptq_quantize_

            if calibration is None:
                raise ValueError("quantize: algorithm gptq needs calibration text (--calib FILE)")
            return gptq_quantize_(lm, self, calibration.token_ids(lm), progress=progress)
        from miaotui.quantize import quantize_

        return quantize_(lm.model, self, progress=progress)
