"""autotune: search compression recipes and engine options for the fastest model under a quality budget.

>>> from miaotui.autotune import AutotuneConfig
>>> AutotuneConfig(max_ppl_increase=0.02, objective="prefill").rounds()
[1024, 2048, 4096]
"""

from miaotui.autotune.config import AutotuneConfig, LayerOption, SearchSpace, parse_budget, parse_duration
from miaotui.autotune.search import autotune

__all__ = ["AutotuneConfig", "LayerOption", "SearchSpace", "autotune", "parse_budget", "parse_duration"]
