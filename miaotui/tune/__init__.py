"""Autotune: search compression recipes and engine options for the fastest model under a quality budget.

The public entry point is `miaotui.autotune(model, out, config=AutotuneConfig(...))` (this package's `autotune`).

>>> from miaotui.tune import AutotuneConfig
>>> AutotuneConfig(max_ppl_increase=0.02, objective="prefill").rounds()
[1024, 2048, 4096]
"""

from miaotui.tune.config import AutotuneConfig, LayerOption, SearchSpace, parse_budget, parse_duration
from miaotui.tune.search import autotune

__all__ = ["AutotuneConfig", "LayerOption", "SearchSpace", "autotune", "parse_budget", "parse_duration"]
