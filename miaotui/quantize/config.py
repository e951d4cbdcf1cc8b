"""The quantization step of a recipe: which scheme, which algorithm, which layers.

>>> QuantizeConfig(scheme="w8").algorithm
'rtn'
>>> QuantizeConfig(scheme="w5")
Traceback (most recent call last):
...
ValueError: quantize: scheme 'w5' is not supported; choose one of w8, w8a8, fp8, w4, w3 (weights of 8, 4 or 3 bits)
"""

from __future__ import annotations

from dataclasses import dataclass

from miaotui.recipe import StepConfig, register_step

# w8: int8 weight-only per output channel (memory-bound decode);
# w8a8: int8 weights per channel x int8 activations quantized per call (compute-bound: encoders, prefill);
# fp8: e4m3 weights per channel x e4m3 activations per token (GPUs with FP8 tensor cores);
# w4: int4 weight-only, per group of `group_size` input channels, two weights per byte;
# w3: int3 weight-only, groups as w4, eight weights in three bytes (runs on the int4 kernels)
SCHEMES = ("w8", "w8a8", "fp8", "w4", "w3")
GROUPED_SCHEMES = ("w4", "w3")
GROUP_SIZES = (32, 64, 128, 256)
# round-to-nearest; HQQ (zero points fitted to the weights, no calibration); GPTQ and AWQ (calibration text)
ALGORITHMS = ("rtn", "hqq", "gptq", "awq")
CALIBRATED = {"gptq": ("w3", "w4", "w8", "w8a8"), "awq": ("w4", "w8")}  # algorithm -> the schemes it supports
SUPPORTED = {**CALIBRATED, "hqq": GROUPED_SCHEMES}
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
    emulate: bool = False  # fp8 only: allow hardware without FP8 units (slow reference kernels; to measure quality)
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = DEFAULT_IGNORE

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(
                f"quantize: scheme {self.scheme!r} is not supported; choose one of {', '.join(SCHEMES)} "
                "(weights of 8, 4 or 3 bits)"
            )
        if self.scheme not in SUPPORTED.get(self.algorithm, SCHEMES):
            raise ValueError(
                f"quantize: algorithm {self.algorithm} supports the schemes "
                f"{', '.join(SUPPORTED[self.algorithm])}, not {self.scheme!r}"
            )
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"quantize: algorithm {self.algorithm!r} is not supported; choose one of {', '.join(ALGORITHMS)}"
            )
        if self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"quantize: group_size {self.group_size!r} is not supported; choose one of "
                + ", ".join(map(str, GROUP_SIZES))
            )
        for name in ("symmetric", "act_order", "emulate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"quantize: {name} must be true or false, got {getattr(self, name)!r}")
        if self.symmetric and self.algorithm == "hqq":
            raise ValueError("quantize: hqq fits zero points; it needs symmetric: false")
        if self.act_order and self.algorithm != "gptq":
            raise ValueError("quantize: act_order orders GPTQ's columns; it needs algorithm gptq")
        if self.emulate and self.scheme != "fp8":
            raise ValueError(
                f"quantize: emulate runs fp8 without FP8 hardware; scheme {self.scheme} needs no emulation"
            )
        if isinstance(self.damp, bool) or not isinstance(self.damp, int | float) or not 0 < self.damp <= 1:
            raise ValueError(f"quantize: damp must be a fraction in (0, 1] (typical 0.01 to 0.1), got {self.damp!r}")
        _check_patterns("quantize", self.targets, self.ignore)

    @property
    def needs_calibration(self) -> bool:
        return self.algorithm in CALIBRATED

    def check(self, lm) -> None:
        self.check_device(lm.device)

    def check_device(self, device) -> None:
        """Raise MiaotuiError when the scheme has no fast kernels on `device` (fp8 without FP8 tensor cores)."""
        if self.scheme == "fp8" and not self.emulate:
            from miaotui.quantize.fp8 import require_hardware

            require_hardware(device)

    def apply(self, lm, *, calibration=None, teacher=None, progress: bool | None = None) -> dict:
        if self.needs_calibration:
            if calibration is None:
                raise ValueError(f"quantize: algorithm {self.algorithm} needs calibration text (--calib FILE)")
            if self.algorithm == "awq":
                from miaotui.quantize.awq import awq_quantize_ as calibrated
            else:
                from miaotui.quantize.gptq import gptq_quantize_ as calibrated
            from miaotui.calibration import calibration_summary

            ids = calibration.token_ids(lm, progress=progress)
            summary = calibrated(lm, self, ids, progress=progress)
            return {**summary, "calibration": calibration_summary(lm, calibration, ids)}
        from miaotui.quantize import quantize_

        return quantize_(lm.model, self, progress=progress)


def _check_patterns(step: str, targets, ignore) -> None:
    for name, value in (("targets", targets), ("ignore", ignore)):
        if not isinstance(value, tuple) or not all(isinstance(p, str) and p for p in value):
            raise ValueError(f"{step}: {name} must be a list of non-empty glob patterns, got {value!r}")
    if not targets:
        raise ValueError(f"{step}: targets must name at least one pattern (use '*' for all layers)")


@register_step("smooth")
@dataclass(frozen=True)
class SmoothConfig(StepConfig):
    """SmoothQuant: move activation outliers into the weights before int8 activations (a later w8a8 step).

    Per input channel j of the linears a norm or linear feeds (the architecture table's folds):
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), X divided and W multiplied by s, folded into the producer, so the
    model's function is unchanged. alpha 0 leaves activations alone; 1 moves all their range into the weights.

    >>> SmoothConfig(alpha=0.6).needs_calibration
    True
    >>> SmoothConfig(alpha=1.5)
    Traceback (most recent call last):
    ...
    ValueError: smooth: alpha must be a number in [0, 1], got 1.5
    """

    alpha: float = 0.5
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = DEFAULT_IGNORE

    def __post_init__(self):
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
            raise ValueError(f"smooth: alpha must be a number in [0, 1], got {alpha!r}")
        _check_patterns("smooth", self.targets, self.ignore)

    @property
    def needs_calibration(self) -> bool:
        return True

    def apply(self, lm, *, calibration=None, teacher=None, progress: bool | None = None) -> dict:
        from miaotui.calibration import calibration_summary
        from miaotui.quantize.smoothquant import smooth_

        if calibration is None:
            raise ValueError("smooth: SmoothQuant needs calibration text (--calib FILE)")
        ids = calibration.token_ids(lm, progress=progress)
        return {**smooth_(lm, self, ids, progress=progress), "calibration": calibration_summary(lm, calibration, ids)}
