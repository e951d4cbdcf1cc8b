"""Tell a Ctrl-C apart from a failure, wherever it lands.

An interrupt can arrive in the middle of importing torch or numpy. Python then raises KeyboardInterrupt, but a
library may turn it into another error (``ImportError: ... from KeyboardInterrupt``), or swallow it, so that
a later import fails with ``ImportError: cannot load module more than once per process``. `InterruptWatch`
records every SIGINT while the command runs, so the CLI can report any of these as the interrupt it was.

>>> with InterruptWatch() as watch:
...     watch.interrupted(ImportError("numpy failed"))
False
>>> try:
...     try:
...         raise KeyboardInterrupt
...     except KeyboardInterrupt:
...         raise ImportError("cannot load module more than once per process")
... except ImportError as e:
...     InterruptWatch().interrupted(e)
True
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class InterruptWatch:
    """Context manager: while active, SIGINT raises KeyboardInterrupt as usual and is also remembered.

    It installs its handler only over Python's default one, in the main thread: an ignored SIGINT (a
    background job) stays ignored.
    """

    def __init__(self) -> None:
        self.seen = False
        self._previous = None
        self._holding = False

    def _handle(self, signum, frame) -> None:
        first, self.seen = not self.seen, True
        if not (self._holding and first):
            raise KeyboardInterrupt

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold a Ctrl-C until the block ends, then raise it; a second one interrupts at once.

        For imports of C++ extensions: torch aborts the whole process ("terminate called after throwing an
        instance of 'pybind11::error_already_set'") when an interrupt lands in the middle of its start-up.
        """
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self.seen:
            raise KeyboardInterrupt

    def __enter__(self) -> InterruptWatch:
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None

    def interrupted(self, error: BaseException) -> bool:
        """Whether `error` is, was caused by, or followed a Ctrl-C."""
        return self.seen or caused_by_interrupt(error)


def forget_handled_interrupt() -> None:
    """Let a handled Ctrl-C end the process with the status the CLI returns.

    Python 3.11-3.13 flag a KeyboardInterrupt that escapes code run by ``exec()`` of a string (dataclasses builds
    its methods that way, at import) as unhandled, even when it is caught later, and then end the process with
    SIGINT at exit instead of its exit status. The next ``exec()`` of a string clears that flag (CPython gh-128130;
    later versions only flag an interrupt that reaches the top).
    """
    exec("pass", {})


def caused_by_interrupt(error: BaseException | None) -> bool:
    """Whether `error` or any exception in its __cause__ / __context__ chain is a KeyboardInterrupt."""
    pending, seen = [error], set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        pending += [e.__cause__, e.__context__]
    return False
