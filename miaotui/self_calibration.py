"""Calibration windows written by the model itself: samples of its own distribution, whatever text the user has.

Calibrated pruning ranks weights by the activations the calibration text produces. When that text is not like
the text the model will see (the user's documentation, the model then used on prose), the ranking follows the
wrong features, and Wanda can end up worse than plain magnitude pruning. Text the model samples from its own
distribution covers what it was trained on (Ji et al., 2024, "Beware of Calibration Data for Pruning Large
Language Models"): on ref-llama-16m calibrated with Python documentation only, generated windows
bring SparseGPT 50 % on WikiText-2 from +9.0 % to +5.0 %, 2:4 from +21.3 % to +11.0 % and Wanda 50 % from
+12.8 % to +10.6 % (magnitude: +10.9 %), with three quarters of the windows generated (docs/benchmarks/quality.md).

Each window starts after the beginning-of-text token (or the end-of-text token where there is none) and is
sampled at temperature 1 with no top-k / top-p cut, `seqlen` tokens long; an end-of-text token inside a window
starts another text, as in packed training data.

>>> import os, miaotui
>>> lm = miaotui.load(os.environ.get("MIAOTUI_DATA", "../shared/data") + "/ref-llama-16m")  # doctest: +SKIP
>>> generate_windows(lm, 4, 64, seed=0).shape  # doctest: +SKIP
torch.Size([4, 64])
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from miaotui.arch import CAUSAL_LM
from miaotui.errors import MiaotuiError
from miaotui.loading import LoadedModel
from miaotui.progress import track

BATCH = 16  # rows sampled together: bounded memory, a progress step every BATCH windows


def cannot_generate(lm: LoadedModel) -> str | None:
    """Why `lm` cannot write calibration windows, or None when it can."""
    if lm.kind != CAUSAL_LM:
        return f"a {lm.kind} model does not generate text"
    tok = lm.tokenizer
    if tok.bos_token_id is None and tok.eos_token_id is None:
        return "its tokenizer has no beginning- or end-of-text token to start a window after"
    return None


def start_token(lm: LoadedModel) -> int:
    """The token a generated window starts after: beginning of text, else end of text (GPT-2's separator)."""
    reason = cannot_generate(lm)
    if reason:
        raise MiaotuiError(f"generated calibration needs a causal language model: {reason}")
    tok = lm.tokenizer
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


@torch.no_grad()
def generate_windows(lm: LoadedModel, samples: int, seqlen: int, *, seed: int = 0, progress: bool | None = None):
    """`samples` windows of `seqlen` tokens sampled from `lm` itself: (samples, seqlen) token ids on the CPU."""
    start = start_token(lm)
    model = lm.model
    device = next(model.parameters()).device
    # a fresh config: the checkpoint's own (repetition penalties, banned words, an end token) would bend the
    # samples away from the model's distribution; with no end token, every window runs to seqlen tokens
    config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=seqlen, pad_token_id=start
    )
    rows = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for first in track(range(0, samples, BATCH), "generating calibration text", enabled=progress):
            n = min(BATCH, samples - first)
            prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
            rows.append(out[:, 1 : 1 + seqlen].cpu())
    return torch.cat(rows)  # (samples, seqlen)
