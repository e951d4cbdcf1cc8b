"""miaotui (秒推): make language models fast, and prove it.

The public API lives in `miaotui.api`; its names load on first use, so light commands stay quick.

>>> import miaotui
>>> "w8" in miaotui.BUILTIN_RECIPES
True
"""

import importlib

from miaotui import recovery as _recovery  # noqa: F401  registers the "distill" recipe step
from miaotui.lowrank import config as _lowrank_config  # noqa: F401  registers the "factorize" recipe step
from miaotui.quantize import config as _quantize_config  # noqa: F401  registers the "quantize" recipe step
from miaotui.sparsity import config as _sparsity_config  # noqa: F401  registers the "prune" recipe step
from miaotui.sparsity import structured as _structured  # noqa: F401  registers the "slim" recipe step

__version__ = "0.1.0"


def __getattr__(name: str):
    api = importlib.import_module("miaotui.api")
    if name == "__all__":
        return api.__all__
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'miaotui' has no attribute {name!r}")


def __dir__():
    api = importlib.import_module("miaotui.api")
    return sorted(set(globals()) | set(api.__all__))
