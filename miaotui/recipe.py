"""Recipes: an ordered list of self-validating step configs, round-tripping through YAML/JSON.

A step config is a frozen dataclass registered under a type name (`@register_step("quantize")`);
the registry lets a recipe file name any step. Built-in recipes are plain data below.

>>> r = get_recipe("w8")
>>> r.name, [s.step_type for s in r.steps]
('w8', ['quantize'])
>>> Recipe.from_yaml(r.to_yaml()) == r
True
"""

from __future__ import annotations

import dataclasses
import json
import typing
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import yaml

from miaotui.errors import MiaotuiError

RECIPE_VERSION = 1
STEP_TYPES: dict[str, type[StepConfig]] = {}

BUILTIN_RECIPES: dict[str, dict[str, Any]] = {
    "w8": {
        "description": "int8 weight-only, per output channel, round-to-nearest; lm_head kept in full precision",
        "steps": [{"type": "quantize", "scheme": "w8", "algorithm": "rtn"}],
    },
    "w8a8": {
        "description": "int8 weights per output channel x int8 activations quantized per token (dynamic); "
        "for compute-bound encoders, prefill and large batches",
        "steps": [{"type": "quantize", "scheme": "w8a8", "algorithm": "rtn"}],
    },
    "w4-rtn": {
        "description": "int4 weight-only, groups of 128 input channels with scale and zero point, "
        "round-to-nearest; lm_head kept in full precision",
        "steps": [{"type": "quantize", "scheme": "w4", "algorithm": "rtn", "group_size": 128}],
    },
}
BUILTIN_RECIPES["w4-hqq"] = {
    "description": "int4 weight-only, groups of 128 with zero points fitted by HQQ (no calibration data)",
    "steps": [{"type": "quantize", "scheme": "w4", "algorithm": "hqq", "group_size": 128}],
}
BUILTIN_RECIPES["w4-gptq"] = {
    "description": "int4 weight-only, groups of 128 with zero points, GPTQ on calibration text (--calib)",
    "steps": [{"type": "quantize", "scheme": "w4", "algorithm": "gptq", "group_size": 128}],
}
BUILTIN_RECIPES["w4-awq"] = {
    "description": "int4 weight-only, groups of 128 with zero points, AWQ scales and clipping on calibration text",
    "steps": [{"type": "quantize", "scheme": "w4", "algorithm": "awq", "group_size": 128}],
}
BUILTIN_RECIPES["w8a8-smoothquant"] = {
    "description": "SmoothQuant (activation outliers moved into the weights, from calibration text), then w8a8",
    "steps": [{"type": "smooth", "alpha": 0.5}, {"type": "quantize", "scheme": "w8a8", "algorithm": "rtn"}],
}
BUILTIN_RECIPES["w8a8-gptq"] = {
    "description": "w8a8 with weights chosen by GPTQ on calibration text (--calib), each layer's rounding errors "
    "compensated on its other weights",
    "steps": [{"type": "quantize", "scheme": "w8a8", "algorithm": "gptq"}],
}
BUILTIN_RECIPES["fp8"] = {
    "description": "FP8 e4m3 weights per output channel x FP8 activations per token (dynamic), on FP8 tensor "
    "cores (CUDA GPUs of compute capability 8.9+: H100, L4, RTX 40xx; refused elsewhere)",
    "steps": [{"type": "quantize", "scheme": "fp8", "algorithm": "rtn"}],
}
BUILTIN_RECIPES["w3-gptq"] = {
    "description": "int3 weight-only (8 weights in 3 bytes), groups of 128 with zero points, GPTQ on calibration "
    "text (--calib); runs on the int4 kernels",
    "steps": [{"type": "quantize", "scheme": "w3", "algorithm": "gptq", "group_size": 128}],
}
_SPARSE = "; pruned layers compute densely on CPU (no speedup there, smaller on disk)"
# 2:4 SparseGPT kept as plain linear layers with zeros, for a quantize step to take over
_PRUNE24_DENSE = {"type": "prune", "method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4", "layer": "dense"}
BUILTIN_RECIPES.update(
    {
        "sparse50-magnitude": {
            "description": "50 % unstructured sparsity by weight magnitude, no calibration" + _SPARSE,
            "steps": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}],
        },
        "sparse50-wanda": {
            "description": "50 % unstructured sparsity by Wanda (|W| x input norm, --calib)" + _SPARSE,
            "steps": [{"type": "prune", "method": "wanda", "sparsity": 0.5}],
        },
        "sparse50-wanda-swaps": {
            "description": "50 % unstructured sparsity by Wanda, then up to 200 rounds of mask swaps per row that "
            "lower each layer's reconstruction error; no weight changes value (--calib)" + _SPARSE,
            "steps": [{"type": "prune", "method": "wanda", "sparsity": 0.5, "swaps": 200}],
        },
        "sparse50-sparsegpt": {
            "description": "50 % unstructured sparsity by SparseGPT with weight reconstruction (--calib)" + _SPARSE,
            "steps": [{"type": "prune", "method": "sparsegpt", "sparsity": 0.5}],
        },
        "sparse24-sparsegpt": {
            "description": "2:4 sparsity by SparseGPT (--calib); PyTorch's 2:4 sparse kernels on CUDA" + _SPARSE,
            "steps": [{"type": "prune", "method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}],
        },
        "sparse24-w4": {
            "description": "2:4 SparseGPT (--calib), then int4 weight-only g128 round-to-nearest; pruned weights "
            "stay at the zero code; runs on the int4 kernels (no sparse speedup)",
            "steps": [_PRUNE24_DENSE, {"type": "quantize", "scheme": "w4", "algorithm": "rtn", "group_size": 128}],
        },
        "sparse24-w4-gptq": {
            "description": "2:4 SparseGPT, then int4 g128 by GPTQ, which keeps the pruned weights at the zero code "
            "and compensates its rounding errors on the kept ones (--calib); runs on the int4 kernels",
            "steps": [_PRUNE24_DENSE, {"type": "quantize", "scheme": "w4", "algorithm": "gptq", "group_size": 128}],
        },
    }
)
BUILTIN_RECIPES["lowrank-asvd"] = {
    "description": "activation-aware low-rank factorization (SVD-LLM whitening, --calib): each linear layer becomes "
    "two thin ones keeping 80 % of its weights; composes with quantization (add a quantize step) and recovery "
    "distillation",
    "steps": [{"type": "factorize", "method": "asvd", "ratio": 0.8}],
}
BUILTIN_RECIPES["slim-mlp25"] = {
    "description": "remove 25 % of every block's MLP channels (the least important on --calib text), "
    "then distill from the original on that text; a smaller dense model",
    "steps": [{"type": "slim", "mlp": 0.25}, {"type": "distill"}],
}
BUILTIN_RECIPES["slim-depth"] = {
    "description": "drop the transformer block that changes its input least (on --calib text), "
    "then distill from the original on that text",
    "steps": [{"type": "slim", "blocks": 1}, {"type": "distill"}],
}
BUILTIN_RECIPES["slim-experts50"] = {
    "description": "mixtures of experts: remove the least routed half of every block's experts (on --calib text), "
    "then distill from the original on that text; a smaller model of the same family",
    "steps": [{"type": "slim", "experts": 0.5}, {"type": "distill"}],
}
# What `--recipe auto` picks: memory-bound decoding gains from smaller weights, compute-bound encoders only
# from int8 arithmetic.
AUTO_RECIPE = {"causal-lm": "w8", "encoder": "w8a8"}


def register_step(name: str):
    """Class decorator: make a step config nameable in recipes as `type: name`."""

    def deco(cls):
        cls.step_type = name
        STEP_TYPES[name] = cls
        return cls

    return deco


class StepConfig:
    """Base of step configs (used with @dataclass(frozen=True)); validates in __post_init__."""

    step_type: ClassVar[str] = ""

    @property
    def needs_calibration(self) -> bool:
        """True when `apply` needs calibration data."""
        return False

    @property
    def needs_teacher(self) -> bool:
        """True when `apply` needs the model as it was before the recipe (e.g. distillation)."""
        return False

    def check(self, lm) -> None:
        """Raise MiaotuiError when this step cannot run on `lm` (e.g. on its hardware); called for every step
        before the first one runs."""

    @abstractmethod
    def apply(self, lm, *, calibration=None, teacher=None, progress: bool | None = None) -> dict:
        """Apply the step in place to `lm` (a LoadedModel); return a summary for the report.

        calibration: a `miaotui.calibration.Calibration` (text, samples, seqlen) for the steps that need data.
        teacher: the LoadedModel before the recipe ran, for the steps that need it (never modified).
        """

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"type": self.step_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> StepConfig:
        data = {k: v for k, v in data.items() if k != "type"}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(
                f"step {cls.step_type!r}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(fields)}"
            )
        hints = typing.get_type_hints(cls)
        for name, value in list(data.items()):
            if typing.get_origin(hints[name]) is tuple:
                if isinstance(value, str) or not isinstance(value, list | tuple):
                    raise ValueError(f"step {cls.step_type!r}: field {name} must be a list, got {value!r}")
                data[name] = tuple(value)
        return cls(**data)


def step_from_dict(data: Any) -> StepConfig:
    """Build a registered step config from {"type": ..., fields...}."""
    if not isinstance(data, dict) or "type" not in data:
        raise ValueError(f"a recipe step must be a mapping with a 'type' key, got {data!r}")
    cls = STEP_TYPES.get(data["type"])
    if cls is None:
        raise ValueError(f"unknown step type {data['type']!r}; known: {', '.join(sorted(STEP_TYPES))}")
    return cls.from_dict(data)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An ordered list of compression steps, applied in order."""

    steps: tuple[StepConfig, ...]
    name: str = "custom"
    description: str = ""

    def __post_init__(self):
        if not self.steps:
            raise ValueError("a recipe needs at least one step")
        for step in self.steps:
            if not isinstance(step, StepConfig):
                raise ValueError(f"recipe steps must be step configs, got {step!r}")

    def to_dict(self) -> dict:
        return {
            "miaotui_recipe": RECIPE_VERSION,
            "name": self.name,
            "description": self.description,
            "steps": [s.to_dict() for s in self.steps],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        if not isinstance(data, dict):
            raise ValueError("a recipe must be a mapping with a 'steps' list")
        version = data.get("miaotui_recipe", RECIPE_VERSION)
        if not isinstance(version, int) or not 1 <= version <= RECIPE_VERSION:
            raise ValueError(f"recipe version {version!r} is not supported (this miaotui reads 1..{RECIPE_VERSION})")
        unknown = sorted(set(data) - {"miaotui_recipe", "name", "description", "steps"})
        if unknown:
            raise ValueError(f"unknown recipe key(s) {', '.join(unknown)}; allowed: name, description, steps")
        steps = data.get("steps")
        if not isinstance(steps, list):
            raise ValueError("a recipe needs a 'steps' list")
        return cls(
            steps=tuple(step_from_dict(s) for s in steps),
            name=str(data.get("name", "custom")),
            description=str(data.get("description", "")),
        )

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_PlainDumper, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        return cls.from_dict(read_yaml(text))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class _PlainDumper(yaml.SafeDumper):
    """yaml.SafeDumper that writes a value seen twice in full, never as an anchor and alias (read_yaml refuses them)."""

    def ignore_aliases(self, data) -> bool:
        return True


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader without anchors and aliases: a few lines of `&a`/`*a` can stand for billions of nodes."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            line = event.start_mark.line + 1
            raise yaml.YAMLError(f"recipe files may not use YAML anchors/aliases (&name, *name), found on line {line}")
        return super().compose_node(parent, index)


def read_yaml(text: str) -> Any:
    """Parse recipe YAML: yaml.safe_load, refusing anchors and aliases before anything is built.

    >>> read_yaml("steps: [{type: quantize}]")
    {'steps': [{'type': 'quantize'}]}
    >>> read_yaml("[&x 1, *x]")
    Traceback (most recent call last):
    yaml.error.YAMLError: recipe files may not use YAML anchors/aliases (&name, *name), found on line 1
    """
    return yaml.load(text, Loader=_RecipeLoader)


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe from a .yaml/.yml/.json file, with errors that name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else read_yaml(text)
        return Recipe.from_dict(data)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
        raise MiaotuiError(f"cannot read recipe {path}: {str(e).splitlines()[0]}") from e
    except RecursionError as e:
        raise MiaotuiError(f"cannot read recipe {path}: it is nested too deeply") from e
    except (ValueError, TypeError) as e:
        raise MiaotuiError(f"invalid recipe {path}: {e}") from e


def get_recipe(name_or_path: str | Recipe) -> Recipe:
    """A built-in recipe by name, or a recipe file by path."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if name_or_path in BUILTIN_RECIPES:
        data = BUILTIN_RECIPES[name_or_path]
        return Recipe.from_dict({"name": name_or_path, **data})
    if Path(name_or_path).is_file():
        return load_recipe(name_or_path)
    raise MiaotuiError(f"unknown recipe {name_or_path!r}: not a built-in ({', '.join(BUILTIN_RECIPES)}) and not a file")
