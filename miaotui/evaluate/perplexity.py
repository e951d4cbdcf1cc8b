"""Perplexity by the GPTQ/AWQ protocol, and next-token agreement (KL, top-1) with a baseline model.

Tokenize the whole text once, cut it into non-overlapping windows of `seqlen` tokens (tail dropped),
average the next-token NLL over every window, exponentiate. With a `stride` below seqlen, windows overlap
(sliding window) and each scores only the tokens no earlier window saw.

>>> import os
>>> from miaotui.loading import load_pretrained
>>> data = os.environ.get("MIAOTUI_DATA", "../shared/data")
>>> lm = load_pretrained(f"{data}/ref-llama-16m", dtype="float32")  # doctest: +SKIP
>>> text = read_text(f"{data}/wikitext-2-raw/wiki.test.raw")  # doctest: +SKIP
>>> round(perplexity(lm, text, seqlen=512, max_tokens=65536)["perplexity"], 2)  # doctest: +SKIP
125.26
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from miaotui.calibration import DEFAULT_GENERATED, Calibration
from miaotui.errors import MiaotuiError
from miaotui.evaluate.agreement import LogHistogram
from miaotui.loading import LoadedModel
from miaotui.progress import track


def read_text(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file; refuses missing, unreadable and empty files."""
    path = Path(path)
    if not path.is_file():
        raise MiaotuiError(f"text file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MiaotuiError(f"cannot read {path} as UTF-8 text: {e}") from e
    if not text.strip():
        raise MiaotuiError(f"text file {path} is empty")
    return text


def read_texts(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """One file's text, or several files' texts joined by a blank line (calibration on a mix of sources)."""
    if isinstance(paths, str | os.PathLike):
        return read_text(paths)
    if not paths:
        raise MiaotuiError("no text file given")
    return "\n\n".join(read_text(p) for p in paths)


def read_calibration(
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None,
    samples: int = 128,
    seqlen: int = 512,
    generated: float = DEFAULT_GENERATED,
    seed: int = 0,
) -> Calibration | None:
    """Calibration from text files (mixed as `read_texts` does) with the fraction `generated` of the windows
    written by the model itself; None without files, unless the model writes every window (generated 1)."""
    if paths is None:
        return Calibration("", samples, seqlen, seed, generated) if generated == 1 else None
    return Calibration(read_texts(paths), samples, seqlen, seed, generated)


def token_windows(
    lm: LoadedModel,
    text: str,
    seqlen: int | None = None,
    max_tokens: int | None = None,
    stride: int | None = None,
) -> torch.Tensor:
    """Token ids cut into windows of `seqlen` starting every `stride` tokens (default: seqlen, no overlap),
    tail dropped: (W, seqlen). Default seqlen: min(2048, context, tokens)."""
    if not text.strip():
        raise MiaotuiError("the evaluation text is empty")
    ids = torch.tensor(lm.tokenizer(text)["input_ids"], dtype=torch.long)  # (T,)
    context = lm.context_length
    if seqlen is None:
        seqlen = min(2048, context or 2048, len(ids))
    if seqlen < 2:
        raise MiaotuiError(f"seqlen must be at least 2, got {seqlen}")
    if context is not None and seqlen > context:
        raise MiaotuiError(f"seqlen {seqlen} is larger than the model's context of {context} tokens")
    stride = seqlen if stride is None else stride
    if not 1 <= stride <= seqlen:
        raise MiaotuiError(f"stride must be between 1 and seqlen ({seqlen}), got {stride}")
    if max_tokens is not None:
        if max_tokens < seqlen:
            raise MiaotuiError(f"max-tokens {max_tokens} is smaller than one window of seqlen {seqlen}")
        ids = ids[:max_tokens]
    if len(ids) < seqlen:
        raise MiaotuiError(f"the text has {len(ids)} tokens, fewer than one window of seqlen {seqlen}")
    return ids.unfold(0, seqlen, stride)  # (W, seqlen)


@torch.no_grad()
def _logprobs(lm: LoadedModel, batch: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities in fp32: (B, S) ids -> (B, S-1, V)."""
    logits = lm.model(input_ids=batch.to(lm.device), use_cache=False).logits  # (B, S, V)
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def score_windows(
    lm: LoadedModel,
    windows: torch.Tensor,
    *,
    baseline: LoadedModel | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool | None = None,
) -> dict:
    """Perplexity of `lm` over token windows (W, S) that start every `stride` tokens (default S: no overlap).

    The first window scores all its next-token predictions, each later one only its last `stride` (the
    tokens no earlier window saw). With a baseline: its perplexity, mean KL(baseline || lm), top-1 agreement
    and the distribution of per-token KL (median, p90, p99, max; streaming, bounded memory).
    """
    seq = windows.shape[1]
    stride = seq if stride is None else stride
    nll = base_nll = agree = 0.0
    hist = LogHistogram()
    count = 0
    for i, batch in enumerate(track(list(windows.split(batch_size)), "evaluating", enabled=progress)):
        first = torch.full((len(batch),), seq - 1 - stride)  # (B,) first scored target position
        if i == 0:
            first[0] = 0
        pos = torch.arange(seq - 1)  # (S-1,)
        mask = (pos[None, :] >= first[:, None].clamp(min=0)).to(lm.device)  # (B, S-1)
        targets = batch[:, 1:].to(lm.device).unsqueeze(-1)  # (B, S-1, 1)
        lp = _logprobs(lm, batch)  # (B, S-1, V)
        nll -= lp.gather(-1, targets).squeeze(-1)[mask].sum().item()
        count += int(mask.sum())
        if baseline is not None:
            blp = _logprobs(baseline, batch).to(lp.device)  # (B, S-1, V)
            base_nll -= blp.gather(-1, targets).squeeze(-1)[mask].sum().item()
            hist.add((blp.exp() * (blp - lp)).sum(-1)[mask])  # (N,) per-token KL
            agree += (blp.argmax(-1) == lp.argmax(-1))[mask].sum().item()
    out = {
        "perplexity": math.exp(nll / count),
        "seqlen": seq,
        "stride": stride,
        "windows": windows.shape[0],
        "tokens": (windows.shape[0] - 1) * stride + seq,
        "predicted_tokens": count,
    }
    if baseline is not None:
        out["baseline_perplexity"] = math.exp(base_nll / count)
        out["perplexity_ratio"] = out["perplexity"] / out["baseline_perplexity"]
        out["kl_mean"] = hist.total / count
        out.update(hist.summary("kl"))
        out["top1_agreement"] = agree / count
    return out


def compare_causal(
    lm: LoadedModel,
    text: str,
    *,
    baseline: LoadedModel | None = None,
    seqlen: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: bool | None = None,
    stride: int | None = None,
) -> dict:
    """Perplexity of `lm` on `text` (and of `baseline`, with KL and top-1 agreement): see score_windows.

    >>> import os, miaotui
    >>> lm = miaotui.load(os.environ.get("MIAOTUI_DATA", "../shared/data") + "/ref-llama-16m")  # doctest: +SKIP
    >>> compare_causal(lm, "some text " * 200, baseline=lm, seqlen=64)["kl_p99"]  # doctest: +SKIP
    0.0
    """
    windows = token_windows(lm, text, seqlen, max_tokens, stride)  # (W, S)
    return score_windows(lm, windows, baseline=baseline, stride=stride, batch_size=batch_size, progress=progress)


def perplexity(lm: LoadedModel, text: str, **kwargs) -> dict:
    """Perplexity of one model on `text` (see compare_causal for the options)."""
    return compare_causal(lm, text, **kwargs)
