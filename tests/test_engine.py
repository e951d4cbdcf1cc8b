"""The generation engine: greedy equals Hugging Face `generate`, sampling, stops, batching, KV-cache dtypes."""

from __future__ import annotations

import pytest
import torch
from families import CORE, ENCODER_TYPES

import miaotui
from miaotui.engine.generate import Engine
from miaotui.engine.sampling import SamplingParams
from miaotui.errors import MiaotuiError

DECODERS = [t for t in CORE if t not in ENCODER_TYPES]
PROMPTS = ["The history of the city", "In 1990 , the band released their second album , which", "Rain"]


def hf_greedy(lm, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Hugging Face `generate`, greedy, on a left-padded batch; each row cut after its first end token."""
    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = lm.model.generate(
        input_ids=ids.to(lm.device),
        attention_mask=mask.to(lm.device),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    eos = lm.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def engine_greedy(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=new_tokens))]


@pytest.fixture(scope="module")
def ref(ref_llama):
    return miaotui.load(ref_llama, dtype="float32")


@pytest.fixture(scope="module")
def ref_prompts(ref):
    return [ref.tokenizer(p)["input_ids"] for p in PROMPTS]


def test_greedy_equals_hf_generate_on_the_reference_model(ref, ref_prompts):
    expected = hf_greedy(ref, ref_prompts, 40)  # before the engine switches the model to its attention
    engine = Engine(ref, max_batch=3, max_len=128)
    assert engine_greedy(engine, ref_prompts, 40) == expected  # ragged batch
    assert engine_greedy(engine, ref_prompts[:1], 40) == expected[:1]  # single prompt, reused rows


@pytest.mark.parametrize("model_type", DECODERS)
def test_greedy_equals_hf_generate_on_every_family(model_type, tiny_models):
    lm = miaotui.load(tiny_models[model_type], dtype="float32")
    prompts = [[5, 17, 300, 42, 7, 99, 1000], [64, 3], [8, 9, 10, 11]]
    expected = hf_greedy(lm, prompts, 12)
    engine = Engine(lm, max_batch=3, max_len=32)
    assert engine_greedy(engine, prompts, 12) == expected
    assert engine_greedy(Engine(lm, max_len=32), prompts[:1], 12) == expected[:1]


@pytest.mark.parametrize("model_type", ["mistral", "gemma2"])
def test_sliding_window_layers_match_hf(model_type, tmp_path, ref_llama):
    """Prompts longer than the window: the engine's windowed masks agree with the model's own."""
    from families import tiny_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = tiny_config(model_type)
    config.sliding_window = 6
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(ref_llama).save_pretrained(tmp_path)
    lm = miaotui.load(tmp_path, dtype="float32")
    prompts = [list(range(100, 120)), list(range(7, 16))]
    expected = hf_greedy(lm, prompts, 16)
    assert engine_greedy(Engine(lm, max_batch=2, max_len=48), prompts, 16) == expected


def test_compiled_decode_equals_hf_generate(ref, ref_prompts):
    """The compiled step (fused GEMVs, guards checked only where graphs differ) gives the greedy
    tokens of HF `generate`, with rows reused by continuous batching, and without compiling again as the rows
    grow past the lengths attention reads (SPAN_STEP); a second compiled engine of other shapes in the same
    process gets its own graph, and the first still runs on its own."""
    expected = hf_greedy(ref, ref_prompts, 70)
    engine = Engine(ref, max_batch=2, max_len=96, compile=True)
    assert engine.runner.compile_seconds > 0
    graphs = dict(torch._dynamo.utils.counters["stats"])
    assert engine_greedy(engine, ref_prompts, 70) == expected  # three prompts through two rows, past 64
    assert dict(torch._dynamo.utils.counters["stats"]) == graphs  # spans 64 and 96: the same graph
    other = Engine(ref, max_batch=1, max_len=64, compile=True)
    assert engine_greedy(other, ref_prompts[2:], 30) == [expected[2][:30]]
    assert engine_greedy(engine, ref_prompts[:1], 70) == expected[:1]


def test_compiled_decode_runs_the_smallest_batch_size_that_covers_the_busy_rows(tiny_models):
    """A compiled engine compiles its step for batch sizes 1, 2, 4, ... max_batch at start, and each step runs
    the smallest that covers rows 0 up to the last busy one: requests finishing at different times (rows freed
    and reused, 1 to 4 busy) give the eager engine's tokens, and generating compiles nothing more."""
    lm = miaotui.load(tiny_models["llama"], dtype="float32")
    prompts = [[5, 17, 300, 42, 7], [64, 3], [9, 8, 7, 6], [1000, 2], [3, 3, 3], [77]]
    params = [SamplingParams(max_tokens=n) for n in (3, 11, 6, 14, 2, 9)]
    expected = [c.token_ids for c in Engine(lm, max_batch=4, max_len=32).generate(prompts, params)]
    engine = Engine(lm, max_batch=4, max_len=32, compile=True)
    assert engine.runner.batch_sizes == [1, 2, 4]
    graphs = dict(torch._dynamo.utils.counters["stats"])
    sizes = []
    decode = engine.runner._decode
    engine.runner._decode = lambda tokens, pos: sizes.append(len(tokens)) or decode(tokens, pos)
    assert [c.token_ids for c in engine.generate(prompts, params)] == expected
    assert dict(torch._dynamo.utils.counters["stats"]) == graphs
    assert set(sizes) == {1, 2, 4}  # down to one row at the end: 14 tokens for the fourth prompt
    assert engine.runner.decode(torch.tensor([5, 6, 7]), torch.tensor([0, 0, 0])).shape[0] == 3  # 3 -> size 4


@pytest.mark.parametrize("model_type", DECODERS)
def test_compiled_decode_equals_eager_on_every_family(model_type, tiny_models):
    """Every family's compiled step (fused GEMV matmuls, multiply-sum attention; GPT-2's Conv1D, OPT's biases,
    Gemma's soft-capping, sliding windows) gives the eager engine's greedy tokens. More than 8 compiled engines
    in one process (Dynamo's limit of graphs per function) still all compile."""
    lm = miaotui.load(tiny_models[model_type], dtype="float32")
    prompts = [[5, 17, 300, 42, 7, 99, 1000], [64, 3]]
    expected = engine_greedy(Engine(lm, max_batch=2, max_len=32), prompts, 10)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    engine = Engine(lm, max_batch=2, max_len=32, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # compiled, not fallen back to eager
    assert engine_greedy(engine, prompts, 10) == expected


def test_compiled_decode_reads_the_weights_at_every_step(tiny_models):
    """Weights are graph inputs, not constants folded in at compile time: a weight changed in place is seen."""
    lm = miaotui.load(tiny_models["llama"], dtype="float32")
    runner = Engine(lm, max_len=32, compile=True).runner
    tokens, pos = torch.tensor([5]), torch.tensor([3])
    assert runner.decode(tokens, pos).abs().max() > 0
    with torch.no_grad():
        lm.model.lm_head.weight.zero_()
    assert runner.decode(tokens, pos).abs().max() == 0


@pytest.mark.parametrize("recipe", ["w8a8", "w8"])
def test_compiled_decode_of_quantized_layers(tiny_models, recipe, tmp_path):
    """w8a8 layers keep their packed weights in Python state behind a graph break: the compiled step still gives
    the eager tokens (after warm-up its guards are checked again when that state trips them). w8 layers decode
    compiled through a fused int8 GEMV instead of their eager kernel: the same tokens."""
    lm = miaotui.load(tiny_models["llama"], dtype="float32")
    miaotui.apply_recipe(lm, miaotui.get_recipe(recipe), progress=False)
    prompts = [[5, 17, 300, 42, 7], [64, 3]]
    expected = engine_greedy(Engine(lm, max_batch=2, max_len=32), prompts, 12)
    params, buffers = len(list(lm.model.parameters())), len(list(lm.model.buffers()))
    assert engine_greedy(Engine(lm, max_batch=2, max_len=32, compile=True), prompts, 12) == expected
    # compiling holds buffers as Parameter objects (fewer guards): they stay buffers, and save as before
    assert (len(list(lm.model.parameters())), len(list(lm.model.buffers()))) == (params, buffers)
    miaotui.save(lm, tmp_path / "saved")
    assert engine_greedy(Engine(miaotui.load(tmp_path / "saved"), max_batch=2, max_len=32), prompts, 12) == expected


def test_continuous_batching_gives_each_request_its_own_result(ref, ref_prompts):
    """Five requests through two rows: rows are reused as requests finish, results do not depend on company."""
    lengths = [5, 30, 12, 3, 20]
    params = [SamplingParams(max_tokens=n) for n in lengths]
    prompts = [ref_prompts[i % 3] for i in range(5)]
    together = Engine(ref, max_batch=2, max_len=96).generate(prompts, params)
    alone = Engine(ref, max_len=96)
    for prompt, p, c in zip(prompts, params, together, strict=True):
        assert c.token_ids == alone.generate([prompt], p)[0].token_ids
        assert c.completion_tokens == p.max_tokens and c.finish_reason == "length"


def test_sampling_is_seeded_and_follows_its_filters(ref, ref_prompts):
    engine = Engine(ref, max_batch=2, max_len=96)
    p = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    a, b = engine.generate(ref_prompts[:2], [p, p])
    assert a.token_ids == engine.generate(ref_prompts[:1], p)[0].token_ids  # same seed, same tokens, any batch
    other = engine.generate(ref_prompts[:1], SamplingParams(max_tokens=24, temperature=0.9, seed=8))[0]
    assert other.token_ids != a.token_ids
    top1 = engine.generate(ref_prompts[:1], SamplingParams(max_tokens=24, temperature=5.0, top_k=1, seed=3))[0]
    assert top1.token_ids == engine.generate(ref_prompts[:1], SamplingParams(max_tokens=24))[0].token_ids
    penalised = engine.generate(ref_prompts[:1], SamplingParams(max_tokens=40, repetition_penalty=1.5))[0]
    plain = engine.generate(ref_prompts[:1], SamplingParams(max_tokens=40))[0]
    assert len(set(penalised.token_ids)) > len(set(plain.token_ids))


def test_stops_logprobs_and_streaming(ref, ref_prompts):
    engine = Engine(ref, max_len=96)
    full = engine.generate(ref_prompts[:1], SamplingParams(max_tokens=30))[0]
    stop = full.text[10:14]
    cut = engine.generate(ref_prompts[:1], SamplingParams(max_tokens=30, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    by_id = engine.generate(ref_prompts[:1], SamplingParams(max_tokens=30, stop_token_ids=[full.token_ids[4]]))[0]
    assert by_id.token_ids == full.token_ids[: full.token_ids.index(full.token_ids[4]) + 1]
    lp = engine.generate(ref_prompts[:1], SamplingParams(max_tokens=5, logprobs=3))[0].logprobs
    assert len(lp) == 5 and all(e["top"][0][0] == e["token"] and e["logprob"] <= 0 for e in lp)
    assert "".join(engine.stream(PROMPTS[0], SamplingParams(max_tokens=30))) == full.text


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_quantized_kv_cache_keeps_next_token_distributions(ref, ref_prompts, kv_dtype):
    """KL of the next-token distributions along a greedy continuation, low-bit cache vs the float cache."""
    base, quant = Engine(ref, max_len=96), Engine(ref, max_len=96, kv_dtype=kv_dtype)
    tokens = base.generate(ref_prompts[:1], SamplingParams(max_tokens=40))[0].token_ids
    ids = ref_prompts[0] + tokens
    logits = [e.runner.extend(torch.tensor([0]), [ids], keep=len(ids)) for e in (base, quant)]  # (1, T, V)
    p, q = (x[0].float().log_softmax(-1) for x in logits)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl < (0.002 if kv_dtype == "int8" else 0.03), kl
    assert quant.runner.kv_cache_bytes() < base.runner.kv_cache_bytes() / 3
    # the compiled step reads and writes the low-bit cache as the eager one does, past the first span of 64
    params = SamplingParams(max_tokens=70)
    eager = [c.token_ids for c in quant.generate(ref_prompts[:2], params)]
    compiled = Engine(ref, max_batch=2, max_len=96, kv_dtype=kv_dtype, compile=True)
    assert [c.token_ids for c in compiled.generate(ref_prompts[:2], params)] == eager


def test_bad_requests_fail_before_any_work(ref, ref_prompts):
    engine = Engine(ref, max_len=64)
    with pytest.raises(MiaotuiError, match="exceeds the engine"):
        engine.generate(ref_prompts[:1], SamplingParams(max_tokens=60))
    with pytest.raises(MiaotuiError, match="empty"):
        engine.generate([""])
    with pytest.raises(MiaotuiError, match="token ids"):
        engine.generate([[1, 10**6]])
    for bad in [dict(temperature=-1), dict(top_p=1.5), dict(max_tokens=0), dict(top_k=-2), dict(logprobs=99)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(MiaotuiError, match="context"):
        Engine(ref, max_len=10**6)
    assert not engine.scheduler.has_work()


def test_speculative_decoding_equals_plain_greedy(ref, ref_prompts):
    """Prompt lookup and a quantized draft model: same tokens as plain greedy, most drafts accepted."""
    import copy

    params = SamplingParams(max_tokens=48)
    plain = Engine(ref, max_len=128).generate(ref_prompts, params)
    lookup = Engine(ref, max_len=128, draft="ngram", num_draft=4)
    assert [c.token_ids for c in lookup.generate(ref_prompts, params)] == [c.token_ids for c in plain]
    assert lookup.speculative_stats["proposed"] > 0
    draft = copy.deepcopy(ref)
    miaotui.apply_recipe(draft, miaotui.get_recipe("w8"), progress=False)
    drafted = Engine(ref, max_len=128, draft=draft, num_draft=4)
    assert [c.token_ids for c in drafted.generate(ref_prompts, params)] == [c.token_ids for c in plain]
    assert drafted.speculative_stats["acceptance_rate"] > 0.8, drafted.speculative_stats
    assert drafted.speculative_stats["tokens_per_pass"] > 2.5


@pytest.mark.parametrize("draft", [0, 2, 4])
def test_speculative_sampling_keeps_the_distribution(draft):
    """Draws through verify_draft follow the sampling distribution whatever the draft token."""
    from miaotui.engine.sampling import apply_repetition_penalty, filtered_logits, verify_draft

    logits = torch.tensor([1.5, 0.2, 1.0, -0.5, 0.8, -3.0])
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=5, repetition_penalty=1.3)
    history = [1, 4]
    target = filtered_logits(apply_repetition_penalty(logits, torch.tensor(history), 1.3), params).softmax(-1)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(6)
    kept = 0
    for _ in range(n):
        token, accepted = verify_draft(logits, params, history, gen, draft)
        counts[token] += 1
        kept += accepted
    assert float((counts / n - target).abs().sum()) / 2 < 0.015  # total variation distance
    assert abs(kept / n - float(target[draft])) < 0.015  # the draft is kept with its own probability


def test_speculative_sampling_on_the_engine(ref, ref_prompts):
    """Sampled requests run speculatively too: seeded runs repeat, drafts are checked, tokens stay in range."""
    params = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, seed=3)
    lookup = Engine(ref, max_len=128, draft="ngram", num_draft=4)
    done = lookup.generate(ref_prompts, params)
    assert [c.token_ids for c in lookup.generate(ref_prompts, params)] == [c.token_ids for c in done]
    assert all(c.finish_reason == "stop" or c.completion_tokens == 32 for c in done)
    assert all(0 <= t < ref.model.config.vocab_size for c in done for t in c.token_ids)
    assert lookup.speculative_stats["proposed"] > 0 and 0 <= lookup.speculative_stats["acceptance_rate"] <= 1


def test_a_draft_with_another_vocabulary_is_refused(ref, tmp_path, ref_llama):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(ref_llama).save_pretrained(tmp_path)
    with pytest.raises(MiaotuiError, match="vocabulary"):
        Engine(ref, max_len=64, draft=miaotui.load(tmp_path))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("boolean", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_decode_attention_equals_sdpa(dtype, boolean, fused):
    """The CPU's one-query attention (multiply-sums for compiled steps, matmuls otherwise) is SDPA's function:
    GQA, masked positions."""
    from miaotui.engine.attention import _decode_attention

    torch.manual_seed(0)
    q, k, v = (
        torch.randn(3, 6, 1, 16, dtype=dtype),
        torch.randn(3, 2, 9, 16, dtype=dtype),
        torch.randn(3, 2, 9, 16, dtype=dtype),
    )
    seen = torch.arange(9)[None, None, None, :] <= torch.tensor([2, 5, 8])[:, None, None, None]  # (3, 1, 1, 9)
    mask = seen if boolean else torch.zeros(seen.shape, dtype=dtype).masked_fill(~seen, torch.finfo(dtype).min)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out = _decode_attention(q, k, v, mask, fused=fused)  # (B, 1, Hq, D)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.transpose(1, 2).float(), atol=tol, rtol=tol)
