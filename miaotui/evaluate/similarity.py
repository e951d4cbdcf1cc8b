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

from miaotui.errors import MiaotuiError
from miaotui.evaluate.perplexity import read_text
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


def neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of each row's k nearest other rows by cosine similarity: (S, H) -> (S, k).

    >>> neighbours(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), 1).flatten().tolist()
    [1, 0, 1]
    """
    x = F.normalize(emb.float(), dim=-1)  # (S, H)
    sim = x @ x.T  # (S, S)
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=-1).indices  # (S, k)


def retrieval_agreement(a: torch.Tensor, b: torch.Tensor, k: int = 5) -> float:
    """Mean overlap |top-k(a) ∩ top-k(b)| / k of each sentence's nearest neighbours under two embeddings.

    >>> e = torch.randn(8, 4)
    >>> retrieval_agreement(e, 2 * e, k=3)
    1.0
    """
    if not 1 <= k < len(a):
        raise ValueError(f"top-k needs 1 <= k < number of sentences ({len(a)}), got {k}")
    na, nb = neighbours(a, k), neighbours(b.to(a.device), k)  # (S, k)
    overlap = (na[:, :, None] == nb[:, None, :]).any(-1).sum(-1)  # (S,)
    return overlap.float().mean().item() / k


def embedding_similarity(
    lm: LoadedModel, baseline: LoadedModel, sentences: list[str] | None = None, k: int = 5
) -> dict:
    """Per-sentence cosine similarity of `lm`'s embeddings to `baseline`'s (mean, minimum), and the
    top-k neighbour overlap (retrieval agreement) over the sentence set."""
    sentences = sentences or sample_sentences()
    a, b = embed(lm, sentences), embed(baseline, sentences).to(lm.device)
    cos = F.cosine_similarity(a, b, dim=-1)  # (S,)
    return {
        "cosine_mean": cos.mean().item(),
        "cosine_min": cos.min().item(),
        "retrieval_agreement": retrieval_agreement(a, b, k) if len(sentences) > k else None,
        "retrieval_k": k,
        "sentences": len(sentences),
    }


def read_sentences(path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, one sentence each."""
    sentences = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if len(sentences) < 2:
        raise MiaotuiError(f"{path} needs at least two sentences (one a line) for retrieval agreement")
    return sentences
