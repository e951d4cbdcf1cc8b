"""Encoder fidelity: cosine similarity of sentence embeddings to a baseline model.

Embeddings are mean-pooled last hidden states over real tokens (as sentence-transformers pools
all-MiniLM-L6-v2); for classifier heads the logits are compared.

>>> sentences = sample_sentences()
>>> len(sentences) >= 32
True
"""

from __future__ import annotations

from importlib import resources

import torch
import torch.nn.functional as F

from miaotui.loading import LoadedModel


def sample_text() -> str:
    """miaotui's built-in English sample text (plain sentences, one per line)."""
    return resources.files("miaotui").joinpath("data/sample.txt").read_text(encoding="utf-8")


def sample_sentences() -> list[str]:
    """The built-in sentence set for encoder fidelity checks."""
    return [line.strip() for line in sample_text().splitlines() if line.strip()]


@torch.no_grad()
def embed(lm: LoadedModel, sentences: list[str], batch_size: int = 16, max_length: int | None = None) -> torch.Tensor:
    """Embeddings (S, H) in fp32: mean pooling over the attention mask, or logits for classifiers."""
    out = []
    max_length = max_length or lm.context_length or 512
    for i in range(0, len(sentences), batch_size):
        enc = lm.tokenizer(
            sentences[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(lm.device)
        res = lm.model(**enc)
        if getattr(res, "logits", None) is not None:
            out.append(res.logits.float())  # (B, C)
            continue
        hidden = res.last_hidden_state.float()  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))  # (B, H)
    return torch.cat(out)


def embedding_similarity(lm: LoadedModel, baseline: LoadedModel, sentences: list[str] | None = None) -> dict:
    """Per-sentence cosine similarity of `lm`'s embeddings to `baseline`'s: mean and minimum."""
    sentences = sentences or sample_sentences()
    a, b = embed(lm, sentences), embed(baseline, sentences).to(lm.device)
    cos = F.cosine_similarity(a, b, dim=-1)  # (S,)
    return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(), "sentences": len(sentences)}
