"""Write a benchmark's results as JSON + markdown into benchmarks/results (shared by the scripts here)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path


def write_results(out_dir: str | Path, name: str, device: str, data: dict, md: list[str]) -> Path:
    """Write <out_dir>/<name>-<device>-<date>.json and .md, print the markdown; returns the base path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{name}-{device}-{datetime.date.today().isoformat()}"
    base.with_suffix(".json").write_text(json.dumps(data, indent=2))
    base.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return base
