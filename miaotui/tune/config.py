"""What autotune searches and under which budget: self-validating configs that round-trip through JSON.

A layer option names what one linear layer can become: `keep` (the float layer), a quantization scheme
(`w8`, `w8a8`, `fp8`, `w4g128`, `w4g32`, `w3g128`: scheme and group size), unstructured pruning (`sparse50`: half the
weights, by magnitude) or a low-rank factorization (`lowrank80`: two thin layers keeping 80 % of the weights).

>>> LayerOption.parse("w4g32").steps(("*",), ("lm_head",))[0].group_size
32
>>> parse_budget("2%"), parse_duration("30m")
(0.02, 1800.0)
>>> AutotuneConfig(objective="latency")
Traceback (most recent call last):
...
ValueError: autotune: objective 'latency' is not supported; choose one of decode, prefill, throughput
>>> AutotuneConfig.from_dict(AutotuneConfig().to_dict()) == AutotuneConfig()
True
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass

from miaotui.calibration import DEFAULT_GENERATED
from miaotui.lowrank import FactorizeConfig
from miaotui.quantize.config import CALIBRATED, DEFAULT_IGNORE, GROUP_SIZES, QuantizeConfig
from miaotui.recipe import BUILTIN_RECIPES, StepConfig
from miaotui.sparsity import PruneConfig

OBJECTIVES = ("decode", "prefill", "throughput")
DEVICES = ("cpu", "cuda")
_OPTION = re.compile(r"^(?:(keep)|(w8a8|w8|fp8)|(w4|w3)g(\d+)|sparse(\d+)|lowrank(\d+))$")
_SPECULATIVE = re.compile(r"^(?:(off)|ngram(\d+)?)$")
OPTION_HELP = (
    "keep, w8, w8a8, fp8 (GPUs with FP8 tensor cores), w4gN / w3gN (N = group size: 32, 64, 128, 256), "
    "sparseP (P % pruned), lowrankP"
)


@dataclass(frozen=True)
class LayerOption:
    """What a linear layer becomes, parsed from its name (see the module docstring)."""

    name: str
    kind: str  # keep | quantize | prune | factorize
    scheme: str = ""
    group_size: int = 128
    fraction: float = 0.0

    @classmethod
    def parse(cls, name: str) -> LayerOption:
        m = _OPTION.match(name)
        if m is None:
            raise ValueError(f"autotune: unknown layer option {name!r}; allowed: {OPTION_HELP}")
        keep, w8, grouped, group, sparse, lowrank = m.groups()
        if keep:
            return cls(name, "keep")
        if w8:
            return cls(name, "quantize", scheme=w8)
        if grouped:
            if int(group) not in GROUP_SIZES:
                raise ValueError(f"autotune: group size {group} of {name!r}; choose one of {GROUP_SIZES}")
            return cls(name, "quantize", scheme=grouped, group_size=int(group))
        pct = int(sparse or lowrank)
        if not 0 < pct < 100:
            raise ValueError(f"autotune: {name!r} needs a percentage between 1 and 99")
        return cls(name, "prune" if sparse else "factorize", fraction=pct / 100)

    def steps(self, targets: tuple[str, ...], ignore: tuple[str, ...], algorithm: str = "rtn") -> list[StepConfig]:
        """Recipe steps applying this option to `targets` minus `ignore` (none for keep).

        algorithm: rtn for quantization without data; gptq/awq use calibration text; pruning then uses wanda
        and factorization asvd. The data-free variant (rtn, magnitude, svd) is what the speed model times.
        """
        calibrated = algorithm != "rtn"
        if self.kind == "quantize":
            algo = algorithm if self.scheme in CALIBRATED.get(algorithm, ()) else "rtn"
            grouped = {"group_size": self.group_size} if self.scheme in ("w4", "w3") else {}
            return [QuantizeConfig(scheme=self.scheme, algorithm=algo, targets=targets, ignore=ignore, **grouped)]
        if self.kind == "prune":
            method = "wanda" if calibrated else "magnitude"
            return [PruneConfig(method=method, sparsity=self.fraction, targets=targets, ignore=ignore)]
        if self.kind == "factorize":
            method = "asvd" if calibrated else "svd"
            return [FactorizeConfig(method=method, ratio=self.fraction, targets=targets, ignore=ignore)]
        return []


def speculative_options(name: str) -> dict:
    """Engine options of a speculative choice: "off" -> {}, "ngram" -> 4 drafted tokens, "ngram8" -> 8.

    >>> speculative_options("ngram8")
    {'draft': 'ngram', 'num_draft': 8}
    """
    match = _SPECULATIVE.match(str(name))
    if match is None or (match[2] is not None and not 1 <= int(match[2]) <= 16):
        raise ValueError(f"autotune: speculative option {name!r}; allowed: off, ngram, ngramK (K drafted, 1-16)")
    return {} if match[1] else {"draft": "ngram", "num_draft": int(match[2] or 4)}


@dataclass(frozen=True)
class SearchSpace:
    """The options autotune may combine.

    layer_options: what each linear layer may become (mixed per layer by sensitivity); keep is implied.
    algorithm: rtn (no data) or, with calibration text, gptq / awq (pruning then uses wanda, low-rank asvd).
    builtins: built-in recipes measured in the same run as references and candidates (those needing
        calibration text only when it is given).
    kv_dtypes, compile: engine options, kept only when they make the original model faster.
    speculative: "off", "ngram" (prompt lookup, 4 drafted tokens) or "ngramK" (K drafted tokens), timed on
        greedy generation from held-out text prompts (acceptance depends on the text) and kept only when faster.
    keep_fractions: mixed candidates keep the most sensitive layers (this share of the total sensitivity
        removed) at the best fallback option.
    """

    layer_options: tuple[str, ...] = ("w8", "w8a8", "w4g128", "w4g32", "sparse50")
    algorithm: str = "rtn"
    builtins: tuple[str, ...] = ("w8", "w8a8", "w4-rtn", "w4-gptq", "w4-awq", "w8a8-smoothquant")
    kv_dtypes: tuple[str, ...] = ("auto",)
    compile: tuple[bool, ...] = (False,)
    speculative: tuple[str, ...] = ("off",)
    keep_fractions: tuple[float, ...] = (0.5, 0.8)

    def __post_init__(self):
        if not self.layer_options and not self.builtins:
            raise ValueError("autotune: the search space is empty (no layer options and no built-in recipes)")
        for name in self.layer_options:
            LayerOption.parse(name)
        if self.algorithm not in ("rtn", "gptq", "awq"):
            raise ValueError(f"autotune: algorithm {self.algorithm!r}; choose one of rtn, gptq, awq")
        unknown = [b for b in self.builtins if b not in BUILTIN_RECIPES]
        if unknown:
            raise ValueError(f"autotune: unknown built-in recipe(s) {unknown}; known: {', '.join(BUILTIN_RECIPES)}")
        bad = [k for k in self.kv_dtypes if k not in ("auto", "int8", "fp8")]
        if bad or not self.kv_dtypes:
            raise ValueError(f"autotune: kv_dtypes {list(self.kv_dtypes)}; allowed: auto, int8, fp8")
        if not self.compile or not all(isinstance(c, bool) for c in self.compile):
            raise ValueError(f"autotune: compile must list true/false values, got {self.compile!r}")
        for name in self.speculative:
            speculative_options(name)
        if not all(isinstance(f, int | float) and 0 < f <= 1 for f in self.keep_fractions):
            raise ValueError(f"autotune: keep_fractions must be fractions in (0, 1], got {self.keep_fractions!r}")

    @property
    def uses_fp8(self) -> bool:
        """True when a layer option or a built-in quantizes to fp8 (which needs FP8 tensor cores)."""
        steps = [s for b in self.builtins for s in BUILTIN_RECIPES[b]["steps"]]
        return "fp8" in self.layer_options or any(s.get("scheme") == "fp8" for s in steps)

    def options(self) -> list[LayerOption]:
        return [LayerOption.parse(n) for n in self.layer_options if n != "keep"]


@dataclass(frozen=True)
class AutotuneConfig:
    """The budget, the objective and the measurement protocol of one autotune run.

    max_ppl_increase: allowed perplexity increase on held-out text, a fraction (0.02 = +2 %).
    max_kl: optional cap on the mean KL(original || candidate) per token on held-out text.
    objective: decode (tokens/s of one decode step), prefill (prompt tokens/s) or throughput (all tokens
        of prompt + generation per second) at `batch` sequences.
    tokens: held-out tokens of the first evaluation round; each later round doubles them, up to max_tokens.
    """

    max_ppl_increase: float = 0.02
    max_kl: float | None = None
    objective: str = "decode"
    batch: int = 1
    device: str = "cpu"
    dtype: str = "auto"
    time_budget_s: float | None = None
    seed: int = 0
    seqlen: int = 512
    tokens: int = 1024
    max_tokens: int = 4096
    sensitivity_tokens: int = 256
    calib_samples: int = 32
    calib_generated: float = DEFAULT_GENERATED  # the fraction of calibration windows the model writes
    prompt_len: int = 64
    new_tokens: int = 32
    repeats: int = 3
    final_repeats: int = 5
    min_kernel_speedup: float = 1.02
    space: SearchSpace = SearchSpace()

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"autotune: objective {self.objective!r} is not supported; choose one of {', '.join(OBJECTIVES)}"
            )
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"autotune: device {self.device!r}; choose cpu, cuda or cuda:N")
        if not isinstance(self.max_ppl_increase, int | float) or not 0 <= self.max_ppl_increase < 10:
            raise ValueError(
                f"autotune: max_ppl_increase must be a fraction >= 0 (0.02 = 2 %), got {self.max_ppl_increase!r}"
            )
        if self.max_kl is not None and not (isinstance(self.max_kl, int | float) and self.max_kl > 0):
            raise ValueError(f"autotune: max_kl must be a positive number, got {self.max_kl!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"autotune: time budget must be positive, got {self.time_budget_s!r}")
        sizes = ("batch", "seqlen", "tokens", "max_tokens", "sensitivity_tokens", "calib_samples", "prompt_len")
        for name in (*sizes, "repeats", "final_repeats"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"autotune: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.new_tokens < 2:
            raise ValueError("autotune: new_tokens must be at least 2")
        if self.tokens < self.seqlen or self.max_tokens < self.tokens:
            raise ValueError(
                f"autotune: need seqlen ({self.seqlen}) <= tokens ({self.tokens}) <= max_tokens ({self.max_tokens})"
            )
        if isinstance(self.calib_generated, bool) or not isinstance(self.calib_generated, int | float):
            raise ValueError(f"autotune: calib_generated must be a fraction in [0, 1], got {self.calib_generated!r}")
        if not 0 <= self.calib_generated <= 1:
            raise ValueError(f"autotune: calib_generated must be a fraction in [0, 1], got {self.calib_generated!r}")
        if self.sensitivity_tokens < 2:
            raise ValueError("autotune: sensitivity_tokens must be at least 2")

    def rounds(self) -> list[int]:
        """Held-out tokens of each successive-halving round: tokens, 2 x tokens, ... up to max_tokens."""
        out, t = [], self.tokens
        while t < self.max_tokens:
            out.append(t)
            t *= 2
        return [*out, self.max_tokens]

    def meets(self, quality: dict) -> tuple[bool, str]:
        """Whether a quality measurement is within budget, and why not."""
        increase = quality["perplexity_ratio"] - 1
        if increase > self.max_ppl_increase:
            return False, f"perplexity +{100 * increase:.2f} % > +{100 * self.max_ppl_increase:g} %"
        if self.max_kl is not None and quality["kl_mean"] > self.max_kl:
            return False, f"mean KL {quality['kl_mean']:.4g} > {self.max_kl:g}"
        return True, ""

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["space"] = {k: list(v) for k, v in out["space"].items() if k != "algorithm"}
        out["space"]["algorithm"] = self.space.algorithm
        return out

    @classmethod
    def from_dict(cls, data: dict) -> AutotuneConfig:
        data = dict(data)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"autotune: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}")
        space = dict(data.pop("space", {}))
        hints = typing.get_type_hints(SearchSpace)
        for k, v in list(space.items()):
            if typing.get_origin(hints.get(k)) is tuple:
                space[k] = tuple(v)
        return cls(**data, space=SearchSpace(**space))


def parse_budget(text: str | float) -> float:
    """A perplexity budget: "2%" or "0.02" -> 0.02; refuses negatives and garbage."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ValueError(f"autotune: cannot read the budget {text!r}; write e.g. 2% or 0.02") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"autotune: the budget must be a non-negative fraction, got {text!r}")
    return value


def parse_duration(text: str | float) -> float:
    """Seconds from "90s", "30m", "2h" or a plain number of seconds."""
    raw = str(text).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(raw[-1:])
    try:
        value = float(raw[:-1]) * scale if scale else float(raw)
    except ValueError:
        raise ValueError(f"autotune: cannot read the time budget {text!r}; write e.g. 30m, 90s or 2h") from None
    if not value > 0:
        raise ValueError(f"autotune: the time budget must be positive, got {text!r}")
    return value


__all__ = [
    "DEFAULT_IGNORE",
    "AutotuneConfig",
    "LayerOption",
    "SearchSpace",
    "parse_budget",
    "parse_duration",
    "speculative_options",
]
