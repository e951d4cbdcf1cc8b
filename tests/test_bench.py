import copy

import pytest

import miaotui
from miaotui.bench import bench_models
from miaotui.recipe import get_recipe


def test_causal_bench_reports_every_field(tiny_models):
    lm = miaotui.load(tiny_models["llama"])
    opt = copy.deepcopy(lm)
    miaotui.apply_recipe(opt, get_recipe("w8"), progress=False)
    r = bench_models({"a": lm, "b": opt}, prompt_len=16, new_tokens=4, repeats=2)
    assert r["kind"] == "causal-lm" and r["protocol"]["prompt_len"] == 16
    assert {"date", "device", "torch", "transformers", "threads", "peak_rss_bytes"} <= set(r["environment"])
    for m in r["models"].values():
        assert m["decode_tokens_per_s"] > 0 and m["ttft_ms"] > 0 and m["prefill_tokens_per_s"] > 0
    assert r["models"]["b"]["linear_bytes"] < 0.55 * r["models"]["a"]["linear_bytes"]


def test_encoder_bench(tiny_models):
    lm = miaotui.load(tiny_models["bert"])
    r = bench_models({"bert": lm}, seqlen=32, encoder_batch=4, repeats=1)
    m = r["models"]["bert"]
    assert m["latency_b1_ms"] > 0 and m["throughput_seq_per_s"] > 0


def test_bench_validation(tiny_models):
    lm = miaotui.load(tiny_models["gpt2"])
    with pytest.raises(ValueError, match="exceed the model's context of 256"):
        bench_models({"x": lm}, prompt_len=250, new_tokens=10)
    with pytest.raises(ValueError, match="must be positive"):
        bench_models({"x": lm}, repeats=0)


def test_decode_bytes_per_token(tiny_models, ref_llama):
    from miaotui.bench import decode_bytes_per_token, weight_bytes

    lm = miaotui.load(ref_llama)  # untied: one embedding row is read per token, not the table
    table = 8192 * 384 * 2
    assert decode_bytes_per_token(lm) == weight_bytes(lm)["total_bytes"] - table + 384 * 2
    tied = miaotui.load(tiny_models["gemma"])  # tied: lm_head reads the whole table anyway
    assert decode_bytes_per_token(tied) == weight_bytes(tied)["total_bytes"]
    head_w8 = miaotui.Recipe.from_dict({"steps": [{"type": "quantize", "scheme": "w8", "ignore": []}]})
    miaotui.apply_recipe(lm, head_w8, progress=False)  # a quantized lm_head has no .weight to compare with
    assert decode_bytes_per_token(lm) == weight_bytes(lm)["total_bytes"] - table + 384 * 2


def test_batch_sweep_and_peak_memory(tiny_models):
    from miaotui.bench import bench_sweep, peak_rss

    lm = miaotui.load(tiny_models["llama"])
    r = bench_sweep({"m": lm}, [1, 3], prompt_len=8, new_tokens=3, repeats=1)
    points = r["models"]["m"]
    assert [p["batch_size"] for p in points] == [1, 3] and all(p["throughput"] > 0 for p in points)
    assert points[0]["unit"] == "tokens/s" and "batch_size" not in r["protocol"]
    assert 0 < points[0]["peak_rss_bytes"] <= peak_rss() * 2  # this process's resident memory
    enc = bench_sweep({"e": miaotui.load(tiny_models["bert"])}, [1, 2], seqlen=8, repeats=1)
    assert enc["models"]["e"][1]["unit"] == "sequences/s" and enc["models"]["e"][1]["throughput"] > 0
    with pytest.raises(ValueError, match="batch sizes must be positive"):
        bench_sweep({"m": lm}, [0])
