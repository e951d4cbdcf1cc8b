"""Tensor and pipeline parallelism on CPU (gloo, 2 ranks): greedy outputs equal the single-process engine's.

Tolerance: fp32 and int8 weights must give identical greedy tokens (sharding changes only the order of sums);
int4 (whose fp32 path dequantizes the same codes) must agree on at least 90 % of the tokens. Pipeline stages
move whole blocks, packed or not, so the pipeline is tested in fp32 only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import miaotui
from miaotui.checkpoint import save
from miaotui.engine.generate import Engine
from miaotui.engine.parallel import ParallelConfig, check_tensor_parallel
from miaotui.engine.sampling import SamplingParams
from miaotui.engine.stages import stage_bounds
from miaotui.errors import MiaotuiError
from miaotui.quantize import QuantizeConfig, quantize_
from miaotui.quantize.int4 import Int4WeightOnlyLinear
from miaotui.quantize.int8 import Int8WeightOnlyLinear

PROMPTS = ["The history of the city", "In 1990 , the band released their second album , which", "Rain"]
NEW = 24
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(__import__("conftest").REPO)}


def greedy(model, parallel=None, prompts=PROMPTS, **options) -> list[list[int]]:
    with Engine(model, max_batch=3, max_len=96, dtype="float32", parallel=parallel, **options) as engine:
        return [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=NEW))]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=False)]
    return sum(x == y for x, y in pairs) / len(pairs)


@pytest.fixture(scope="module")
def quantized(ref_llama, tmp_path_factory):
    """scheme -> optimized folder of ref-llama-16m with int8 (w8) or int4 group-64 (w4) weights."""
    root = tmp_path_factory.mktemp("parallel")
    out = {}
    for scheme, cfg in {"w8": QuantizeConfig(scheme="w8"), "w4": QuantizeConfig(scheme="w4", group_size=64)}.items():
        lm = miaotui.load(ref_llama)
        quantize_(lm.model, cfg, progress=False)
        out[scheme] = save(lm, root / scheme)
    return out


@pytest.mark.slow
def test_tensor_parallel_cli_equals_single_process(ref_llama):
    expected = greedy(ref_llama)
    prompt = PROMPTS[1]
    cmd = [sys.executable, "-m", "miaotui.cli", "generate", str(ref_llama), prompt, "--dtype", "float32"]
    cmd += ["--max-tokens", str(NEW), "--tp", "2", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["token_ids"] == expected[1]


@pytest.mark.slow
def test_tensor_parallel_int8_equals_single_process(quantized):
    assert greedy(quantized["w8"], ParallelConfig(tp=2)) == greedy(quantized["w8"])


@pytest.mark.slow
def test_pipeline_parallel_equals_single_process(ref_llama):
    expected = greedy(ref_llama)
    assert greedy(ref_llama, ParallelConfig(pp=2)) == expected
    # a paged cache of 7 blocks on each stage (3 of the 6 layers, 3 KiB a token in fp32): the ranks agree on
    # the block count, the block table follows rank 0's scheduler through admissions and preemptions
    tight = {"kv_cache_memory": 7 * 16 * 3072, "prefill_chunk": 5}
    assert greedy(ref_llama, ParallelConfig(pp=2), **tight) == expected


@pytest.mark.slow
def test_tensor_parallel_int4_agrees(quantized):
    assert agreement(greedy(quantized["w4"], ParallelConfig(tp=2)), greedy(quantized["w4"])) >= 0.9


@pytest.mark.slow
def test_tensor_parallel_fused_qkv_phi3(tmp_path, ref_llama):
    from conftest import build_tiny

    folder = build_tiny("phi3", tmp_path / "phi3", ref_llama)
    prompts = [[5, 17, 300, 42, 7, 99, 1000], [64, 3]]
    assert greedy(folder, ParallelConfig(tp=2), prompts) == greedy(folder, prompts=prompts)


def test_bad_shard_shapes_are_refused(ref_llama):
    lm = miaotui.load(ref_llama)
    with pytest.raises(MiaotuiError, match="6 attention heads do not split evenly over 4"):
        check_tensor_parallel(lm.model, lm.arch, 4)
    quantize_(lm.model, QuantizeConfig(scheme="w4", group_size=128), progress=False)
    # o_proj has 6 heads x 64 = 384 inputs: 192 per rank, not whole groups of 128
    with pytest.raises(MiaotuiError, match=r"o_proj split by inputs: .*whole groups of 128"):
        check_tensor_parallel(lm.model, lm.arch, 2)
    with pytest.raises(MiaotuiError, match="only 6 blocks"):
        stage_bounds(6, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        ParallelConfig(tp=2, backend="mpi")


def test_packed_shards_hold_the_right_weights():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64, bias=True)
    rows, cols = torch.arange(16, 48), torch.arange(128, 256)
    for layer in (Int8WeightOnlyLinear.from_float(lin), Int4WeightOnlyLinear.from_float(lin, group_size=64)):
        w = layer.dequantize()  # (64, 256)
        assert torch.equal(layer.take(0, rows).dequantize(), w[rows])
        assert torch.equal(layer.take(1, cols).dequantize(), w[:, cols])
        assert torch.equal(layer.take(0, rows).bias, layer.bias[rows])
    with pytest.raises(ValueError, match="whole groups of 64"):
        Int4WeightOnlyLinear.from_float(lin, group_size=64).take(1, torch.arange(32, 96))
    with pytest.raises(ValueError, match="multiple of 16"):
        Int4WeightOnlyLinear.from_float(lin, group_size=64).take(0, torch.arange(8))


KILL_SCRIPT = """
import sys, torch
from miaotui.engine.launch import start_parallel
from miaotui.engine.parallel import ParallelConfig
runner = start_parallel(sys.argv[1], ParallelConfig(tp=2, timeout_s=20), load_options={"dtype": "float32"}, max_len=64)
print(runner.supervisor.children[0].pid, flush=True)
token = torch.zeros(1, dtype=torch.long)
while True:
    runner.decode(token, token)
"""


def _start_and_get_child(ref_llama):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(ref_llama)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV
    )
    child = int(proc.stdout.readline())
    time.sleep(1.0)  # decoding in lockstep by now
    return proc, child


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_with_an_error(ref_llama):
    proc, child = _start_and_get_child(ref_llama)
    os.kill(child, signal.SIGKILL)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 30
    assert "rank 1 exited with code -9" in err.decode()


@pytest.mark.slow
def test_a_killed_rank_0_stops_the_others(ref_llama):
    proc, child = _start_and_get_child(ref_llama)
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    pytest.fail("rank 1 kept running after rank 0 died")


def test_optimize_for_a_tp_size_refuses_unsplittable_groups(ref_llama, tmp_path, capsys):
    from miaotui.cli import main

    out = tmp_path / "w4"
    assert main(["optimize", str(ref_llama), "--recipe", "w4-rtn", "--out", str(out), "--no-bench", "--tp", "2"]) == 2
    assert "whole groups of 128" in capsys.readouterr().err
    assert not out.exists()
