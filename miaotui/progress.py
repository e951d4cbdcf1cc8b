"""Progress bars for long work (rich), silent when disabled or not on a terminal.

>>> for _ in track(range(3), "working", enabled=False):
...     pass
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")


def _wanted(enabled: bool | None) -> bool:
    if enabled is not None:
        return enabled
    return sys.stderr.isatty() and not os.environ.get("MIAOTUI_NO_PROGRESS")


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool | None = None) -> Iterator[T]:
    """Iterate over `items` showing a bar with count and ETA on stderr."""
    if not _wanted(enabled):
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
