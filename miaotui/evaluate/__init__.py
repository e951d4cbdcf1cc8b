"""Quality measurements: perplexity and agreement for causal LMs, embedding similarity for encoders,
classification accuracy on labelled files."""

from miaotui.evaluate.classify import classify, read_labelled
from miaotui.evaluate.perplexity import (
    compare_causal,
    perplexity,
    read_calibration,
    read_text,
    read_texts,
    score_windows,
    token_windows,
)
from miaotui.evaluate.similarity import (
    embed,
    embedding_similarity,
    read_sentences,
    retrieval_agreement,
    sample_sentences,
)

__all__ = [
    "classify",
    "compare_causal",
    "embed",
    "embedding_similarity",
    "perplexity",
    "read_labelled",
    "read_sentences",
    "read_calibration",
    "read_text",
    "read_texts",
    "retrieval_agreement",
    "sample_sentences",
    "score_windows",
    "token_windows",
]
