"""The measurement log: every measurement appended as one JSON line, so an interrupted run resumes.

The first line records the run's configuration; a log written under another configuration is refused
rather than mixed in. Each later line is {"key": ..., "value": ...}; `get` returns a logged value, `measure`
returns it or computes, appends and returns it.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "log.jsonl"
>>> log = MeasurementLog(path, {"seed": 0})
>>> log.measure(["kernel", "w8", 384], lambda: {"us": 12.5})
{'us': 12.5}
>>> MeasurementLog(path, {"seed": 0}).get(["kernel", "w8", 384])
{'us': 12.5}
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from miaotui.errors import MiaotuiError


def _key(key: Any) -> str:
    return json.dumps(key, sort_keys=True)


class MeasurementLog:
    """Append-only JSONL of measurements keyed by JSON-serialisable keys."""

    def __init__(self, path: str | os.PathLike, header: dict):
        self.path = Path(path)
        self.values: dict[str, Any] = {}
        self.resumed = 0
        if self.path.exists():
            self._read(header)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"header": header})

    def _read(self, header: dict) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            first = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            first = {}
        if first.get("header") != json.loads(json.dumps(header)):
            raise MiaotuiError(
                f"the measurement log {self.path} was written by a run with other settings; "
                "resume with the same model and options, or delete it (or choose another --out) to start afresh"
            )
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interruption: measured again
            self.values[_key(entry["key"])] = entry["value"]
        self.resumed = len(self.values)

    def _append(self, entry: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def get(self, key: Any) -> Any:
        return self.values.get(_key(key))

    def measure(self, key: Any, fn: Callable[[], Any]) -> Any:
        """The logged value of `key`, else `fn()` appended to the log."""
        k = _key(key)
        if k not in self.values:
            value = json.loads(json.dumps(fn()))
            self._append({"key": key, "value": value})
            self.values[k] = value
        return self.values[k]
