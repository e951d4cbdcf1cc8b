"""Quality measurements: perplexity and agreement for causal LMs, embedding similarity for encoders."""

from miaotui.evaluate.perplexity import compare_causal, perplexity, read_text, token_windows
from miaotui.evaluate.similarity import embed, embedding_similarity, sample_sentences

__all__ = [
    "compare_causal",
    "embed",
    "embedding_similarity",
    "perplexity",
    "read_text",
    "sample_sentences",
    "token_windows",
]
