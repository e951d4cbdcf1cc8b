"""Write what a run measured: `report.json` (versioned, machine-readable), `report.md` (for people) and a
self-contained `report.html` with plots.

Schema: version 2 adds `report_type` ("optimize": one model against its original; "compare": several models
against the first) and the per-token KL distribution; version 1 files (optimize reports) still read.

>>> print(markdown({"model": "m", "recipe": {"name": "w8"}, "kind": "causal-lm"}).splitlines()[0])
# miaotui report: m
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from miaotui.atomic import write_bytes_atomic, write_text_atomic
from miaotui.errors import MiaotuiError
from miaotui.report_html import comparison_view, plots, render_html

REPORT_VERSION = 2


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
            *(
                [f"\nPer-token KL: median {q['kl_p50']:.2g}, 99th percentile {q['kl_p99']:.2g}, max {q['kl_max']:.2g}."]
                if "kl_p99" in q
                else []
            ),
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


def _compare_lines(report: dict) -> list[str]:
    models, base = report["models"], report["baseline"]
    lines = ["| model | source | recipe | dtype | weights | linear weights |", "|---|---|---|---|---|---|"]
    for name, m in models.items():
        lines.append(
            f"| {name}{' (baseline)' if name == base else ''} | `{m['source']}` | {m.get('recipe') or '-'} | "
            f"{m.get('dtype', '-')} | {_mb(m.get('total_bytes'))} | {_mb(m.get('linear_bytes'))} |"
        )
    q = report.get("quality")
    if q and report["kind"] == "causal-lm":
        p = q["protocol"]
        lines += [
            "",
            "## Quality",
            "",
            f"Perplexity on `{p['text']}` ({p['tokens']} tokens, seqlen {p['seqlen']}, stride {p['stride']}, "
            f"{p['windows']} windows, {p['predicted_tokens']} scored, fp32 compute); KL(baseline || model) per token:",
            "",
            "| model | perplexity | change | mean KL | KL median | KL p99 | KL max | top-1 agreement |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in q["models"].items():
            if name == base:
                lines.append(f"| {name} | {r['perplexity']:.3f} | | | | | | |")
                continue
            lines.append(
                f"| {name} | {r['perplexity']:.3f} | {100 * (r['perplexity_ratio'] - 1):+.3f} % | {r['kl_mean']:.5f} "
                f"| {r['kl_p50']:.2g} | {r['kl_p99']:.2g} | {r['kl_max']:.2g} | {100 * r['top1_agreement']:.2f} % |"
            )
    elif q:
        lines += ["", "## Quality", "", f"Embeddings of {q['protocol']['sentences']} sentences, fp32 compute:", ""]
        lines += ["| model | cosine mean | cosine min | top-k neighbour overlap |", "|---|---|---|---|"]
        for name, r in q["models"].items():
            ra = r.get("retrieval_agreement")
            overlap = "-" if ra is None else f"{100 * ra:.1f} % (k={r.get('retrieval_k')})"
            lines.append(f"| {name} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} | {overlap} |")
    c = report.get("classification")
    if c:
        lines += ["", "## Classification", "", f"`{c['file']}`:", "", "| model | accuracy | correct |", "|---|---|---|"]
        for name, r in c["models"].items():
            lines.append(f"| {name} | {100 * r['accuracy']:.2f} % | {r['correct']} / {r['examples']} |")
    return lines


def _sweep_lines(sweep: dict) -> list[str]:
    sizes = sweep["batch_sizes"]
    unit = next(iter(sweep["models"].values()))[0]["unit"]
    lines = [f"Throughput ({unit}) by batch size:", "", "| model | " + " | ".join(f"b={b}" for b in sizes) + " |"]
    lines.append("|---" * (len(sizes) + 1) + "|")
    for name, points in sweep["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{p['throughput']:.1f}" for p in points) + " |")
    return lines


def _speculative_lines(rows: dict) -> list[str]:
    """Speculative choices timed on the original model from held-out prompts (none when only "off")."""
    if not rows:
        return []
    lines = ["| speculative | tokens/s | vs off | drafts accepted | verdict |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        if "speed" not in r:
            return [f"Speculative decoding not timed: {r['reason']}.", ""]
        accepted = f"{100 * r['acceptance_rate']:.0f} %" if "acceptance_rate" in r else "-"
        verdict = "kept" if r["kept"] else "not kept"
        lines.append(f"| {name} | {r['speed']:.1f} | {r['speedup']:.2f}x | {accepted} | {verdict} |")
    return [*lines, ""]


def _autotune_lines(report: dict) -> list[str]:
    cfg, sig, cands = report["config"], report["signals"], report["candidates"]
    budget = f"+{100 * cfg['max_ppl_increase']:g} % perplexity" + (
        f", mean KL <= {cfg['max_kl']:g}" if cfg.get("max_kl") is not None else ""
    )
    lines = [
        f"Objective {cfg['objective']} at batch {cfg['batch']} on {cfg['device']} ({cfg['dtype']} weights), "
        f"budget {budget} on held-out `{report['quality']['protocol']['text']}`; seed {cfg['seed']}; "
        f"{report['elapsed_s']:.0f} s.",
        "",
        f"**Winner: {report['winner']['name']}.** {report['why']}.",
        "",
        f"Engine options: {json.dumps(report['engine'])}"
        + "".join(f"; {n} {r['speed']:.1f}" for n, r in sig.get("engine", {}).items()),
        "",
        *_speculative_lines(sig.get("speculative") or {}),
        f"## Speed model (kernels at the model's layer shapes vs float, {cfg['objective']} rows)",
        "",
        "| option | predicted linear speedup | verdict |",
        "|---|---|---|",
    ]
    for name, r in sig["speed_model"].items():
        lines.append(f"| {name} | {r['speedup']:.2f}x | {'kept' if r['kept'] else 'dropped: ' + r['reason']} |")
    for name, per_layer in sig.get("sensitivity", {}).items():
        top = sorted(per_layer.items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"\nMost sensitive layers to {name} (mean KL alone): " + ", ".join(f"{n} {v:.2g}" for n, v in top))
    lines += [
        "",
        "## Candidates (* on the Pareto front of screening speed vs perplexity)",
        "",
        "| candidate | origin | speed (screen) | speed (final) | perplexity change | mean KL | tokens | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in cands.items():
        q = c.get("quality") or {}
        change = f"{100 * (q['perplexity_ratio'] - 1):+.2f} %" if q else ("0" if c["recipe"] is None else "-")
        status = c["status"] + (f": {c['reason']}" if c.get("reason") else "")
        mark = "*" if name in report.get("pareto", []) else ""
        lines.append(
            f"| {name}{mark} | {c['origin']} | {_num(c.get('speed'))} | {_num(c.get('final_speed'))} | {change} | "
            f"{_num(q.get('kl_mean'), '.4f')} | {q.get('tokens', '-')} | {status} |"
        )
    return lines


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(report: dict) -> str:
    """Render a report dict (as written to report.json) as markdown."""
    if report.get("report_type") == "autotune":
        lines = [f"# miaotui autotune: {report['model']}", "", *_autotune_lines(report)]
    elif report.get("report_type") == "compare":
        lines = [f"# miaotui comparison: {len(report['models'])} models, baseline {report['baseline']}", ""]
        lines += _compare_lines(report)
    else:
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
    if report.get("sweep"):
        lines += ["", *_sweep_lines(report["sweep"])]
    if report.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, folder: str | Path) -> None:
    """Write report.json, report.md, report.html and plot-*.png into `folder` (each file atomically)."""
    folder = Path(folder)
    report = {"report_version": REPORT_VERSION, "report_type": "optimize", **report}
    report["report_version"] = REPORT_VERSION
    text = markdown(report)
    write_text_atomic(folder / "report.json", json.dumps(report, indent=2))
    _write_rendered(report, text, folder)


def _write_rendered(report: dict, text: str, folder: Path) -> None:
    """report.md, report.html, and each plot as plot-<name>.png (for documents that link images)."""
    images = plots(comparison_view(report))
    write_text_atomic(folder / "report.md", text)
    write_text_atomic(folder / "report.html", render_html(report, text, images))
    for name, data in images.items():
        write_bytes_atomic(folder / f"plot-{name}.png", base64.b64decode(data))


def read_report(folder: str | Path) -> dict:
    """The report.json of `folder`; version 1 files read as optimize reports."""
    path = Path(folder) / "report.json"
    if not path.is_file():
        raise MiaotuiError(f"{folder} has no report.json")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MiaotuiError(f"cannot read {path}: {e}") from e
    version = report.get("report_version") if isinstance(report, dict) else None
    if version not in (1, 2):
        raise MiaotuiError(f"{path} has report version {version!r}; this miaotui reads versions 1 and 2")
    report.setdefault("report_type", "optimize")
    return report


def render_folder(folder: str | Path) -> dict:
    """Re-render report.md, report.html and the plot PNGs of `folder` from its report.json (left as it is)."""
    report = read_report(folder)
    _write_rendered(report, markdown(report), Path(folder))
    return report
