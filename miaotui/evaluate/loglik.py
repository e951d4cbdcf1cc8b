"""Log-likelihood of continuations given contexts under a causal LM (label scoring, lm-evaluation-harness).

>>> import os, miaotui
>>> lm = miaotui.load(os.environ.get("MIAOTUI_DATA", "../shared/data") + "/ref-llama-16m")  # doctest: +SKIP
>>> [(round(lp, 2), greedy)] = text_logprobs(lm, [("The capital of France is", " Paris")])  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from miaotui.errors import MiaotuiError
from miaotui.loading import LoadedModel


def prefix_token(lm: LoadedModel) -> int:
    """The token that stands before a text with no context: BOS, else EOS."""
    tok = lm.tokenizer
    token = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if token is None:
        raise MiaotuiError("the tokenizer has neither a BOS nor an EOS token to start a text with")
    return token


def encode_pair(lm: LoadedModel, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, cut from one encoding of both (so merges across the seam count).

    Trailing spaces of the context move to the continuation; an empty context gets the prefix token.
    """
    n = len(context) - len(context.rstrip(" "))
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    encode = lambda s: lm.tokenizer(s, add_special_tokens=False)["input_ids"]
    whole = encode(context + continuation)
    ctx = encode(context) if context else []
    ctx_len = len(ctx)
    cont = whole[ctx_len:] if whole[:ctx_len] == ctx else encode(continuation)
    if not cont:
        raise MiaotuiError(f"the continuation {continuation!r} encodes to no tokens")
    return (ctx or [prefix_token(lm)]), cont


@torch.no_grad()
def continuation_logprobs(
    lm: LoadedModel, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum of the continuation's log-probabilities, whether greedy
    decoding would produce it). Inputs longer than the context are cut on the left."""
    limit = lm.context_length or 2048
    results: list[tuple[float, bool]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        seqs = [(list(c) + list(t))[-(limit + 1) :][:-1] for c, t in chunk]  # inputs: all but the last token
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), prefix_token(lm), dtype=torch.long)  # (B, L) right-padded
        mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, L)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False).logits
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, L, V)
        for i, (s, (_, cont)) in enumerate(zip(seqs, chunk, strict=True)):
            n = len(cont)
            if n > len(s):
                raise MiaotuiError(f"a continuation of {n} tokens does not fit the model's context of {limit}")
            rows = logp[i, len(s) - n : len(s)]  # (n, V) predictions of the continuation tokens
            target = torch.tensor(cont, device=rows.device)  # (n,)
            lp = rows.gather(-1, target[:, None]).sum().item()
            results.append((lp, bool((rows.argmax(-1) == target).all())))
    return results


def text_logprobs(lm: LoadedModel, pairs: list[tuple[str, str]], batch_size: int = 8) -> list[tuple[float, bool]]:
    """continuation_logprobs for (context, continuation) strings."""
    return continuation_logprobs(lm, [encode_pair(lm, c, t) for c, t in pairs], batch_size)
