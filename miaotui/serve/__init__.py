"""OpenAI-compatible serving on miaotui's engine.

`miaotui serve MODEL`, or from Python `miaotui.serve.serve(MODEL, ServeConfig())`.
"""

from miaotui.serve.app import create_app
from miaotui.serve.config import ServeConfig
from miaotui.serve.server import serve

__all__ = ["ServeConfig", "create_app", "serve"]
