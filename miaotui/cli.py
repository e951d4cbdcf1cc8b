"""The `miaotui` command: one subcommand per verb, a thin layer over miaotui.api.

Run `miaotui --help` or `miaotui COMMAND --help`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

EPILOG = "Errors are printed as one line; set MIAOTUI_DEBUG=1 to see tracebacks."


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _batch_list(text: str) -> list[int]:
    try:
        return [_positive(x) for x in text.split(",") if x.strip()]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None


def _add_quality_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quality protocol")
    g.add_argument("--ppl", metavar="TEXTFILE", help="text for perplexity (default: built-in sample)")
    g.add_argument("--seqlen", type=_positive, help="perplexity window in tokens (default min(2048, context))")
    g.add_argument("--stride", type=_positive, help="start a window every N tokens, scoring only new ones")
    g.add_argument("--max-tokens", type=_positive, help="evaluate only the first N tokens")
    g.add_argument("--sentences", metavar="FILE", help="encoders: sentences, one a line (default: built-in set)")
    g.add_argument("--classify", metavar="FILE", help="labelled .csv (text,label) or .jsonl: accuracy")
    g.add_argument("--labels", help="causal LMs: comma-separated candidate labels (default: the file's)")
    g.add_argument("--template", help="causal LMs: prompt with {text}; the label follows after a space")


def _add_load_options(p: argparse.ArgumentParser, dtype: str = "auto") -> None:
    p.add_argument(
        "--dtype",
        default=dtype,
        help=f"compute dtype: auto (the checkpoint's), float32, bfloat16, float16 (default {dtype})",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickle checkpoints (*.bin) with weights_only=True when no safetensors exist",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the checkpoint")


def _add_bench_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speed protocol")
    g.add_argument("--prompt-len", type=_positive, default=128, help="causal LM prompt tokens (default 128)")
    g.add_argument("--new-tokens", type=_positive, default=64, help="causal LM generated tokens (default 64)")
    g.add_argument("--batch", type=_positive, default=1, help="causal LM batch size (default 1)")
    g.add_argument("--seqlen-encoder", type=_positive, default=128, help="encoder input tokens (default 128)")
    g.add_argument("--encoder-batch", type=_positive, default=32, help="encoder throughput batch (default 32)")
    g.add_argument("--repeats", type=_positive, default=5, help="timed repeats, median reported (default 5)")
    g.add_argument("--compile", action="store_true", help="compile the engine's decode step (causal LMs)")


def _bench_kwargs(a: argparse.Namespace) -> dict:
    return {
        "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens,
        "batch_size": a.batch,
        "seqlen": a.seqlen_encoder,
        "encoder_batch": a.encoder_batch,
        "repeats": a.repeats,
        "compile": a.compile,
    }


def build_parser() -> argparse.ArgumentParser:
    from miaotui.recipe import AUTO_RECIPE, BUILTIN_RECIPES

    parser = argparse.ArgumentParser(
        prog="miaotui",
        description="Make language models fast: compress a Hugging Face model, measure what it cost in quality "
        "and bought in speed, save it.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "optimize",
        help="compress a model with a recipe, measure it against the original, save it",
        description="Load MODEL, apply the recipe, measure quality (perplexity / KL / top-1 for "
        "causal LMs, embedding cosine for encoders) and speed of original and optimized model in "
        "the same run, and write the model with report.md and report.json to --out.",
        epilog=EPILOG,
    )
    p.add_argument("model", nargs="?", help="model folder or hub id (default: the built-in all-MiniLM-L6-v2)")
    p.add_argument(
        "--recipe",
        default="auto",
        help=f"built-in recipe ({', '.join(BUILTIN_RECIPES)}), a recipe .yaml/.json file, or auto: "
        + ", ".join(f"{r} for {k.replace('causal-lm', 'causal LM')}s" for k, r in AUTO_RECIPE.items())
        + " (default auto)",
    )
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--ppl", metavar="TEXTFILE", help="text for perplexity of causal LMs (default: built-in sample)")
    p.add_argument("--seqlen", type=_positive, help="perplexity window (default min(2048, context))")
    p.add_argument("--max-tokens", type=_positive, default=65536, help="perplexity tokens (default 65536)")
    p.add_argument("--calib", metavar="TEXTFILE", help="calibration text for calibrated recipes (e.g. w4-gptq)")
    p.add_argument("--calib-samples", type=_positive, default=128, help="calibration windows (default 128)")
    p.add_argument("--calib-seqlen", type=_positive, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--no-bench", action="store_true", help="skip the speed measurement")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_load_options(p)
    _add_bench_options(p)

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
    _add_quality_options(p)
    _add_load_options(p, dtype="float32")

    p = sub.add_parser(
        "compare",
        help="evaluate and benchmark several models under one protocol; one report",
        description="Load every MODEL (Hugging Face or miaotui folders; the first is the baseline), "
        "benchmark them interleaved, measure quality against the first in fp32 compute, and write "
        "report.json, report.md and report.html (with plots) to --out.",
        epilog=EPILOG,
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="model folders or hub ids; the first is the baseline")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-bench", action="store_true", help="skip the speed measurement")
    p.add_argument("--batch-sizes", type=_batch_list, help="throughput sweep, e.g. 1,4,16 (default: none)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_quality_options(p)
    _add_load_options(p)
    _add_bench_options(p)

    p = sub.add_parser("report", help="re-render report.md and report.html from a folder's report.json")
    p.add_argument("folder", help="a folder written by optimize or compare")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

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
    p.add_argument("--batch-size", type=_positive, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_load_options(p, dtype="float32")

    p = sub.add_parser(
        "bench",
        help="latency, throughput and memory of a model",
        description="Causal LMs: time to first token, time per output token, tokens/s (greedy, "
        "KV cache). Encoders: batch-1 latency and batched throughput.",
        epilog=EPILOG,
    )
    p.add_argument("model", help="model folder (plain or optimized) or hub id")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_load_options(p)
    _add_bench_options(p)

    p = sub.add_parser(
        "generate",
        help="complete a prompt with the engine",
        description="Complete PROMPT with miaotui's engine (static KV cache; --compile for a compiled decode step). "
        "Greedy by default; --temperature > 0 samples (reproducibly with --seed).",
        epilog=EPILOG,
    )
    p.add_argument("model", help="causal LM folder (plain or optimized) or hub id")
    p.add_argument("prompt", help="the prompt text, or - to read it from standard input")
    p.add_argument("--max-tokens", type=_positive, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--compile", action="store_true", help="compile the decode step (slow start, fast steps)")
    p.add_argument("--kv-cache", default="auto", choices=["auto", "int8", "fp8"], help="KV cache storage dtype")
    p.add_argument("--json", action="store_true", help="print text, tokens, finish reason and timings as JSON")
    _add_load_options(p)

    p = sub.add_parser(
        "export",
        help="export an optimized folder for other runtimes (compressed-tensors: transformers, vLLM)",
        description="Write the packed codes of an optimized folder in the compressed-tensors format: "
        "transformers.AutoModelForCausalLM.from_pretrained(OUT) and `vllm serve OUT` load it.",
        epilog=EPILOG,
    )
    p.add_argument("model", help="a folder written by miaotui optimize")
    p.add_argument("--format", default="compressed-tensors", help="export format (default compressed-tensors)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--tp", type=_positive, help="check that vLLM can split the model over N GPUs")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("info", help="architecture, parameters, dtype, bytes and recipe of a model", epilog=EPILOG)
    p.add_argument("model", help="model folder (plain or optimized) or hub id")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_load_options(p)

    p = sub.add_parser("recipes", help="list the built-in recipes", epilog=EPILOG)
    p.add_argument("--show", metavar="NAME", help="print one recipe as YAML (a starting point for your own)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _load(a: argparse.Namespace, source: str):
    from miaotui.api import load

    return load(source, **_load_kwargs(a))


def _load_kwargs(a: argparse.Namespace) -> dict:
    return {
        "dtype": a.dtype,
        "device": a.device,
        "allow_pickle": a.allow_pickle,
        "trust_remote_code": a.trust_remote_code,
    }


def _print_report(report: dict, as_json: bool, footer: str) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from miaotui.report import markdown

    print(markdown(report))
    print(footer)


def _print(data: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        print(f"{key:>22}: {value}")


def cmd_optimize(a: argparse.Namespace) -> None:
    from miaotui.api import optimize

    report = optimize(
        a.model,
        a.recipe,
        a.out,
        text_path=a.ppl,
        calib_path=a.calib,
        calib_samples=a.calib_samples,
        calib_seqlen=a.calib_seqlen,
        seqlen=a.seqlen,
        max_tokens=a.max_tokens,
        bench=not a.no_bench,
        bench_options=_bench_kwargs(a),
        overwrite=a.overwrite,
        **_load_kwargs(a),
    )
    _print_report(report, a.json, f"saved to {a.out} (report.md, report.html, report.json, model files)")


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
    lm = _load(a, a.model)
    baseline = _load(a, a.baseline) if a.baseline else None
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
    _print(result, a.json)


def cmd_compare(a: argparse.Namespace) -> None:
    from miaotui.api import compare

    report = compare(
        a.models,
        a.out,
        text_path=a.ppl,
        seqlen=a.seqlen,
        stride=a.stride,
        max_tokens=a.max_tokens or 65536,
        sentences_path=a.sentences,
        classify_path=a.classify,
        **_classify_kwargs(a),
        bench=not a.no_bench,
        bench_options=_bench_kwargs(a),
        batch_sizes=a.batch_sizes,
        overwrite=a.overwrite,
        **_load_kwargs(a),
    )
    _print_report(report, a.json, f"written to {a.out} (report.md, report.html, report.json)")


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
        _load(a, a.model),
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
    from miaotui.api import bench_models

    result = bench_models({a.model: _load(a, a.model)}, **_bench_kwargs(a))
    if a.json:
        print(json.dumps(result, indent=2))
        return
    _print(result["models"][a.model], False)
    _print({"device": result["environment"]["device"], "protocol": result["protocol"]}, False)


def cmd_generate(a: argparse.Namespace) -> None:
    import time

    from miaotui.api import Engine, SamplingParams
    from miaotui.errors import MiaotuiError

    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    params = SamplingParams(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        repetition_penalty=a.repetition_penalty,
        stop=tuple(a.stop),
        seed=a.seed,
    )
    lm = _load(a, a.model)
    prompt_ids = lm.tokenizer(prompt)["input_ids"] if prompt else []
    need, context = len(prompt_ids) + a.max_tokens, lm.context_length
    if context is not None and need > context:
        raise MiaotuiError(
            f"prompt ({len(prompt_ids)} tokens) + --max-tokens ({a.max_tokens}) exceeds the model's context of "
            f"{context} tokens"
        )
    engine = Engine(lm, max_len=max(need, 2), compile=a.compile, kv_dtype=a.kv_cache)
    if a.stream and not a.json:
        for piece in engine.stream(prompt_ids, params):
            print(piece, end="", flush=True)
        print()
        return
    t0 = time.perf_counter()
    done = engine.generate(prompt_ids, params)[0]
    seconds = time.perf_counter() - t0
    if not a.json:
        print(done.text)
        return
    result = {
        "text": done.text,
        "token_ids": done.token_ids,
        "finish_reason": done.finish_reason,
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "time_to_first_token_s": done.time_to_first_token_s,
        "seconds": seconds,
        "compile_seconds": engine.runner.compile_seconds,
    }
    print(json.dumps(result, indent=2))


def cmd_export(a: argparse.Namespace) -> None:
    from miaotui.api import export

    _print(export(a.model, a.out, format=a.format, tp=a.tp, overwrite=a.overwrite), a.json)


def cmd_info(a: argparse.Namespace) -> None:
    from miaotui.api import info

    _print(info(_load(a, a.model)), a.json)


def cmd_recipes(a: argparse.Namespace) -> None:
    from miaotui.recipe import AUTO_RECIPE, BUILTIN_RECIPES, get_recipe

    if a.show:
        print(get_recipe(a.show).to_yaml(), end="")
        return
    if a.json:
        print(json.dumps({n: get_recipe(n).to_dict() for n in BUILTIN_RECIPES}, indent=2))
        return
    for name, data in BUILTIN_RECIPES.items():
        print(f"{name:<12} {data['description']}")
    print(
        f"{'auto':<12} what optimize uses by default: "
        + ", ".join(f"{r} for {k.replace('causal-lm', 'causal LM')}s" for k, r in AUTO_RECIPE.items())
    )


COMMANDS = {
    "optimize": cmd_optimize,
    "eval": cmd_eval,
    "compare": cmd_compare,
    "report": cmd_report,
    "lm-eval": cmd_lm_eval,
    "bench": cmd_bench,
    "generate": cmd_generate,
    "export": cmd_export,
    "info": cmd_info,
    "recipes": cmd_recipes,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(os.environ.get("MIAOTUI_DEBUG"))
    if not debug:
        warnings.filterwarnings("ignore")
    from miaotui.errors import MiaotuiError

    try:
        COMMANDS[args.command](args)
    except (MiaotuiError, ValueError) as e:
        if debug:
            raise
        print(f"miaotui: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("miaotui: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an environment problem: still one line, unless debugging
        if debug:
            raise
        print(
            f"miaotui: internal error: {type(e).__name__}: {e} (set MIAOTUI_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
