"""Candidates of a search: the original, the built-in recipes, each kept option on every layer, and per-layer
mixes that keep the most sensitive layers at a gentler option.

>>> c = mixed_recipes({"w4g32": {"a": 3.0, "b": 1.0, "c": 0.0}}, {"w4g32": 1.5}, (0.7,))
>>> [(name, [s.targets for s in r.steps]) for name, r in c]
[('w4g32 (1 layers float)', [('*',)])]
>>> c[0][1].steps[0].ignore[-1]
'a'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from miaotui.quantize.config import DEFAULT_IGNORE
from miaotui.recipe import Recipe, get_recipe
from miaotui.tune.config import LayerOption, SearchSpace


@dataclass
class Candidate:
    """One point of the search: a recipe (None for the original model) and what was learnt about it."""

    name: str
    recipe: Recipe | None
    origin: str  # original | built-in | uniform | mixed
    status: str = "pending"  # pending | rejected | passed | winner
    reason: str = ""
    predicted_speedup: float | None = None
    predicted_kl: float | None = None
    speed: float | None = None  # the objective figure, screening bench
    final_speed: float | None = None  # the objective figure, final bench
    quality: dict = field(default_factory=dict)  # the largest held-out round measured
    rounds: list[dict] = field(default_factory=list)

    @property
    def key(self) -> str:
        return "original" if self.recipe is None else json.dumps([s.to_dict() for s in self.recipe.steps])

    def reject(self, reason: str) -> None:
        self.status, self.reason = "rejected", reason

    def row(self) -> dict:
        return {
            "origin": self.origin,
            "recipe": None if self.recipe is None else self.recipe.to_dict(),
            "status": self.status,
            "reason": self.reason,
            "predicted_speedup": self.predicted_speedup,
            "predicted_kl": self.predicted_kl,
            "speed": self.speed,
            "final_speed": self.final_speed,
            "quality": self.quality,
            "rounds": self.rounds,
        }


def uniform_recipe(option: LayerOption, algorithm: str) -> Recipe:
    steps = option.steps(("*",), DEFAULT_IGNORE, algorithm)
    return Recipe(steps=tuple(steps), name=option.name, description=f"{option.name} on every linear layer")


def mixed_recipes(
    sens: dict[str, dict[str, float]], speedups: dict[str, float], fractions: tuple[float, ...], algorithm: str = "rtn"
) -> list[tuple[str, Recipe]]:
    """Per fast option A: keep the layers carrying `fraction` of A's total sensitivity (most sensitive first) at
    the option with the least total sensitivity (or float when A is already the gentlest), A elsewhere."""
    out, seen = [], set()
    totals = {o: sum(s.values()) for o, s in sens.items()}
    gentlest = min(totals, key=totals.get) if totals else None
    for a in sorted(sens, key=lambda o: -speedups[o]):
        order = sorted(sens[a], key=lambda n: -sens[a][n])
        fallback = gentlest if gentlest != a else None
        for fraction in fractions:
            acc, kept = 0.0, []
            for name in order:
                if acc >= fraction * totals[a] or len(kept) == len(order) - 1:
                    break
                kept.append(name)
                acc += sens[a][name]
            if not kept or tuple(kept) in seen:
                continue
            seen.add(tuple(kept))
            steps = []
            if fallback is not None:
                steps += LayerOption.parse(fallback).steps(tuple(kept), DEFAULT_IGNORE, algorithm)
            steps += LayerOption.parse(a).steps(("*",), (*DEFAULT_IGNORE, *kept), algorithm)
            label = f"{a} ({len(kept)} layers {fallback or 'float'})"
            desc = f"{a} on every linear layer but the {len(kept)} most sensitive, which " + (
                f"take {fallback}" if fallback else "stay in float"
            )
            out.append((label, Recipe(steps=tuple(steps), name=label, description=desc)))
        seen.clear()
    return out


def initial_candidates(space: SearchSpace, has_calibration: bool, kept: dict[str, dict]) -> list[Candidate]:
    """The original, the built-ins (those needing data rejected without --calib), each kept option uniformly."""
    cands = [Candidate("original", None, "original")]
    for name in space.builtins:
        recipe = get_recipe(name)
        c = Candidate(name, recipe, "built-in")
        if any(s.needs_calibration for s in recipe.steps) and not has_calibration:
            c.reject("calibrates on data: pass --calib TEXTFILE")
        cands.append(c)
    keys = {c.key for c in cands}
    for option in space.options():
        if not kept.get(option.name, {}).get("kept"):
            continue
        c = Candidate(option.name, uniform_recipe(option, space.algorithm), "uniform")
        c.predicted_speedup = kept[option.name]["speedup"]
        if c.key not in keys:
            cands.append(c)
            keys.add(c.key)
    return cands
