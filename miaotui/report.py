"""Write what a run measured: `report.json` (versioned, machine-readable) and `report.md` (for people).

>>> print(markdown({"model": "m", "recipe": {"name": "w8"}, "kind": "causal-lm"}).splitlines()[0])
# miaotui report: m
"""

from __future__ import annotations

import json
from pathlib import Path

from miaotui.atomic import write_text_atomic

REPORT_VERSION = 1


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def _quality_lines(q: dict) -> list[str]:
    if "perplexity" in q:
        return [
            f"Perplexity on `{q.get('text', '?')}` ({q['tokens']} tokens, seqlen {q['seqlen']}, "
            f"{q['windows']} windows, fp32 compute):",
            "",
            "| model | perplexity | change | mean KL | top-1 agreement |",
            "|---|---|---|---|---|",
            f"| original | {q['baseline_perplexity']:.3f} | | | |",
            f"| optimized | {q['perplexity']:.3f} | {100 * (q['perplexity_ratio'] - 1):+.3f} % "
            f"| {q['kl_mean']:.5f} | {100 * q['top1_agreement']:.2f} % |",
        ]
    return [
        f"Cosine similarity of embeddings to the original on {q['sentences']} sentences (fp32 compute): "
        f"mean {q['cosine_mean']:.5f}, min {q['cosine_min']:.5f}.",
    ]


def _speed_lines(speed: dict) -> list[str]:
    env, proto, m = speed["environment"], speed["protocol"], speed["models"]
    a, b = m.get("original", {}), m.get("optimized", {})
    lines = [
        f"Device {env['device']} ({env['device_name']}), {env['threads']} threads, torch {env['torch']}, "
        f"transformers {env['transformers']}; protocol {json.dumps(proto)}.",
        "",
    ]
    if speed["kind"] == "causal-lm":
        lines += [
            "| model | dtype | weights | linear weights | TTFT | time/token | decode tok/s | prefill tok/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in m.items():
            lines.append(
                f"| {name} | {r['dtype']} | {_mb(r['total_bytes'])} | {_mb(r['linear_bytes'])} | "
                f"{r['ttft_ms']:.1f} ms | {r['time_per_token_ms']:.2f} ms | {r['decode_tokens_per_s']:.1f} | "
                f"{r['prefill_tokens_per_s']:.0f} |"
            )
        for name, r in m.items():
            if "roofline_pct" in r:
                lines.append(
                    f"\n{name}: {r['roofline_pct']:.1f} % of the memory-bandwidth roofline "
                    f"({r['roofline_tokens_per_s']:.0f} tok/s at {_mb(r['decode_bytes_per_token'])} read per token)."
                )
        if a and b:
            lines += [
                "",
                f"Optimized vs original: decode {_ratio(b['decode_tokens_per_s'], a['decode_tokens_per_s'])}, "
                f"prefill {_ratio(b['prefill_tokens_per_s'], a['prefill_tokens_per_s'])}, "
                f"linear weights {_ratio(a['linear_bytes'], b['linear_bytes'])} smaller.",
            ]
    else:
        lines += [
            "| model | dtype | weights | linear weights | latency b=1 | latency batch | sequences/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in m.items():
            lines.append(
                f"| {name} | {r['dtype']} | {_mb(r['total_bytes'])} | {_mb(r['linear_bytes'])} | "
                f"{r['latency_b1_ms']:.2f} ms | {r['latency_batch_ms']:.1f} ms | {r['throughput_seq_per_s']:.1f} |"
            )
        if a and b:
            lines += [
                "",
                f"Optimized vs original: batch-1 speed {_ratio(a['latency_b1_ms'], b['latency_b1_ms'])}, "
                f"throughput {_ratio(b['throughput_seq_per_s'], a['throughput_seq_per_s'])}, "
                f"linear weights {_ratio(a['linear_bytes'], b['linear_bytes'])} smaller.",
            ]
    return lines


def markdown(report: dict) -> str:
    """Render a report dict (as written to report.json) as markdown."""
    recipe = report.get("recipe") or {}
    lines = [f"# miaotui report: {report.get('model', '?')}", ""]
    lines.append(f"Recipe `{recipe.get('name', '?')}`: {recipe.get('description', '')}".rstrip(": "))
    for step in report.get("steps", []):
        skipped = step.get("skipped") or {}
        lines.append(
            f"- step `{step.get('type')}`: {step.get('quantized', step.get('layers', 0))} layers"
            + (f", {len(skipped)} skipped ({next(iter(skipped.values()))})" if skipped else "")
        )
    if report.get("quality"):
        lines += ["", "## Quality", "", *_quality_lines(report["quality"])]
    if report.get("speed"):
        lines += ["", "## Speed and size", "", *_speed_lines(report["speed"])]
    if report.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, folder: str | Path) -> None:
    """Write report.json and report.md into `folder`."""
    folder = Path(folder)
    report = {"report_version": REPORT_VERSION, **report}
    write_text_atomic(folder / "report.json", json.dumps(report, indent=2))
    write_text_atomic(folder / "report.md", markdown(report))
