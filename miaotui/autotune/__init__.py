"""autotune: search compression recipes and engine options for the fastest model under a quality budget.

The package is callable like its function, so `miaotui.autotune(...)` works whether Python resolves the name
to the API function or (once imported) to this subpackage.

>>> from miaotui.autotune import AutotuneConfig
>>> AutotuneConfig(max_ppl_increase=0.02, objective="prefill").rounds()
[1024, 2048, 4096]
>>> import miaotui.autotune
>>> callable(miaotui.autotune)
True
"""

import sys
import types

from miaotui.autotune.config import AutotuneConfig, LayerOption, SearchSpace, parse_budget, parse_duration
from miaotui.autotune.search import autotune

__all__ = ["AutotuneConfig", "LayerOption", "SearchSpace", "autotune", "parse_budget", "parse_duration"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return autotune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
