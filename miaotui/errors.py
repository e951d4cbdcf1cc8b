"""The one exception type users see: a message a person can act on.

>>> try:
...     raise MiaotuiError("no such folder: ./missing")
... except MiaotuiError as e:
...     print(e)
no such folder: ./missing
"""


class MiaotuiError(Exception):
    """Bad input or an impossible request; the CLI prints it as one line and exits non-zero."""
