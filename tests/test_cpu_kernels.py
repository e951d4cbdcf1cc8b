"""miaotui's CPU int4 kernel: exact layout, products against the dequantized weight and PyTorch's kernel, quality on
ref-llama-16m, a compiled decode step through it, and the fallback when it is switched off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from conftest import sqnr_db

import miaotui
from miaotui.engine.generate import Engine
from miaotui.engine.sampling import SamplingParams
from miaotui.quantize import Int4WeightOnlyLinear, cpu_kernels
from miaotui.quantize.int4 import AVX512

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="needs AVX-512 BF16 and a C++ compiler")


@needs_kernel
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 9])  # one row: the tile path; more: passes of up to 4 rows
def test_int4_kernel_matches_the_dequantized_weight_and_pytorch(group_size, rows):
    torch.manual_seed(group_size + rows)
    n, k = 48, 512
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = torch.rand(n, k // group_size).to(torch.bfloat16) / 10
    zeros = torch.randn(n, k // group_size).to(torch.bfloat16) / 10
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    w = (q.float() - 8) * scales.float().repeat_interleave(group_size, 1) + zeros.float().repeat_interleave(
        group_size, 1
    )
    ref = x.float() @ w.T  # (rows, N)
    sz = torch.stack([scales.T, zeros.T], dim=1).contiguous()  # (G, 2, N)
    y = cpu_kernels.int4_mm(x, cpu_kernels.pack_int4(q), sz, group_size)
    assert y.shape == (rows, n) and y.dtype == torch.bfloat16
    assert sqnr_db(ref, y) > 45  # bf16 output rounding alone: about 50 dB
    theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x,
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1),
        group_size,
        torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous(),
    )
    assert sqnr_db(theirs.float(), y) > 45


@needs_kernel
def test_int4_layer_switches_layouts_by_input_dtype_without_loss():
    torch.manual_seed(0)
    lin = nn.Linear(384, 64, bias=True).to(torch.bfloat16)
    layer = Int4WeightOnlyLinear.from_float(lin, group_size=128)
    portable = layer.qweight.clone()
    x = torch.randn(3, 384, dtype=torch.bfloat16)
    y_ours = layer(x)
    assert layer.layout == AVX512
    y_fp16 = layer(x.half())  # PyTorch's kernel takes fp16: the weight moves to its layout
    assert layer.layout == "cpu" and y_fp16.dtype == torch.float16
    assert sqnr_db(y_ours.float(), y_fp16.float()) > 35
    assert torch.equal(layer(x), y_ours) and layer.layout == AVX512
    assert torch.equal(layer.portable_qweight(), portable)


@needs_kernel
@pytest.mark.slow
def test_int4_kernel_quality_on_the_reference_model(ref_llama, wikitext):
    """The kernel against PyTorch's on the same w4 model: the same next-token distributions (KL, top-1)."""
    lm = miaotui.load(ref_llama, dtype="bfloat16")
    miaotui.apply_recipe(lm, miaotui.get_recipe("w4-rtn"), progress=False)
    layers = [m for m in lm.model.modules() if isinstance(m, Int4WeightOnlyLinear)]
    ids = lm.tokenizer(wikitext.read_text()[:20000])["input_ids"][: 4 * 256]
    windows = torch.tensor(ids).view(4, 256)

    def logits() -> torch.Tensor:
        for m in layers:
            m._scales_zeros = None  # prepare again: the layout follows cpu_kernels.int4_fits
        with torch.inference_mode():
            out = lm.model(windows).logits.float()  # prefill: passes of 4 rows over 1,024 rows
            one = [lm.model(windows[:1, j : j + 1]).logits.float() for j in range(32)]  # one row: the tile path
        return out, torch.cat(one)

    ours, ours_step = logits()
    assert {m.layout for m in layers} == {AVX512}
    with cpu_kernels.switched_off():
        theirs, theirs_step = logits()
    assert {m.layout for m in layers} == {"cpu"}
    for a, b in ((ours, theirs), (ours_step, theirs_step)):
        kl = torch.nn.functional.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="none")
        assert kl.sum(-1).mean() < 2e-3  # measured: 1.5e-4 (prefill), 5e-6 (single rows)
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.97  # measured: 0.992, 1.0


@needs_kernel
def test_compiled_decode_runs_the_kernel(tiny_models):
    lm = miaotui.load(tiny_models["llama"], dtype="bfloat16")
    miaotui.apply_recipe(lm, miaotui.get_recipe("w4-rtn"), progress=False)
    layers = [m for m in lm.model.modules() if isinstance(m, Int4WeightOnlyLinear)]
    if not any(cpu_kernels.int4_fits(m.in_features) for m in layers):
        pytest.skip("the tiny model has no layer wide enough for the kernel")
    params = SamplingParams(max_tokens=12)
    eager = Engine(lm, max_len=32).generate([[5, 17, 300, 42, 7]], params)[0].token_ids
    assert AVX512 in {m.layout for m in layers}
    compiled = Engine(lm, max_len=32, compile=True).generate([[5, 17, 300, 42, 7]], params)[0].token_ids
    assert compiled == eager


def test_switched_off_the_layers_use_pytorch_kernels():
    code = (
        "import torch\n"
        "from miaotui.quantize import Int4WeightOnlyLinear, cpu_kernels\n"
        "layer = Int4WeightOnlyLinear.from_float(torch.nn.Linear(256, 32).to(torch.bfloat16))\n"
        "layer(torch.randn(1, 256, dtype=torch.bfloat16))\n"
        "print(cpu_kernels.available(), layer.layout)\n"
    )
    env = {**os.environ, "MIAOTUI_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "cpu"]
