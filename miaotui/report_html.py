"""A self-contained report.html with plots (matplotlib, embedded as base64 PNG): quality vs speed with the
Pareto front, throughput vs batch size, and sizes.

Every report (a comparison of several models, or one optimize run: original vs optimized) is first brought
to one view: per model its size, quality and speed.

>>> v = comparison_view({"report_type": "compare", "baseline": "a", "kind": "causal-lm",
...                      "models": {"a": {"total_bytes": 10}}, "quality": {"models": {"a": {"perplexity": 2.0}}}})
>>> v["rows"]["a"]["perplexity"]
2.0
>>> pareto_front([(1.0, 3.0), (2.0, 2.0), (1.5, 4.0), (3.0, 2.5), (0.5, 1.0)])
[4, 1, 3]
"""

from __future__ import annotations

import base64
import html
import io

SPEED = {"causal-lm": ("decode_tokens_per_s", "decode tokens/s"), "encoder": ("throughput_seq_per_s", "sequences/s")}


def comparison_view(report: dict) -> dict:
    """{"kind", "baseline", "rows": {name: {metric: value}}, "sweep"} from a compare or an optimize report."""
    kind = report.get("kind", "causal-lm")
    speed = (report.get("speed") or {}).get("models", {})
    if report.get("report_type") == "autotune":  # every candidate timed: objective speed vs perplexity ratio
        rows = {
            name: {**report["models"].get(name, {}), "objective_speed": c["speed"], "perplexity_ratio": ratio}
            for name, c in report["candidates"].items()
            if c.get("speed") is not None
            for ratio in [(c.get("quality") or {}).get("perplexity_ratio", 1.0)]
        }
        objective = report["config"]["objective"]
        return {
            "kind": kind,
            "baseline": "original",
            "rows": rows,
            "sweep": None,
            "speed": ("objective_speed", f"{objective} tokens/s"),
            "loss": ("perplexity_ratio", "perplexity / original's (lower is better)"),
        }
    if report.get("report_type") == "compare":
        quality = (report.get("quality") or {}).get("models", {})
        rows = {n: {**m, **quality.get(n, {}), **speed.get(n, {})} for n, m in report["models"].items()}
        for name, acc in ((report.get("classification") or {}).get("models") or {}).items():
            rows.setdefault(name, {})["accuracy"] = acc.get("accuracy")
        return {"kind": kind, "baseline": report["baseline"], "rows": rows, "sweep": report.get("sweep")}
    q = report.get("quality") or {}
    original = {"perplexity": q["baseline_perplexity"]} if "baseline_perplexity" in q else {"cosine_mean": 1.0}
    rows = {"original": {**original, **speed.get("original", {})}, "optimized": {**q, **speed.get("optimized", {})}}
    return {"kind": kind, "baseline": "original", "rows": rows, "sweep": report.get("sweep")}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (speed, loss) points no other point beats on both (faster and lower loss), by speed."""
    keep = [
        i for i, (s, q) in enumerate(points) if not any(s2 >= s and q2 <= q and (s2, q2) != (s, q) for s2, q2 in points)
    ]
    return sorted(keep, key=lambda i: points[i][0])


def _loss(kind: str, row: dict) -> tuple[float | None, str]:
    if kind == "causal-lm":
        return row.get("perplexity"), "perplexity (lower is better)"
    cos = row.get("cosine_mean")
    return (None if cos is None else 1.0 - cos), "1 - embedding cosine to the baseline (lower is better)"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plots(view: dict) -> dict[str, str]:
    """Base64 PNGs keyed quality_vs_speed, throughput_vs_batch, sizes (each only when the data exist)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    kind, rows, out = view["kind"], view["rows"], {}
    key, label = view.get("speed") or SPEED[kind]
    loss_key, loss_label = view.get("loss") or (None, _loss(kind, {})[1])
    loss = (lambda r: r.get(loss_key)) if loss_key else (lambda r: _loss(kind, r)[0])
    pts = {n: (r[key], loss(r)) for n, r in rows.items() if r.get(key) and loss(r) is not None}
    if pts:
        fig, ax = plt.subplots(figsize=(6, 4))
        names = list(pts)
        for n in names:
            ax.scatter(*pts[n], s=40, zorder=3)
            ax.annotate(n, pts[n], textcoords="offset points", xytext=(5, 4), fontsize=8)
        front = pareto_front([pts[n] for n in names])
        ax.plot([pts[names[i]][0] for i in front], [pts[names[i]][1] for i in front], "--", color="gray", zorder=2)
        ax.set(xlabel=label + " (higher is better)", ylabel=loss_label, title="Quality vs speed (Pareto front)")
        ax.grid(alpha=0.3)
        out["quality_vs_speed"] = _png(fig)
    sweep = view.get("sweep")
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, points in sweep["models"].items():
            ax.plot([p["batch_size"] for p in points], [p["throughput"] for p in points], "o-", label=name)
        unit = next(iter(sweep["models"].values()))[0]["unit"]
        ax.set(xscale="log", xlabel="batch size", ylabel=unit, title="Throughput vs batch size")
        ax.set_xticks(sweep["batch_sizes"], [str(b) for b in sweep["batch_sizes"]])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        out["throughput_vs_batch"] = _png(fig)
    sized = {n: r for n, r in rows.items() if r.get("total_bytes")}
    if sized:
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(sized)))
        names = list(sized)
        ax.barh(names, [sized[n]["total_bytes"] / 2**20 for n in names], label="all weights")
        ax.barh(names, [sized[n].get("linear_bytes", 0) / 2**20 for n in names], label="linear layers")
        ax.invert_yaxis()
        ax.set(xlabel="MiB", title="Model size")
        ax.legend(fontsize=8)
        out["sizes"] = _png(fig)
    return out


def render_html(report: dict, markdown_text: str, images: dict[str, str] | None = None) -> str:
    """One HTML page: the plots (`images`, default `plots` of the report), then the markdown report as
    preformatted text (no external files)."""
    images = plots(comparison_view(report)) if images is None else images
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{data}"></figure>' for name, data in images.items()
    )
    title = html.escape(markdown_text.splitlines()[0].lstrip("# ") if markdown_text else "miaotui report")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}"
        "figure{display:inline-block;margin:0.5em}pre{white-space:pre-wrap;background:#f6f6f6;padding:1em}</style>"
        f"</head><body><h1>{title}</h1>{images}<pre>{html.escape(markdown_text)}</pre></body></html>\n"
    )
