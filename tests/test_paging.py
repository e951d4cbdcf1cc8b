"""The paged KV cache: block budgets, preemption, prefix caching and chunked prefill give the same greedy output
as a cache with a full row per sequence (itself equal to Hugging Face `generate`, test_engine.py), and every
block comes back."""

from __future__ import annotations

import random

import pytest
import torch
from test_engine import engine_greedy, hf_greedy

import miaotui
from miaotui.engine.blocks import BlockManager
from miaotui.engine.generate import Engine
from miaotui.engine.request import Request
from miaotui.engine.sampling import SamplingParams
from miaotui.errors import MiaotuiError

TEXT = (
    "The history of the city goes back to the Roman period , when a small fort was built on the river . In the "
    "middle ages it grew into a market town , and by 1800 it was one of the largest ports of the country ."
)


@pytest.fixture(scope="module")
def ref(ref_llama):
    return miaotui.load(ref_llama, dtype="float32")


@pytest.fixture(scope="module")
def prompts(ref):
    ids = ref.tokenizer(TEXT)["input_ids"]  # ~50 tokens: prompts sharing prefixes of 16..48 tokens
    return [ids[:n] for n in (5, 17, 33, 40, 48, 9)] + [ids[3:30]]


def _budget(engine: Engine, tokens: int) -> int:
    return tokens * engine.runner.cache.token_bytes()


def _assert_all_blocks_back(engine: Engine) -> None:
    s = engine.scheduler
    m = s.blocks
    assert not s.running and not s.waiting and s.free == list(range(engine.runner.max_batch))
    assert m.used == 0 and m.available == m.num_blocks and not any(m.refs)
    assert all(m.hash_of[b] == h for h, b in m.cached.items())


def test_paged_equals_a_row_per_sequence_and_hf(ref, prompts):
    want = hf_greedy(ref, prompts, 24)
    full = Engine(ref, max_batch=4, max_len=80)
    assert engine_greedy(full, prompts, 24) == want
    # 20 blocks of 16 for 4 rows of 80 positions: sequences scattered over the pool, some preempted
    paged = Engine(ref, max_batch=4, max_len=80, kv_cache_memory=_budget(full, 20 * 16), prefix_caching=False)
    assert engine_greedy(paged, prompts, 24) == want
    assert paged.runner.cache.num_blocks == 20
    _assert_all_blocks_back(paged)


def test_preemption_recomputes_to_the_same_output(ref, prompts):
    full = Engine(ref, max_batch=4, max_len=80)
    want = engine_greedy(full, prompts, 30)
    # room for one full sequence (5 blocks): four running sequences outgrow it and the latest is preempted
    for caching in (False, True):
        tight = Engine(ref, max_batch=4, max_len=80, kv_cache_memory=_budget(full, 80), prefix_caching=caching)
        assert engine_greedy(tight, prompts, 30) == want
        assert tight.scheduler.preemptions > 0
        _assert_all_blocks_back(tight)


def test_prefix_cache_hits_give_the_same_output(ref, prompts):
    cold = Engine(ref, max_batch=2, max_len=80, prefix_caching=False)
    want = engine_greedy(cold, prompts, 16)
    warm = Engine(ref, max_batch=2, max_len=80)
    assert engine_greedy(warm, prompts, 16) == want  # shared prefixes: later prompts reuse earlier blocks
    assert engine_greedy(warm, prompts, 16) == want  # every full prompt block is cached now
    stats = warm.scheduler.stats()
    assert 0.3 < stats["prefix_hit_rate"] < 1
    assert cold.scheduler.stats()["prefix_hit_rate"] == 0
    _assert_all_blocks_back(warm)


def test_sampling_with_a_seed_is_unchanged_by_prefix_hits(ref, prompts):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=3)
    cold = Engine(ref, max_batch=2, max_len=80, prefix_caching=False)
    warm = Engine(ref, max_batch=2, max_len=80)
    warm.generate(prompts[4], SamplingParams(max_tokens=1))  # caches the 48-token prompt's blocks
    assert warm.generate(prompts[4], params)[0].token_ids == cold.generate(prompts[4], params)[0].token_ids


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_prefill_equals_whole_prompts(ref, prompts, chunk):
    want = engine_greedy(Engine(ref, max_batch=3, max_len=80, prefill_chunk=None), prompts, 12)
    chunked = Engine(ref, max_batch=3, max_len=80, prefill_chunk=chunk)
    assert engine_greedy(chunked, prompts, 12) == want
    _assert_all_blocks_back(chunked)


def test_long_prompt_is_prefilled_between_decode_steps(ref, prompts):
    engine = Engine(ref, max_batch=2, max_len=80, prefill_chunk=8, prefix_caching=False)
    s = engine.scheduler
    short = s.submit(Request(prompts[0], SamplingParams(max_tokens=20)))
    s.step()  # the short prompt is prefilled and decoding
    long = s.submit(Request(prompts[4], SamplingParams(max_tokens=4)))
    before = len(short.tokens)
    for _ in range(5):  # 48 prompt tokens in chunks of 8: six steps, the short one decoding in each
        s.step()
    assert not long.tokens and long.computed == 40
    assert len(short.tokens) == before + 5
    while s.has_work():
        s.step()
    _assert_all_blocks_back(engine)


def test_block_accounting_returns_to_zero_after_random_requests_and_cancellations(tiny_models):
    lm = miaotui.load(tiny_models["llama"], dtype="float32")
    probe = Engine(lm, max_batch=1, max_len=64)
    probe.generate([1, 2, 3], SamplingParams(max_tokens=1))
    engine = Engine(lm, max_batch=6, max_len=64, kv_cache_memory=_budget(probe, 10 * 16), prefill_chunk=24)
    s, rng = engine.scheduler, random.Random(0)
    stems = [[rng.randrange(5, 1000) for _ in range(40)] for _ in range(4)]  # shared prefixes
    live, submitted = [], 0
    while submitted < 200 or s.has_work():
        for _ in range(rng.randrange(0, 4)):
            if submitted < 200:
                stem = rng.choice(stems)
                prompt = stem[: rng.randrange(1, 40)] + [rng.randrange(5, 1000) for _ in range(rng.randrange(0, 8))]
                greedy = rng.random() < 0.5
                params = SamplingParams(max_tokens=rng.randrange(1, 16), temperature=0 if greedy else 1.0)
                live.append(s.submit(Request(prompt, params)))
                submitted += 1
        for r in [r for r in live if not r.done and rng.random() < 0.05]:
            s.cancel(r)  # waiting, being prefilled or decoding
        s.step()
        assert s.blocks.used <= s.blocks.num_blocks
    assert all(r.done for r in live)
    assert s.preemptions > 0 and s.blocks.hit_tokens > 0
    _assert_all_blocks_back(engine)


def test_int8_kv_on_a_paged_cache_stays_close(ref, prompts):
    full = Engine(ref, max_batch=4, max_len=80)
    want = engine_greedy(full, prompts, 16)
    int8 = Engine(ref, max_batch=4, max_len=80, kv_dtype="int8", kv_cache_memory=_budget(full, 200))
    got = engine_greedy(int8, prompts, 16)
    same = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    assert same / sum(len(w) for w in want) > 0.8
    assert int8.runner.cache.token_bytes() < full.runner.cache.token_bytes() / 3


def test_a_budget_too_small_for_one_sequence_is_refused(ref):
    with pytest.raises(MiaotuiError, match="too few for one sequence of 80 positions"):
        Engine(ref, max_batch=2, max_len=80, kv_cache_memory=1000)


def test_block_manager_evicts_least_recently_used_cached_blocks():
    m = BlockManager(num_blocks=3, block_size=2)
    a, b = m.allocate(1), m.allocate(1)
    m.register(a, m.extend_hashes([], [1, 2]))
    m.register(b, m.extend_hashes([], [3, 4]))
    m.release(a)
    m.release(b)  # both cached and free; a is the least recently used
    assert m.allocate(1) == [2]  # the empty block goes first
    assert m.allocate(1) == a  # then the oldest cached one, no longer cached
    assert m.match([1, 2, 9], m.extend_hashes([], [1, 2, 9])) == []
    assert m.match([3, 4, 9], m.extend_hashes([], [3, 4, 9])) == b
    with pytest.raises(MiaotuiError, match="released more often"):
        m.release([2, 2])
    assert torch.tensor(m.refs).sum() == 1
