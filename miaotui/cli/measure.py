"""Subcommands that measure: eval, compare, report, lm-eval, bench."""

from __future__ import annotations

import argparse
import json

from miaotui.cli.common import (
    EPILOG,
    add_bench_options,
    add_calib_options,
    add_load_options,
    add_parallel_options,
    add_quality_options,
    batch_list,
    bench_kwargs,
    calib_kwargs,
    load,
    load_kwargs,
    parallel_config,
    positive,
    print_fields,
    print_report,
)


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity of a causal LM, or agreement with a baseline model",
        description="Perplexity by the GPTQ protocol (non-overlapping windows, fp32 compute by "
        "default); with --baseline also mean KL and top-1 agreement (causal LMs) or embedding "
        "cosine (encoders).",
        epilog=EPILOG,
    )
    p.add_argument("model", help="model folder (plain or optimized) or hub id")
    p.add_argument("--baseline", help="compare against this model (folder or hub id)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_quality_options(p)
    add_load_options(p, dtype="float32")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "compare",
        help="evaluate and benchmark several models under one protocol; one report",
        description="Load every MODEL (Hugging Face or miaotui folders; the first is the baseline), add the "
        "baseline compressed by each of --recipes, benchmark them all interleaved, measure quality against the "
        "first in fp32 compute, and write report.json, report.md and report.html (with plots) to --out.",
        epilog=EPILOG,
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="model folders or hub ids; the first is the baseline")
    p.add_argument(
        "--recipes",
        type=lambda text: [r.strip() for r in text.split(",") if r.strip()],
        help="also compare the first MODEL compressed in memory by each of these comma-separated recipes "
        "(built-in names or recipe files), e.g. w8,w4-gptq,sparse50-sparsegpt",
    )
    add_calib_options(p)
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-bench", action="store_true", help="skip the speed measurement")
    p.add_argument("--batch-sizes", type=batch_list, help="throughput sweep, e.g. 1,4,16 (default: none)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_quality_options(p)
    add_load_options(p)
    add_bench_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="re-render report.md and report.html from a folder's report.json")
    p.add_argument("folder", help="a folder written by optimize or compare")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness tasks on a model (needs the eval extra)",
        description="Evaluate a model (plain or optimized folder) with lm-evaluation-harness: built-in "
        "tasks or your own YAML task definitions under --include-path.",
        epilog=EPILOG,
    )
    p.add_argument("model", help="model folder (plain or optimized) or hub id")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--include-path", metavar="DIR", help="folder with task YAML files")
    p.add_argument("--limit", type=float, help="examples per task (an integer, or a fraction below 1)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt")
    p.add_argument("--batch-size", type=positive, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_load_options(p, dtype="float32")
    p.set_defaults(func=cmd_lm_eval)

    p = sub.add_parser(
        "bench",
        help="latency, throughput and memory of a model",
        description="Causal LMs: time to first token, time per output token, tokens/s (greedy, "
        "KV cache). Encoders: batch-1 latency and batched throughput.",
        epilog=EPILOG,
    )
    p.add_argument("model", help="model folder (plain or optimized) or hub id")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_load_options(p)
    add_bench_options(p)
    add_parallel_options(p)
    p.set_defaults(func=cmd_bench)


def _classify_kwargs(a: argparse.Namespace) -> dict:
    from miaotui.evaluate.classify import DEFAULT_TEMPLATE

    labels = [x.strip() for x in a.labels.split(",") if x.strip()] if a.labels else None
    return {"labels": labels, "template": a.template or DEFAULT_TEMPLATE}


def cmd_eval(a: argparse.Namespace) -> None:
    from miaotui.api import classify, compare_causal, embedding_similarity, read_labelled
    from miaotui.arch import CAUSAL_LM
    from miaotui.errors import MiaotuiError
    from miaotui.evaluate import read_sentences, read_text
    from miaotui.evaluate.similarity import sample_text

    text = read_text(a.ppl) if a.ppl else None
    sentences = read_sentences(a.sentences) if a.sentences else None
    examples = read_labelled(a.classify) if a.classify else None
    lm = load(a, a.model)
    baseline = load(a, a.baseline) if a.baseline else None
    if baseline is not None and baseline.kind != lm.kind:
        raise MiaotuiError(f"cannot compare a {lm.kind} with a {baseline.kind}")
    result: dict = {"model": a.model}
    if examples is not None:
        for name, m in (("", lm), ("baseline_", baseline)):
            if m is not None:
                r = classify(m, examples, **_classify_kwargs(a))
                result.update({f"{name}{k}": r[k] for k in ("accuracy", "correct", "examples")})
        result["labels"] = r["labels"]
    elif lm.kind == CAUSAL_LM:
        r = compare_causal(
            lm, text or sample_text(), baseline=baseline, seqlen=a.seqlen, max_tokens=a.max_tokens, stride=a.stride
        )
        result.update({"text": a.ppl or "built-in sample", "dtype": a.dtype, **r})
    elif baseline is None:
        raise MiaotuiError(
            "encoders have no perplexity: pass --baseline MODEL (embedding similarity) or --classify FILE"
        )
    else:
        result.update({"baseline": a.baseline, **embedding_similarity(lm, baseline, sentences)})
    print_fields(result, a.json)


def cmd_compare(a: argparse.Namespace) -> None:
    from miaotui.api import compare

    report = compare(
        a.models,
        a.out,
        recipes=a.recipes,
        **calib_kwargs(a),
        text_path=a.ppl,
        seqlen=a.seqlen,
        stride=a.stride,
        max_tokens=a.max_tokens or 65536,
        sentences_path=a.sentences,
        classify_path=a.classify,
        **_classify_kwargs(a),
        bench=not a.no_bench,
        bench_options=bench_kwargs(a),
        batch_sizes=a.batch_sizes,
        overwrite=a.overwrite,
        **load_kwargs(a),
    )
    print_report(report, a.json, f"written to {a.out} (report.md, report.html, report.json)")


def cmd_report(a: argparse.Namespace) -> None:
    from miaotui.api import render_folder

    report = render_folder(a.folder)
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"re-rendered {a.folder}/report.md and {a.folder}/report.html")


def cmd_lm_eval(a: argparse.Namespace) -> None:
    from miaotui.errors import MiaotuiError

    try:
        from miaotui.evaluate.lm_eval_adapter import evaluate_tasks
    except ImportError as e:
        raise MiaotuiError(f"lm-eval is not installed: pip install 'miaotui[eval]' ({e})") from e
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    limit = int(a.limit) if a.limit is not None and a.limit >= 1 else a.limit
    result = evaluate_tasks(
        load(a, a.model),
        tasks,
        include_path=a.include_path,
        limit=limit,
        num_fewshot=a.num_fewshot,
        batch_size=a.batch_size,
    )
    result["model"] = a.model
    if a.json:
        print(json.dumps(result, indent=2, default=float))
        return
    for task, metrics in result["results"].items():
        for key, value in metrics.items():
            if key not in ("name", "alias") and "stderr" not in key:
                print(f"{task:>22} {key}: {value}")


def cmd_bench(a: argparse.Namespace) -> None:
    from miaotui.api import bench_models, start_parallel

    parallel = parallel_config(a)
    if parallel is None:
        result = bench_models({a.model: load(a, a.model)}, **bench_kwargs(a))
    else:  # rank 0's shard is measured; every rank runs each step
        options = {"max_batch": a.batch, "max_len": a.prompt_len + a.new_tokens, "compile": a.compile}
        runner = start_parallel(a.model, parallel, load_options=load_kwargs(a), **options)
        try:
            result = bench_models({a.model: runner.lm}, runners={a.model: runner}, **bench_kwargs(a))
        finally:
            runner.close()
        result["protocol"].update(tp=parallel.tp, pp=parallel.pp, weights="rank 0's shard")
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print_fields(result["models"][a.model], False)
    print_fields({"device": result["environment"]["device"], "protocol": result["protocol"]}, False)
