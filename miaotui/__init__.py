"""miaotui (秒推): make language models fast, and prove it.

>>> import miaotui
>>> "w8" in miaotui.BUILTIN_RECIPES
True
"""

from miaotui.api import *  # noqa: F403
from miaotui.api import __all__  # noqa: F401

__version__ = "0.1.0"
