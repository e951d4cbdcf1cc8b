"""miaotui's CPU int4, int8 and w8a8 kernels: products against the dequantized weights, the exported per-token
scheme and PyTorch's kernels, quality on ref-llama-16m, compiled decode steps through them, and the fallback when
they are switched off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from conftest import sqnr_db
from families import CORE, ENCODER_TYPES

import miaotui
from miaotui.engine.generate import Engine
from miaotui.engine.sampling import SamplingParams
from miaotui.quantize import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear, cpu_kernels
from miaotui.quantize.int4 import AVX512

DECODERS = [t for t in CORE if t not in ENCODER_TYPES]
needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="needs AVX-512 BF16 and a C++ compiler")
needs_w8a8 = pytest.mark.skipif(not cpu_kernels.w8a8_fits(), reason="needs AVX-512 VNNI and BF16, a C++ compiler")


def int4_weights(n: int, k: int, group_size: int) -> dict:
    """Random int4 codes with bf16 scales and zeros: the exact float weight (N, K) and the kernel's tensors."""
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // group_size) / 10).to(torch.bfloat16)
    zeros = (torch.randn(n, k // group_size) / 10).to(torch.bfloat16)
    per_column = lambda t: t.float().repeat_interleave(group_size, 1)  # noqa: E731
    return {
        "q": q,
        "scales": scales,
        "zeros": zeros,
        "w": (q.float() - 8) * per_column(scales) + per_column(zeros),
        "packed": cpu_kernels.pack_int4(q),
        "sz": torch.stack([scales.T, zeros.T], dim=1).contiguous(),  # (G, 2, N)
    }


@needs_kernel
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9, 16])  # up to MATMUL_ROWS: the kernel (one row; rows in pairs)
def test_int4_kernel_matches_the_dequantized_weight_and_pytorch(group_size, rows):
    torch.manual_seed(group_size + rows)
    n, k = 48, 512
    c = int4_weights(n, k, group_size)
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    y = cpu_kernels.int4_mm(x, c["packed"], c["sz"], group_size)
    assert y.shape == (rows, n) and y.dtype == torch.bfloat16
    assert sqnr_db(x.float() @ c["w"].T, y) > 45  # bf16 output rounding alone: about 50 dB
    theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x,
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(c["q"].to(torch.int32), 1),
        group_size,
        torch.stack([c["scales"], c["zeros"]], dim=-1).transpose(0, 1).contiguous(),
    )
    assert sqnr_db(theirs.float(), y) > 45


@needs_kernel
@pytest.mark.parametrize("n, k", [(48, 384), (20, 64)])
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 9])
def test_int8_kernel_matches_the_dequantized_weight_and_pytorch(n, k, rows):
    torch.manual_seed(rows + n)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)  # the full range: GPTQ's codes reach -128
    scale = (torch.rand(n) / 50).to(torch.bfloat16)
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    ref = x.float() @ (q.float() * scale.float()[:, None]).T  # (rows, N)
    y = cpu_kernels.int8_mm(x, q, scale)
    assert y.shape == (rows, n) and y.dtype == torch.bfloat16
    assert sqnr_db(ref, y) > 45
    assert sqnr_db(torch.ops.aten._weight_int8pack_mm(x, q, scale).float(), y) > 45


def per_token_product(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """The exported scheme in plain PyTorch: x (M, K) to symmetric int8 per row, exact integer sums, then scaled."""
    xf = x.float()
    xs = xf.abs().amax(1, keepdim=True) / 127  # (M, 1)
    codes = torch.round(xf / xs.clamp(min=1e-30)).clamp(-127, 127)  # (M, K)
    y = (codes.double() @ q.double().T).float() * xs * scale  # (M, N)
    return y if bias is None else y + bias.float()


@needs_w8a8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k", [(48, 384), (20, 72), (17, 4096), (40, 70)])  # 4096: rows in one cache set; 70: K % 4
@pytest.mark.parametrize("rows", [1, 3, 5, 21, 83])  # one row; 2 + 1; 4 + 1; 5 x 4 + 1; 5 x 16 (tiles) + 2 + 1
def test_w8a8_kernel_is_the_exported_per_token_product(n, k, rows, dtype):
    torch.manual_seed(rows + n + k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) / 50
    bias = torch.randn(n) if n % 2 == 0 else None
    x = (torch.randn(rows, k) * torch.logspace(-3, 3, rows)[:, None]).to(dtype)  # rows 10^6 apart in magnitude
    x[rows // 2] = 0  # an all-zero row: zero codes, the bias alone
    y = cpu_kernels.w8a8_mm(x, q, scale, None if bias is None else bias.to(dtype))
    assert y.shape == (rows, n) and y.dtype == dtype
    ref = per_token_product(x, q, scale, None if bias is None else bias.to(dtype))
    for row in range(rows):  # every row on its own scale; fp32: the same codes and sums, the scaling's rounding only
        torch.testing.assert_close(
            y[row].float(),
            ref[row].to(dtype).float(),
            rtol=1e-5 if dtype == torch.float32 else 1e-2,
            atol=1e-6 * ref[row].abs().max().item() + 1e-30,
        )


@needs_w8a8
def test_w8a8_layer_runs_the_kernel_and_pytorch_s_path_agrees():
    """The kernel (symmetric per-token codes) against fbgemm's path where it is off (every row normalised, then
    asymmetric uint8 codes): two roundings of the same product, fp32 and bf16, with a bias."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=True)
    layer = Int8DynamicLinear.from_float(lin)
    x = torch.randn(2, 9, 256)
    ours = layer(x)
    assert layer._cpu_kernel is True and ours.shape == (2, 9, 96)
    assert sqnr_db(per_token_product(x.view(-1, 256), layer.qweight, layer.scale, layer.bias), ours.view(-1, 96)) > 60
    assert layer(x.bfloat16()).dtype == torch.bfloat16 and layer(x.half()).dtype == torch.float16
    with cpu_kernels.switched_off():
        layer._cpu_kernel = None
        theirs = layer(x)
    assert layer._cpu_kernel is False
    assert sqnr_db(lin(x), ours) > 35 and sqnr_db(ours, theirs) > 35


@needs_kernel
def test_dequantized_weights_are_the_exact_values_rounded_once():
    """Past MATMUL_ROWS rows (prefill) the layers multiply through the dequantized weight in bf16."""
    torch.manual_seed(0)
    n, k, g = 48, 384, 64
    c = int4_weights(n, k, g)
    w, packed, sz = c["w"], c["packed"], c["sz"]
    assert torch.equal(torch.ops.miaotui_cpu.int4_dequantize(packed, sz, g), w.to(torch.bfloat16))
    q8, s8 = torch.randint(-128, 128, (n, k), dtype=torch.int8), (torch.rand(n) / 50).to(torch.bfloat16)
    w8 = q8.float() * s8.float()[:, None]
    assert torch.equal(torch.ops.miaotui_cpu.int8_dequantize(q8, s8), w8.to(torch.bfloat16))
    x = torch.randn(cpu_kernels.MATMUL_ROWS + 1, k, dtype=torch.bfloat16)
    assert sqnr_db(x.float() @ w.T, cpu_kernels.int4_linear(x, packed, sz, g)) > 40
    assert sqnr_db(x.float() @ w8.T, cpu_kernels.int8_linear(x, q8, s8)) > 40


@needs_kernel
def test_int8_layer_runs_the_kernel_for_bf16_only():
    torch.manual_seed(0)
    lin = nn.Linear(128, 32, bias=True)
    layer = Int8WeightOnlyLinear.from_float(lin.to(torch.bfloat16))
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    expected = torch.ops.aten._weight_int8pack_mm(x, layer.qweight, layer.scale) + layer.bias
    assert sqnr_db(expected.float(), layer(x).float()) > 40 and layer._cpu_kernel is True
    assert layer(x.half()).dtype == torch.float16  # PyTorch's kernel for fp16
    narrow = Int8WeightOnlyLinear.from_float(nn.Linear(96, 32).to(torch.bfloat16))  # 96: not a multiple of 64
    narrow(x[:, :96])
    assert narrow._cpu_kernel is False


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
@pytest.mark.parametrize("recipe, kind", [("w4-rtn", Int4WeightOnlyLinear), ("w8", Int8WeightOnlyLinear)])
def test_kernel_quality_on_the_reference_model(ref_llama, wikitext, recipe, kind):
    """Our kernels against PyTorch's on the same quantized model: the same next-token distributions (KL, top-1)."""
    lm = miaotui.load(ref_llama, dtype="bfloat16")
    miaotui.apply_recipe(lm, miaotui.get_recipe(recipe), progress=False)
    layers = [m for m in lm.model.modules() if isinstance(m, kind)]
    ids = lm.tokenizer(wikitext.read_text()[:20000])["input_ids"][: 4 * 256]
    windows = torch.tensor(ids).view(4, 256)

    int4 = kind is Int4WeightOnlyLinear

    def logits() -> torch.Tensor:
        for m in layers:  # choose the kernel again: it follows cpu_kernels.switched_off
            if int4:
                m._scales_zeros = None
            else:
                m._cpu_kernel = None
        with torch.inference_mode():
            out = lm.model(windows).logits.float()  # prefill: 1,024 rows, the dequantized weight through F.linear
            one = [lm.model(windows[:1, j : j + 1]).logits.float() for j in range(32)]  # one row: the tile path
        return out, torch.cat(one)

    def kernels() -> set:
        return {m.layout if int4 else m._cpu_kernel for m in layers}

    ours, ours_step = logits()
    assert kernels() == {AVX512 if int4 else True}
    with cpu_kernels.switched_off():
        theirs, theirs_step = logits()
    assert kernels() == {"cpu" if int4 else False}
    for a, b in ((ours, theirs), (ours_step, theirs_step)):
        kl = torch.nn.functional.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="none")
        assert kl.sum(-1).mean() < 2e-3  # measured, w4 / w8: 2.2e-4 / 2.1e-4 (prefill), 5e-6 / 1e-5 (single rows)
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.97  # measured: 0.988 / 0.986, 1.0 / 1.0
    nll = [
        torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1), windows[:, 1:].flatten()) for lg in (ours, theirs)
    ]
    assert nll[0] < nll[1] * 1.002  # measured, w4 / w8: 4.8571 against 4.8576, 4.8415 against 4.8416


@needs_kernel
@pytest.mark.parametrize("recipe", ["w4-rtn", "w8", "w8a8"])
def test_compiled_decode_runs_the_kernels(tiny_models, recipe):
    lm = miaotui.load(tiny_models["llama"], dtype="bfloat16")
    miaotui.apply_recipe(lm, miaotui.get_recipe(recipe), progress=False)
    params = SamplingParams(max_tokens=12)
    eager = Engine(lm, max_len=32).generate([[5, 17, 300, 42, 7]], params)[0].token_ids
    modules = list(lm.model.modules())
    assert any(getattr(m, "layout", None) == AVX512 or getattr(m, "_cpu_kernel", None) for m in modules)
    compiled = Engine(lm, max_len=32, compile=True).generate([[5, 17, 300, 42, 7]], params)[0].token_ids
    assert compiled == eager


@needs_kernel
@pytest.mark.parametrize(
    "model_type, recipe", [(t, "w4-rtn" if i % 2 else "w8") for i, t in enumerate(DECODERS)]
)  # each family through one of the two kernels, in turn; Llama through both (test_compiled_decode_runs_the_kernels)
def test_every_family_decodes_compiled_through_the_kernels(tiny_models, model_type, recipe):
    """Each decoder family in bf16 (GPT-2's Conv1D, OPT's biases, Phi-3's fused projections, Gemma's head
    dimension): some layers run the kernel, and fed the same 6 tokens, the compiled step's logits match the
    eager step's (cosine > 0.999; bf16 rounds differently where the compiled graph fuses operations)."""
    lm = miaotui.load(tiny_models[model_type], dtype="bfloat16")
    miaotui.apply_recipe(lm, miaotui.get_recipe(recipe), progress=False)
    prompt, fed = [5, 17, 300, 42, 7], [64, 3, 900, 12, 8, 1000]
    logits = []
    for engine in (Engine(lm, max_len=32), Engine(lm, max_len=32, compile=True)):
        runner = engine.runner
        runner.extend(torch.tensor([0]), [prompt])
        steps = [runner.decode(torch.tensor([t]), torch.tensor([len(prompt) + i])) for i, t in enumerate(fed)]
        logits.append(torch.cat(steps).float())  # (6, V)
    modules = list(lm.model.modules())
    assert any(getattr(m, "layout", None) == AVX512 or getattr(m, "_cpu_kernel", None) for m in modules)
    assert torch.nn.functional.cosine_similarity(logits[0], logits[1]).min().item() > 0.999


def test_switched_off_the_layers_use_pytorch_kernels():
    code = (
        "import torch\n"
        "from miaotui.quantize import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear, cpu_kernels\n"
        "w4 = Int4WeightOnlyLinear.from_float(torch.nn.Linear(256, 32).to(torch.bfloat16))\n"
        "w8 = Int8WeightOnlyLinear.from_float(torch.nn.Linear(256, 32).to(torch.bfloat16))\n"
        "w8a8 = Int8DynamicLinear.from_float(torch.nn.Linear(256, 32))\n"
        "x = torch.randn(1, 256, dtype=torch.bfloat16)\n"
        "w4(x), w8(x), w8a8(x)\n"
        "print(cpu_kernels.available(), w4.layout, w8._cpu_kernel, w8a8._cpu_kernel)\n"
    )
    env = {**os.environ, "MIAOTUI_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "cpu", "False", "False"]
