"""lm-evaluation-harness adapter: evaluate miaotui models (plain Hugging Face and optimized folders) on its tasks.

Importing this module registers the model type `miaotui` with lm-eval. lm-eval finds no plugins by itself, so
run its command line through this module (arguments as for `lm_eval`):

    python -m miaotui.evaluate.lm_eval_adapter run --model miaotui --model_args pretrained=DIR,dtype=float32 \\
        --tasks hellaswag

or `miaotui lm-eval DIR --tasks ...`, or from Python:

>>> from miaotui.evaluate.lm_eval_adapter import evaluate_tasks
>>> r = evaluate_tasks("ref-w8", ["my_task"], include_path="tasks/", limit=100)  # doctest: +SKIP
>>> r["results"]["my_task"]["acc,none"]  # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys

import lm_eval.models  # noqa: F401  lm-eval's own model types first (it indexes them only into an empty registry)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from miaotui.arch import CAUSAL_LM
from miaotui.checkpoint import load_model
from miaotui.engine.generate import Engine
from miaotui.engine.sampling import SamplingParams
from miaotui.errors import MiaotuiError
from miaotui.evaluate.loglik import continuation_logprobs, encode_pair, prefix_token
from miaotui.loading import LoadedModel
from miaotui.progress import track


@register_model("miaotui")
class MiaotuiLM(LM):
    """An lm-eval model backed by a miaotui LoadedModel (`pretrained`: a folder, hub id or LoadedModel)."""

    def __init__(
        self,
        pretrained: str | LoadedModel,
        dtype: str = "auto",
        device: str | None = "cpu",
        batch_size: int | str | None = 8,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        **_: object,
    ) -> None:
        super().__init__()
        if isinstance(pretrained, LoadedModel):
            self.lm = pretrained
        else:
            self.lm = load_model(
                str(pretrained), dtype=dtype, device=device or "cpu", trust_remote_code=trust_remote_code
            )
        if self.lm.kind != CAUSAL_LM:
            raise MiaotuiError(f"lm-eval needs a causal LM; {self.lm.source} is an {self.lm.kind}")
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length or self.lm.context_length or 2048)
        self._device = self.lm.device
        self._engine: Engine | None = None

    @property
    def tokenizer_name(self) -> str:
        return self.lm.source.replace("/", "__")

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log P(continuation | context), greedy) per request; requests' args are (context, continuation)."""
        pairs = [encode_pair(self.lm, ctx, cont) for ctx, cont in (r.args for r in requests)]
        return self._score(pairs, "loglikelihood")

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of the model's context (lm-eval's protocol)."""
        out = []
        for req in track(requests, "rolling loglikelihood", enabled=None):
            (text,) = req.args
            ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            windows = get_rolling_token_windows(ids, prefix_token(self.lm), self.max_length, context_len=1)
            pairs = [make_disjoint_window(w) for w in windows]
            out.append(sum(lp for lp, _ in continuation_logprobs(self.lm, pairs, self.batch_size)))
        return out

    def generate_until(self, requests) -> list[str]:
        """Continuations until a stop string, end-of-sequence or `max_gen_toks` tokens, on miaotui's engine.

        Requests run through the engine's continuous batching, `batch_size` rows at a time: greedy unless the
        task asks for `do_sample` with a temperature > 0 (then seeded, `seed` in its generation kwargs or 0).
        """
        if not requests:
            return []
        prompts, params = [], []
        for req in requests:
            context, kwargs = req.args
            sp = _sampling_params(kwargs, self.max_length)
            ids = self.lm.tokenizer(context, add_special_tokens=False)["input_ids"] or [prefix_token(self.lm)]
            prompts.append(ids[-max(1, self.max_length - sp.max_tokens) :])
            params.append(sp)
        if self._engine is None:
            self._engine = Engine(self.lm, max_batch=self.batch_size, max_len=self.max_length)
        done: list[str] = []
        for i in track(range(0, len(prompts), self.batch_size), "generating", enabled=None):
            chunk = slice(i, i + self.batch_size)
            done += [c.text for c in self._engine.generate(prompts[chunk], params[chunk])]
        return done

    def _score(self, pairs, label: str) -> list[tuple[float, bool]]:
        chunk = 64 * self.batch_size
        results: list[tuple[float, bool]] = []
        for i in track(range(0, len(pairs), chunk), label, enabled=None):
            results += continuation_logprobs(self.lm, pairs[i : i + chunk], self.batch_size)
        return results


def _sampling_params(kwargs: dict, max_length: int) -> SamplingParams:
    """lm-eval generation kwargs (until, max_gen_toks, do_sample, temperature, top_p, top_k, seed) as ours."""
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = min(int(kwargs.get("max_gen_toks", 256)), max_length - 1)
    sampled = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0) > 0
    extra = {}
    if sampled:
        extra = {"temperature": float(kwargs["temperature"]), "top_p": float(kwargs.get("top_p") or 1.0)}
        extra |= {"top_k": int(kwargs.get("top_k") or 0), "seed": int(kwargs.get("seed") or 0)}
    return SamplingParams(max_tokens=max_new, stop=tuple(s for s in until if s), **extra)


def evaluate_tasks(
    model: str | LoadedModel,
    tasks: list[str],
    *,
    include_path: str | os.PathLike | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    dtype: str = "auto",
    device: str = "cpu",
    builtin_tasks: bool = True,
) -> dict:
    """Run lm-eval tasks (names, or tasks defined in YAML files under `include_path`) on a miaotui model.

    builtin_tasks: also look up lm-eval's own tasks (indexing them takes a while) when a name is not local.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise MiaotuiError(f"task folder {include_path} does not exist")
    path = str(include_path) if include_path is not None else None
    manager = TaskManager(include_path=path, include_defaults=False) if path else None
    if builtin_tasks and (manager is None or any(t not in manager.all_tasks for t in tasks)):
        manager = TaskManager(include_path=path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise MiaotuiError(f"unknown lm-eval task(s) {unknown}; define them in YAML under --include-path")
    lm = MiaotuiLM(model, dtype=dtype, device=device, batch_size=batch_size)
    results = simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=False
    )
    return {"model": lm.lm.source, "results": results["results"], "versions": results.get("versions", {})}


def main() -> None:
    """lm-eval's command line with the `miaotui` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
