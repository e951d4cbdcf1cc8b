"""The engine on an accelerator: eager and compiled (CUDA graphs) decoding give Hugging Face's greedy tokens, rows
are reused without recompiling, and w8 / w4 models decode compiled as they do eagerly.

Runs on CUDA when a GPU is present, and skips otherwise; MIAOTUI_TEST_DEVICE=cpu runs the same checks on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from test_engine import PROMPTS, engine_greedy, hf_greedy

import miaotui
from miaotui.engine.generate import Engine
from miaotui.engine.sampling import SamplingParams

DEVICE = os.environ.get("MIAOTUI_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU (or MIAOTUI_TEST_DEVICE)")


@pytest.fixture(scope="module")
def ref(ref_llama):
    return miaotui.load(ref_llama, dtype="float32", device=DEVICE)


@pytest.fixture(scope="module")
def prompts(ref):
    return [ref.tokenizer(p)["input_ids"] for p in PROMPTS]


def test_eager_and_compiled_decoding_equal_hf_generate(ref, prompts):
    """fp32: a ragged batch, then three prompts through two rows of a compiled engine, past the first 64
    positions, with one graph for the whole run."""
    expected = hf_greedy(ref, prompts, 70)
    assert engine_greedy(Engine(ref, max_batch=3, max_len=96), prompts, 70) == expected
    engine = Engine(ref, max_batch=2, max_len=96, compile=True)
    assert engine.runner.compile_seconds > 0
    graphs = dict(torch._dynamo.utils.counters["stats"])
    assert engine_greedy(engine, prompts, 70) == expected
    assert engine_greedy(engine, prompts[:1], 70) == expected[:1]
    assert dict(torch._dynamo.utils.counters["stats"]) == graphs


def test_compiled_continuous_batching_and_sampling(ref, prompts):
    """Five requests of different lengths through two compiled rows each get their own result; a seed repeats."""
    engine = Engine(ref, max_batch=2, max_len=96, compile=True)
    lengths = [5, 30, 12, 3, 20]
    params = [SamplingParams(max_tokens=n) for n in lengths]
    batch = [prompts[i % 3] for i in range(5)]
    together = engine.generate(batch, params)
    for prompt, p, c in zip(batch, params, together, strict=True):
        assert c.token_ids == engine.generate([prompt], p)[0].token_ids
    sampled = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=3)
    assert engine.generate(prompts[:1], sampled)[0].token_ids == engine.generate(prompts[:1], sampled)[0].token_ids


@pytest.mark.parametrize("recipe", ["w8", "w4-rtn"])
def test_quantized_models_decode_compiled_as_eager(ref_llama, prompts, recipe):
    """bf16 with packed weights (the device's int8 / int4 kernels): fed the same 16 tokens after the same
    prefill, the compiled decode step's logits match the eager step's (cosine > 0.999 each, top-1 agreement
    >= 15 of 16; bf16 rounds differently where the compiled graph fuses operations)."""
    lm = miaotui.load(ref_llama, dtype="bfloat16", device=DEVICE)
    miaotui.apply_recipe(lm, miaotui.get_recipe(recipe), progress=False)
    prompt = prompts[1]
    tokens = engine_greedy(Engine(lm, max_len=64), [prompt], 16)[0]
    logits = []
    for engine in (Engine(lm, max_len=64), Engine(lm, max_len=64, compile=True)):
        runner = engine.runner
        runner.extend(torch.tensor([0], device=lm.device), [prompt])
        steps = [
            runner.decode(torch.tensor([t], device=lm.device), torch.tensor([len(prompt) + i], device=lm.device))
            for i, t in enumerate(tokens)
        ]
        logits.append(torch.cat(steps).float())  # (16, V)
    assert F.cosine_similarity(logits[0], logits[1]).min().item() > 0.999
    assert (logits[0].argmax(-1) == logits[1].argmax(-1)).sum().item() >= 15
