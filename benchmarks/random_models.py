"""Random-weight Llama models of real shapes for speed and cost benchmarks (weights do not change speed).

>>> lm = random_llama("random-llama-0.4b", LLAMA_0_4B, "bfloat16", "cpu")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DATA = Path(os.environ.get("MIAOTUI_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# hidden 1024, 8 blocks, GQA 16/4, ref-llama-16m's vocabulary: about 0.1B parameters
LLAMA_0_1B = dict(
    vocab_size=8192,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=1024,
)
# hidden 1280, 20 blocks, GQA 20/4: about 0.4B parameters
LLAMA_0_4B = dict(
    vocab_size=32000,
    hidden_size=1280,
    intermediate_size=3456,
    num_hidden_layers=20,
    num_attention_heads=20,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)
# Llama-3.2-1B's shape: hidden 2048, 16 blocks, GQA 32/8, MLP 8192, vocab 128256, tied embeddings
LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
# Llama-3-8B's shape: hidden 4096, 32 blocks, GQA 32/8, MLP 14336, vocab 128256, untied head
LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
# a small Llama to check GPU scripts on a CPU: hidden 256, 2 blocks, GQA 4/2
LLAMA_TINY = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


def random_llama(name: str, shape: dict, dtype: str = "bfloat16", device: str = "cpu"):
    """A LoadedModel of a seeded random Llama of `shape` with ref-llama-16m's tokenizer (its ids are a subset)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from miaotui.arch import CAUSAL_LM, discover
    from miaotui.loading import LoadedModel, load_tokenizer

    config = LlamaConfig(**shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, "bfloat16" if dtype == "auto" else dtype)).eval()
    tok = load_tokenizer(str(DATA / "ref-llama-16m"), CAUSAL_LM)
    return LoadedModel(model, tok, discover(model, CAUSAL_LM), name, None, {})
